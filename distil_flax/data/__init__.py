"""Host-side input pipeline: corpus → prepared token-id shards → packed rows → per-host batches.

Preparation (`prepare.py`, once per corpus and tokenizer) reads the corpus (`corpus.py`,
`readers.py`) and tokenizes it unit by unit (`units.py`) into sharded ArrayRecord files of token
ids; training opens them (`loader.py`) and reads them through a resumable grain pipeline
(`batches.py`). Only integer ids leave this package; masking, labels and losses are computed on
device.
"""

from distil_flax.data.batches import BatchIterator, eval_batches
from distil_flax.data.corpus import SOURCES, Tally
from distil_flax.data.loader import PackedSplit, build_datasets, token_counts
from distil_flax.data.packing import pack_documents, padding_fraction
from distil_flax.data.readers import read_documents
from distil_flax.data.records import PreparedDataset
from distil_flax.data.roberta_vocab import train_bpe
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
    "train_bpe",
    "train_sentencepiece",
    "train_wordpiece",
]
