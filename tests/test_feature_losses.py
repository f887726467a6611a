"""The intermediate-layer terms (TinyBERT, MiniLM) against float64 numpy references written from
the definitions; chunking's equivalence and memory bound; `feature_terms`, `captures`, layer maps.
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import f64

from distil_flax import losses
from distil_flax.losses import scores

# Packed rows of length 10: two segments, and padding but in the last row (full to its end, so a
# chunk's own padding rows sit right after real ones).
SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0, 0],
                     [1, 1, 1, 1, 1, 1, 2, 2, 2, 0],
                     [1, 1, 1, 2, 2, 2, 2, 2, 2, 2]], np.int32)
B, L = SEGMENTS.shape


# ------------------------------------------------------------------------------------------------
# Float64 references, from the definitions: explicit loops over rows, only visible keys.


def _visible_keys(segments, b, i):
    """Keys query i of row b sees: real, same segment (None for a padding query)."""
    if segments[b, i] <= 0:
        return None
    return np.flatnonzero(segments[b] == segments[b, i])


def _ref_hidden_mse(h_s, h_t, weights, kernel=None, bias=None):
    projected = h_s if kernel is None else h_s @ kernel + bias
    per_token = ((projected - h_t) ** 2).mean(-1)
    return (per_token * weights).sum() / weights.sum()


def _ref_attention_mse(q_s, k_s, q_t, k_t, segments):
    """q, k: [batch, length, heads, head_dim]."""
    sse, pairs = 0.0, 0
    for b in range(q_s.shape[0]):
        for h in range(q_s.shape[2]):
            for i in range(q_s.shape[1]):
                keys = _visible_keys(segments, b, i)
                if keys is None:
                    continue
                s = k_s[b, keys, h] @ q_s[b, i, h] / math.sqrt(q_s.shape[-1])
                t = k_t[b, keys, h] @ q_t[b, i, h] / math.sqrt(q_t.shape[-1])
                sse += ((s - t) ** 2).sum()
                pairs += len(keys)
    return sse / pairs


def _ref_log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _ref_relation_kl(student, teacher, segments, heads):
    """student, teacher: (a, b), each [batch, length, ...]: the heads concatenated into one width
    and that width split into `heads` contiguous relation heads."""
    def split(x):
        x = x.reshape(x.shape[0], x.shape[1], -1)
        return x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads)

    (a_s, b_s), (a_t, b_t) = [tuple(split(x) for x in side) for side in (student, teacher)]
    total, rows = 0.0, 0
    for b in range(a_s.shape[0]):
        for i in range(a_s.shape[1]):
            keys = _visible_keys(segments, b, i)
            if keys is None:
                continue
            rows += heads
            for r in range(heads):
                log_p_s = _ref_log_softmax(
                    b_s[b, keys, r] @ a_s[b, i, r] / math.sqrt(a_s.shape[-1]))
                log_p_t = _ref_log_softmax(
                    b_t[b, keys, r] @ a_t[b, i, r] / math.sqrt(a_t.shape[-1]))
                total += (np.exp(log_p_t) * (log_p_t - log_p_s)).sum()
    return total / rows


def _attention_probs(q, k, segments):
    """A model's attention distribution [batch, heads, length, length] with an additive mask."""
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    allowed = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    scores = np.where(allowed[:, None], scores, -np.inf)
    with np.errstate(invalid="ignore"):  # Padding queries see nothing: NaN rows, unused.
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        return probs / probs.sum(-1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# 1. Each term against its reference, in float64.


def test_hidden_mse_with_projection_matches_reference(rng, x64):
    h_s, h_t = rng.normal(size=(B, L, 6)), rng.normal(size=(B, L, 10))
    kernel, bias = rng.normal(size=(6, 10)), rng.normal(size=10)
    w = (SEGMENTS > 0).astype(np.float64)
    projection = dict(zip(("kernel", "bias"), f64(kernel, bias)))
    projected = losses.project(projection, jnp.asarray(h_s))
    assert projected.shape == (B, L, 10)
    got = losses.hidden_mse(projected, *f64(h_t, w))
    np.testing.assert_allclose(got, _ref_hidden_mse(h_s, h_t, w, kernel, bias), rtol=1e-10)


def test_hidden_mse_without_projection_matches_reference(rng, x64):
    h_s, h_t = rng.normal(size=(2, B, L, 8))
    w = (SEGMENTS > 0).astype(np.float64)
    for projection in (None, {}):
        projected = losses.project(projection, jnp.asarray(h_s))
        np.testing.assert_array_equal(projected, h_s)
        got = losses.hidden_mse(projected, *f64(h_t, w))
        np.testing.assert_allclose(got, _ref_hidden_mse(h_s, h_t, w), rtol=1e-10)
    # Padded positions do not count, however different they are.
    garbage = h_s.copy()
    garbage[SEGMENTS == 0] = 1e3
    np.testing.assert_allclose(losses.hidden_mse(*f64(garbage, h_t, w)),
                               _ref_hidden_mse(h_s, h_t, w), rtol=1e-10)


def test_attention_score_mse_matches_reference(rng, x64):
    # Same heads; different head dims, so each side is scaled by its own √d.
    q_s, k_s = rng.normal(size=(2, B, L, 3, 4))
    q_t, k_t = 2 * rng.normal(size=(2, B, L, 3, 8))
    got = losses.attention_score_mse(f64(q_s, k_s), f64(q_t, k_t), jnp.asarray(SEGMENTS))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, _ref_attention_mse(q_s, k_s, q_t, k_t, SEGMENTS), rtol=1e-10)


