"""Narrow students pruned from their teacher: the slicing is exact, importance finds the units that
contribute nothing and is the same sharded, and a pruned run records, resumes and exports."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from distil_flax.model import importance, init_fn, make_encoder, model_config, student_init
from distil_flax.training import partitioning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def _model(size, seed=0, **fields):
    """A float32 model of a size in `model.SIZES` (fields overridden) and its random params,
    moved off their init so that biases and LayerNorms matter."""
    c = model_config(size)
    c.vocab_size, c.dtype = 50, "float32"
    for key, value in fields.items():
        setattr(c, key, value)
    model = make_encoder(c)
    params = nn.unbox(init_fn(model)(jax.random.PRNGKey(seed)))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), 1000))
    params = jax.tree.map(lambda p: np.asarray(p + 0.05 * jax.random.normal(next(keys), p.shape)),
                          params)
    return model, params


def _inputs(rows=4, length=12, vocab=50, seed=0):
    """Packed rows: two documents in each of the first rows, padding at the end of the last."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (rows, length)).astype(np.int32)
    segments = np.ones((rows, length), np.int32)
    segments[:, 7:] = 2
    segments[-1, 9:] = 0
    positions = np.where(segments == 2, np.arange(length) - 7, np.arange(length)).astype(np.int32)
    positions[segments == 0] = 0
    ids[segments == 0] = 0
    return {"input_ids": ids, "segment_ids": segments, "positions": positions}


def _outputs(model, params, batch):
    logits, out = model.apply({"params": params}, batch["input_ids"], batch["segment_ids"],
                              batch["positions"], logits_at="all")
    real = batch["segment_ids"] > 0
    found = {"hidden": np.asarray(out["hidden"])[real], "logits": np.asarray(logits)[real]}
    if "pooled" in out:
        found["pooled"] = np.asarray(out["pooled"])
    return found


def _keep_all(model) -> student_init.Pruning:
    every = lambda n: tuple(range(n))  # noqa: E731
    return student_init.Pruning(
        layers=every(model.num_layers), channels=every(model.hidden_size),
        heads=(every(model.num_heads),) * model.num_layers,
        neurons=(every(model.intermediate_size),) * model.num_layers)


def _prune(teacher, teacher_params, student, pruning):
    return student_init.init_from_teacher(
        teacher_params, jax.eval_shape(init_fn(student), jax.random.PRNGKey(0)), pruning.layers,
        num_heads=(teacher.num_heads, student.num_heads),
        position_offset=(teacher.position_offset, student.position_offset), pruning=pruning)


def _assert_close(got, want):
    assert set(got) == set(want)
    for name in want:
        assert np.max(np.abs(got[name] - want[name])) < TOL, name


@pytest.mark.parametrize("teacher_size,student_size", [
    ("tiny", "tiny"), ("tiny_roberta", "tiny_roberta"),
    ("tiny", "tiny_student")])  # DistilBERT-shaped: token-type row 0 folded into positions.
def test_pruning_nothing_reproduces_the_teacher(teacher_size, student_size):
    teacher, teacher_params = _model(teacher_size)
    student, _ = _model(student_size, num_layers=teacher.num_layers)
    got = _outputs(student, _prune(teacher, teacher_params, student, _keep_all(teacher)),
                   _inputs())
    want = _outputs(teacher, teacher_params, _inputs())
    if "pooled" not in got:  # The DistilBERT shape has no pooler.
        want.pop("pooled", None)
    _assert_close(got, want)


