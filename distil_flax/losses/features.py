"""The feature terms composed (`registry.TERMS`): what the encoders expose for them, the
projections they compare through, and their weighted sum.

Every term reads the encoders' named outputs (`out["hidden"]`, `out["hidden_at"]`,
`out["qkv_at"]`), is a weighted mean over real tokens or sentences, and runs in float32 (float64
inputs stay float64); each term's module says what it computes and which metrics it reports.

`feature_terms` adds these terms to whichever path computed the vocabulary-sized ones (fused or
plain): each term is written once.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from distil_flax.losses.registry import TERMS, LossSpec
from distil_flax.losses.spec import Captures
from distil_flax.losses.term import TermInputs

Array = jax.Array

_INIT_STD = 0.02  # As the encoder's dense layers.


def _weighted(spec: LossSpec):
    """(term, its spec) of each term with a weight, in `TERMS` order."""
    for term in TERMS:
        term_spec = getattr(spec, term.name)
        if term_spec.weight:
            yield term, term_spec


def captures(spec: LossSpec) -> tuple[Captures, Captures]:
    """(student, teacher) intermediates the weighted terms read, and nothing more."""
    sides = [term.captures(term_spec) for term, term_spec in _weighted(spec)]
    merged = lambda i, field: tuple(sorted(  # noqa: E731
        {index for side in sides for index in getattr(side[i], field)}))
    return tuple(Captures(hidden=merged(i, "hidden"), qkv=merged(i, "qkv")) for i in (0, 1))


# ------------------------------------------------------------------------------------------------
# Projections: trainable parameters of the loss, not of the student (never exported).


def projections_needed(spec: LossSpec, student_width: int, teacher_width: int) -> tuple[str, ...]:
    """Which projections the weighted terms compare through (each term's `projections`: "hidden"
    for TinyBERT's hidden states, "embeddings" for pooled sentence embeddings' MSE and cosine),
    in `TERMS` order. None at equal widths, or where hidden states are compared on the teacher's
    kept channels (`LossSpec.teacher_channels`)."""
    if student_width == teacher_width or spec.teacher_channels:
        return ()
    return tuple(dict.fromkeys(name for term, term_spec in _weighted(spec)
                               for name in term.projections(term_spec)))


def projection_init(spec: LossSpec, student_width: int, teacher_width: int
                    ) -> Callable[[Array], dict[str, Any]]:
    """`rng → logically-boxed projections` (`projections_needed`), {} when none is.

    Each kernel is [student width, teacher width] with the teacher side on the `embed` rule, so
    it is sharded as the encoders' embeddings are; biases start at 0.
    """
    names = projections_needed(spec, student_width, teacher_width)

    def init(rng):
        projections = {}
        # At least two keys: a key depends on how many are split, and the checkpoints written
        # before the registry split two.
        for name, key in zip(names, jax.random.split(rng, max(2, len(names)))):
            kernel = nn.with_logical_partitioning(
                nn.initializers.normal(_INIT_STD), ("transform", "embed"))(
                    key, (student_width, teacher_width), jnp.float32)
            bias = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))(
                key, (teacher_width,), jnp.float32)
            projections[name] = {"kernel": kernel, "bias": bias}
        return projections

    return init


# ------------------------------------------------------------------------------------------------
# Composition.


def feature_terms(spec: LossSpec, student_out: dict[str, Any], teacher_out: dict[str, Any] | None,
                  segment_ids: Array, projections: dict[str, Any]
                  ) -> tuple[Array, dict[str, Array]]:
    """The weighted sum of the feature terms, and each term's metrics (per mapped layer, pair, …).

    Args:
      spec: the run's loss.
      student_out, teacher_out: the encoders' outputs, holding `hidden` [batch, length, width],
        `hidden_at` {index: [batch, length, width]} and `qkv_at` {layer: (q, k, v)} for
        `captures` (the teacher's already stop-gradient'ed); teacher_out may be None when no
        term reads it.
      segment_ids: [batch, length], 0 on padding.
      projections: the loss's trainable projections ({} when the widths agree).
    """
    inputs = TermInputs(student=student_out, teacher=teacher_out, segment_ids=segment_ids,
                        projections=projections, chunk=spec.relation_chunk,
                        teacher_channels=spec.teacher_channels)
    metrics: dict[str, Array] = {}
    loss = jnp.zeros((), jnp.float32)
    for term, term_spec in _weighted(spec):
        term_loss, term_metrics = term.compute(term_spec, inputs)
        metrics.update(term_metrics)
        loss += term_loss
    return loss, metrics
