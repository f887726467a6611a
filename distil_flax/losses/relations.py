"""MiniLM's term: KL between the self-attention relations of one student and one teacher layer.

    L_relations = Σ_ab KL(softmax(a_t b_tᵀ/√d_r) ‖ softmax(a_s b_sᵀ/√d_r))     (a, b ∈ {q, k, v})

Averaged over real query tokens and relation heads, in float32 (float64 inputs stay float64),
query rows chunk by chunk (`scores.sum_over_row_chunks`).

Metrics: `relation_kl/AB` for each pair, and `loss_relations`, their sum.
"""

import dataclasses

import jax
import jax.numpy as jnp

from distil_flax.losses.scores import scaled_scores, split_heads, sum_over_row_chunks, visible
from distil_flax.losses.spec import pair_captures
from distil_flax.losses.term import Field, Term, TermInputs
from distil_flax.training import fields

Array = jax.Array

# Relation pairs: "qk" is the attention distribution itself (MiniLM v1's attention transfer),
# "vv" the value relation; MiniLM v2 uses "qq", "kk" and "vv".
RELATION_PAIRS = ("qq", "kk", "vv", "qk")
_QKV = {"q": 0, "k": 1, "v": 2}


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


def relation_kl(student: tuple[Array, Array], teacher: tuple[Array, Array], segment_ids: Array,
                *, heads: int, chunk: int = 0) -> Array:
    """KL(teacher ‖ student) between relations softmax(a·bᵀ/√d_r) over a segment's keys.

    Averaged over real query tokens and relation heads. With a = q and b = k and the models' own
    head count this is the attention distribution (MiniLM v1); a = b = v is the value relation;
    MiniLM v2 uses q·q, k·k and v·v with any number of relation heads.

    Args:
      student, teacher: (a, b), each [batch, length, width] or [batch, length, h, d]; each side's
        width is split into `heads` relation heads of width / heads.
      segment_ids: [batch, length], 0 on padding.
      heads: relation heads.
      chunk: query rows per chunk (0: all at once).
    """
    a_s, b_s = (split_heads(x, heads) for x in student)
    a_t, b_t = (split_heads(x, heads) for x in teacher)

    def row_sums(rows):
        a_s_rows, a_t_rows, segments = rows
        seen = visible(segments, segment_ids)[:, None]
        # Hidden keys get the lowest finite logit: they vanish from the softmax, and a row
        # without any visible key (padding) stays finite and weighs nothing.
        lowest = jnp.finfo(jnp.promote_types(a_s.dtype, jnp.float32)).min
        log_p_s = jax.nn.log_softmax(jnp.where(seen, scaled_scores(a_s_rows, b_s), lowest),
                                     axis=-1)
        log_p_t = jax.nn.log_softmax(jnp.where(seen, scaled_scores(a_t_rows, b_t), lowest),
                                     axis=-1)
        kl = jnp.sum(jnp.where(seen, jnp.exp(log_p_t) * (log_p_t - log_p_s), 0.0), axis=-1)
        real = (segments > 0).astype(kl.dtype)
        return {"kl": jnp.sum(kl * real[:, None]), "rows": jnp.sum(real) * heads}

    sums = sum_over_row_chunks(row_sums, chunk, (a_s, a_t, segment_ids))
    return sums["kl"] / jnp.maximum(sums["rows"], 1.0)


def _pairs(text: str) -> tuple[str, ...]:
    """The config's comma-separated pairs."""
    return tuple(p.strip() for p in text.split(","))


class RelationsTerm(Term):
    name = "relations"
    spec = Relations
    fields = (
        Field("weight", 0.0, "KL between self-attention relations of one layer (MiniLM)."),
        Field("pairs", "qq,kk,vv", "Comma-separated pairs of q, k, v: MiniLM v2 \"qq,kk,vv\"; "
                                   "MiniLM v1 \"qk,vv\" (attention distributions and value "
                                   "relation, with relations.heads = the models' head count)."),
        Field("heads", 12, "Relation heads; teacher and student widths must divide by it.",
              fields.at_least(1)),
        # Checked against the models' depths once both are known (`resolve`).
        Field("teacher_layer", -1, "Negative: from the end (MiniLM: the last, for base).",
              fields.any_number()),
        Field("student_layer", -1, "As teacher_layer.", fields.any_number()),
    )
    card = "KL between self-attention relations of one layer (MiniLM)"

    def check(self, section, config):
        if not section.weight:
            return
        pairs = _pairs(section.pairs)
        unknown = [p for p in pairs if p not in RELATION_PAIRS]
        if unknown or not pairs:
            raise ValueError(f"loss.{self.name}.pairs={section.pairs!r}: each pair must be one "
                             f"of {', '.join(RELATION_PAIRS)}")

    def resolve(self, section, config, student, teacher, teacher_pooling, pruning=None):
        for width, name in ((student.hidden_size, "model.hidden_size"),
                            (teacher.hidden_size, "the teacher's hidden size")):
            if width % section.heads:
                raise ValueError(f"loss.{self.name}.heads ({section.heads}) must divide {name} "
                                 f"({width})")

        def one_layer(field: str, count: int) -> int:
            index = section[field]
            if not -count <= index < count:
                raise ValueError(f"loss.{self.name}.{field} {index} is outside a model of "
                                 f"{count} layers")
            return index % count

        return Relations(weight=section.weight, pairs=_pairs(section.pairs), heads=section.heads,
                         student_layer=one_layer("student_layer", student.num_layers),
                         teacher_layer=one_layer("teacher_layer", teacher.num_layers))

    def captures(self, spec):
        return pair_captures(qkv=((spec.student_layer, spec.teacher_layer),))

    def compute(self, spec, inputs: TermInputs):
        metrics = {}
        total = 0.0
        s_qkv = inputs.student["qkv_at"][spec.student_layer]
        t_qkv = inputs.teacher["qkv_at"][spec.teacher_layer]
        for pair in spec.pairs:
            pick = lambda qkv: tuple(qkv[_QKV[name]] for name in pair)  # noqa: E731
            kl = relation_kl(pick(s_qkv), pick(t_qkv), inputs.segment_ids, heads=spec.heads,
                             chunk=inputs.chunk)
            metrics[f"relation_kl/{pair}"] = kl
            total += kl
        metrics["loss_relations"] = total
        return spec.weight * total, metrics


TERM = RelationsTerm()
