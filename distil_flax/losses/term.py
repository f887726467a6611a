"""What a feature term of the loss declares, so that everything else reads it from one place.

A feature term is a `Term` subclass in its own module of `losses/`, and its instance in
`registry.TERMS`. From it:

  the config       `distill.config.base_config` adds the section `loss.<name>` with `fields`;
                   `validate` calls `check` and takes the weights named by `weights`;
  the spec         `train.loss_spec` calls `resolve` for a weighted section once both models are
                   known; `registry.LossSpec` has a field `<name>` holding that `spec`;
  the step         `features.captures` asks the encoders for what `captures` names,
                   `features.projection_init` makes the `projections`, and
                   `features.feature_terms` adds up what `compute` returns, with its metrics;
  the model card   says `card` for the section's weight.

Nothing else names a term, so a new one is its module, its tests and one line of `TERMS`.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from distil_flax.losses.spec import Captures
from distil_flax.model import Encoder
from distil_flax.model.student_init import Pruning
from distil_flax.training.fields import Rule

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Field:
    """A field of a term's config section: its name, its default, what it means, and the values
    it may hold (`training.fields`; None for a field whose term's `check` judges it)."""

    name: str
    default: Any
    doc: str = ""
    rule: Rule | None = None


@dataclasses.dataclass(frozen=True)
class TermInputs:
    """What a term is computed from (`features.feature_terms`)."""

    # The encoders' outputs: `hidden` [batch, length, width], and the `hidden_at` {index: ...}
    # and `qkv_at` {layer: (q, k, v)} the terms' `captures` asked for; the teacher's are
    # stop-gradient'ed.
    student: dict[str, Any]
    teacher: dict[str, Any]
    segment_ids: Array  # [batch, length], 0 on padding.
    projections: dict[str, Any]  # The loss's trainable projections by name ({}: none).
    chunk: int  # Query rows per chunk of a score term (`LossSpec.relation_chunk`; 0: all).
    # The teacher's hidden channels a pruned student kept, where hidden states are compared on
    # them instead of through projections (`LossSpec.teacher_channels`; (): all).
    teacher_channels: tuple[int, ...] = ()


class Term:
    """A feature term; a subclass sets the attributes and overrides the methods it needs."""

    name: str  # The config section `loss.<name>` and the `LossSpec` field.
    spec: type  # Its frozen dataclass, defaults all off, with a `weight` (0: not computed).
    fields: tuple[Field, ...]  # Of the config section, in order.
    doc: str = ""  # What the config section is for.
    weights: tuple[str, ...] = ("weight",)  # The section's weight fields (each finite, ≥ 0).
    card: str  # What the model card says the section's `weight` weighs.

    def weighted(self, section) -> bool:
        """Whether the config section turns the term on."""
        return any(section[name] for name in self.weights)

    def check(self, section, config) -> None:
        """What can be checked of the section before any model is loaded (`config.validate`;
        the weights are checked there already).

        Raises:
          ValueError: naming the field.
        """

    def resolve(self, section, config, student: Encoder, teacher: Encoder,
                teacher_pooling: str | None, pruning: Pruning | None = None):
        """The term's spec from its weighted config section and both models (`train.loss_spec`).

        Args:
          section: `config.loss.<name>`.
          config: the whole run config, for what the term reads beyond its section.
          student, teacher: the models.
          teacher_pooling: the teacher folder's sentence-embedding pooling, None without one.
          pruning: what a student pruned from the teacher kept of it, None for any other.

        Raises:
          ValueError: naming the field, when the models do not fit the section.
        """
        raise NotImplementedError

    def captures(self, spec) -> tuple[Captures, Captures]:
        """(student, teacher) intermediates the term reads; the final `hidden` is always there."""
        return Captures(), Captures()

    def projections(self, spec) -> tuple[str, ...]:
        """The projections the term compares through when the models' widths differ."""
        return ()

    def compute(self, spec, inputs: TermInputs) -> tuple[Array, dict[str, Array]]:
        """The term's weighted loss and its metrics, each named by the term."""
        raise NotImplementedError


def kept_channels(teacher_hidden: Array, channels: tuple[int, ...]) -> Array:
    """teacher_hidden [..., teacher width] at the channels a pruned student kept, in order
    (`LossSpec.teacher_channels`); unchanged for ()."""
    if not channels:
        return teacher_hidden
    return jnp.take(teacher_hidden, jnp.asarray(channels, jnp.int32), axis=-1)


def project(projection: dict[str, Array] | None, hidden: Array) -> Array:
    """hidden [..., student width] → [..., teacher width]; the identity without a projection."""
    if not projection:
        return hidden
    kernel = projection["kernel"].astype(hidden.dtype)
    return hidden @ kernel + projection["bias"].astype(hidden.dtype)