def test_attention_score_mse_rejects_different_head_counts():
    q_s, k_s = jnp.zeros((2, B, L, 3, 4))
    q_t, k_t = jnp.zeros((2, B, L, 2, 6))
    with pytest.raises(ValueError, match="heads"):
        losses.attention_score_mse((q_s, k_s), (q_t, k_t), jnp.asarray(SEGMENTS))


@pytest.mark.parametrize("pair", ["qq", "kk", "vv", "qk"])
def test_relation_kl_minilm_v2_matches_reference(rng, x64, pair):
    # Teacher 12 heads × 8 (width 96), student 6 heads × 8 (width 48); 12 relation heads of
    # 8 and 4 dims. q, k, v as the model gives them: [batch, length, heads, head_dim].
    teacher_qkv = 2 * rng.normal(size=(3, B, L, 12, 8))
    student_qkv = rng.normal(size=(3, B, L, 6, 8))
    index = {"q": 0, "k": 1, "v": 2}
    student = tuple(student_qkv[index[n]] for n in pair)
    teacher = tuple(teacher_qkv[index[n]] for n in pair)
    got = losses.relation_kl(f64(*student), f64(*teacher), jnp.asarray(SEGMENTS), heads=12)
    assert got.dtype == jnp.float64
    expected = _ref_relation_kl(student, teacher, SEGMENTS, heads=12)
    assert expected > 0.05
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # The same widths flattened ([batch, length, width]) are the same relations.
    flat = lambda xs: f64(*(x.reshape(B, L, -1) for x in xs))  # noqa: E731
    np.testing.assert_allclose(
        losses.relation_kl(flat(student), flat(teacher), jnp.asarray(SEGMENTS), heads=12),
        expected, rtol=1e-10)


def test_relation_kl_other_relation_head_counts_match_reference(rng, x64):
    student = tuple(rng.normal(size=(2, B, L, 6, 8)))
    teacher = tuple(rng.normal(size=(2, B, L, 12, 8)))
    for heads in (1, 16):  # One relation head of the whole width; 3 dims a head.
        got = losses.relation_kl(f64(*student), f64(*teacher), jnp.asarray(SEGMENTS),
                                 heads=heads)
        np.testing.assert_allclose(got, _ref_relation_kl(student, teacher, SEGMENTS, heads),
                                   rtol=1e-10)


def test_relation_kl_minilm_v1_is_kl_of_attention_distributions(rng, x64):
    # "qk" with the models' own head count (4): the attention distributions themselves.
    q_s, k_s = rng.normal(size=(2, B, L, 4, 4))
    q_t, k_t = 2 * rng.normal(size=(2, B, L, 4, 8))
    p_s = _attention_probs(q_s, k_s, SEGMENTS)
    p_t = _attention_probs(q_t, k_t, SEGMENTS)
    real = SEGMENTS > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p_t > 0, p_t * (np.log(p_t) - np.log(p_s)), 0.0)
    kl = terms.sum(-1)  # [batch, heads, length]
    expected = kl.transpose(0, 2, 1)[real].mean()
    got = losses.relation_kl(f64(q_s, k_s), f64(q_t, k_t), jnp.asarray(SEGMENTS), heads=4)
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_relation_kl_is_zero_on_match_and_ignores_padding(rng, x64):
    a, b = rng.normal(size=(2, B, L, 4, 4))
    garbage_a, garbage_b = a.copy(), b.copy()
    garbage_a[SEGMENTS == 0] = 1e3 * rng.normal(size=garbage_a[SEGMENTS == 0].shape)
    garbage_b[SEGMENTS == 0] = -1e3
    got = losses.relation_kl(f64(garbage_a, garbage_b), f64(a, b), jnp.asarray(SEGMENTS),
                             heads=4)
    assert float(got) == pytest.approx(0.0, abs=1e-12)