def _silence(params, unit: str, layer_units: dict[int, int]) -> dict:
    """A copy of the teacher's params in which the given unit of each layer contributes nothing
    — head: its value columns are zero, so its output is; neuron: its input column is zero, so
    GELU(0) = 0 reaches the output projection — or, for "layer", layer 1 passes its input
    through (outputs zeroed, identity LayerNorms after a normalised input)."""
    params = jax.tree.map(np.array, params)
    if unit == "layer":
        layer = params["layers_1"]
        layer["attention"]["out"] = jax.tree.map(np.zeros_like, layer["attention"]["out"])
        layer["mlp_out"] = jax.tree.map(np.zeros_like, layer["mlp_out"])
        for norm in (layer["attention_norm"], layer["mlp_norm"], params["layers_0"]["mlp_norm"]):
            norm["scale"][:], norm["bias"][:] = 1.0, 0.0
        return params
    for index, unit_index in layer_units.items():
        layer = params[f"layers_{index}"]
        if unit == "head":
            size = layer["attention"]["value"]["kernel"].shape[1] // 4
            columns = slice(unit_index * size, (unit_index + 1) * size)
            layer["attention"]["value"]["kernel"][:, columns] = 0.0
            layer["attention"]["value"]["bias"][columns] = 0.0
        else:
            layer["mlp_in"]["kernel"][:, unit_index] = 0.0
            layer["mlp_in"]["bias"][unit_index] = 0.0
    return params


@pytest.mark.parametrize("unit", ["head", "neuron", "layer"])
def test_importance_removes_exactly_the_unit_that_contributes_nothing(unit):
    teacher, params = _model("tiny", num_layers=3, num_heads=4)
    silenced = {0: 2, 1: 0, 2: 3}  # A different unit in each layer.
    params = _silence(params, unit, silenced)
    batch = _inputs()
    measured = importance.measure(teacher, params, [batch])
    sizes = dict(hidden_size=32, num_heads=4, intermediate_size=64, layers=(0, 1, 2))
    shape = {}
    if unit == "head":
        sizes["num_heads"] = shape["num_heads"] = 3
        shape["head_dim"] = 8  # Heads keep their size; the hidden size stays.
    elif unit == "neuron":
        sizes["intermediate_size"] = shape["intermediate_size"] = 63
    else:
        sizes["layers"] = 2
        shape["num_layers"] = 2
    pruning = importance.keep(measured, **sizes)

    # Importance found exactly the silenced units, and nothing else went.
    if unit == "layer":
        assert pruning.layers == (0, 2)
    for i, layer in enumerate(pruning.layers):
        kept = pruning.heads[i] if unit == "head" else pruning.neurons[i]
        width = 4 if unit == "head" else 64
        expected = [u for u in range(width) if unit == "layer" or u != silenced[layer]]
        assert list(kept) == expected, (unit, layer, kept)
    assert pruning.channels == tuple(range(32))

    student, _ = _model("tiny", **{"num_layers": 3, "num_heads": 4, **shape})
    _assert_close(_outputs(student, _prune(teacher, params, student, pruning), batch),
                  _outputs(teacher, params, batch))
    if unit != "layer":  # Not vacuous: removing a unit that does contribute changes the output.
        other = {"head": "heads", "neuron": "neurons"}[unit]
        # Head 1 or neuron 1 of every layer: never a silenced one.
        wrong = dataclasses.replace(pruning, **{other: tuple(
            tuple(u for u in range(4 if unit == "head" else 64) if u != 1) for _ in range(3))})
        got = _outputs(student, _prune(teacher, params, student, wrong), batch)
        assert np.max(np.abs(got["hidden"] - _outputs(teacher, params, batch)["hidden"])) > 1e-3


