"""The baseline a distilled student must beat: the same 6-layer student, MLM loss only, random init.

    python -m distil_flax.main --config=configs/mlm_baseline.py --workdir=runs/mlm_baseline \
        --config.data.tokenizer=vocab.txt --config.data.source=jsonl \
        --config.data.paths='corpus/*.jsonl'

Identical to configs/distil6.py in data, steps and optimizer, so that the two runs differ only by
the teacher (the "MLM-only" row of the DistilBERT paper's ablation).
"""

from distil_flax.config import base_config


def get_config():
    c = base_config()
    c.loss.alpha_ce = 0.0
    c.loss.alpha_cos = 0.0
    c.loss.alpha_mlm = 1.0
    c.init.from_teacher = False
    return c
