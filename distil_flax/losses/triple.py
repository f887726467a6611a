"""DistilBERT's triple loss, as pure functions returning `(loss, metrics)`.

    loss = α_ce · T² · KL(softmax(t/T) ‖ softmax(s/T)) + α_mlm · CE(labels, s)
           + α_cos · (1 − cos(h_s, h_t))

KL and the soft-target cross-entropy differ by the teacher's entropy, a constant, so they have the
same gradient; we report KL because it reaches 0 when the student matches. Every reduction runs in
float32 (float64 inputs stay float64) whatever the logits' dtype. Each term is a weighted mean
over the positions it reads.

Two paths compute the two vocabulary-sized terms (L_ce and L_mlm). `distillation_loss` takes logits
and lets autodiff do the rest: simple, but in the released recipe (L_ce on every token) it holds
several float32 [tokens, vocab] arrays at once. `fused_distillation_loss` takes the heads' inputs
instead and runs projection, both terms and their gradients chunk by chunk under a custom VJP, so no
more than one chunk of logits ever exists (`LossSpec.head_chunk`).
"""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from distil_flax.losses.spec import CoreSpec

Array = jax.Array


def wide(x: Array) -> Array:
    """`x` in float32, or wider if it already is (float64 in tests)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def weighted_mean(values: Array, weights: Array) -> Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def soft_target_kl(student_logits: Array, teacher_logits: Array, weights: Array,
                   temperature: float) -> Array:
    """T² · KL(teacher ‖ student) at temperature T, averaged over weighted positions.

    Args:
      student_logits, teacher_logits: [..., vocab].
      weights: [...] 1.0 where the loss reads, 0.0 elsewhere (padding).
    """
    log_p_s = jax.nn.log_softmax(wide(student_logits) / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(wide(teacher_logits) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return temperature**2 * weighted_mean(kl, weights)


# The teacher's distribution where it is cached (`data/teacher_logits.py`): its k largest logits'
# ids and values, and its log-partition at the temperature, each [..., k] or [...].
TopK = tuple[Array, Array, Array]
_LOG_TINY = -69.0  # log 1e-30


def _top_k_parts(student_logits: Array, top_k: TopK, temperature: float):
    """The teacher's and student's log-probabilities on the top k and their tails' mass."""
    top_ids, top_logits, log_z = top_k
    log_q = jax.nn.log_softmax(wide(student_logits) / temperature, axis=-1)
    log_q_top = jnp.take_along_axis(log_q, top_ids, axis=-1)
    log_p_top = wide(top_logits) / temperature - wide(log_z)[..., None]
    p_tail = jnp.clip(1.0 - jnp.sum(jnp.exp(log_p_top), axis=-1), 0.0, 1.0)
    # The student's tail summed over the rest of the vocabulary, not as 1 − Σ top k: that
    # difference loses every digit when the student puts nearly all its mass on the top k.
    in_top = jnp.put_along_axis(jnp.zeros(log_q.shape, bool), top_ids, True, axis=-1,
                                inplace=False)
    log_q_rest = jnp.where(in_top, -jnp.inf, log_q)
    # Floored: with k = vocab the tail is empty, and the teacher's is then rounding alone.
    log_q_tail = jnp.maximum(jax.nn.logsumexp(log_q_rest, axis=-1), _LOG_TINY)
    return log_p_top, log_q_top, p_tail, log_q_tail, log_q_rest


