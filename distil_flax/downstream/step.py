"""The fine-tuning step and the prediction step: pure functions, jitted by `finetune.py`.

    loss = (1 − α) · task loss + α · T² · KL(teacher/T ‖ student/T)        (α = 0 without teacher)

The task loss is cross-entropy over classes (seq_cls, multiple_choice, token_cls), mean squared
error for regression, and for extractive QA the mean of the start and end cross-entropies over
the row's real positions; the distillation term compares the same distributions (start and end
for QA, as the DistilBERT (D) SQuAD run did), and for regression is the squared error to the
teacher's score. Every reduction runs in float32.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from distil_flax.losses import soft_target_kl
from distil_flax.model.heads import TaskModel
from distil_flax.training.train_state import TrainState, apply_update, step_rng

Array = jax.Array

# Logit given to padding positions of a QA row: exp() of it is 0 in float32, and unlike −inf it
# keeps KL terms finite (0 · finite).
_MASKED = -1e9

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    head: str
    regression: bool = False
    alpha: float = 0.0  # Weight of the distillation term; 0 without a teacher.
    temperature: float = 2.0


def _cross_entropy(logits: Array, labels: Array, weights: Array) -> tuple[Array, Array]:
    """Weighted mean CE and accuracy. logits [..., classes]; labels, weights [...]."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    total = jnp.maximum(jnp.sum(weights), 1.0)
    return jnp.sum(nll * weights) / total, jnp.sum(correct * weights) / total


def task_loss(logits: Array, batch: dict[str, Array], spec: LossSpec,
              teacher_logits: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """The loss of one batch and its parts.

    Args:
      logits: the student's float32 outputs (see `heads.TaskModel`).
      batch: `labels` [batch] (float for regression; [batch, length] with `label_weights` for
        token_cls), or `start_positions`/`end_positions` [batch] for QA, and `attention_mask`.
      spec: head, α and temperature.
      teacher_logits: the teacher's outputs, same shape (needed when α > 0).

    Returns:
      (loss, metrics) with `loss_task`, `loss_distill` (with a teacher) and `accuracy` where
      defined.
    """
    metrics: dict[str, Array] = {}
    if spec.head == "qa":
        real = batch["attention_mask"][..., None] > 0  # [batch, length, 1]
        logits = jnp.where(real, logits, _MASKED)
        if teacher_logits is not None:
            teacher_logits = jnp.where(real, teacher_logits, _MASKED)
        ones = jnp.ones(logits.shape[0], jnp.float32)
        start, start_acc = _cross_entropy(logits[..., 0], batch["start_positions"], ones)
        end, end_acc = _cross_entropy(logits[..., 1], batch["end_positions"], ones)
        task = (start + end) / 2
        metrics["accuracy"] = (start_acc + end_acc) / 2  # Of start and end positions.
        distill = lambda: (  # noqa: E731
            soft_target_kl(logits[..., 0], teacher_logits[..., 0], ones, spec.temperature)
            + soft_target_kl(logits[..., 1], teacher_logits[..., 1], ones, spec.temperature)) / 2
    elif spec.regression:
        predictions = logits[:, 0]
        task = jnp.mean((predictions - batch["labels"]) ** 2)
        distill = lambda: jnp.mean((predictions - teacher_logits[:, 0]) ** 2)  # noqa: E731
    else:
        weights = batch.get("label_weights")
        if weights is None:
            weights = jnp.ones(batch["labels"].shape, jnp.float32)
        task, metrics["accuracy"] = _cross_entropy(logits, batch["labels"], weights)
        distill = lambda: soft_target_kl(logits, teacher_logits, weights,  # noqa: E731
                                         spec.temperature)
    metrics["loss_task"] = task
    loss = task
    if spec.alpha > 0:
        if teacher_logits is None:
            raise ValueError("LossSpec.alpha > 0 needs teacher logits")
        kd = distill()
        metrics["loss_distill"] = kd
        loss = spec.alpha * kd + (1.0 - spec.alpha) * task
    metrics["loss"] = loss
    return loss, metrics


def finetune_step(state: TrainState, teacher_params: Any, batch: dict[str, Array], *,
                  model: TaskModel, teacher: TaskModel | None,
                  optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                  loss: LossSpec) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update on a global batch.

    Args:
      state: the model's train state (donated by the jitted step).
      teacher_params: the fine-tuned teacher's parameters (ignored without a teacher).
      batch: `INPUTS` int32 [batch, length] and the head's targets.

    Returns:
      The new state and scalar metrics. A step whose loss or gradients are not finite keeps
      the old parameters and optimizer state and counts itself in `skipped_steps`.
    """
    rng = step_rng(state)
    inputs = tuple(batch[k] for k in INPUTS)
    teacher_logits = None
    if teacher is not None and loss.alpha > 0:
        teacher_logits = jax.lax.stop_gradient(
            teacher.apply({"params": teacher_params}, *inputs)[0])

    def loss_fn(params):
        logits, _ = model.apply({"params": params}, *inputs, train=True, rngs={"dropout": rng})
        return task_loss(logits, batch, loss, teacher_logits)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return apply_update(state, grads, metrics, optimizer=optimizer, schedule=schedule)


def predict_step(params: Any, batch: dict[str, Array], *, model: TaskModel) -> Array:
    """The head's float32 outputs for a batch of `INPUTS` (no dropout)."""
    logits, _ = model.apply({"params": params}, *(batch[k] for k in INPUTS))
    return logits
