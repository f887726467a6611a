"""Pretrains a BERT-base teacher with the masked-LM loss alone (no teacher: α_ce = α_cos = 0).

    python -m distil_flax.main --config=configs/bert_teacher.py --workdir=runs/bert_base \
        --config.data.tokenizer=vocab.txt --config.data.source=jsonl \
        --config.data.paths='corpus/*.jsonl'

RoBERTa-style large-batch schedule (Liu et al., 2019): 4K sequences per update, lr 6e-4,
6 % warmup, weight decay 0.01. Token types and the pooler are kept so that the teacher has BERT's
exact shape (and exports as `BertForMaskedLM`).
"""

from distil_flax.config import base_config
from distil_flax.model import model_config


def get_config():
    c = base_config()
    c.model = model_config("base")
    c.loss.alpha_ce = 0.0
    c.loss.alpha_cos = 0.0
    c.loss.alpha_mlm = 1.0
    c.masking.smoothing = 0.0  # BERT masks uniformly.
    c.init.from_teacher = False
    c.train.num_steps = 100_000
    c.train.learning_rate = 6e-4
    c.train.warmup_fraction = 0.06
    c.train.weight_decay = 0.01
    return c