def top_k_kl(student_logits: Array, top_k: TopK, weights: Array, temperature: float
             ) -> tuple[Array, Array]:
    """`soft_target_kl` against a teacher known on its top k: the KL over k + 1 outcomes.

    The teacher's probabilities at T are exp(z / T − log_z) on its k largest logits, and the
    rest of the vocabulary is one outcome holding what they leave (its tail's mass P); the
    student's distribution is coarsened the same way. By the log-sum inequality that KL never
    exceeds the full one, and the gap is the tail's mass times the KL within the tails:

        0 ≤ KL − KL_top-k = P · KL(p̃ ‖ q̃) ≤ P · (log(p_k / P) − min_tail log q̃)

    where p̃, q̃ are the distributions within the tails and p_k, the teacher's k-th largest
    probability, bounds every p in its tail (`top_k_gap_bound`).

    Args:
      student_logits: [..., vocab] at the cached positions.
      top_k: the teacher's (ids [..., k], logits [..., k], log_z [...]).
      weights: [...] 1.0 where the loss reads.

    Returns:
      (T² · the weighted mean KL_top-k, the weighted mean tail mass P).
    """
    log_p_top, log_q_top, p_tail, log_q_tail, _ = _top_k_parts(student_logits, top_k,
                                                                temperature)
    p_top = jnp.exp(log_p_top)
    tail = jnp.where(p_tail > 0, p_tail * (jnp.log(jnp.maximum(p_tail, 1e-30)) - log_q_tail),
                     0.0)
    kl = jnp.sum(p_top * (log_p_top - log_q_top), axis=-1) + tail
    return temperature**2 * weighted_mean(kl, weights), weighted_mean(p_tail, weights)


def top_k_gap_bound(student_logits: Array, top_k: TopK, temperature: float) -> Array:
    """[...]: the bound of `top_k_kl`'s docstring on T² · (KL − KL_top-k), per position."""
    log_p_top, _, p_tail, log_q_tail, log_q_rest = _top_k_parts(student_logits, top_k,
                                                                temperature)
    min_log_q = jnp.min(jnp.where(jnp.isfinite(log_q_rest), log_q_rest, jnp.inf), axis=-1)
    safe_tail = jnp.maximum(p_tail, 1e-30)
    bound = p_tail * (jnp.min(log_p_top, axis=-1) - jnp.log(safe_tail) - (min_log_q - log_q_tail))
    return temperature**2 * jnp.where(p_tail > 0, bound, 0.0)


def masked_lm_loss(logits: Array, labels: Array, weights: Array) -> tuple[Array, Array]:
    """Cross-entropy and top-1 accuracy at the prediction slots.

    Args:
      logits: [..., vocab]; labels: [...] int ids; weights: [...] 1.0 for real predictions.
    """
    log_p = jax.nn.log_softmax(wide(logits), axis=-1)
    nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return weighted_mean(nll, weights), weighted_mean(correct, weights)


def cosine_distance(student_hidden: Array, teacher_hidden: Array, weights: Array) -> Array:
    """Mean of 1 − cos(h_s, h_t) over weighted positions. hidden: [..., embed]; weights: [...]."""
    s = wide(student_hidden)
    t = wide(teacher_hidden)
    dot = jnp.sum(s * t, axis=-1)
    norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
    cos = dot / jnp.maximum(norms, 1e-8)
    return weighted_mean(1.0 - cos, weights)


