"""Intermediate-layer terms: TinyBERT's hidden-state and attention-score MSE, MiniLM's relations.

    L_hidden    = Σ_(i,j) MSE(h_s,i · W + b, h_t,j)           (W, b: a projection, widths differ)
    L_attention = Σ_(i,j) MSE(q_s,i k_s,iᵀ/√d, q_t,j k_t,jᵀ/√d)     (equal heads, one segment)
    L_relations = Σ_ab KL(softmax(a_t b_tᵀ/√d_r) ‖ softmax(a_s b_sᵀ/√d_r))     (a, b ∈ {q, k, v})

Every term reads the encoders' named outputs (`out["hidden_at"]`, `out["qkv_at"]`), is a weighted
mean over real tokens, and runs in float32 (float64 inputs stay float64). The [batch, heads,
length, length] score terms go over query rows chunk by chunk (`relation_chunk`) under
`jax.checkpoint`: the forward holds one chunk of scores at a time and the backward recomputes each
chunk instead of keeping all of them, so no full score array exists in either direction.

`feature_terms` adds these terms to whichever path computed the vocabulary-sized ones (fused or
plain): each term is written once.
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from distil_flax.losses import sentence
from distil_flax.losses.spec import LossSpec
from distil_flax.losses.triple import cosine_distance, weighted_mean, wide
from distil_flax.model.pooling import pool_segments

Array = jax.Array

_INIT_STD = 0.02  # As the encoder's dense layers.


# ------------------------------------------------------------------------------------------------
# Projections: trainable parameters of the loss, not of the student (never exported).


def projections_needed(spec: LossSpec, student_width: int, teacher_width: int) -> tuple[str, ...]:
    """Which projections the weighted terms compare through: "hidden" (TinyBERT's W_h, one shared
    by every mapped hidden state, the embeddings' included, as TinyBERT's released code does) and
    "embeddings" (pooled sentence embeddings, for their MSE and cosine). None at equal widths."""
    if student_width == teacher_width:
        return ()
    e = spec.embeddings
    return tuple(name for name, used in (("hidden", spec.hidden_states.weight),
                                         ("embeddings", e.mse or e.cosine)) if used)


def projection_init(spec: LossSpec, student_width: int, teacher_width: int
                    ) -> Callable[[Array], dict[str, Any]]:
    """`rng → logically-boxed projections` (`projections_needed`), {} when none is.

    Each kernel is [student width, teacher width] with the teacher side on the `embed` rule, so
    it is sharded as the encoders' embeddings are; biases start at 0.
    """

    def init(rng):
        projections = {}
        for name, key in zip(projections_needed(spec, student_width, teacher_width),
                             jax.random.split(rng, 2)):
            kernel = nn.with_logical_partitioning(
                nn.initializers.normal(_INIT_STD), ("transform", "embed"))(
                    key, (student_width, teacher_width), jnp.float32)
            bias = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))(
                key, (teacher_width,), jnp.float32)
            projections[name] = {"kernel": kernel, "bias": bias}
        return projections

    return init


def project(projection: dict[str, Array] | None, hidden: Array) -> Array:
    """hidden [..., student width] → [..., teacher width]; the identity without a projection."""
    if not projection:
        return hidden
    kernel = projection["kernel"].astype(hidden.dtype)
    return hidden @ kernel + projection["bias"].astype(hidden.dtype)


# ------------------------------------------------------------------------------------------------
# The terms, as pure functions.


def hidden_mse(student_hidden: Array, teacher_hidden: Array, weights: Array) -> Array:
    """Mean over weighted positions of the mean squared difference over features.

    Args:
      student_hidden, teacher_hidden: [batch, length, width] (the student's already projected).
      weights: [batch, length], 1.0 on real tokens.
    """
    diff = wide(student_hidden) - wide(teacher_hidden)
    return weighted_mean(jnp.mean(diff * diff, axis=-1), weights)


def _heads(x: Array, heads: int) -> Array:
    """[batch, length, width] or [batch, length, h, d] → [batch, length, heads, width / heads]."""
    x = x.reshape(*x.shape[:2], -1)
    if x.shape[-1] % heads:
        raise ValueError(f"a width of {x.shape[-1]} does not split into {heads} relation heads")
    return x.reshape(*x.shape[:2], heads, x.shape[-1] // heads)


def _scores(a: Array, b: Array) -> Array:
    """a [batch, c, h, d], b [batch, length, h, d] → a·bᵀ/√d [batch, h, c, length] in float32."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", a, b,
                        preferred_element_type=jnp.promote_types(a.dtype, jnp.float32))
    return scores / math.sqrt(a.shape[-1])


def _sum_over_row_chunks(row_sums: Callable, chunk: int, rows: Any) -> Any:
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
        diff = _scores(q_s, k_s) - _scores(q_t, k_t)
        visible = _visible(segments, segment_ids)[:, None]
        return {"sse": jnp.sum(jnp.where(visible, diff * diff, 0.0)),
                "pairs": jnp.sum(visible, dtype=diff.dtype) * heads}

    sums = _sum_over_row_chunks(row_sums, chunk, (student_qk[0], teacher_qk[0], segment_ids))
    return sums["sse"] / jnp.maximum(sums["pairs"], 1.0)