def test_relation_kl_rejects_widths_the_heads_do_not_split():
    x = jnp.zeros((B, L, 6, 8))
    y = jnp.zeros((B, L, 12, 8))
    with pytest.raises(ValueError, match="relation heads"):
        losses.relation_kl((x, x), (y, y), jnp.asarray(SEGMENTS), heads=5)


# ------------------------------------------------------------------------------------------------
# 2. Chunking: the same values and gradients whatever the chunk.


def _relation(student, teacher, chunk):
    return losses.relation_kl(student, teacher, jnp.asarray(SEGMENTS), heads=4, chunk=chunk)


def _attention(student, teacher, chunk):
    return losses.attention_score_mse(student, teacher, jnp.asarray(SEGMENTS), chunk=chunk)


@pytest.mark.parametrize("term", [_relation, _attention], ids=["relation_kl", "attention_mse"])
def test_chunking_keeps_values_and_gradients(rng, x64, term):
    student = f64(*rng.normal(size=(2, B, L, 4, 4)))
    teacher = f64(*(2 * rng.normal(size=(2, B, L, 4, 6))))
    value_and_grad = jax.jit(jax.value_and_grad(term), static_argnums=2)
    value, grads = value_and_grad(student, teacher, 0)
    assert float(value) > 0.05
    padding = SEGMENTS == 0
    for g in grads:
        assert np.all(np.isfinite(g))
        assert np.abs(np.asarray(g)[~padding]).max() > 1e-3
        np.testing.assert_array_equal(np.asarray(g)[padding], 0.0)  # Padding weighs nothing.
    for chunk in (3, 4, 5, 10):  # Not dividing the length (two ways), dividing it, all of it.
        got_value, got_grads = value_and_grad(student, teacher, chunk)
        np.testing.assert_allclose(got_value, value, rtol=1e-12, err_msg=f"chunk {chunk}")
        for got, expected in zip(got_grads, grads):
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14,
                                       err_msg=f"chunk {chunk}")


# ------------------------------------------------------------------------------------------------
# 3. Chunking bounds memory: no [batch, heads, length, length] array in either direction.

MB, MH, ML, MD, MC = 2, 3, 40, 4, 8  # Distinctive: [2,3,40,40] vs [2,3,8,40].
_SHAPE = re.compile(r"\b(?:f32|f64|bf16|f16|pred|s32|u32|s8|u8)\[([\d,]*)\]")


def _compiled_shapes(term, chunk):
    rng = np.random.default_rng(1)
    inputs = [jnp.asarray(rng.normal(size=(MB, ML, MH, MD)), jnp.float32) for _ in range(4)]
    segments = np.ones((MB, ML), np.int32)
    segments[0, 25:] = 2
    segments[1, 33:] = 0
    if term == "relation":
        fn = lambda s, t, seg: losses.relation_kl(s, t, seg, heads=MH, chunk=chunk)  # noqa: E731
    else:
        fn = lambda s, t, seg: losses.attention_score_mse(s, t, seg, chunk=chunk)  # noqa: E731
    grad = jax.grad(lambda a, b, c, d, seg: fn((a, b), (c, d), seg), argnums=(0, 1))
    compiled = jax.jit(grad).lower(*inputs, jnp.asarray(segments)).compile()
    text = compiled.as_text()
    shapes = {tuple(int(n) for n in m.split(",") if n) for m in _SHAPE.findall(text)}
    assert shapes  # The pattern reads this HLO's shapes at all.
    # The bounded program still computes a usable float32 gradient.
    for g in compiled(*inputs, jnp.asarray(segments)):
        assert g.dtype == jnp.float32 and np.all(np.isfinite(g))
        assert np.abs(np.asarray(g)[segments > 0]).max() > 1e-4
        np.testing.assert_array_equal(np.asarray(g)[segments == 0], 0.0)  # Padding.
    return text, shapes


