"""The sentence-embedding terms (`losses/sentence.py`) against float64 numpy references written
from the definitions; empty slots; narrower students; `feature_terms` on packed rows.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import f64

from distil_flax import losses

# Eight slots, of which 0, 2, 3, 5 and 6 hold a sentence.
PRESENT = np.array([1, 0, 1, 1, 0, 1, 1, 0], bool)
N = len(PRESENT)
TEMPERATURE = 0.2  # Not the default: the reference must divide by the one it is given.

# Packed rows of length 12, two or three segments each ([CLS] … [SEP] is at least 3 tokens) and
# padding but in the last row.
SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0, 0],
                     [1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 0],
                     [1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3]], np.int32)
B, L = SEGMENTS.shape
MAX_SEGMENTS = L // 3  # As `train.loss_spec` sets it: 4 slots a row, so every row has empty ones.


# ------------------------------------------------------------------------------------------------
# Float64 references, from the definitions, on the present sentences only ([n, d] each).


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _ref_mse(s, t):
    return np.mean([np.mean((s[i] - t[i]) ** 2) for i in range(len(s))])


def _ref_cosine_distance(s, t):
    return np.mean([1.0 - _cos(s[i], t[i]) for i in range(len(s))])


def _ref_similarity(s, t, kind, temperature):
    n = len(s)
    if kind == "mse":
        return np.mean([(_cos(s[i], s[j]) - _cos(t[i], t[j])) ** 2
                        for i in range(n) for j in range(n) if i != j])
    kls = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        if not others:
            continue
        logits_s = np.array([_cos(s[i], s[j]) for j in others]) / temperature
        logits_t = np.array([_cos(t[i], t[j]) for j in others]) / temperature
        log_p_s = logits_s - np.log(np.exp(logits_s - logits_s.max()).sum()) - logits_s.max()
        log_p_t = logits_t - np.log(np.exp(logits_t - logits_t.max()).sum()) - logits_t.max()
        kls.append(np.sum(np.exp(log_p_t) * (log_p_t - log_p_s)))
    return np.mean(kls) if kls else 0.0


def _ref_pool(hidden, segments, pooling):
    """Each segment's vector, pooled alone: [sentences, d], row by row, segment by segment."""
    vectors = []
    for b in range(segments.shape[0]):
        for k in range(1, segments[b].max() + 1):
            tokens = hidden[b, segments[b] == k]
            vectors.append(tokens.mean(0) if pooling == "mean" else tokens[0])
    return np.stack(vectors)


# ------------------------------------------------------------------------------------------------
# 1. Each term against its reference.


def _embeddings(rng, d_s=6, d_t=6):
    """Student and teacher embeddings [N, d] that are related (so the terms are not extreme)."""
    t = rng.normal(size=(N, d_t))
    s = t[:, :d_s] + 0.5 * rng.normal(size=(N, d_s)) if d_s <= d_t else rng.normal(size=(N, d_s))
    return s, t


def test_pooled_mse_and_cosine_match_reference(rng, x64):
    s, t = _embeddings(rng)
    present = jnp.asarray(PRESENT)
    got = losses.pooled_mse(*f64(s, t), present)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, _ref_mse(s[PRESENT], t[PRESENT]), rtol=1e-12)
    got = losses.pooled_cosine_distance(*f64(s, t), present)
    expected = _ref_cosine_distance(s[PRESENT], t[PRESENT])
    assert 0.05 < expected < 1.0
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("kind", losses.SIMILARITIES)
@pytest.mark.parametrize("d_s", [6, 4], ids=["same_width", "narrower"])
def test_similarity_structure_matches_reference(rng, x64, kind, d_s):
    # The student may be narrower: each model's similarities are in its own space.
    s, t = _embeddings(rng, d_s=d_s, d_t=6)
    got = losses.similarity_structure(*f64(s, t), jnp.asarray(PRESENT), kind=kind,
                                      temperature=TEMPERATURE)
    assert got.dtype == jnp.float64
    expected = _ref_similarity(s[PRESENT], t[PRESENT], kind, TEMPERATURE)
    assert expected > 1e-3
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # The same model on both sides: nothing to learn.
    same = losses.similarity_structure(*f64(t, t), jnp.asarray(PRESENT), kind=kind,
                                       temperature=TEMPERATURE)
    assert float(same) == pytest.approx(0.0, abs=1e-12)


