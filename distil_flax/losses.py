"""DistilBERT's triple loss, as pure functions returning `(loss, metrics)`.

    loss = α_ce · T² · KL(softmax(t/T) ‖ softmax(s/T)) + α_mlm · CE(labels, s) + α_cos · (1 − cos(h_s, h_t))

KL and the soft-target cross-entropy differ by the teacher's entropy, a constant, so they have the
same gradient; we report KL because it reaches 0 when the student matches. Every reduction runs in
float32 whatever the logits' dtype. Each term is a weighted mean over the positions it reads.
"""

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Weights of the three terms; a term with weight 0 is not computed at all."""

    alpha_ce: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    temperature: float = 2.0
    # False: L_ce on every non-pad position (the released DistilBERT). True: only on the masked ones.
    restrict_ce_to_mask: bool = False

    @property
    def needs_teacher(self) -> bool:
        return self.alpha_ce > 0 or self.alpha_cos > 0


def _weighted_mean(values: Array, weights: Array) -> Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def soft_target_kl(student_logits: Array, teacher_logits: Array, weights: Array,
                   temperature: float) -> Array:
    """T² · KL(teacher ‖ student) at temperature T, averaged over weighted positions.

    Args:
      student_logits, teacher_logits: [..., vocab].
      weights: [...] 1.0 where the loss reads, 0.0 elsewhere (padding).
    """
    log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return temperature**2 * _weighted_mean(kl, weights)


def masked_lm_loss(logits: Array, labels: Array, weights: Array) -> tuple[Array, Array]:
    """Cross-entropy and top-1 accuracy at the prediction slots.

    Args:
      logits: [..., vocab]; labels: [...] int ids; weights: [...] 1.0 for real predictions.
    """
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return _weighted_mean(nll, weights), _weighted_mean(correct, weights)


def cosine_distance(student_hidden: Array, teacher_hidden: Array, weights: Array) -> Array:
    """Mean of 1 − cos(h_s, h_t) over weighted positions. hidden: [..., embed]; weights: [...]."""
    s = student_hidden.astype(jnp.float32)
    t = teacher_hidden.astype(jnp.float32)
    dot = jnp.sum(s * t, axis=-1)
    norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
    cos = dot / jnp.maximum(norms, 1e-8)
    return _weighted_mean(1.0 - cos, weights)


def distillation_loss(
    spec: LossSpec,
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
    """
    metrics: dict[str, Array] = {}
    loss = jnp.zeros((), jnp.float32)
    mlm, accuracy = masked_lm_loss(student_mlm_logits, mlm_labels, mlm_weights)
    metrics["student_mlm_accuracy"] = accuracy
    metrics["loss_mlm"] = mlm
    if spec.alpha_mlm:
        loss += spec.alpha_mlm * mlm
    if spec.alpha_ce:
        ce = soft_target_kl(student_logits, teacher_logits, ce_weights, spec.temperature)
        metrics["loss_ce"] = ce
        loss += spec.alpha_ce * ce
    if spec.alpha_cos:
        cos = cosine_distance(student_hidden, teacher_hidden, token_weights)
        metrics["loss_cos"] = cos
        loss += spec.alpha_cos * cos
    if teacher_mlm_logits is not None:
        _, teacher_accuracy = masked_lm_loss(teacher_mlm_logits, mlm_labels, mlm_weights)
        agree = jnp.argmax(teacher_mlm_logits, -1) == jnp.argmax(student_mlm_logits, -1)
        metrics["teacher_mlm_accuracy"] = teacher_accuracy
        metrics["agreement"] = _weighted_mean(agree.astype(jnp.float32), mlm_weights)
    metrics["loss"] = loss
    return loss, metrics
