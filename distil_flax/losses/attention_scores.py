"""TinyBERT's attention term: MSE between the unnormalised attention scores of mapped layers.

    L_attention = Σ_(i,j) MSE(q_s,i k_s,iᵀ/√d, q_t,j k_t,jᵀ/√d)     (equal heads, one segment)

A student pruned from the teacher compares each of its heads with the teacher head it was cut
from, so it needs no equal heads.

Over the (query, key) pairs attention can see, in float32 (float64 inputs stay float64), query
rows chunk by chunk (`scores.sum_over_row_chunks`).

Metrics: `attention_mse/sI_tJ` for student layer I and teacher layer J, and `loss_attention`,
their sum.
"""

import dataclasses

import jax
import jax.numpy as jnp

from distil_flax.losses.scores import scaled_scores, sum_over_row_chunks, visible
from distil_flax.losses.spec import check_layer_map, mapped_layer_pairs, pair_captures
from distil_flax.losses.term import Field, Term, TermInputs

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AttentionScores:
    """TinyBERT's MSE between the unnormalised attention scores of mapped layers (same heads).

    `pairs` are (student layer, teacher layer); `teacher_heads`, per pair, the teacher heads
    compared with the student's, in order (a pruned student's kept heads), () for all.
    """

    weight: float = 0.0
    pairs: tuple[tuple[int, int], ...] = ()
    teacher_heads: tuple[tuple[int, ...], ...] = ()


def attention_score_mse(student_qk: tuple[Array, Array], teacher_qk: tuple[Array, Array],
                        segment_ids: Array, *, chunk: int = 0) -> Array:
    """TinyBERT's attention loss: MSE between the scores q·kᵀ/√d of each head.

    Averaged over the (query, key) pairs attention can see — real tokens of the same packed
    segment — and the heads; TinyBERT's padded positions, zero in both, are left out.

    Args:
      student_qk, teacher_qk: (q, k), each [batch, length, heads, head_dim]; equal head counts.
      segment_ids: [batch, length], 0 on padding.
      chunk: query rows per chunk (0: all at once).
    """
    heads = student_qk[0].shape[2]
    if teacher_qk[0].shape[2] != heads:
        raise ValueError(f"attention scores compare heads one to one, but the student has {heads} "
                         f"heads and the teacher {teacher_qk[0].shape[2]}")
    (_, k_s), (_, k_t) = student_qk, teacher_qk

    def row_sums(rows):
        q_s, q_t, segments = rows
        diff = scaled_scores(q_s, k_s) - scaled_scores(q_t, k_t)
        seen = visible(segments, segment_ids)[:, None]
        return {"sse": jnp.sum(jnp.where(seen, diff * diff, 0.0)),
                "pairs": jnp.sum(seen, dtype=diff.dtype) * heads}

    sums = sum_over_row_chunks(row_sums, chunk, (student_qk[0], teacher_qk[0], segment_ids))
    return sums["sse"] / jnp.maximum(sums["pairs"], 1.0)


class AttentionScoresTerm(Term):
    name = "attention_scores"
    spec = AttentionScores
    fields = (
        Field("weight", 0.0, "MSE between the attention scores q·kᵀ/√d of mapped layers "
                             "(TinyBERT); needs equal heads, or a pruned student."),
        Field("layer_map", (), "As hidden_states.layer_map."),
    )
    card = "MSE between the attention scores of mapped layers (TinyBERT)"

    def check(self, section, config):
        if section.weight:
            check_layer_map(f"loss.{self.name}.layer_map", section.layer_map,
                            config.model.num_layers)

    def resolve(self, section, config, student, teacher, teacher_pooling, pruning=None):
        field = f"loss.{self.name}.layer_map"
        pairs = mapped_layer_pairs(field, section.layer_map, student.num_layers,
                                   teacher.num_layers)
        if student.num_heads == teacher.num_heads:
            return AttentionScores(weight=section.weight, pairs=pairs)
        if pruning is None:
            raise ValueError(
                f"loss.{self.name} compares heads one to one, but model.num_heads is "
                f"{student.num_heads} and the teacher has {teacher.num_heads}: use "
                "loss.relations, which needs no equal heads, or prune the student from the "
                "teacher (init.prune)")
        if any(t != pruning.layers[s] for s, t in pairs):
            raise ValueError(
                f"loss.{self.name} compares a pruned student's heads with the teacher heads they "
                f"were cut from, so {field} must be the layers it was pruned from: "
                f"{tuple(pruning.layers)}")
        return AttentionScores(weight=section.weight, pairs=pairs,
                               teacher_heads=tuple(pruning.heads[s] for s, _ in pairs))

    def captures(self, spec):
        return pair_captures(qkv=spec.pairs)

    def compute(self, spec, inputs: TermInputs):
        metrics = {}
        total = 0.0
        for index, (s, t) in enumerate(spec.pairs):
            teacher_qk = inputs.teacher["qkv_at"][t][:2]
            if spec.teacher_heads:
                heads = jnp.asarray(spec.teacher_heads[index], jnp.int32)
                teacher_qk = tuple(jnp.take(x, heads, axis=2) for x in teacher_qk)
            mse = attention_score_mse(inputs.student["qkv_at"][s][:2], teacher_qk,
                                      inputs.segment_ids, chunk=inputs.chunk)
            metrics[f"attention_mse/s{s}_t{t}"] = mse
            total += mse
        metrics["loss_attention"] = total
        return spec.weight * total, metrics


TERM = AttentionScoresTerm()
