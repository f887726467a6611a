"""Sentence embeddings from the one encoder: tokenise, pack, encode, pool.

Sentences are packed several to a row exactly as training rows are (`data/packing.py`): each is
one `[CLS] … [SEP]` segment, attention stays inside a segment and positions restart in each, so a
packed sentence is encoded as if it were alone. Pooling then reads each segment back out:

    segment_ids   1 1 1 1 1 2 2 2 2 0 0     hidden [batch, length, d]
                  └─ s1 ──┘ └ s2 ─┘         → pool_segments → [batch, max_segments, d]

Pooling itself is `model/pooling.py` (pure JAX, shared with the embedding-distillation loss).
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from distil_flax.data import packing
from distil_flax.data.tokenizer import Tokenizer
from distil_flax.model import Encoder, make_encoder
from distil_flax.model.encoder import encoder_only  # noqa: F401 (embedding_encoder's params)
from distil_flax.model.pooling import check_pooling, pool_segments
from distil_flax.training.progress import Progress

Array = jax.Array

# ----------------------------------------------------------------------------------------------
# Packing sentences, and encoding them.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackedSentences:
    """Sentences packed into rows, and where each one went.

    Attributes:
      rows: `input_ids`, `segment_ids`, `positions`, int32 [rows, length] (`data.packing` layout).
      row: [sentences] the row holding each sentence.
      segment: [sentences] its segment number in that row (1, 2, …).
      max_segments: the most segments any row holds, rounded up to a power of two (so files of
        similar sentences share one compiled program).
      truncated: how many sentences were cut to fit `length`.
    """

    rows: dict[str, np.ndarray]
    row: np.ndarray
    segment: np.ndarray
    max_segments: int
    truncated: int


def pack_sentences(token_ids: Sequence[Sequence[int]], max_len: int, cls_id: int, sep_id: int,
                   pad_id: int) -> PackedSentences:
    """Packs sentences (ids without special tokens) as `[CLS] … [SEP]` segments of rows.

    A sentence longer than `max_len - 2` tokens keeps its first `max_len - 2` (as transformers'
    truncation does); an empty one is `[CLS] [SEP]`. Rows are filled best-fit decreasing.

    Raises:
      ValueError: `max_len` < 3, or no sentences.
    """
    if max_len < 3:
        raise ValueError(f"max_len must be at least 3 ([CLS] token [SEP]), got {max_len}")
    if not len(token_ids):
        raise ValueError("no sentences to embed")
    pieces = [np.asarray(ids, np.int32).reshape(-1)[:max_len - 2] for ids in token_ids]
    piece_lens = np.array([len(p) for p in pieces], np.int64)
    truncated = sum(len(ids) > max_len - 2 for ids in token_ids)
    seg_rows, seg_starts = packing.assign_rows(piece_lens + 2, max_len)
    n_rows = int(seg_rows.max()) + 1
    rows = packing.write_rows(np.concatenate(pieces), piece_lens, seg_rows, seg_starts, n_rows,
                              max_len, cls_id, sep_id, pad_id)
    segment = rows["segment_ids"][seg_rows, seg_starts].astype(np.int64)
    max_segments = 1 << int(segment.max() - 1).bit_length()
    return PackedSentences(rows, seg_rows, segment, max_segments, int(truncated))


def tokenize_and_pack(tokenizer: Tokenizer, sentences: Sequence[str],
                      max_len: int) -> PackedSentences:
    """`pack_sentences` of the sentences as `tokenizer` encodes them."""
    return pack_sentences(tokenizer.encode_batch(list(sentences)), max_len, tokenizer.cls_id,
                          tokenizer.sep_id, tokenizer.pad_id)


def embedding_encoder(model_cfg: ml_collections.ConfigDict, dtype: str | None = None) -> Encoder:
    """The encoder of a model section, set up to embed packed sentences.

    Attention is restricted to segments whatever the run used (a fine-tuning run's "lengths"
    mask would let packed sentences see each other), and neither the MLM head nor the pooler is
    built: `encoder_only(params)` are its parameters.

    Args:
      model_cfg: a model section (a run's config.json, or `hf.load_hf_checkpoint`'s).
      dtype: compute dtype; None keeps the section's.
    """
    c = ml_collections.ConfigDict(model_cfg.to_dict())
    c.attention_mask = "segments"
    if dtype:
        c.dtype = dtype
    return make_encoder(c).clone(use_mlm_head=False, use_pooler=False)


# Static: a Linen module hashes by its fields, so equal encoders (a student and its init-only
# twin) and later calls with the same shapes reuse one compiled program.
@functools.partial(jax.jit, static_argnames=("model", "max_segments", "pooling"))
def _encode(params, input_ids, segment_ids, positions, *, model: Encoder, max_segments: int,
            pooling: str) -> Array:
    _, out = model.apply({"params": params}, input_ids, segment_ids, positions)
    return pool_segments(out["hidden"], segment_ids, max_segments, pooling)[0]


def embed_packed(model: Encoder, params: dict[str, Any], packed: PackedSentences, *,
                 pooling: str = "mean", batch_size: int = 64,
                 progress: Progress | None = None) -> np.ndarray:
    """Embeds packed sentences, in their original order.

    Args:
      model: from `embedding_encoder`.
      params: its parameters (`encoder_only` of a full tree), on the device to run on.
      packed: from `pack_sentences` / `tokenize_and_pack`.
      pooling: "mean" or "cls".
      batch_size: rows per forward pass (the last batch is padded with empty rows, so one
        program serves every batch).
      progress: counts the sentences embedded.

    Returns:
      float32 [sentences, d].
    """
    check_pooling(pooling)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    encode = functools.partial(_encode, model=model, max_segments=packed.max_segments,
                               pooling=pooling)
    rows = packed.rows
    n_rows = rows["input_ids"].shape[0]
    batch = min(batch_size, n_rows)
    pooled = []
    per_row = np.bincount(packed.row, minlength=n_rows)  # Sentences in each row.
    for start in range(0, n_rows, batch):
        chunk = [rows[k][start:start + batch] for k in packing.FIELDS]
        missing = batch - chunk[0].shape[0]
        if missing:  # Padding rows: segment 0 everywhere, never read.
            chunk = [np.pad(a, ((0, missing), (0, 0))) for a in chunk]
        pooled.append(np.asarray(encode(params, *chunk))[:batch - missing])
        if progress is not None:
            progress.update(int(per_row[start:start + batch].sum()))
    by_row = np.concatenate(pooled)  # [rows, max_segments, d]
    return by_row[packed.row, packed.segment - 1]


def embed(model: Encoder, params: dict[str, Any], tokenizer: Tokenizer,
          sentences: Sequence[str], *, pooling: str = "mean", max_len: int = 128,
          batch_size: int = 64) -> np.ndarray:
    """Embeddings of `sentences`, float32 [sentences, d] (see `embed_packed`)."""
    return embed_packed(model, params, tokenize_and_pack(tokenizer, sentences, max_len),
                        pooling=pooling, batch_size=batch_size)
