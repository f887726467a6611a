"""DistilBERT: a 6-layer student distilled from BERT-base (Sanh et al., 2019, arXiv:1910.01108).

    python -m distil_flax.data.prepare --config=configs/distil6.py \
        --config.data.tokenizer=vocab.txt --config.data.dir=data/wiki_en
    python -m distil_flax.main --config=configs/distil6.py --workdir=runs/distil6 \
        --config.teacher.checkpoint=runs/bert_base --config.data.tokenizer=vocab.txt \
        --config.data.dir=data/wiki_en

The released model's recipe: T=2, α_ce=5, α_mlm=2, α_cos=1, L_ce on every real token, student
initialised from teacher layers [0, 2, 4, 7, 9, 11], batches of ~4K sequences of 512 tokens
(through gradient accumulation), AdamW lr 5e-4 with 5 % warmup, 3 epochs, mlm_smoothing 0.7.

Data: English Wikipedia from TFDS, prepared in ArrayRecord format beforehand (`tfds build
wikipedia/20230601.en --file_format=array_record`, on Apache Beam for the full dump), then
tokenized into `data.dir` by the first command. The paper added Toronto BookCorpus, which TFDS
does not carry: for the full mix, prepare JSONL or Parquet files of both instead
(`--config.data.source=jsonl --config.data.paths='corpus/*.jsonl'`).
"""

from distil_flax.config import base_config


def get_config():
    c = base_config()  # Every default above is the recipe; the run only needs paths.
    c.data.source = "tfds"
    c.data.paths = "wikipedia/20230601.en"
    c.data.text_field = "text"
    return c
