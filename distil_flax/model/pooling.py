"""Sentence embeddings out of packed rows: one vector per segment, in pure JAX.

Used inside the training step (the sentence-embedding distillation terms pool student and teacher
on the same packed batch) and by evaluation and export (`embeddings/embed.py`). Pooling follows
sentence-transformers: "mean" averages every real token of the segment, [CLS] and [SEP] included
(its attention-mask mean); "cls" takes the segment's first token, [CLS].
"""

import jax
import jax.numpy as jnp

Array = jax.Array

POOLINGS = ("mean", "cls")


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def pool_segments(hidden: Array, segment_ids: Array, max_segments: int,
                  pooling: str = "mean") -> tuple[Array, Array]:
    """One vector per packed segment.

    Args:
      hidden: [batch, length, d] final hidden states.
      segment_ids: [batch, length] segment of each token, 1, 2, … per row; 0 on padding.
      max_segments: segments per row to return (static); rows hold at most this many.
      pooling: "mean" (over the segment's real tokens) or "cls" (the segment's first token).

    Returns:
      (embeddings [batch, max_segments, d] float32, present [batch, max_segments] bool): slot s
      holds segment s + 1 of the row; slots of segments a row lacks are zeros and not present.
    """
    check_pooling(pooling)
    member = segment_ids[:, :, None] == jnp.arange(1, max_segments + 1)  # [batch, length, S]
    if pooling == "cls":
        # A segment's first token is where its running count of members reaches 1.
        member = member & (jnp.cumsum(member, axis=1) == 1)
    weights = member.astype(jnp.float32)
    counts = jnp.sum(weights, axis=1)  # [batch, S]
    # HIGHEST: a sum of hidden states, not a learned matmul; TF32 would cost ~1e-3 relative.
    summed = jnp.einsum("bls,bld->bsd", weights, hidden.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    return summed / jnp.maximum(counts, 1.0)[..., None], counts > 0


def pool_rows(hidden: Array, segment_ids: Array, pooling: str = "mean") -> Array:
    """One vector per row, for rows that hold one sequence each.

    Args:
      hidden: [batch, length, d] final hidden states.
      segment_ids: [batch, length]; > 0 on the row's tokens, 0 on padding (an attention mask
        serves). Rows must not be packed: every non-zero id counts as the same sequence.
      pooling: "mean" or "cls" (the row's first real token).

    Returns:
      [batch, d] float32.
    """
    return pool_segments(hidden, (segment_ids > 0).astype(jnp.int32), 1, pooling)[0][:, 0]
