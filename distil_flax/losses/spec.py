"""What a run's loss is made of: the weight and options of every term, resolved for two models.

A recipe is a `LossSpec`: DistilBERT's (soft targets, MLM, cosine), TinyBERT's (hidden states and
attention scores of mapped layers), MiniLM's (self-attention relations of one layer) and
sentence-embedding distillation (pooled embeddings and their similarity structure) are settings
of it, and they compose. A term with weight 0 is not computed, and the encoders expose
only what the terms with a weight read (`captures`).

Layer numbers here are resolved (no negative indices, no "uniform" placeholder): `train.loss_spec`
turns the config's sections into a spec once both models are known.
"""

import dataclasses

# Relation pairs: "qk" is the attention distribution itself (MiniLM v1's attention transfer),
# "vv" the value relation; MiniLM v2 uses "qq", "kk" and "vv".
RELATION_PAIRS = ("qq", "kk", "vv", "qk")


@dataclasses.dataclass(frozen=True)
class HiddenStates:
    """TinyBERT's hidden-state MSE, through a learned projection when the widths differ.

    `pairs` are (student, teacher) hidden-state indices: 0 is the embeddings' output, i the
    output of layer i − 1.
    """

    weight: float = 0.0
    pairs: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class AttentionScores:
    """TinyBERT's MSE between the unnormalised attention scores of mapped layers (same heads).

    `pairs` are (student layer, teacher layer).
    """

    weight: float = 0.0
    pairs: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class Relations:
    """MiniLM's KL between self-attention relations of one student and one teacher layer.

    Each pair "ab" compares softmax(a·bᵀ/√d) per relation head, where a and b are the layer's
    queries, keys or values with their heads concatenated and split again into `heads` relation
    heads (so teacher and student head counts and widths need not match).
    """

    weight: float = 0.0
    pairs: tuple[str, ...] = ("qq", "kk", "vv")
    heads: int = 12
    student_layer: int = 0
    teacher_layer: int = 0


@dataclasses.dataclass(frozen=True)
class SentenceEmbeddings:
    """Terms on sentence embeddings pooled per packed segment (`losses/sentence.py`): MSE and
    cosine against the teacher's (through a projection when the widths differ), and the in-batch
    similarity structure; each weight 0 is off."""

    mse: float = 0.0
    cosine: float = 0.0
    similarity: float = 0.0
    similarity_kind: str = "kl"  # kl | mse
    temperature: float = 0.05  # Of the similarity KL's softmax over cosine similarities.
    pooling: str = "mean"  # mean | cls
    max_segments: int = 1  # Segments a row may hold (static: the pooled array's size).

    @property
    def weight(self) -> float:
        return self.mse + self.cosine + self.similarity


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Every term of the distillation loss; a term with weight 0 is not computed at all."""

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
    hidden_states: HiddenStates = HiddenStates()
    attention_scores: AttentionScores = AttentionScores()
    relations: Relations = Relations()
    embeddings: SentenceEmbeddings = SentenceEmbeddings()
    # Query rows per chunk of the attention-score and relation terms: a chunk holds
    # [batch, heads, relation_chunk, length] scores. 0: all rows at once.
    relation_chunk: int = 128

    @property
    def uses_heads(self) -> bool:
        """Whether a term reads the MLM heads (the vocabulary-sized terms, or L_cos beside them)."""
        return bool(self.alpha_ce or self.alpha_mlm or self.alpha_cos)

    @property
    def needs_teacher(self) -> bool:
        return bool(self.alpha_ce or self.alpha_cos or self.features)

    @property
    def features(self) -> bool:
        """Whether a term reads the encoders' intermediates or pooled outputs
        (`features.feature_terms`)."""
        return bool(self.hidden_states.weight or self.attention_scores.weight
                    or self.relations.weight or self.embeddings.weight)


@dataclasses.dataclass(frozen=True)
class Captures:
    """What one encoder must expose for the terms: hidden-state indices and layers' q, k, v."""

    hidden: tuple[int, ...] = ()
    qkv: tuple[int, ...] = ()


def captures(spec: LossSpec) -> tuple[Captures, Captures]:
    """(student, teacher) intermediates the weighted terms read, and nothing more."""
    hidden = spec.hidden_states.pairs if spec.hidden_states.weight else ()
    scores = spec.attention_scores.pairs if spec.attention_scores.weight else ()
    relations = ((spec.relations.student_layer, spec.relations.teacher_layer),
                 ) if spec.relations.weight else ()
    side = lambda i, pairs: tuple(sorted({p[i] for p in pairs}))  # noqa: E731
    return tuple(Captures(hidden=side(i, hidden), qkv=side(i, scores + relations))
                 for i in (0, 1))


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


def hidden_state_pairs(pairs: tuple[tuple[int, int], ...], embeddings: bool
                       ) -> tuple[tuple[int, int], ...]:
    """Layer pairs as hidden-state indices (the output of layer i is index i + 1), with the
    embeddings' outputs (index 0) first when asked."""
    shifted = tuple((s + 1, t + 1) for s, t in pairs)
    return ((0, 0),) + shifted if embeddings else shifted