def _visible(query_segments: Array, key_segments: Array) -> Array:
    """[batch, c, length]: key in the query's segment, both real."""
    return (query_segments[:, :, None] == key_segments[:, None, :]) & (
        query_segments[:, :, None] > 0)


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
    a_s, b_s = (_heads(x, heads) for x in student)
    a_t, b_t = (_heads(x, heads) for x in teacher)

    def row_sums(rows):
        a_s_rows, a_t_rows, segments = rows
        visible = _visible(segments, segment_ids)[:, None]
        # Hidden keys get the lowest finite logit: they vanish from the softmax, and a row
        # without any visible key (padding) stays finite and weighs nothing.
        lowest = jnp.finfo(jnp.promote_types(a_s.dtype, jnp.float32)).min
        log_p_s = jax.nn.log_softmax(jnp.where(visible, _scores(a_s_rows, b_s), lowest), axis=-1)
        log_p_t = jax.nn.log_softmax(jnp.where(visible, _scores(a_t_rows, b_t), lowest), axis=-1)
        kl = jnp.sum(jnp.where(visible, jnp.exp(log_p_t) * (log_p_t - log_p_s), 0.0), axis=-1)
        real = (segments > 0).astype(kl.dtype)
        return {"kl": jnp.sum(kl * real[:, None]), "rows": jnp.sum(real) * heads}

    sums = _sum_over_row_chunks(row_sums, chunk, (a_s, a_t, segment_ids))
    return sums["kl"] / jnp.maximum(sums["rows"], 1.0)


# ------------------------------------------------------------------------------------------------
# Composition.

_QKV = {"q": 0, "k": 1, "v": 2}


def feature_terms(spec: LossSpec, student_out: dict[str, Any], teacher_out: dict[str, Any] | None,
                  segment_ids: Array, projections: dict[str, Any]
                  ) -> tuple[Array, dict[str, Array]]:
    """The weighted sum of the intermediate-layer terms, and a metric per term and mapped layer.

    Args:
      spec: the run's loss.
      student_out, teacher_out: the encoders' outputs, holding `hidden_at` {index: [batch,
        length, width]} and `qkv_at` {layer: (q, k, v)} for `spec.captures` (the teacher's
        already stop-gradient'ed); teacher_out may be None when no term reads it.
      segment_ids: [batch, length], 0 on padding.
      projections: the loss's trainable projections ({} when the widths agree).
    """
    metrics: dict[str, Array] = {}
    loss = jnp.zeros((), jnp.float32)
    real = (segment_ids > 0).astype(jnp.float32)
    h = spec.hidden_states
    if h.weight:
        total = 0.0
        for s, t in h.pairs:
            student = project(projections.get("hidden"), student_out["hidden_at"][s])
            teacher = teacher_out["hidden_at"][t]
            mse = hidden_mse(student, teacher, real)
            # Named by layer (hidden-state index − 1), as the config's layer maps are.
            name = "embeddings" if s == t == 0 else f"s{s - 1}_t{t - 1}"
            metrics[f"hidden_mse/{name}"] = mse
            metrics[f"hidden_cos/{name}"] = 1.0 - jax.lax.stop_gradient(
                cosine_distance(student, teacher, real))
            total += mse
        metrics["loss_hidden"] = total
        loss += h.weight * total
    a = spec.attention_scores
    if a.weight:
        total = 0.0
        for s, t in a.pairs:
            mse = attention_score_mse(student_out["qkv_at"][s][:2], teacher_out["qkv_at"][t][:2],
                                      segment_ids, chunk=spec.relation_chunk)
            metrics[f"attention_mse/s{s}_t{t}"] = mse
            total += mse
        metrics["loss_attention"] = total
        loss += a.weight * total
    r = spec.relations
    if r.weight:
        total = 0.0
        s_qkv = student_out["qkv_at"][r.student_layer]
        t_qkv = teacher_out["qkv_at"][r.teacher_layer]
        for pair in r.pairs:
            pick = lambda qkv: tuple(qkv[_QKV[name]] for name in pair)  # noqa: E731
            kl = relation_kl(pick(s_qkv), pick(t_qkv), segment_ids, heads=r.heads,
                             chunk=spec.relation_chunk)
            metrics[f"relation_kl/{pair}"] = kl
            total += kl
        metrics["loss_relations"] = total
        loss += r.weight * total
    if spec.embeddings.weight:
        embedding_loss, embedding_metrics = _embedding_terms(
            spec, student_out["hidden"], teacher_out["hidden"], segment_ids,
            projections.get("embeddings"))
        metrics.update(embedding_metrics)
        loss += embedding_loss
    return loss, metrics


def _embedding_terms(spec: LossSpec, student_hidden: Array, teacher_hidden: Array,
                     segment_ids: Array, projection: dict[str, Array] | None
                     ) -> tuple[Array, dict[str, Array]]:
    """The sentence-embedding terms on both models' final hidden states, pooled per segment."""
    e = spec.embeddings

    def pooled(hidden):  # [batch, max_segments, d] → [batch · max_segments, d]
        vectors, present = pool_segments(hidden, segment_ids, e.max_segments, e.pooling)
        return vectors.reshape(-1, vectors.shape[-1]), present.reshape(-1)

    (student, present), (teacher, _) = pooled(student_hidden), pooled(teacher_hidden)
    loss = jnp.zeros((), jnp.float32)
    metrics = {}
    if projection or student.shape[-1] == teacher.shape[-1]:
        projected = project(projection, student)
        metrics["embedding_mse"] = sentence.pooled_mse(projected, teacher, present)
        metrics["embedding_cosine"] = 1.0 - sentence.pooled_cosine_distance(
            projected, teacher, present)
        loss += e.mse * metrics["embedding_mse"] + e.cosine * (1.0 - metrics["embedding_cosine"])
    if e.similarity:
        name = f"embedding_similarity_{e.similarity_kind}"
        metrics[name] = sentence.similarity_structure(
            student, teacher, present, kind=e.similarity_kind, temperature=e.temperature)
        loss += e.similarity * metrics[name]
    metrics["loss_embeddings"] = loss
    return loss, metrics
