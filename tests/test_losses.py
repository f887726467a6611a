"""The triple loss against a float64 numpy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from distil_flax import losses


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference_kl(s, t, w, temperature):
    log_ps = _log_softmax(s / temperature)
    log_pt = _log_softmax(t / temperature)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
    return temperature**2 * (kl * w).sum() / w.sum()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_target_kl_matches_float64_reference(rng, temperature):
    s, t = rng.normal(size=(2, 2, 5, 11)) * 3
    w = (rng.random((2, 5)) > 0.3).astype(np.float64)
    got = losses.soft_target_kl(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                jnp.asarray(w), temperature)
    np.testing.assert_allclose(got, _reference_kl(s, t, w, temperature), rtol=1e-5)


def test_soft_target_kl_ignores_padding_and_is_zero_on_match(rng):
    s = rng.normal(size=(3, 7))
    w = np.array([1.0, 1.0, 0.0])
    garbage = s.copy()
    garbage[2] = 1e3 * rng.normal(size=7)  # A padded position: must not count.
    assert float(losses.soft_target_kl(jnp.asarray(garbage), jnp.asarray(s), jnp.asarray(w), 2.0)) \
        == pytest.approx(0.0, abs=1e-6)


def test_soft_target_kl_reads_bfloat16_logits_in_float32(rng):
    s, t = rng.normal(size=(2, 4, 9))
    w = np.ones(4)
    got = losses.soft_target_kl(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16),
                                jnp.asarray(w), 2.0)
    expected = _reference_kl(np.asarray(jnp.asarray(s, jnp.bfloat16), np.float64),
                             np.asarray(jnp.asarray(t, jnp.bfloat16), np.float64), w, 2.0)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_masked_lm_loss_matches_reference(rng):
    logits = rng.normal(size=(2, 6, 13))
    labels = rng.integers(0, 13, size=(2, 6))
    labels[0, :3] = logits[0, :3].argmax(-1)  # Some correct predictions.
    w = (rng.random((2, 6)) > 0.25).astype(np.float64)
    nll = -np.take_along_axis(_log_softmax(logits), labels[..., None], -1)[..., 0]
    loss, acc = losses.masked_lm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                                      jnp.asarray(w))
    np.testing.assert_allclose(loss, (nll * w).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(acc, ((logits.argmax(-1) == labels) * w).sum() / w.sum(), rtol=1e-6)


def test_cosine_distance_matches_reference(rng):
    hs, ht = rng.normal(size=(2, 3, 5, 8))
    w = (rng.random((3, 5)) > 0.4).astype(np.float64)
    cos = (hs * ht).sum(-1) / (np.linalg.norm(hs, axis=-1) * np.linalg.norm(ht, axis=-1))
    got = losses.cosine_distance(jnp.asarray(hs, jnp.float32), jnp.asarray(ht, jnp.float32),
                                 jnp.asarray(w))
    np.testing.assert_allclose(got, ((1 - cos) * w).sum() / w.sum(), rtol=1e-5)


def test_distillation_loss_weights_terms_and_skips_zero_weights(rng):
    b, l, k, v, d = 2, 6, 2, 11, 4  # noqa: E741 — batch, length, …, as in the paper.
    s_logits, t_logits = rng.normal(size=(2, b, l, v))
    positions = np.array([[1, 3], [0, 5]])
    s_mlm = np.take_along_axis(s_logits, positions[..., None], 1)
    t_mlm = np.take_along_axis(t_logits, positions[..., None], 1)
    labels = rng.integers(0, v, size=(b, k))
    mlm_w = np.array([[1.0, 1.0], [1.0, 0.0]])
    hs, ht = rng.normal(size=(2, b, l, d))
    real = np.ones((b, l))
    real[1, 4:] = 0
    args = dict(student_logits=jnp.asarray(s_logits), teacher_logits=jnp.asarray(t_logits),
                ce_weights=jnp.asarray(real), student_mlm_logits=jnp.asarray(s_mlm),
                teacher_mlm_logits=jnp.asarray(t_mlm), mlm_labels=jnp.asarray(labels),
                mlm_weights=jnp.asarray(mlm_w), student_hidden=jnp.asarray(hs),
                teacher_hidden=jnp.asarray(ht), token_weights=jnp.asarray(real))
    spec = losses.LossSpec(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, temperature=2.0)
    loss, metrics = losses.distillation_loss(spec, **args)
    expected = 5.0 * metrics["loss_ce"] + 2.0 * metrics["loss_mlm"] + 1.0 * metrics["loss_cos"]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_ce"], _reference_kl(s_logits, t_logits, real, 2.0),
                               rtol=1e-5)
    agree = (s_mlm.argmax(-1) == t_mlm.argmax(-1))
    np.testing.assert_allclose(metrics["agreement"], (agree * mlm_w).sum() / mlm_w.sum(), rtol=1e-6)

    mlm_only = losses.LossSpec(alpha_ce=0.0, alpha_mlm=1.0, alpha_cos=0.0)
    loss, metrics = losses.distillation_loss(
        mlm_only, **{**args, "student_logits": None, "teacher_logits": None,
                     "teacher_hidden": None, "teacher_mlm_logits": None})
    assert "loss_ce" not in metrics and "loss_cos" not in metrics
    np.testing.assert_allclose(loss, metrics["loss_mlm"], rtol=1e-6)
