"""The quickstart's teacher: a small BERT pretrained on the bundled corpus in a few CPU minutes.

    python -m distil_flax.main --config=configs/quickstart_teacher.py \
        --workdir=runs/quickstart/teacher

Needs `runs/quickstart/vocab.txt`: `make quickstart` trains it first. `:tiny` is a
seconds-long version for tests.
"""

from distil_flax.config import base_config
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
        shrink_for_tests(c)
    elif preset:
        raise ValueError(f"unknown preset {preset!r}; known: tiny")
    return c


def shrink_for_tests(c):
    """Seconds on a CPU: a 2-layer model of width 32 on 32-token rows."""
    c.model = model_config("tiny")
    c.model.max_position_embeddings = 32
    c.model.dtype = "float32"
    c.data.seq_len = 32
    c.data.eval_every = 20
    c.train.batch_size = 8
    c.train.num_steps = 20
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.eval_batches = 2
    c.train.checkpoint_every = 10
