"""Fine-tunes an encoder for IMDb review sentiment (Maas et al., 2011).

    python -m distil_flax.finetune --config=configs/imdb.py --workdir=runs/imdb \
        --config.init.checkpoint=runs/distil6 --config.data.dir=aclImdb

`data.dir` is the unpacked `aclImdb/` (train/ and test/ with neg/ and pos/ review files), or
`--config.data.source=tfds` reads prepared `imdb_reviews`. Reviews are long: rows of 512 tokens
(the start of each review), batch 32, AdamW lr 2e-5 with 10 % warmup, 2 epochs. Reports accuracy
on the 25k test reviews (the DistilBERT paper: 92.82; BERT-base 93.46). `:preset=tiny` is for
tests.
"""

from distil_flax.downstream import config as finetune_config


def get_config(arg: str = ""):
    task, preset = finetune_config.parse_arg(arg, default_task="imdb")
    if task != "imdb":
        raise ValueError(f"configs/imdb.py runs task imdb, not {task!r}")
    c = finetune_config.base_config()
    c.task.name = "imdb"
    c.data.max_length = 512
    c.train.learning_rate = 2e-5
    c.train.num_epochs = 2.0
    if preset == "tiny":
        finetune_config.shrink_for_tests(c)
    return c
