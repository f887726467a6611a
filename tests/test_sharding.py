"""The step on 8 simulated devices, under every mesh shape, matches the 1-device result."""

import dataclasses

import jax
import numpy as np
import pytest

from distil_flax import model as model_lib
from distil_flax.distill import train
from distil_flax.distill.config import base_config
from distil_flax.model import make_encoder, model_config
from distil_flax.training import partitioning
from distil_flax.training.optimizer import make_optimizer
from distil_flax.training.train_state import shardings_of

VOCAB, LENGTH, BATCH = 64, 16, 16


@dataclasses.dataclass
class _Tokenizer:
    vocab_size: int = VOCAB
    mask_id: int = 4
    special_ids: tuple = (0, 1, 2, 3, 4)


def _config(recipe="distilbert"):
    c = base_config()
    c.model = model_config("tiny_student")
    c.model.dtype = "float32"
    c.model.vocab_size = VOCAB
    c.model.num_heads = 4  # Divisible by the tensor axis.
    c.model.dropout_rate = 0.0  # Dropout masks depend on the sharding; compare without them.
    c.data.seq_len = LENGTH
    c.train.batch_size = BATCH
    c.train.micro_batch_size = 8  # Two micro-batches: accumulation runs sharded too.
    c.init.layer_map = [1]
    if recipe == "narrow":
        # A student half the teacher's width, distilled by every intermediate-layer term: the
        # hidden-state projection is sharded too, and relations run in two chunks of rows.
        c.model.hidden_size, c.model.intermediate_size = 16, 32
        c.init.from_teacher = False
        c.loss.alpha_ce = c.loss.alpha_cos = 0.0
        c.loss.hidden_states.weight = 1.0
        c.loss.attention_scores.weight = 1.0
        c.loss.relations.weight = 1.0
        c.loss.relations.heads = 4
        c.loss.relation_chunk = LENGTH // 2
    return c


def _teacher():
    c = model_config("tiny")
    c.dtype = "float32"
    c.vocab_size = VOCAB
    c.num_heads = 4
    return make_encoder(c)


def _host_params(model, seed):
    init = model_lib.init_fn(model)
    abstract = partitioning.abstract_params(init, partitioning.make_mesh(
        {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]), partitioning.DEFAULT_RULES)
    from flax import linen as nn
    params = jax.jit(lambda r: nn.unbox(init(r)))(jax.random.PRNGKey(seed))
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    return jax.device_get(params)


def _batch(rng):
    ids = rng.integers(5, VOCAB, size=(2, BATCH // 2, LENGTH)).astype(np.int32)
    seg = np.ones_like(ids)
    seg[..., LENGTH - 3:] = 0
    ids[..., LENGTH - 3:] = 0
    pos = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), ids.shape).copy()
    return {"input_ids": ids, "segment_ids": seg, "positions": pos}


def _run(mesh_shape, devices, steps=2, recipe="distilbert"):
    c = _config(recipe)
    mesh = partitioning.make_mesh(mesh_shape, devices)
    rules = partitioning.DEFAULT_RULES
    teacher = _teacher()
    student = make_encoder(c.model)
    teacher_host = _host_params(teacher, 0)
    teacher_params = jax.device_put(
        teacher_host, shardings_of(partitioning.abstract_params(model_lib.init_fn(teacher), mesh,
                                                                 rules)))
    from distil_flax.model import student_init
    setup = train.Setup(
        config=c, mesh=mesh, rules=rules, tokenizer=_Tokenizer(), train_rows={}, eval_rows={},
        student=student, teacher=teacher, teacher_params=teacher_params,
        teacher_init=student_init.init_from_teacher(
            teacher_host, _host_params(student, 1), c.init.layer_map)
        if c.init.from_teacher else None,
        loss=train.loss_spec(c, student, teacher))
    optimizer, schedule = make_optimizer(c.train, 10)
    abstract = train.abstract_state(setup, optimizer)
    state = train.init_state(setup, optimizer, abstract)
    step_fn, _ = train.compile_steps(setup, optimizer, schedule, shardings_of(abstract))
    batch_sharding = partitioning.batch_sharding(mesh, rules, leading_dims=1)
    rng = np.random.default_rng(0)
    metrics = []
    with partitioning.mesh_context(mesh, rules):
        for _ in range(steps):
            batch = partitioning.host_to_global(_batch(rng), batch_sharding)
            state, m = step_fn(state, teacher_params, batch, None)
            metrics.append(jax.device_get(m))
    return state, metrics


@pytest.fixture(scope="module")
def single_device():
    return _run({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


@pytest.mark.parametrize("shape", [
    {"data": 8, "fsdp": 1, "tensor": 1},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"data": 1, "fsdp": 8, "tensor": 1},
    {"data": 2, "fsdp": 1, "tensor": 4},
])
def test_mesh_shapes_match_single_device(single_device, shape):
    assert len(jax.devices()) == 8
    ref_state, ref_metrics = single_device
    state, metrics = _run(shape, jax.devices())
    for ref, got in zip(ref_metrics, metrics):
        for key in ("loss", "loss_ce", "loss_mlm", "loss_cos", "grad_norm"):
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(state.params), jax.device_get(ref_state.params))


@pytest.fixture(scope="module")
def narrow_single_device():
    return _run({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1], recipe="narrow")


def test_intermediate_layer_terms_match_single_device(narrow_single_device):
    # Every axis at once: batch over data and fsdp, parameters over fsdp, heads over tensor.
    ref_state, ref_metrics = narrow_single_device
    state, metrics = _run({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices(), recipe="narrow")
    for ref, got in zip(ref_metrics, metrics):
        for key in ("loss", "loss_hidden", "loss_attention", "loss_relations", "grad_norm"):
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert state.projections["hidden"]["kernel"].shape == (16, 32)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get((state.params, state.projections)),
                 jax.device_get((ref_state.params, ref_state.projections)))


def test_fsdp_really_shards_parameters_and_optimizer_state():
    state, _ = _run({"data": 1, "fsdp": 8, "tensor": 1}, jax.devices(), steps=1)
    replicated_state, _ = _run({"data": 8, "fsdp": 1, "tensor": 1}, jax.devices(), steps=1)
    for tree in ("params", "opt_state"):
        sharded = partitioning.bytes_per_device(getattr(state, tree))
        whole = partitioning.bytes_per_device(getattr(replicated_state, tree))
        assert len(sharded) == 8
        # Every matrix splits its embedding axis 8 ways; only small vectors stay whole.
        assert max(sharded.values()) < 0.25 * max(whole.values()), tree
