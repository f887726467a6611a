"""Fine-tunes an encoder for SQuAD v1.1 extractive QA (Rajpurkar et al., 2016).

    python -m distil_flax.finetune --config=configs/squad.py --workdir=runs/squad \
        --config.init.checkpoint=runs/distil6 --config.data.dir=squad

`data.dir` holds the official `train-v1.1.json` and `dev-v1.1.json` (or
`--config.data.source=tfds` reads prepared `squad/v1.1`). BERT's SQuAD recipe: windows of 384
tokens, 128 apart, questions cut to 64 tokens, answers of at most 30 tokens chosen from the 20
best starts and ends; batch 32, AdamW lr 5e-5 with 10 % warmup, 2 epochs. Reports the official
script's exact match and F1 on dev (the DistilBERT paper: 77.7/85.8; BERT-base 81.2/88.5).

"DistilBERT (D)" (79.1/86.9 in the paper): add `--config.distill.teacher=runs/squad_bert` (a BERT
fine-tuned with this config): loss = α·T²·KL over the start and end distributions + (1 − α)·CE,
α = 0.5, T = 2 (the reference `run_squad_w_distillation.py`). `:preset=tiny` is for tests.
"""

from distil_flax.downstream import config as finetune_config


def get_config(arg: str = ""):
    task, preset = finetune_config.parse_arg(arg, default_task="squad")
    if task != "squad":
        raise ValueError(f"configs/squad.py runs task squad, not {task!r}")
    c = finetune_config.base_config()
    c.task.name = "squad"
    c.data.max_length = 384
    c.data.doc_stride = 128
    c.data.max_query_length = 64
    c.train.num_epochs = 2.0
    c.train.eval_batch_size = 256
    if preset == "tiny":
        finetune_config.shrink_for_tests(c)
    return c
