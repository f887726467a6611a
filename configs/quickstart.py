"""The quickstart's student: distils `runs/quickstart/teacher` into a 2-layer student on CPU.

    python -m distil_flax.data.prepare --config=configs/quickstart.py
    python -m distil_flax.main --config=configs/quickstart.py --workdir=runs/quickstart/student

DistilBERT's recipe at toy size: half the teacher's layers (every other one), triple loss with
T=2 and 5/2/1 weights, L_ce on every real token. `:tiny` is a seconds-long version for tests.

`:masked_ce` is the recipe a logits cache serves: L_ce at the masked positions only, and no L_cos
(the cache holds the teacher's logits there, not its hidden states). `:cached` is the same run
reading the teacher's top-64 logits at 4 static maskings instead of running it:

    python -m distil_flax.cache_teacher --config=configs/quickstart.py:masked_ce \
        --targets=logits --output=runs/quickstart/teacher_logits
    python -m distil_flax.main --config=configs/quickstart.py:cached \
        --workdir=runs/quickstart/student_cached
"""

from distil_flax.config import base_config, shrink_for_tests
from distil_flax.model import model_config


def get_config(preset: str = ""):
    c = base_config()
    c.model = model_config("mini_student")
    c.model.max_position_embeddings = 128
    c.model.dtype = "float32"  # CPUs have no fast bfloat16 matmuls.
    c.teacher.checkpoint = "runs/quickstart/teacher"
    c.teacher.param_dtype = "float32"
    c.init.layer_map = (0, 2)  # Every other layer of the 4-layer teacher.
    c.data.tokenizer = "runs/quickstart/vocab.txt"
    c.data.dir = "runs/quickstart/data"  # Prepared by `make quickstart` (the teacher's too).
    c.data.seq_len = 128
    c.train.batch_size = 32
    c.train.micro_batch_size = 0
    c.train.num_steps = 300
    c.train.learning_rate = 1e-3
    c.train.log_every = 50
    c.train.eval_every = 150
    c.train.eval_batches = 10
    c.train.checkpoint_every = 150
    if preset == "tiny":
        shrink_for_tests(c, "tiny_student")
        c.data.dir = ""  # Prepared on first use into data.cache_dir, keyed by the tokenizer.
        c.init.layer_map = (1,)
        c.train.batch_size = 16
        c.train.micro_batch_size = 8  # Exercises gradient accumulation.
    elif preset in ("masked_ce", "cached"):
        c.loss.restrict_ce_to_mask = True
        c.loss.alpha_cos = 0.0
        if preset == "cached":
            c.teacher.cache = "runs/quickstart/teacher_logits"
    elif preset:
        raise ValueError(f"unknown preset {preset!r}; known: tiny, masked_ce, cached")
    return c