@pytest.mark.parametrize("term", ["relation", "attention"])
def test_chunked_gradient_never_holds_full_scores(term):
    full = MB * MH * ML * ML
    text, shapes = _compiled_shapes(term, MC)
    assert f"f32[{MB},{MH},{MC},{ML}]" in text  # One chunk of scores.
    assert f"f32[{MB},{MH},{ML},{ML}]" not in text
    # Nor the chunks stacked for the backward ([chunks, batch, heads, chunk, length]).
    biggest = max(shapes, key=math.prod)
    assert math.prod(biggest) < full, biggest

    text, shapes = _compiled_shapes(term, 0)  # The detector sees the full array when it is there.
    assert f"f32[{MB},{MH},{ML},{ML}]" in text
    assert max(math.prod(s) for s in shapes) >= full


def test_memory_check_catches_a_missing_checkpoint(monkeypatch):
    """Without `jax.checkpoint` the scan's backward keeps every chunk's scores: the check fires."""
    monkeypatch.setattr(scores.jax, "checkpoint", lambda f, **_: f)
    _, shapes = _compiled_shapes("relation", MC)
    assert max(math.prod(s) for s in shapes) >= MB * MH * ML * ML


# ------------------------------------------------------------------------------------------------
# 4. Composition: feature_terms and captures.