def test_a_narrower_student_slices_every_tensor_on_the_hidden_size():
    teacher, params = _model("tiny", num_layers=2)
    student, _ = _model("tiny", num_layers=1, hidden_size=16, num_heads=1,
                        intermediate_size=40)
    measured = importance.measure(teacher, params, [_inputs()])
    pruning = importance.keep(measured, layers=(1,), hidden_size=16, num_heads=1,
                              intermediate_size=40)
    got = _prune(teacher, params, student, pruning)
    channels, head = np.asarray(pruning.channels), pruning.heads[0][0]
    np.testing.assert_array_equal(got["word_embeddings"]["embedding"],
                                  params["word_embeddings"]["embedding"][:, channels])
    np.testing.assert_array_equal(got["pooler"]["kernel"],
                                  params["pooler"]["kernel"][channels][:, channels])
    np.testing.assert_array_equal(got["mlm_bias"], params["mlm_bias"])  # The vocabulary stays.
    query = params["layers_1"]["attention"]["query"]["kernel"]
    np.testing.assert_array_equal(got["layers_0"]["attention"]["query"]["kernel"],
                                  query[channels][:, head * 16:(head + 1) * 16])
    out = params["layers_1"]["attention"]["out"]["kernel"]
    np.testing.assert_array_equal(got["layers_0"]["attention"]["out"]["kernel"],
                                  out[head * 16:(head + 1) * 16][:, channels])
    neurons = np.asarray(pruning.neurons[0])
    np.testing.assert_array_equal(got["layers_0"]["mlp_out"]["kernel"],
                                  params["layers_1"]["mlp_out"]["kernel"][neurons][:, channels])
    # The kept channels carry the largest activations.
    assert set(channels) == set(np.argsort(-measured.channels)[:16])
    # The record round-trips through JSON; a damaged one is refused naming the key.
    assert student_init.Pruning.from_json(json.loads(json.dumps(pruning.to_json()))) == pruning
    with pytest.raises(ValueError, match="'neurons'"):
        student_init.Pruning.from_json({**pruning.to_json(), "neurons": [[0.5]]})


def test_pruned_heads_must_keep_the_teachers_head_size():
    teacher, params = _model("tiny")
    student, _ = _model("tiny", hidden_size=16, num_heads=2, intermediate_size=64)  # Heads of 8.
    pruning = importance.keep(importance.measure(teacher, params, [_inputs()]), layers=(0, 1),
                              hidden_size=16, num_heads=2, intermediate_size=64)
    with pytest.raises(ValueError, match="heads of 16.*model.num_heads=1"):
        _prune(teacher, params, student, pruning)


def test_importance_is_deterministic_and_sharded_equals_one_device():
    teacher, params = _model("tiny", num_layers=2, num_heads=4)
    batches = [_inputs(rows=8, seed=seed) for seed in range(3)]
    one, again = (importance.measure(teacher, params, batches) for _ in range(2))
    for field in ("heads", "neurons", "channels", "layers"):
        np.testing.assert_array_equal(getattr(again, field), getattr(one, field))

    mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = partitioning.rules_from_config(partitioning.DEFAULT_RULES)
    shardings = jax.tree.map(lambda a: a.sharding, partitioning.abstract_params(
        init_fn(teacher), mesh, rules))
    sharded_params = jax.device_put(params, shardings)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    with partitioning.mesh_context(mesh, rules):
        sharded = importance.measure(teacher, sharded_params, [
            jax.device_put(b, batch_sharding) for b in batches])
    for field in ("heads", "neurons", "channels", "layers"):
        np.testing.assert_allclose(getattr(sharded, field), getattr(one, field), rtol=1e-5,
                                   atol=1e-6)
    sizes = dict(layers=1, hidden_size=16, num_heads=2, intermediate_size=32)
    assert importance.keep(sharded, **sizes) == importance.keep(one, **sizes)


def test_keep_refuses_a_student_larger_than_its_teacher():
    teacher, params = _model("tiny")
    measured = importance.measure(teacher, params, [_inputs()])
    with pytest.raises(ValueError, match="model.intermediate_size \\(128\\)"):
        importance.keep(measured, layers=(0,), hidden_size=32, num_heads=2,
                        intermediate_size=128)


def test_a_head_size_that_does_not_fill_the_hidden_size_is_not_exported():
    from distil_flax.interop.hf import export

    c = model_config("tiny")
    c.vocab_size, c.head_dim, c.num_heads = 50, 8, 3
    make_encoder(c)  # Runs here ...
    with pytest.raises(ValueError, match="num_heads \\(3\\) × model.head_dim \\(8\\)"):
        export.hf_config(c)  # ... but transformers' BERT cannot hold it.


def test_kept_channels_compare_the_teachers_kept_channels_without_projection():
    from distil_flax.losses import kept_channels

    teacher = jnp.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(kept_channels(teacher, (1, 3)), teacher[..., [1, 3]])
    assert kept_channels(teacher, ()) is teacher
