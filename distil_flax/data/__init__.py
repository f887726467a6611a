"""Host-side input pipeline: corpus → prepared token-id shards → packed rows → per-host batches.

Preparation (`prepare.py`, once per corpus and tokenizer) writes sharded ArrayRecord files of
token ids; training reads them through a resumable grain pipeline (`loader.py`). Only integer ids
leave this package; masking, labels and losses are computed on device.
"""

from distil_flax.data.corpus import read_documents
from distil_flax.data.corpus import SOURCES
from distil_flax.data.corpus import Tally
from distil_flax.data.loader import BatchIterator
from distil_flax.data.loader import build_datasets
from distil_flax.data.loader import eval_batches
from distil_flax.data.loader import PackedSplit
from distil_flax.data.loader import token_counts
from distil_flax.data.packing import pack_documents
from distil_flax.data.packing import padding_fraction
from distil_flax.data.records import PreparedDataset
from distil_flax.data.tokenizer import load_tokenizer
from distil_flax.data.tokenizer import Tokenizer
from distil_flax.data.tokenizer import train_sentencepiece
from distil_flax.data.tokenizer import train_wordpiece

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
