"""The training step: masking, teacher and student forward, backward, loss, update: one program.

`distil_step` is a pure function of (state, teacher_params, batch, token_weights). The caller binds
the models, optimizer and specs with `functools.partial` and jits it with explicit shardings and a
donated state (see `train.py`). With no teacher (α_ce = α_cos = 0) the same step pretrains a BERT
teacher or an MLM-only student.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from distil_flax import losses
from distil_flax.data import teacher_logits, teacher_targets
from distil_flax.distill.masking import MaskingSpec, mask_tokens
from distil_flax.model import Encoder
from distil_flax.training import partitioning
from distil_flax.training.train_state import TrainState, apply_update, step_rng

Array = jax.Array


def _gather(x: Array, positions: Array) -> Array:
    """x [batch, length, ...] at positions [batch, k] → [batch, k, ...]."""
    return jnp.take_along_axis(x, positions[:, :, None], axis=1)


def _masks(batch: dict[str, Array], rng: Array, masking: MaskingSpec,
           token_weights: Array | None) -> tuple[dict[str, Array], "losses.TopK | None"]:
    """The batch's MLM inputs (`mask_tokens`' fields), and the teacher's cached top k there.

    With a logits cache (`data/teacher_logits.py`) the batch carries its static masks and the
    teacher's distribution at them; otherwise the mask is drawn here, fresh for every batch.
    """
    if teacher_logits.FIELDS[0] in batch:
        masked = {name: batch[name] for name in ("input_ids", "mlm_positions", "mlm_labels",
                                                 "mlm_weights")}
        return masked, (batch["teacher_top_ids"], batch["teacher_top_logits"],
                        batch["teacher_log_z"])
    return mask_tokens(rng, batch["input_ids"], batch["segment_ids"], masking, token_weights), None


def _loss_and_grads(
    params, projections, teacher_params, micro: dict[str, Array], token_weights: Array | None,
    rng: Array, *, student: Encoder, teacher: Encoder | None, masking: MaskingSpec,
    loss: losses.LossSpec,
):
    """Loss, metrics and gradients (for params and projections) of one micro-batch.

    The intermediate-layer terms (`losses.feature_terms`) read the encoders' captured outputs
    and are added to whichever path computes the vocabulary-sized ones. With `loss.head_chunk`
    > 0 the MLM heads stop before their vocabulary projection and
    `losses.fused_distillation_loss` projects chunk by chunk; with 0 the heads return logits
    for `losses.distillation_loss`. Both give the same loss, gradients and metrics. Without a
    head term (TinyBERT's and MiniLM's general distillation) no head runs at all.
    """
    mask_rng, dropout_rng = jax.random.split(rng)
    masked, top_k = _masks(micro, mask_rng, masking, token_weights)
    real_tokens = (micro["segment_ids"] > 0).astype(jnp.float32)
    positions = masked["mlm_positions"]
    ce_on_all = loss.alpha_ce > 0 and not loss.restrict_ce_to_mask

    def head_rows(hidden):
        # The vocab projections run only where a loss reads: all positions, or the gathered 15 %.
        return hidden if ce_on_all else _gather(hidden, positions)

    ce_weights = real_tokens if ce_on_all else masked["mlm_weights"]
    inputs = (masked["input_ids"], micro["segment_ids"], micro["positions"])
    # The fused heads bound the memory of logits at every position; cached targets are read at
    # the prediction slots only, whose logits the plain path holds.
    fused = loss.head_chunk > 0 and top_k is None
    teacher_vars = {"params": teacher_params}
    student_captures, teacher_captures = losses.captures(loss)

    # The teacher's head output where L_ce reads: its inputs (fused) or its logits (plain).
    # A live teacher (None when caches serve every term) computes what no cache holds.
    teacher_head = teacher_out = None
    if teacher is not None and loss.needs_teacher:
        _, teacher_out = teacher.apply(teacher_vars, *inputs, hidden_at=teacher_captures.hidden,
                                       qkv_at=teacher_captures.qkv)
        if loss.alpha_ce and top_k is None:
            method = Encoder.mlm_head_inputs if fused else Encoder.mlm_logits
            teacher_head = teacher.apply(teacher_vars, head_rows(teacher_out["hidden"]),
                                         method=method)
        teacher_head, teacher_out = jax.lax.stop_gradient((teacher_head, teacher_out))
    if teacher_targets.FIELD in micro:
        # Cached embeddings (`data/teacher_targets.py`): the sentence terms read them, slot by
        # slot as `pool_segments` lays them out, in place of the teacher's pooled states.
        teacher_out = {**(teacher_out or {}), teacher_targets.FIELD: micro[teacher_targets.FIELD]}

    def head_terms(p, student_hidden):
        common = dict(mlm_labels=masked["mlm_labels"], mlm_weights=masked["mlm_weights"],
                      student_hidden=student_hidden,
                      teacher_hidden=None if teacher_out is None or "hidden" not in teacher_out
                      else losses.kept_channels(teacher_out["hidden"], loss.teacher_channels),
                      token_weights=real_tokens, ce_weights=ce_weights)
        if fused:
            return losses.fused_distillation_loss(
                loss, student_head=student.apply(
                    {"params": p}, head_rows(student_hidden), method=Encoder.mlm_head_inputs),
                teacher_head=teacher_head, label_positions=positions if ce_on_all else None,
                **common)
        student_logits = student.apply({"params": p}, head_rows(student_hidden),
                                       method=Encoder.mlm_logits)
        slots = (lambda x: _gather(x, positions)) if ce_on_all else (lambda x: x)  # noqa: E731
        return losses.distillation_loss(
            loss, student_logits=student_logits, teacher_logits=teacher_head,
            student_mlm_logits=slots(student_logits),
            teacher_mlm_logits=None if teacher_head is None else slots(teacher_head),
            teacher_top_k=top_k, **common)

    def loss_fn(trainable):
        p, projections = trainable
        _, student_out = student.apply(
            {"params": p}, *inputs, train=True, rngs={"dropout": dropout_rng},
            hidden_at=student_captures.hidden, qkv_at=student_captures.qkv)
        total, metrics = losses.feature_terms(loss, student_out, teacher_out,
                                              micro["segment_ids"], projections)
        if loss.uses_heads:
            head_loss, head_metrics = head_terms(p, student_out["hidden"])
            total += head_loss
            metrics.update(head_metrics)
        metrics["loss"] = total
        return total, metrics

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)((params, projections))
    metrics["real_tokens"] = jnp.sum(real_tokens)
    return grads, metrics


def distil_step(
    state: TrainState, teacher_params: Any, batch: dict[str, Array], token_weights: Array | None,
    *, student: Encoder, teacher: Encoder | None, optimizer: optax.GradientTransformation,
    schedule: optax.Schedule, masking: MaskingSpec, loss: losses.LossSpec,
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update over a global batch, accumulating gradients over micro-batches.

    Args:
      state: the student's train state (donated).
      teacher_params: the teacher's parameters (ignored without a teacher).
      batch: `input_ids`, `segment_ids`, `positions`, each [accum_steps, micro_batch, length],
        and with cached targets `teacher_embeddings` [accum_steps, micro_batch, slots, width].
      token_weights: [vocab] masking selection weights (frequency smoothing), or None.

    Returns:
      The new state and scalar metrics (means over micro-batches; `real_tokens` summed).
      When the loss or the gradients are not finite the update is skipped: parameters and
      optimizer state stay as they were (so the optimizer's step count, and with it its learning
      rate schedule, does not advance), `nonfinite` is 1 and the state's counters go up.
    """
    rng = step_rng(state)
    grads_of = functools.partial(
        _loss_and_grads, state.params, state.projections, teacher_params,
        token_weights=token_weights,
        student=student, teacher=teacher, masking=masking, loss=loss)
    accum_steps = batch["input_ids"].shape[0]
    if accum_steps == 1:
        grads, metrics = grads_of(jax.tree.map(lambda x: x[0], batch), rng=rng)
    else:
        def accumulate(carry, xs):
            index, micro = xs
            out = grads_of(micro, rng=jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, carry, out), None

        shapes = jax.eval_shape(grads_of, jax.tree.map(lambda x: x[0], batch), rng=rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
        (grads, metrics), _ = jax.lax.scan(
            accumulate, zeros, (jnp.arange(accum_steps), batch))
        real_tokens = metrics["real_tokens"]
        grads, metrics = jax.tree.map(lambda x: x / accum_steps, (grads, metrics))
        metrics["real_tokens"] = real_tokens

    param_grads, projection_grads = grads
    return apply_update(state, param_grads, metrics, optimizer=optimizer, schedule=schedule,
                        projection_grads=projection_grads)


def eval_step(
    params: Any, projections: Any, teacher_params: Any, batch: dict[str, Array], rng: Array, *,
    student: Encoder, teacher: Encoder | None, masking: MaskingSpec, loss: losses.LossSpec,
    student_mlm: bool = True, teacher_mlm: bool = True,
) -> dict[str, Array]:
    """Held-out sums for one batch [batch, length] (exact aggregation across batches).

    Returns sums: with `student_mlm` (a student whose MLM head a loss trains) `predictions`,
    `student_nll`, `student_correct`; with `teacher_mlm` (a teacher that has an MLM head)
    `teacher_nll`, `teacher_correct`, and `agreement` when both. With intermediate-layer terms,
    `tokens` and each `losses.feature_terms` metric times the batch's real tokens, as
    `feature/NAME`. The mask is uniform (no smoothing) and depends only on `rng`, so every
    evaluation of a run scores the same positions. With a logits cache the masks are its
    static ones, the teacher's metrics come from its cached top 1 (no `teacher_nll`), and
    `kl_top_k` and `tail_mass` are the student's L_ce against its top k, times predictions.
    """
    masked, top_k = _masks(batch, rng, masking, None)
    inputs = (masked["input_ids"], batch["segment_ids"], batch["positions"])
    weights = masked["mlm_weights"]
    teacher_mlm = teacher is not None and teacher_mlm
    cached = teacher_targets.FIELD in batch
    features = loss.features and (teacher is not None or cached)
    student_captures, teacher_captures = losses.captures(loss) if features else (
        losses.Captures(), losses.Captures())

    def forward(model, p, captures, mlm: bool):
        logits, out = model.apply(
            {"params": p}, *inputs, logits_at=masked["mlm_positions"] if mlm else None,
            hidden_at=captures.hidden, qkv_at=captures.qkv)
        if not mlm:
            return out, {}
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(log_p, masked["mlm_labels"][..., None], axis=-1)[..., 0]
        top1 = jnp.argmax(logits, axis=-1)
        return out, {"nll": jnp.sum(nll * weights),
                     "correct": jnp.sum((top1 == masked["mlm_labels"]) * weights), "top1": top1,
                     "logits": logits}

    sums = {}
    student_out, student_mlm_sums = forward(student, params, student_captures, student_mlm)
    # The live teacher (beside caches, for what they do not hold), then the caches.
    teacher_out, teacher_mlm_sums = None, {}
    live_mlm = teacher_mlm and top_k is None
    if teacher is not None and (live_mlm or features):
        teacher_out, teacher_mlm_sums = forward(teacher, teacher_params, teacher_captures,
                                                live_mlm)
    if cached:
        teacher_out = {**(teacher_out or {}), teacher_targets.FIELD: batch[teacher_targets.FIELD]}
    if top_k is not None:
        # The teacher's top 1 at the cached masks and, for a student with an MLM head, its
        # held-out L_ce against the top k (`losses.top_k_kl`) with the tail's mass.
        top1 = top_k[0][..., 0]
        teacher_mlm_sums = {"correct": jnp.sum((top1 == masked["mlm_labels"]) * weights),
                            "top1": top1}
        if student_mlm_sums:
            predictions = jnp.maximum(jnp.sum(weights), 1.0)
            kl, tail = losses.top_k_kl(student_mlm_sums["logits"], top_k, weights,
                                       loss.temperature)
            sums["kl_top_k"], sums["tail_mass"] = kl * predictions, tail * predictions
    for name, mlm_sums in (("student", student_mlm_sums), ("teacher", teacher_mlm_sums)):
        if mlm_sums:
            sums["predictions"] = jnp.sum(weights)
            sums[f"{name}_correct"] = mlm_sums["correct"]
            if "nll" in mlm_sums:  # Not the cached teacher's: its top k may miss the label.
                sums[f"{name}_nll"] = mlm_sums["nll"]
    if student_mlm_sums and teacher_mlm_sums:
        sums["agreement"] = jnp.sum((student_mlm_sums["top1"] == teacher_mlm_sums["top1"])
                                    * weights)
    if features:
        _, metrics = losses.feature_terms(loss, student_out, teacher_out, batch["segment_ids"],
                                          projections)
        tokens = jnp.sum(batch["segment_ids"] > 0, dtype=jnp.float32)
        sums["tokens"] = tokens
        sums.update({f"feature/{name}": value * tokens for name, value in metrics.items()})
    return sums


def jit_steps(*, student: Encoder, teacher: Encoder | None, optimizer: optax.GradientTransformation,
              schedule: optax.Schedule, masking: MaskingSpec, loss: losses.LossSpec,
              mesh: jax.sharding.Mesh, rules, state_shardings: Any, teacher_shardings: Any,
              student_mlm: bool = True, teacher_mlm: bool = True):
    """The jitted training step (state donated) and evaluation step, with explicit shardings.

    Training and the benchmark both build their step here. Call the steps inside
    `partitioning.mesh_context(mesh, rules)` so that activation constraints apply.

    Returns:
      (train_step(state, teacher_params, batch [accum, batch, length], token_weights),
       eval_step(params, projections, teacher_params, batch [batch, length], rng)); the
      `*_mlm` flags say whose MLM metrics the evaluation reports (see `eval_step`).
    """
    replicated = partitioning.replicated(mesh)
    train_step = jax.jit(
        functools.partial(distil_step, student=student, teacher=teacher, optimizer=optimizer,
                          schedule=schedule, masking=masking, loss=loss),
        in_shardings=(state_shardings, teacher_shardings,
                      partitioning.batch_sharding(mesh, rules, leading_dims=1), replicated),
        out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    evaluate = jax.jit(
        functools.partial(eval_step, student=student, teacher=teacher, masking=masking,
                          loss=loss, student_mlm=student_mlm, teacher_mlm=teacher_mlm),
        in_shardings=(state_shardings.params, state_shardings.projections, teacher_shardings,
                      partitioning.batch_sharding(mesh, rules), replicated),
        out_shardings=replicated)
    return train_step, evaluate
