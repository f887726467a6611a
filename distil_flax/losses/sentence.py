"""Sentence-embedding terms: the student's pooled embeddings against the teacher's.

    L_mse        = mean over sentences of ‖e_s·W + b − e_t‖² / d_t    (W, b: a projection when the
    L_cosine     = mean over sentences of 1 − cos(e_s·W + b, e_t)       widths differ)
    L_similarity = in-batch structure: KL(softmax(C_t/τ) ‖ softmax(C_s/τ)) over each sentence's
                   row of cosine similarities to the other sentences, or the MSE between C_s, C_t

e are the sentence embeddings pooled per packed segment (`pooling.pool_segments`), so packing
stays exact. The similarity term compares each model in its own space: it needs no projection
and keeps the teacher's rankings, not only its vectors. Reductions run in float32 (float64 inputs
stay float64).
"""

import jax
import jax.numpy as jnp

from distil_flax.losses.triple import weighted_mean, wide

Array = jax.Array

SIMILARITIES = ("kl", "mse")


def pooled_mse(student: Array, teacher: Array, present: Array) -> Array:
    """Mean over present sentences of the mean squared difference over features.

    Args:
      student, teacher: [n, d] sentence embeddings (the student's already projected).
      present: [n] bool, False for empty slots.
    """
    diff = wide(student) - wide(teacher)
    return weighted_mean(jnp.mean(diff * diff, axis=-1), present.astype(diff.dtype))


def _normalised(x: Array) -> Array:
    x = wide(x)
    # Not x / ‖x‖: the norm's gradient is 0/0 at the zero vectors of empty segment slots.
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def pooled_cosine_distance(student: Array, teacher: Array, present: Array) -> Array:
    """Mean over present sentences of 1 − cos(student, teacher); embeddings [n, d]."""
    cos = jnp.sum(_normalised(student) * _normalised(teacher), axis=-1)
    return weighted_mean(1.0 - cos, present.astype(cos.dtype))


def similarity_structure(student: Array, teacher: Array, present: Array, *, kind: str = "kl",
                         temperature: float = 0.05) -> Array:
    """How far the student's in-batch cosine-similarity matrix is from the teacher's.

    Only pairs of two different present sentences count. "kl": for each sentence, KL(teacher ‖
    student) between softmax(cosine similarities / temperature) over the other sentences, averaged
    over sentences; "mse": the mean squared difference of the similarities over pairs.

    Args:
      student, teacher: [n, d_s], [n, d_t] sentence embeddings, each in its own model's space.
      present: [n] bool.
    """
    if kind not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {kind!r}")
    s, t = _normalised(student), _normalised(teacher)
    c_s, c_t = s @ s.T, t @ t.T
    n = present.shape[0]
    pairs = present[:, None] & present[None, :] & ~jnp.eye(n, dtype=bool)
    if kind == "mse":
        diff = c_s - c_t
        return weighted_mean(diff * diff, pairs.astype(diff.dtype))
    lowest = jnp.finfo(c_s.dtype).min  # Left-out pairs vanish from the softmax.
    log_p_s = jax.nn.log_softmax(jnp.where(pairs, c_s / temperature, lowest), axis=-1)
    log_p_t = jax.nn.log_softmax(jnp.where(pairs, c_t / temperature, lowest), axis=-1)
    kl = jnp.sum(jnp.where(pairs, jnp.exp(log_p_t) * (log_p_t - log_p_s), 0.0), axis=-1)
    # A sentence alone in the batch has no row to compare.
    rows = jnp.any(pairs, axis=-1)
    return weighted_mean(kl, rows.astype(kl.dtype))