def test_similarity_default_temperature_and_unknown_kind(rng, x64):
    s, t = _embeddings(rng)
    got = losses.similarity_structure(*f64(s, t), jnp.asarray(PRESENT))
    np.testing.assert_allclose(got, _ref_similarity(s[PRESENT], t[PRESENT], "kl", 0.05),
                               rtol=1e-10)
    with pytest.raises(ValueError, match="similarity must be one of"):
        losses.similarity_structure(*f64(s, t), jnp.asarray(PRESENT), kind="cosine")


def _all_terms(s, t, present):
    return {"mse": losses.pooled_mse(s, t, present),
            "cosine": losses.pooled_cosine_distance(s, t, present),
            **{f"similarity_{kind}": losses.similarity_structure(
                s, t, present, kind=kind, temperature=TEMPERATURE)
               for kind in losses.SIMILARITIES}}


def test_absent_slots_are_ignored(rng, x64):
    s, t = _embeddings(rng)
    clean = _all_terms(*f64(s, t), jnp.asarray(PRESENT))
    for garbage in (1e3, -7.0, 0.0):
        s_bad, t_bad = s.copy(), t.copy()
        s_bad[~PRESENT] = garbage * rng.normal(size=s_bad[~PRESENT].shape)
        t_bad[~PRESENT] = garbage
        got = _all_terms(*f64(s_bad, t_bad), jnp.asarray(PRESENT))
        for name, value in clean.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-12, err_msg=f"{name} {garbage}")


def test_few_or_no_sentences(rng, x64):
    s, t = _embeddings(rng)
    one = np.zeros(N, bool)
    one[3] = True
    got = _all_terms(*f64(s, t), jnp.asarray(one))
    np.testing.assert_allclose(got["mse"], _ref_mse(s[one], t[one]), rtol=1e-12)
    # A sentence alone has no other to be similar to: the structure terms have nothing to say.
    assert float(got["similarity_kl"]) == float(got["similarity_mse"]) == 0.0
    two = one.copy()
    two[6] = True  # Two sentences: each row's softmax has one entry, KL 0; the MSE is not 0.
    got = _all_terms(*f64(s, t), jnp.asarray(two))
    assert float(got["similarity_kl"]) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(got["similarity_mse"],
                               _ref_similarity(s[two], t[two], "mse", TEMPERATURE), rtol=1e-10)
    got = _all_terms(*f64(s, t), jnp.zeros(N, bool))
    for name, value in got.items():
        assert float(value) == 0.0, name


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_gradients_finite_at_empty_zero_slots(rng, dtype):
    """Empty slots pool to zero vectors; ‖x‖'s gradient there is 0/0 (it once gave NaN)."""
    s, t = _embeddings(rng, d_s=4, d_t=6)
    s[~PRESENT] = 0.0
    t[~PRESENT] = 0.0

    def total(student, projection):
        present = jnp.asarray(PRESENT)
        projected = losses.project(projection, student)
        terms = _all_terms(projected, t.astype(dtype), present)
        # Similarity straight on the narrower student, as `feature_terms` does.
        terms["similarity_kl"] = losses.similarity_structure(student, t.astype(dtype), present)
        return sum(terms.values())

    with jax.enable_x64(dtype == jnp.float64):
        projection = {"kernel": jnp.asarray(rng.normal(size=(4, 6)), dtype),
                      "bias": jnp.zeros(6, dtype)}
        grads = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.asarray(s, dtype), projection)
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g))
    g_student = np.asarray(grads[0])
    np.testing.assert_array_equal(g_student[~PRESENT], 0.0)  # Absent slots weigh nothing.
    assert np.abs(g_student[PRESENT]).min(axis=-1).max() > 0


# ------------------------------------------------------------------------------------------------
# 2. Composition: `feature_terms` on packed rows is the terms on each sentence pooled alone.

_feature_terms = jax.jit(losses.feature_terms, static_argnums=0)


