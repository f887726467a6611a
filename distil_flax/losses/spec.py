"""What a run's loss is made of: the fixed core of every `LossSpec`, what the encoders expose for
the feature terms, and the layer maps those terms resolve.

A recipe is a `LossSpec` (`registry.py`): DistilBERT's triple loss (soft targets, MLM, cosine)
is its core, here; each feature term of `registry.TERMS` (TinyBERT's hidden states and attention
scores, MiniLM's relations, sentence embeddings) adds one field, and they compose. A term with
weight 0 is not computed, and the encoders expose only what the terms with a weight read
(`features.captures`).

Layer numbers in a spec are resolved (no negative indices, no "uniform" placeholder):
`train.loss_spec` turns the config's sections into a spec once both models are known.
"""

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class CoreSpec:
    """The terms every recipe has (DistilBERT's) and the chunk sizes; `registry.LossSpec` adds a
    field per feature term. A term with weight 0 is not computed at all."""

    alpha_ce: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    temperature: float = 2.0
    # False: L_ce on every non-pad position (the released DistilBERT). True: only on the masked
    # ones.
    restrict_ce_to_mask: bool = False
    # Positions per row in each chunk of the fused head + loss (`fused_distillation_loss`); a chunk
    # holds [batch, head_chunk, vocab] logits. 0: the plain path (`distillation_loss`).
    head_chunk: int = 128
    # Query rows per chunk of the attention-score and relation terms: a chunk holds
    # [batch, heads, relation_chunk, length] scores. 0: all rows at once.
    relation_chunk: int = 128
    # loss.kept_channels: the teacher's hidden channels that a pruned student kept, in order.
    # Hidden states (L_cos, hidden_states, embeddings' MSE and cosine) are compared on them, with
    # no projection. (): the teacher's whole width, through projections where widths differ.
    teacher_channels: tuple[int, ...] = ()

    def terms(self) -> dict[str, Any]:
        """The feature terms' specs by name: the fields beyond these ones."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in CORE_FIELDS}

    @property
    def uses_heads(self) -> bool:
        """Whether a term reads the MLM heads (the vocabulary-sized terms, or L_cos beside them)."""
        return bool(self.alpha_ce or self.alpha_mlm or self.alpha_cos)

    @property
    def needs_teacher(self) -> bool:
        return bool(self.alpha_ce or self.alpha_cos or self.features)

    @property
    def features(self) -> bool:
        """Whether a feature term has a weight: one that reads the encoders' intermediates or
        pooled outputs (`features.feature_terms`)."""
        return any(term.weight for term in self.terms().values())


CORE_FIELDS = frozenset(f.name for f in dataclasses.fields(CoreSpec))


@dataclasses.dataclass(frozen=True)
class Captures:
    """What one encoder must expose for the terms: hidden-state indices and layers' q, k, v."""

    hidden: tuple[int, ...] = ()
    qkv: tuple[int, ...] = ()


def pair_captures(hidden: tuple[tuple[int, int], ...] = (),
                  qkv: tuple[tuple[int, int], ...] = ()) -> tuple[Captures, Captures]:
    """(student, teacher) captures of (student, teacher) index pairs a term compares."""
    side = lambda i, pairs: tuple(sorted({p[i] for p in pairs}))  # noqa: E731
    return tuple(Captures(hidden=side(i, hidden), qkv=side(i, qkv)) for i in (0, 1))


# ------------------------------------------------------------------------------------------------
# Layer maps: a config's `layer_map` field, checked and resolved.


def uniform_layer_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
    """TinyBERT's uniform map: student layer i reads teacher layer (i + 1)·k − 1, k = L_t / L_s.

    With k not an integer the teacher layer is rounded down; the last student layer always reads
    the teacher's last layer.
    """
    return tuple((i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers))


def layer_pairs(layer_map: tuple[int, ...], student_layers: int, teacher_layers: int
                ) -> tuple[tuple[int, int], ...]:
    """(student layer, teacher layer) pairs of a config's layer map; () is the uniform map.

    Raises:
      ValueError: the map names a teacher layer that does not exist.
    """
    layer_map = tuple(layer_map) or uniform_layer_map(student_layers, teacher_layers)
    if any(not 0 <= t < teacher_layers for t in layer_map):
        raise ValueError(f"layer map {layer_map} names layers outside the teacher's "
                         f"0..{teacher_layers - 1}")
    return tuple(enumerate(layer_map))


def check_layer_map(field: str, layer_map: tuple[int, ...], num_layers: int) -> None:
    """Before the teacher is known: one teacher layer per student layer, or ().

    Raises:
      ValueError: naming `field` (e.g. "loss.hidden_states.layer_map").
    """
    layer_map = tuple(layer_map)
    if layer_map and len(layer_map) != num_layers:
        raise ValueError(
            f"{field} {layer_map} has {len(layer_map)} entries but model.num_layers is "
            f"{num_layers}: give one teacher layer per student layer, or () for the uniform map")


def mapped_layer_pairs(field: str, layer_map: tuple[int, ...], student_layers: int,
                       teacher_layers: int) -> tuple[tuple[int, int], ...]:
    """`layer_pairs` of the config's `field`, whose errors name it."""
    try:
        return layer_pairs(tuple(layer_map), student_layers, teacher_layers)
    except ValueError as error:
        raise ValueError(f"{field}: {error}") from None
