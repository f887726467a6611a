"""The fused, chunked MLM heads + loss against the plain path: value, gradients, metrics, memory."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from distil_flax import losses
from distil_flax.distill import step
from distil_flax.distill.masking import MaskingSpec
from distil_flax.model import Encoder, make_encoder, model_config
from distil_flax.training import partitioning

B, L, D, V, K = 3, 10, 8, 23, 3


def _load_bench(name):
    path = os.path.join(os.path.dirname(__file__), "..", "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _problem(dtype, seed=0, batch=B, vocab=V):
    """Random head inputs, hidden states, prediction slots and weights (with padding)."""
    rng = np.random.default_rng(seed)
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    real = np.ones((batch, L))
    real[1, 7:] = 0.0
    real[2, 4:] = 0.0
    positions = np.stack([rng.choice(int(r.sum()), K, replace=False) for r in real])
    mlm_weights = np.ones((batch, K))
    mlm_weights[2, 2] = 0.0  # An unused slot.
    head = lambda: (arr(batch, L, D), arr(vocab, D), arr(vocab))  # noqa: E731
    return dict(
        student=head(), teacher=head(), hidden=(arr(batch, L, D), arr(batch, L, D)),
        positions=jnp.asarray(positions), labels=jnp.asarray(rng.integers(0, vocab, (batch, K))),
        mlm_weights=jnp.asarray(mlm_weights, dtype), real=jnp.asarray(real, dtype))


def _both_paths(spec, on_all: bool):
    """(plain, fused) losses as functions of (features, decoder, bias, problem), one layout.

    Everything but the student's head inputs arrives in `problem` (as jit arguments, so XLA
    does not fold the teacher's logits into constants).
    """

    def parts(p):
        gather = lambda x: jnp.take_along_axis(x, p["positions"][..., None], 1)  # noqa: E731
        identity = lambda x: x  # noqa: E731
        # Heads run at every position (L_ce on all) or at the prediction slots only.
        rows, slots = (identity, gather) if on_all else (gather, identity)
        teacher = None if not spec.alpha_ce else (rows(p["teacher"][0]), *p["teacher"][1:])
        common = dict(ce_weights=p["real"] if on_all else p["mlm_weights"],
                      mlm_labels=p["labels"], mlm_weights=p["mlm_weights"],
                      student_hidden=p["hidden"][0],
                      teacher_hidden=p["hidden"][1] if spec.alpha_cos else None,
                      token_weights=p["real"])
        return rows, slots, teacher, common

    def logits(head):
        features, decoder, bias = head
        return features @ decoder.T.astype(features.dtype) + bias.astype(features.dtype)

    def plain(features, decoder, bias, p):
        rows, slots, teacher, common = parts(p)
        s = logits((rows(features), decoder, bias))
        t = None if teacher is None else logits(teacher)
        return losses.distillation_loss(
            spec, student_logits=s, teacher_logits=t, student_mlm_logits=slots(s),
            teacher_mlm_logits=None if t is None else slots(t), **common)

    def fused(features, decoder, bias, p):
        rows, _, teacher, common = parts(p)
        return losses.fused_distillation_loss(
            spec, student_head=(rows(features), decoder, bias), teacher_head=teacher,
            label_positions=p["positions"] if on_all else None, **common)

    return plain, fused


def _value_and_grads(fn, p):
    rest = {k: v for k, v in p.items() if k != "student"}
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))(*p["student"], rest)


@pytest.mark.parametrize("on_all, chunk", [(True, 3), (True, 5), (False, 64)],
                         ids=["ce_on_all-ragged_chunks", "ce_on_all-even_chunks",
                              "ce_on_masked-one_chunk"])
def test_fused_matches_plain_in_float64(on_all, chunk):
    with jax.enable_x64(True):
        p = _problem(jnp.float64)
        spec = losses.LossSpec(head_chunk=chunk)
        plain, fused = _both_paths(spec, on_all)
        (loss_p, metrics_p), grads_p = _value_and_grads(plain, p)
        (loss_f, metrics_f), grads_f = _value_and_grads(fused, p)
    assert loss_f.dtype == jnp.float64
    np.testing.assert_allclose(loss_f, loss_p, rtol=1e-12)
    assert set(metrics_f) == set(metrics_p)
    for key in metrics_p:
        np.testing.assert_allclose(metrics_f[key], metrics_p[key], rtol=1e-12, err_msg=key)
    for name, g_f, g_p in zip(("features", "decoder", "bias"), grads_f, grads_p):
        np.testing.assert_allclose(g_f, g_p, rtol=1e-10, atol=1e-13, err_msg=name)


@pytest.mark.parametrize("weights", [dict(alpha_ce=0.0, alpha_cos=0.0),  # Pretraining: MLM only.
                                     dict(alpha_mlm=0.0, temperature=1.0)],
                         ids=["mlm_only", "ce_only_at_t1"])
def test_fused_matches_plain_for_other_weights(weights):
    p = _problem(jnp.float32, seed=1)
    spec = losses.LossSpec(head_chunk=4, **weights)
    plain, fused = _both_paths(spec, on_all=bool(spec.alpha_ce))
    (loss_p, metrics_p), grads_p = _value_and_grads(plain, p)
    (loss_f, metrics_f), grads_f = _value_and_grads(fused, p)
    np.testing.assert_allclose(loss_f, loss_p, rtol=1e-5)
    assert set(metrics_f) == set(metrics_p)
    for g_f, g_p in zip(grads_f, grads_p):
        np.testing.assert_allclose(g_f, g_p, rtol=1e-4, atol=1e-6)


def test_fused_bfloat16_compute_stays_close_to_plain():
    # bf16 logits, fp32 reductions, fp32 decoder-gradient accumulation: the fused path may only
    # differ from the plain one by bf16 rounding.
    p = _problem(jnp.bfloat16, seed=2)
    p["student"] = (p["student"][0], *(x.astype(jnp.float32) for x in p["student"][1:]))
    spec = losses.LossSpec(head_chunk=4)
    plain, fused = _both_paths(spec, on_all=True)
    (loss_p, _), grads_p = _value_and_grads(plain, p)
    (loss_f, _), grads_f = _value_and_grads(fused, p)
    assert loss_f.dtype == jnp.float32
    np.testing.assert_allclose(loss_f, loss_p, rtol=1e-3)
    for g_f, g_p in zip(grads_f, grads_p):
        g_f, g_p = np.asarray(g_f, np.float32), np.asarray(g_p, np.float32)
        assert np.linalg.norm(g_f - g_p) < 2e-2 * np.linalg.norm(g_p)


def test_fused_holds_one_chunk_of_logits():
    # The plain path keeps several float32 [tokens, vocab] arrays alive for the backward pass;
    # the fused one only [batch, chunk, vocab] at a time.
    batch, length, vocab, chunk = 4, 128, 4096, 8
    rng = np.random.default_rng(3)
    p = _problem(jnp.float32)
    p["student"] = tuple(jnp.asarray(rng.normal(size=s), jnp.float32)
                         for s in ((batch, length, D), (vocab, D), (vocab,)))
    p["teacher"] = tuple(jnp.asarray(rng.normal(size=s), jnp.float32)
                         for s in ((batch, length, D), (vocab, D), (vocab,)))
    p["hidden"] = tuple(jnp.ones((batch, length, D)) for _ in range(2))
    p["real"] = jnp.ones((batch, length))
    p["positions"] = jnp.tile(jnp.arange(K), (batch, 1))
    p["labels"] = jnp.zeros((batch, K), jnp.int32)
    p["mlm_weights"] = jnp.ones((batch, K))
    plain, fused = _both_paths(losses.LossSpec(head_chunk=chunk), on_all=True)
    rest = {k: v for k, v in p.items() if k != "student"}

    def temp_bytes(fn):
        grad_fn = jax.jit(jax.grad(lambda *a: fn(*a)[0], argnums=(0, 1, 2)))
        return grad_fn.lower(*p["student"], rest).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = batch * length * vocab * 4
    assert temp_bytes(plain) > 2 * logits_bytes
    assert temp_bytes(fused) < 0.5 * logits_bytes


def test_fused_loss_under_a_mesh_matches_one_device_and_reduces_once():
    # Batch over data × fsdp, vocabulary over tensor: the chunk loop runs per device and sums
    # decoder gradients once, not once per chunk.
    # Rows divisible by data × fsdp, vocabulary by tensor.
    p = _problem(jnp.float32, seed=4, batch=4, vocab=24)
    spec = losses.LossSpec(head_chunk=4)
    _, fused = _both_paths(spec, on_all=True)
    (loss_1, metrics_1), grads_1 = _value_and_grads(fused, p)
    rest = {k: v for k, v in p.items() if k != "student"}

    mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = partitioning.DEFAULT_RULES
    grad_fn = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2), has_aux=True))
    features, decoder, bias = p["student"]
    sharded = (jax.device_put(features, NamedSharding(mesh, P(("data", "fsdp")))),
               jax.device_put(decoder, NamedSharding(mesh, P("tensor", "fsdp"))),
               jax.device_put(bias, NamedSharding(mesh, P("tensor"))))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = grad_fn.lower(*sharded, rest).compile()
        (loss_8, metrics_8), grads_8 = compiled(*sharded, rest)
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
    for key in metrics_1:
        np.testing.assert_allclose(metrics_8[key], metrics_1[key], rtol=1e-5, err_msg=key)
    for g_8, g_1 in zip(grads_8, grads_1):
        np.testing.assert_allclose(g_8, g_1, rtol=1e-4, atol=1e-6)
    # Reductions across the 4 batch shards happen once; inside the chunk loop only the
    # vocabulary-parallel softmax reduces, across the 2 tensor shards.
    found = _load_bench("comm_model").collectives(compiled.as_text(), 8)
    across_batch = [c for c in found if c["op"] == "all-reduce" and c["group"] == 4]
    assert across_batch and all(c["trips"] == 1 for c in across_batch)


def _tiny_models():
    teacher_config = model_config("tiny")
    student_config = model_config("tiny_student")
    for c in (teacher_config, student_config):
        c.dtype, c.vocab_size, c.max_position_embeddings = "float32", 64, 16
    student_config.dropout_rate = 0.0
    return make_encoder(teacher_config), make_encoder(student_config)


def _init(model: Encoder, seed: int):
    ids = jnp.zeros((1, 16), jnp.int32)
    init = jax.jit(lambda rng: nn.unbox(model.init(rng, ids, jnp.ones_like(ids), ids,
                                                   logits_at="all"))["params"])
    return init(jax.random.PRNGKey(seed))


def test_step_gradients_match_between_fused_and_plain_heads():
    # The released recipe through the whole micro-batch step: masking, both encoders, the heads
    # on every position, all three terms. (L_ce on the masked slots: the function tests above.)
    teacher, student = _tiny_models()
    params, teacher_params = _init(student, 1), _init(teacher, 0)
    rng = np.random.default_rng(6)
    ids = rng.integers(5, 64, size=(4, 16)).astype(np.int32)
    segments = np.ones_like(ids)
    segments[:, 9:] = 2  # Two packed documents per row ...
    segments[1, 13:] = 0  # ... and some padding.
    positions = np.where(segments == 2, np.arange(16) - 9, np.arange(16)).astype(np.int32)
    micro = {"input_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(segments),
             "positions": jnp.asarray(positions)}
    masking = MaskingSpec(mask_id=4, vocab_size=64, special_ids=(0, 1, 2, 3, 4))

    def run(head_chunk):
        spec = losses.LossSpec(head_chunk=head_chunk)
        return jax.jit(lambda p, tp, micro: step._loss_and_grads(
            p, {}, tp, micro, None, jax.random.PRNGKey(7), student=student, teacher=teacher,
            masking=masking, loss=spec))(params, teacher_params, micro)

    grads_plain, metrics_plain = run(0)
    grads_fused, metrics_fused = run(5)
    assert set(metrics_fused) == set(metrics_plain)
    for key in metrics_plain:
        np.testing.assert_allclose(metrics_fused[key], metrics_plain[key], rtol=1e-4,
                                   atol=1e-6, err_msg=key)
    flat_plain = jax.tree.leaves_with_path(grads_plain)
    for (path, g_p), g_f in zip(flat_plain, jax.tree.leaves(grads_fused)):
        np.testing.assert_allclose(g_f, g_p, rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_fused_head_needs_a_positive_chunk_and_the_teacher_head():
    p = _problem(jnp.float32)
    common = dict(ce_weights=p["real"], label_positions=p["positions"], mlm_labels=p["labels"],
                  mlm_weights=p["mlm_weights"], student_hidden=p["hidden"][0],
                  teacher_hidden=p["hidden"][1], token_weights=p["real"])
    with pytest.raises(ValueError, match="loss.head_chunk"):
        losses.fused_distillation_loss(losses.LossSpec(head_chunk=0), student_head=p["student"],
                                       teacher_head=p["teacher"], **common)
    with pytest.raises(ValueError, match="teacher's head inputs"):
        losses.fused_distillation_loss(losses.LossSpec(), student_head=p["student"],
                                       teacher_head=None, **common)