def _expected(s, t, e, kernel=None, bias=None):
    """The metrics and loss of `_embedding_terms`, from sentence vectors [n, d] in numpy."""
    metrics = {}
    loss = 0.0
    if kernel is not None or s.shape[-1] == t.shape[-1]:
        projected = s if kernel is None else s @ kernel + bias
        metrics["embedding_mse"] = _ref_mse(projected, t)
        metrics["embedding_cosine"] = 1.0 - _ref_cosine_distance(projected, t)
        loss += e.mse * metrics["embedding_mse"] + e.cosine * (1 - metrics["embedding_cosine"])
    if e.similarity:
        name = f"embedding_similarity_{e.similarity_kind}"
        metrics[name] = _ref_similarity(s, t, e.similarity_kind, e.temperature)
        loss += e.similarity * metrics[name]
    metrics["loss_embeddings"] = loss
    return loss, metrics


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("case", ["same_width", "narrower_projected", "narrower_similarity_only"])
def test_feature_terms_on_packed_rows_equal_sentences_pooled_alone(rng, x64, pooling, case):
    d_s, d_t = (12, 12) if case == "same_width" else (8, 12)
    e = losses.SentenceEmbeddings(
        mse=0.0 if case == "same_width" else 0.5, cosine=1.0, similarity=1.0,
        similarity_kind="kl", temperature=TEMPERATURE, pooling=pooling, max_segments=MAX_SEGMENTS)
    if case == "narrower_similarity_only":
        e = losses.SentenceEmbeddings(similarity=2.0, similarity_kind="mse", pooling=pooling,
                                      max_segments=MAX_SEGMENTS)
    spec = losses.LossSpec(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0, embeddings=e)
    teacher = rng.normal(size=(B, L, d_t))
    student = teacher[..., :d_s] + rng.normal(size=(B, L, d_s))
    # Padding holds garbage: it must not reach any sentence.
    student[SEGMENTS == 0], teacher[SEGMENTS == 0] = 1e3, -1e3
    kernel = bias = None
    projections = {}
    if case == "narrower_projected":
        assert losses.projections_needed(spec, d_s, d_t) == ("embeddings",)
        kernel, bias = rng.normal(size=(d_s, d_t)) / math.sqrt(d_s), rng.normal(size=d_t)
        projections = {"embeddings": dict(zip(("kernel", "bias"), f64(kernel, bias)))}
    else:
        # Equal widths, or only the similarity term: no projection is asked for.
        assert losses.projections_needed(spec, d_s, d_t) == ()

    loss, metrics = _feature_terms(spec, {"hidden": jnp.asarray(student)},
                                   {"hidden": jnp.asarray(teacher)}, jnp.asarray(SEGMENTS),
                                   projections)
    s_alone = _ref_pool(student, SEGMENTS, pooling)
    t_alone = _ref_pool(teacher, SEGMENTS, pooling)
    assert len(s_alone) == 8  # 2 + 3 + 3 sentences in one in-batch similarity matrix.
    expected_loss, expected_metrics = _expected(s_alone, t_alone, e, kernel, bias)
    assert set(metrics) == set(expected_metrics)
    # float32 tolerance: `pool_segments` returns float32 whatever its input.
    for name, value in expected_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    assert float(loss) > 0.01


def test_feature_terms_gradients_finite_and_zero_on_padding(rng, x64):
    e = losses.SentenceEmbeddings(mse=1.0, cosine=1.0, similarity=1.0, pooling="mean",
                                  max_segments=MAX_SEGMENTS)
    spec = losses.LossSpec(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0, embeddings=e)
    student, teacher = f64(rng.normal(size=(B, L, 8)), rng.normal(size=(B, L, 12)))
    projections = {"embeddings": {"kernel": jnp.asarray(rng.normal(size=(8, 12))),
                                  "bias": jnp.zeros(12, jnp.float64)}}

    def loss(hidden, projections):
        return losses.feature_terms(spec, {"hidden": hidden}, {"hidden": teacher},
                                    jnp.asarray(SEGMENTS), projections)[0]

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(student, projections)
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g))
    g_hidden = np.asarray(grads[0])
    np.testing.assert_array_equal(g_hidden[SEGMENTS == 0], 0.0)
    assert np.abs(g_hidden[SEGMENTS > 0]).sum(-1).min() > 0  # Every real token is trained.