def _outs(rng, d_s=8, d_t=12):
    """Student (4 layers, width 8, 2 heads) and teacher (12 layers, width 12, 3 heads) outputs."""
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float64)  # noqa: E731
    student = {"hidden_at": {i: arr(B, L, d_s) for i in (0, 2, 4)},
               "qkv_at": {i: tuple(arr(B, L, 2, d_s // 2) for _ in range(3)) for i in (1, 3)}}
    teacher = {"hidden_at": {i: arr(B, L, d_t) for i in (0, 6, 12)},
               "qkv_at": {i: tuple(arr(B, L, 2, d_t // 2) for _ in range(3))
                          for i in (5, 11)}}
    return student, teacher


# Jitted: one compilation instead of many eager ones (the whole file stays fast).
_feature_terms = jax.jit(losses.feature_terms, static_argnums=0)


def _hidden_name(s, t):
    """Hidden-state metrics are named by layer (index − 1), the embeddings' pair by name."""
    return "embeddings" if s == t == 0 else f"s{s - 1}_t{t - 1}"


SPEC = losses.LossSpec(
    hidden_states=losses.HiddenStates(weight=2.0, pairs=((0, 0), (2, 6), (4, 12))),
    attention_scores=losses.AttentionScores(weight=0.5, pairs=((1, 5), (3, 11))),
    relations=losses.Relations(weight=3.0, pairs=("qq", "kk", "vv", "qk"), heads=4,
                               student_layer=3, teacher_layer=11),
    relation_chunk=3)


def test_feature_terms_is_the_weighted_sum_of_the_terms(rng, x64):
    student, teacher = _outs(rng)
    segments = jnp.asarray(SEGMENTS)
    real = (SEGMENTS > 0).astype(np.float64)
    projection = {"kernel": jnp.asarray(rng.normal(size=(8, 12))),
                  "bias": jnp.asarray(rng.normal(size=12))}
    loss, metrics = _feature_terms(SPEC, student, teacher, segments, {"hidden": projection})

    expected_metrics = {}
    for s, t in SPEC.hidden_states.pairs:
        name = _hidden_name(s, t)
        h_s = np.asarray(student["hidden_at"][s]) @ np.asarray(projection["kernel"]) \
            + np.asarray(projection["bias"])
        h_t = np.asarray(teacher["hidden_at"][t])
        expected_metrics[f"hidden_mse/{name}"] = _ref_hidden_mse(h_s, h_t, real)
        cos = (h_s * h_t).sum(-1) / (np.linalg.norm(h_s, axis=-1) * np.linalg.norm(h_t, axis=-1))
        expected_metrics[f"hidden_cos/{name}"] = (cos * real).sum() / real.sum()
    for s, t in SPEC.attention_scores.pairs:
        (q_s, k_s, _), (q_t, k_t, _) = student["qkv_at"][s], teacher["qkv_at"][t]
        expected_metrics[f"attention_mse/s{s}_t{t}"] = _ref_attention_mse(
            *(np.asarray(x) for x in (q_s, k_s, q_t, k_t)), SEGMENTS)
    qkv_s = dict(zip("qkv", (np.asarray(x) for x in student["qkv_at"][3])))
    qkv_t = dict(zip("qkv", (np.asarray(x) for x in teacher["qkv_at"][11])))
    for pair in SPEC.relations.pairs:
        expected_metrics[f"relation_kl/{pair}"] = _ref_relation_kl(
            tuple(qkv_s[n] for n in pair), tuple(qkv_t[n] for n in pair), SEGMENTS, heads=4)
    sums = {prefix: sum(v for k, v in expected_metrics.items() if k.startswith(prefix))
            for prefix in ("hidden_mse/", "attention_mse/", "relation_kl/")}
    expected_metrics.update(loss_hidden=sums["hidden_mse/"],
                            loss_attention=sums["attention_mse/"],
                            loss_relations=sums["relation_kl/"])

    assert set(metrics) == set(expected_metrics)
    for key, value in expected_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-10, err_msg=key)
    expected_loss = 2.0 * sums["hidden_mse/"] + 0.5 * sums["attention_mse/"] \
        + 3.0 * sums["relation_kl/"]
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-10)

    # The same through the per-term functions (jitted: one compilation).
    by_terms = jax.jit(_by_terms)(student, teacher, projection)
    np.testing.assert_allclose(loss, by_terms, rtol=1e-10)


def _by_terms(student, teacher, projection):
    """SPEC's loss from the per-term functions, each called directly (chunk 0)."""
    segments = jnp.asarray(SEGMENTS)
    real = (segments > 0).astype(jnp.float64)
    by_terms = 2.0 * sum(
        losses.hidden_mse(losses.project(projection, student["hidden_at"][s]),
                          teacher["hidden_at"][t], real)
        for s, t in SPEC.hidden_states.pairs)
    by_terms += 0.5 * sum(
        losses.attention_score_mse(student["qkv_at"][s][:2], teacher["qkv_at"][t][:2], segments)
        for s, t in SPEC.attention_scores.pairs)
    index = {"q": 0, "k": 1, "v": 2}
    by_terms += 3.0 * sum(
        losses.relation_kl(tuple(student["qkv_at"][3][index[n]] for n in pair),
                           tuple(teacher["qkv_at"][11][index[n]] for n in pair), segments,
                           heads=4)
        for pair in SPEC.relations.pairs)
    return by_terms


def test_feature_terms_gradient_reaches_student_and_projection(rng, x64):
    student, teacher = _outs(rng)
    projection = {"kernel": jnp.asarray(rng.normal(size=(8, 12))),
                  "bias": jnp.asarray(rng.normal(size=12))}
    loss = lambda s, p: losses.feature_terms(  # noqa: E731
        SPEC, s, teacher, jnp.asarray(SEGMENTS), {"hidden": p})[0]
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(student, projection)
    student_grads, projection_grads = grads
    # Layer 1's values feed no term (only its q and k do); everything else gets a gradient.
    *used, unused = student_grads["qkv_at"].pop(1)
    np.testing.assert_array_equal(unused, 0.0)
    for leaf in jax.tree.leaves((student_grads, used, projection_grads)):
        assert np.all(np.isfinite(leaf)) and np.abs(leaf).max() > 0
    for leaf in jax.tree.leaves((student_grads, used)):  # Padding positions weigh nothing.
        np.testing.assert_array_equal(np.asarray(leaf)[SEGMENTS == 0], 0.0)


@pytest.mark.parametrize("on", ["hidden", "attention", "relations"])
def test_feature_terms_skips_zero_weight_terms(rng, x64, on):
    student, teacher = _outs(rng, d_s=12)
    terms = {
        "hidden": ("hidden_states", losses.HiddenStates(weight=1.0, pairs=((2, 6),)),
                   {"hidden_mse/s1_t5", "hidden_cos/s1_t5", "loss_hidden"}),
        "attention": ("attention_scores", losses.AttentionScores(weight=1.0, pairs=((1, 5),)),
                      {"attention_mse/s1_t5", "loss_attention"}),
        "relations": ("relations", losses.Relations(weight=1.0, pairs=("vv",), heads=2,
                                                    student_layer=3, teacher_layer=11),
                      {"relation_kl/vv", "loss_relations"}),
    }
    field, term, keys = terms[on]
    # The other terms keep their pairs but weigh 0: nothing of theirs is read or reported.
    zeroed = {f: dataclasses.replace(getattr(SPEC, f), weight=0.0)
              for f in ("hidden_states", "attention_scores", "relations")}
    spec = dataclasses.replace(SPEC, **{**zeroed, field: term})
    reads = {"hidden": "hidden_at", "attention": "qkv_at", "relations": "qkv_at"}[on]
    only = lambda out: {reads: out[reads]}  # noqa: E731
    loss, metrics = _feature_terms(spec, only(student), only(teacher), jnp.asarray(SEGMENTS), {})
    assert set(metrics) == keys
    np.testing.assert_allclose(loss, metrics[f"loss_{on}"], rtol=1e-12)


def test_feature_terms_with_every_weight_zero_is_zero():
    spec = losses.LossSpec(
        hidden_states=losses.HiddenStates(weight=0.0, pairs=((0, 0),)),
        attention_scores=losses.AttentionScores(weight=0.0, pairs=((1, 5),)),
        relations=losses.Relations(weight=0.0))
    loss, metrics = losses.feature_terms(spec, {}, None, jnp.asarray(SEGMENTS), {})
    assert metrics == {}
    assert float(loss) == 0.0


def test_captures_are_exactly_what_the_terms_read():
    student, teacher = losses.captures(SPEC)
    assert student == losses.Captures(hidden=(0, 2, 4), qkv=(1, 3))
    assert teacher == losses.Captures(hidden=(0, 6, 12), qkv=(5, 11))
    only_relations = losses.LossSpec(
        hidden_states=losses.HiddenStates(weight=0.0, pairs=SPEC.hidden_states.pairs),
        attention_scores=losses.AttentionScores(weight=0.0, pairs=SPEC.attention_scores.pairs),
        relations=SPEC.relations)
    assert losses.captures(only_relations) == (losses.Captures(qkv=(3,)),
                                               losses.Captures(qkv=(11,)))
    off = losses.LossSpec(
        hidden_states=losses.HiddenStates(weight=0.0, pairs=SPEC.hidden_states.pairs),
        attention_scores=losses.AttentionScores(weight=0.0, pairs=SPEC.attention_scores.pairs),
        relations=losses.Relations(weight=0.0, student_layer=3, teacher_layer=11))
    assert losses.captures(off) == (losses.Captures(), losses.Captures())
    assert losses.captures(losses.LossSpec()) == (losses.Captures(), losses.Captures())


# ------------------------------------------------------------------------------------------------
# 5. Layer maps and projections.


def test_uniform_layer_map():
    assert losses.uniform_layer_map(4, 12) == (2, 5, 8, 11)
    assert losses.uniform_layer_map(6, 12) == (1, 3, 5, 7, 9, 11)
    assert losses.uniform_layer_map(12, 12) == tuple(range(12))
    assert losses.uniform_layer_map(3, 8)[-1] == 7  # Rounded down; the last reads the last.


def test_projection_init():
    on = losses.LossSpec(hidden_states=losses.HiddenStates(weight=1.0, pairs=((4, 12),)))
    off = losses.LossSpec(hidden_states=losses.HiddenStates(weight=0.0, pairs=((4, 12),)))
    rng = jax.random.PRNGKey(0)
    assert losses.projection_init(on, 12, 12)(rng) == {}
    assert losses.projection_init(off, 8, 12)(rng) == {}
    assert losses.projections_needed(on, 12, 12) == losses.projections_needed(off, 8, 12) == ()
    assert losses.projections_needed(on, 8, 12) == ("hidden",)
    # Pooled sentence embeddings get their own projection for MSE and cosine, not for the
    # similarity structure, which compares each model in its own space.
    both = dataclasses.replace(on, embeddings=losses.SentenceEmbeddings(cosine=1.0))
    assert losses.projections_needed(both, 8, 12) == ("hidden", "embeddings")
    similarity = losses.LossSpec(embeddings=losses.SentenceEmbeddings(similarity=1.0))
    assert losses.projections_needed(similarity, 8, 12) == ()

    boxed = losses.projection_init(on, 8, 12)(rng)
    assert set(boxed) == {"hidden"} and set(boxed["hidden"]) == {"kernel", "bias"}
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["hidden"]["kernel"]) == ("transform", "embed")
    assert tuple(specs["hidden"]["bias"]) == ("embed",)
    params = nn.unbox(boxed)
    kernel, bias = params["hidden"]["kernel"], params["hidden"]["bias"]
    assert kernel.shape == (8, 12) and kernel.dtype == jnp.float32
    assert bias.shape == (12,)
    np.testing.assert_array_equal(bias, 0.0)
    assert 0.005 < float(jnp.std(kernel)) < 0.05  # Normal(0.02), as the encoder's dense layers.
    assert losses.project(params["hidden"], jnp.ones((B, L, 8))).shape == (B, L, 12)
