"""TinyBERT's hidden-state term: MSE between mapped hidden states, through a learned projection
when the widths differ.

    L_hidden = Σ_(i,j) MSE(h_s,i · W + b, h_t,j)

A weighted mean over real tokens, in float32 (float64 inputs stay float64). One projection,
"hidden", is shared by every mapped hidden state, the embeddings' included, as TinyBERT's
released code does.

Metrics: `hidden_mse/NAME` and `hidden_cos/NAME` for each mapped pair, NAME being `sI_tJ` for
student layer I and teacher layer J (as the config's layer maps count) or `embeddings`, and
`loss_hidden`, the sum of the MSEs.
"""

import dataclasses

import jax
import jax.numpy as jnp

from distil_flax.losses.spec import check_layer_map, mapped_layer_pairs, pair_captures
from distil_flax.losses.term import Field, Term, TermInputs, kept_channels, project
from distil_flax.losses.triple import cosine_distance, weighted_mean, wide

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class HiddenStates:
    """TinyBERT's hidden-state MSE, through a learned projection when the widths differ.

    `pairs` are (student, teacher) hidden-state indices: 0 is the embeddings' output, i the
    output of layer i − 1.
    """

    weight: float = 0.0
    pairs: tuple[tuple[int, int], ...] = ()


def hidden_mse(student_hidden: Array, teacher_hidden: Array, weights: Array) -> Array:
    """Mean over weighted positions of the mean squared difference over features.

    Args:
      student_hidden, teacher_hidden: [batch, length, width] (the student's already projected).
      weights: [batch, length], 1.0 on real tokens.
    """
    diff = wide(student_hidden) - wide(teacher_hidden)
    return weighted_mean(jnp.mean(diff * diff, axis=-1), weights)


def hidden_state_pairs(pairs: tuple[tuple[int, int], ...], embeddings: bool
                       ) -> tuple[tuple[int, int], ...]:
    """Layer pairs as hidden-state indices (the output of layer i is index i + 1), with the
    embeddings' outputs (index 0) first when asked."""
    shifted = tuple((s + 1, t + 1) for s, t in pairs)
    return ((0, 0),) + shifted if embeddings else shifted


class HiddenStatesTerm(Term):
    name = "hidden_states"
    spec = HiddenStates
    fields = (
        Field("weight", 0.0, "MSE between mapped hidden states (TinyBERT)."),
        Field("layer_map", (), "Teacher layer read by each student layer; (): TinyBERT's "
                               "uniform map, (i + 1)·k − 1."),
        Field("embeddings", True, "Also match the embeddings' outputs (TinyBERT)."),
    )
    card = "MSE between mapped hidden states (TinyBERT)"

    def check(self, section, config):
        if section.weight:
            check_layer_map(f"loss.{self.name}.layer_map", section.layer_map,
                            config.model.num_layers)

    def resolve(self, section, config, student, teacher, teacher_pooling, pruning=None):
        pairs = mapped_layer_pairs(f"loss.{self.name}.layer_map", section.layer_map,
                                   student.num_layers, teacher.num_layers)
        return HiddenStates(weight=section.weight,
                            pairs=hidden_state_pairs(pairs, section.embeddings))

    def captures(self, spec):
        return pair_captures(hidden=spec.pairs)

    def projections(self, spec):
        return ("hidden",)

    def compute(self, spec, inputs: TermInputs):
        real = (inputs.segment_ids > 0).astype(jnp.float32)
        metrics = {}
        total = 0.0
        for s, t in spec.pairs:
            student = project(inputs.projections.get("hidden"), inputs.student["hidden_at"][s])
            teacher = kept_channels(inputs.teacher["hidden_at"][t], inputs.teacher_channels)
            mse = hidden_mse(student, teacher, real)
            # Named by layer (hidden-state index − 1), as the config's layer maps are.
            name = "embeddings" if s == t == 0 else f"s{s - 1}_t{t - 1}"
            metrics[f"hidden_mse/{name}"] = mse
            metrics[f"hidden_cos/{name}"] = 1.0 - jax.lax.stop_gradient(
                cosine_distance(student, teacher, real))
            total += mse
        metrics["loss_hidden"] = total
        return spec.weight * total, metrics


TERM = HiddenStatesTerm()
