"""What the [batch, heads, length, length] score terms share: scaled scores, the (query, key)
pairs attention can see, and the sum over chunks of query rows that bounds their memory.

Those terms (`attention_scores`, `relations`) go over query rows chunk by chunk under
`jax.checkpoint`: the forward holds one chunk of scores at a time and the backward recomputes
each chunk instead of keeping all of them, so no full score array exists in either direction.
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def split_heads(x: Array, heads: int) -> Array:
    """[batch, length, width] or [batch, length, h, d] → [batch, length, heads, width / heads]."""
    x = x.reshape(*x.shape[:2], -1)
    if x.shape[-1] % heads:
        raise ValueError(f"a width of {x.shape[-1]} does not split into {heads} relation heads")
    return x.reshape(*x.shape[:2], heads, x.shape[-1] // heads)


def scaled_scores(a: Array, b: Array) -> Array:
    """a [batch, c, h, d], b [batch, length, h, d] → a·bᵀ/√d [batch, h, c, length] in float32."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", a, b,
                        preferred_element_type=jnp.promote_types(a.dtype, jnp.float32))
    return scores / math.sqrt(a.shape[-1])


def visible(query_segments: Array, key_segments: Array) -> Array:
    """[batch, c, length]: key in the query's segment, both real."""
    return (query_segments[:, :, None] == key_segments[:, None, :]) & (
        query_segments[:, :, None] > 0)


def sum_over_row_chunks(row_sums: Callable, chunk: int, rows: Any) -> Any:
    """Σ over chunks of query rows of `row_sums(chunk_of_rows)`.

    Args:
      row_sums: rows → a pytree of sums; each leaf of `rows` is [batch, length, ...] cut to
        [batch, chunk, ...]. Whatever it closes over (the keys) is shared by all chunks.
      chunk: rows per chunk; 0 or ≥ length: one chunk. Padding rows must weigh nothing in
        `row_sums` (their segment id is 0).
      rows: the row-wise inputs.
    """
    length = jax.tree.leaves(rows)[0].shape[1]
    if chunk <= 0 or chunk >= length:
        return row_sums(rows)
    num_chunks = -(-length // chunk)

    def split(x):  # [batch, length, ...] → [num_chunks, batch, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, num_chunks * chunk - length)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], num_chunks, chunk, *x.shape[2:]), 1, 0)

    xs = jax.tree.map(split, rows)
    first = jax.tree.map(lambda x: x[0], xs)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(row_sums, first))
    # Without the checkpoint, autodiff of the scan would stack every chunk's softmax for the
    # backward pass: the full [batch, heads, length, length] array the chunks exist to avoid.
    body = jax.checkpoint(lambda total, x: (jax.tree.map(jnp.add, total, row_sums(x)), None))
    total, _ = jax.lax.scan(body, zeros, xs)
    return total
