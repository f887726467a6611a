"""Host-side input pipeline: corpus → prepared token-id shards → packed rows → per-host batches.

Preparation (`prepare.py`, once per corpus and tokenizer) writes sharded ArrayRecord files of
token ids; training reads them through a resumable grain pipeline (`loader.py`). Only integer ids
leave this package; masking, labels and losses are computed on device.
"""

from distil_flax.data.corpus import SOURCES, Tally, read_documents
from distil_flax.data.loader import (
    BatchIterator,
    PackedSplit,
    build_datasets,
    eval_batches,
    token_counts,
)
from distil_flax.data.packing import pack_documents, padding_fraction
from distil_flax.data.records import PreparedDataset
from distil_flax.data.tokenizer import (
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
    train_wordpiece,
)

__all__ = [
    "BatchIterator",
    "PackedSplit",
    "PreparedDataset",
    "SOURCES",
    "Tally",
    "Tokenizer",
    "build_datasets",
    "eval_batches",
    "load_tokenizer",
    "pack_documents",
    "padding_fraction",
    "read_documents",
    "token_counts",
    "train_sentencepiece",
    "train_wordpiece",
]
