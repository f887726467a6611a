"""The quickstart's teacher: a small BERT pretrained on the bundled corpus in a few CPU minutes.

    python -m distil_flax.data.prepare --config=configs/quickstart_teacher.py
    python -m distil_flax.main --config=configs/quickstart_teacher.py \
        --workdir=runs/quickstart/teacher

Needs `runs/quickstart/vocab.txt`: `make quickstart` trains it and prepares the bundled corpus
into `runs/quickstart/data` first. `:tiny` is a seconds-long version for tests.
"""

from distil_flax.config import base_config, shrink_for_tests
from distil_flax.model import model_config


def get_config(preset: str = ""):
    c = base_config()
    c.model = model_config("mini")
    c.model.max_position_embeddings = 128
    c.model.dtype = "float32"  # CPUs have no fast bfloat16 matmuls.
    c.loss.alpha_ce = 0.0
    c.loss.alpha_cos = 0.0
    c.loss.alpha_mlm = 1.0
    c.masking.smoothing = 0.0  # BERT masks uniformly.
    c.init.from_teacher = False
    c.data.tokenizer = "runs/quickstart/vocab.txt"
    c.data.dir = "runs/quickstart/data"  # Prepared once; the student reads the same shards.
    c.data.seq_len = 128
    c.train.batch_size = 32
    c.train.micro_batch_size = 0
    c.train.num_steps = 600
    c.train.learning_rate = 1e-3
    c.train.warmup_fraction = 0.05
    c.train.weight_decay = 0.01
    c.train.log_every = 100
    c.train.eval_every = 300
    c.train.eval_batches = 10
    c.train.checkpoint_every = 300
    if preset == "tiny":
        shrink_for_tests(c, "tiny")
        c.data.dir = ""  # Prepared on first use into data.cache_dir, keyed by the tokenizer.
        c.train.batch_size = 8
    elif preset:
        raise ValueError(f"unknown preset {preset!r}; known: tiny")
    return c