def distillation_loss(
    spec: CoreSpec,
    *,
    student_logits: Array | None,
    teacher_logits: Array | None,
    ce_weights: Array,
    student_mlm_logits: Array,
    teacher_mlm_logits: Array | None,
    mlm_labels: Array,
    mlm_weights: Array,
    student_hidden: Array,
    teacher_hidden: Array | None,
    token_weights: Array,
    teacher_top_k: TopK | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The weighted sum of the three terms and the metrics of each.

    Args:
      spec: term weights and temperature.
      student_logits, teacher_logits: [..., vocab] where L_ce reads (all positions or the masked
        ones); None when α_ce is 0.
      ce_weights: [...] weights of those positions.
      student_mlm_logits, teacher_mlm_logits: [batch, k, vocab] at the prediction slots (the
        teacher's may be None when it was not computed).
      mlm_labels, mlm_weights: [batch, k].
      student_hidden, teacher_hidden: [batch, length, embed] final hidden states.
      token_weights: [batch, length], 1.0 on real tokens (where L_cos reads).
      teacher_top_k: the teacher's cached top k at the prediction slots (`top_k_kl`), instead
        of its logits: L_ce over k + 1 outcomes, and the teacher's metrics from its top 1.
    """
    metrics: dict[str, Array] = {}
    loss = jnp.zeros((), jnp.float32)
    mlm, accuracy = masked_lm_loss(student_mlm_logits, mlm_labels, mlm_weights)
    metrics["student_mlm_accuracy"] = accuracy
    metrics["loss_mlm"] = mlm
    if spec.alpha_mlm:
        loss += spec.alpha_mlm * mlm
    if spec.alpha_ce and teacher_top_k is not None:
        ce, metrics["teacher_tail_mass"] = top_k_kl(student_logits, teacher_top_k, ce_weights,
                                                    spec.temperature)
        metrics["loss_ce"] = ce
        loss += spec.alpha_ce * ce
    elif spec.alpha_ce:
        ce = soft_target_kl(student_logits, teacher_logits, ce_weights, spec.temperature)
        metrics["loss_ce"] = ce
        loss += spec.alpha_ce * ce
    if spec.alpha_cos:
        cos = cosine_distance(student_hidden, teacher_hidden, token_weights)
        metrics["loss_cos"] = cos
        loss += spec.alpha_cos * cos
    teacher_top1 = (jnp.argmax(teacher_mlm_logits, -1) if teacher_mlm_logits is not None
                    else None if teacher_top_k is None else teacher_top_k[0][..., 0])
    if teacher_top1 is not None:
        teacher_accuracy = weighted_mean((teacher_top1 == mlm_labels).astype(jnp.float32),
                                         mlm_weights)
        agree = teacher_top1 == jnp.argmax(student_mlm_logits, -1)
        metrics["teacher_mlm_accuracy"] = teacher_accuracy
        metrics["agreement"] = weighted_mean(agree.astype(jnp.float32), mlm_weights)
    metrics["loss"] = loss
    return loss, metrics


# ------------------------------------------------------------------------------------------------
# The fused path: projection + L_ce + L_mlm, chunk by chunk, gradients computed on the way forward.

# An MLM head stopped before its vocabulary projection (`Encoder.mlm_head_inputs`):
# features [batch, n, embed], decoder [vocab, embed], bias [vocab].
HeadInputs = tuple[Array, Array, Array]


def fused_distillation_loss(
    spec: CoreSpec,
    *,
    student_head: HeadInputs,
    teacher_head: HeadInputs | None,
    ce_weights: Array,
    label_positions: Array | None,
    mlm_labels: Array,
    mlm_weights: Array,
    student_hidden: Array,
    teacher_hidden: Array | None,
    token_weights: Array,
) -> tuple[Array, dict[str, Array]]:
    """`distillation_loss` from the MLM heads' inputs instead of their logits (same value, gradient
    and metrics).

    Args:
      spec: term weights, temperature and `head_chunk` (> 0).
      student_head, teacher_head: (features [batch, n, embed], decoder [vocab, embed], bias
        [vocab]) from `Encoder.mlm_head_inputs`, at the n positions L_ce reads (all positions, or
        the prediction slots); the teacher's is None when α_ce is 0.
      ce_weights: [batch, n] weights of L_ce at those positions.
      label_positions: [batch, k] where the prediction slots sit among the n positions, or None
        when the n positions are the slots themselves (n = k).
      mlm_labels, mlm_weights: [batch, k] at the prediction slots.
      student_hidden, teacher_hidden, token_weights: as in `distillation_loss` (L_cos).
    """
    if spec.head_chunk <= 0:
        raise ValueError(f"loss.head_chunk must be > 0 for the fused head, got {spec.head_chunk}")
    if spec.alpha_ce and teacher_head is None:
        raise ValueError("loss.alpha_ce > 0 needs the teacher's head inputs")
    if label_positions is None:
        labels, label_weights = mlm_labels, mlm_weights
    else:
        # Scatter the slots into dense rows; slots never repeat a position (masking draws
        # without replacement), so a plain `set` is exact.
        batch, n = student_head[0].shape[:2]
        rows = jnp.arange(batch)[:, None]
        labels = jnp.zeros((batch, n), mlm_labels.dtype).at[rows, label_positions].set(
            mlm_labels, unique_indices=True)
        label_weights = jnp.zeros((batch, n), mlm_weights.dtype).at[rows, label_positions].set(
            mlm_weights, unique_indices=True)
    loss, sums = _fused_head(spec, student_head, teacher_head,
                             (wide(ce_weights), labels, wide(label_weights)))
    sums = jax.lax.stop_gradient(sums)
    predictions = jnp.maximum(jnp.sum(mlm_weights), 1.0)
    metrics = {"loss_mlm": sums["nll"] / predictions,
               "student_mlm_accuracy": sums["student_correct"] / predictions}
    if teacher_head is not None:
        metrics["teacher_mlm_accuracy"] = sums["teacher_correct"] / predictions
        metrics["agreement"] = sums["agreement"] / predictions
        if spec.alpha_ce:
            metrics["loss_ce"] = spec.temperature**2 * sums["kl"] / jnp.maximum(
                jnp.sum(ce_weights), 1.0)
    if spec.alpha_cos:
        cos = cosine_distance(student_hidden, teacher_hidden, token_weights)
        metrics["loss_cos"] = cos
        loss = loss + spec.alpha_cos * cos
    metrics["loss"] = loss
    return loss, metrics


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_head(spec: CoreSpec, student: HeadInputs, teacher: HeadInputs | None, targets):
    """α_ce·L_ce + α_mlm·L_mlm (a scalar) and float32 sums for metrics, from the heads' inputs.

    `targets` is (ce_weights [batch, n], labels [batch, n], label_weights [batch, n]).
    """
    (loss, sums), _ = _fused_head_fwd(spec, student, teacher, targets)
    return loss, sums


def _fused_head_fwd(spec: CoreSpec, student: HeadInputs, teacher: HeadInputs | None, targets):
    ce_weights, _, label_weights = targets
    # Normalisers over the whole (global) batch: d loss / d logits =
    #   ce_scale·w·(p_s,T − p_t,T) + mlm_scale·w·(softmax(s) − onehot(label)),
    # where the T² of L_ce meets the 1/T of the tempered softmax.
    ce_norm = jnp.maximum(jnp.sum(ce_weights), 1.0)
    mlm_norm = jnp.maximum(jnp.sum(label_weights), 1.0)
    scales = (spec.alpha_ce * spec.temperature / ce_norm, spec.alpha_mlm / mlm_norm)
    axes = _batch_mesh_axes()
    local = functools.partial(_fused_head_local, spec, batch_axes=axes)
    if axes:
        # Each device runs the chunk loop on its rows and sums decoder gradients and metrics
        # once at the end, instead of XLA all-reducing the partial sums of every chunk. Other
        # mesh axes (`tensor` splitting the vocabulary) stay with XLA's partitioner.
        rows, whole = P(axes), P()
        head = (rows, whole, whole)
        local = jax.shard_map(
            local, mesh=jax.sharding.get_abstract_mesh(), axis_names=set(axes),
            in_specs=(head, None if teacher is None else head, (rows, rows, rows), whole),
            out_specs=(whole, (rows, whole, whole)), check_vma=False)
    sums, residuals = local(student, teacher, targets, scales)
    loss = spec.alpha_mlm * sums["nll"] / mlm_norm
    if "kl" in sums:
        loss += spec.alpha_ce * spec.temperature**2 * sums["kl"] / ce_norm
    return (loss, sums), residuals


def _batch_mesh_axes() -> tuple[str, ...]:
    """The mesh axes (of size > 1) that the logical rules in effect split `batch` over.

    Axes already manual (a caller inside `shard_map`) are left out: there the rows are local.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = nn.logical_to_mesh_axes(("batch",))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if mesh.shape[a] > 1 and a not in mesh.manual_axes)


