"""Host-side input pipeline: documents → token ids → packed rows → per-host batches.

Only integer ids leave this package; masking, labels and losses are computed on device.
"""

from distil_flax.data.corpus import read_documents
from distil_flax.data.packing import pack_documents
from distil_flax.data.packing import padding_fraction
from distil_flax.data.pipeline import BatchIterator
from distil_flax.data.pipeline import build_datasets
from distil_flax.data.pipeline import eval_batches
from distil_flax.data.pipeline import token_counts
from distil_flax.data.tokenizer import load_tokenizer
from distil_flax.data.tokenizer import Tokenizer
from distil_flax.data.tokenizer import train_sentencepiece
from distil_flax.data.tokenizer import train_wordpiece

__all__ = [
    "BatchIterator",
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