def _fused_head_local(spec: CoreSpec, student: HeadInputs, teacher: HeadInputs | None, targets,
                      scales, *, batch_axes: tuple[str, ...]):
    """The chunk loop over this device's rows; returns summed metrics and the gradients."""
    features, decoder, bias = student
    ce_weights, labels, label_weights = targets
    ce_scale, mlm_scale = scales
    batch, n, _ = features.shape
    dtype = features.dtype
    acc_dtype = jnp.promote_types(dtype, jnp.float32)  # Accumulators and reductions.
    chunk = min(spec.head_chunk, n)
    num_chunks = -(-n // chunk)
    temperature = spec.temperature

    def chunks(x):  # [batch, n, ...] → [num_chunks, batch, chunk, ...]; padding has weight 0.
        x = jnp.pad(x, [(0, 0), (0, num_chunks * chunk - n)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, num_chunks, chunk, *x.shape[2:]), 1, 0)

    s_decoder, s_bias = decoder.astype(dtype), bias.astype(dtype)
    if teacher is not None:
        t_decoder, t_bias = teacher[1].astype(teacher[0].dtype), teacher[2].astype(teacher[0].dtype)

    def body(carry, xs):
        d_decoder, d_bias, sums = carry
        h, ce_w, label, label_w = xs[:4]
        # Logits in the compute dtype, as the plain head makes them; every reduction in float32.
        s = wide(jnp.einsum("bcd,vd->bcv", h, s_decoder) + s_bias)
        lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
        label_logit = jnp.take_along_axis(s, label[..., None], axis=-1)[..., 0]
        student_top = jnp.argmax(s, axis=-1)
        sums = dict(sums)
        sums["nll"] += jnp.sum(label_w * (lse[..., 0] - label_logit))
        sums["student_correct"] += jnp.sum(label_w * (student_top == label))
        grad = jnp.zeros_like(s)
        if spec.alpha_mlm:
            grad += (mlm_scale * label_w)[..., None] * (
                jnp.exp(s - lse) - jax.nn.one_hot(label, s.shape[-1], dtype=s.dtype))
        if teacher is not None:
            t = wide(jnp.einsum("bcd,vd->bcv", xs[4], t_decoder) + t_bias)
            teacher_top = jnp.argmax(t, axis=-1)
            sums["teacher_correct"] += jnp.sum(label_w * (teacher_top == label))
            sums["agreement"] += jnp.sum(label_w * (teacher_top == student_top))
            if spec.alpha_ce:
                log_p_s = jax.nn.log_softmax(s / temperature, axis=-1)
                log_p_t = jax.nn.log_softmax(t / temperature, axis=-1)
                p_t = jnp.exp(log_p_t)
                sums["kl"] += jnp.sum(ce_w * jnp.sum(p_t * (log_p_t - log_p_s), axis=-1))
                grad += (ce_scale * ce_w)[..., None] * (jnp.exp(log_p_s) - p_t)
        grad = grad.astype(dtype)
        d_h = jnp.einsum("bcv,vd->bcd", grad, s_decoder)
        d_decoder += jnp.einsum("bcv,bcd->vd", grad, h, preferred_element_type=acc_dtype)
        d_bias += jnp.sum(grad, axis=(0, 1), dtype=acc_dtype)
        return (d_decoder, d_bias, sums), d_h

    names = ["nll", "student_correct"]
    if teacher is not None:
        names += ["teacher_correct", "agreement"] + (["kl"] if spec.alpha_ce else [])
    zeros = (jnp.zeros(decoder.shape, acc_dtype), jnp.zeros(bias.shape, acc_dtype),
             {name: jnp.zeros((), acc_dtype) for name in names})
    xs = tuple(chunks(x) for x in (features, ce_weights, labels, label_weights))
    if teacher is not None:
        xs += (chunks(teacher[0]),)
    (d_decoder, d_bias, sums), d_features = jax.lax.scan(body, zeros, xs)
    if batch_axes:
        d_decoder, d_bias, sums = jax.lax.psum((d_decoder, d_bias, sums), batch_axes)
    d_features = jnp.moveaxis(d_features, 0, 1).reshape(batch, num_chunks * chunk, -1)[:, :n]
    return sums, (d_features, d_decoder.astype(decoder.dtype), d_bias.astype(bias.dtype))


def _fused_head_bwd(spec: CoreSpec, residuals, cotangents):
    del spec
    d_features, d_decoder, d_bias = residuals
    g = cotangents[0]  # The metrics' sums are not differentiated (stop_gradient'ed by the caller).
    student = (d_features * g.astype(d_features.dtype), d_decoder * g.astype(d_decoder.dtype),
               d_bias * g.astype(d_bias.dtype))
    # The teacher is not trained; targets are data.
    return student, None, None


_fused_head.defvjp(_fused_head_fwd, _fused_head_bwd)
