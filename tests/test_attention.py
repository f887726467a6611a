"""Attention kernel selection per platform, the mask each kernel receives, the kernels the
training step compiles to on GPUs and TPUs, and remat policies."""

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from distil_flax import model as model_lib
from distil_flax.distill.masking import MaskingSpec
from distil_flax.distill.step import TrainState, distil_step
from distil_flax.losses import AttentionScores, LossSpec, Relations
from distil_flax.model import attention as attention_lib
from distil_flax.model import make_encoder, model_config
from distil_flax.model.attention import select_attention
from distil_flax.training import partitioning

BF16, F32 = jnp.bfloat16, jnp.float32


@pytest.mark.parametrize("platform, dtype, head_dim, length, mask, dropout, expected", [
    ("cuda", BF16, 64, 512, "segments", False, "cudnn"),
    ("cuda", BF16, 64, 512, "lengths", False, "cudnn"),
    ("cuda", BF16, 64, 511, "segments", False, "xla"),  # Bias needs an even length.
    ("cuda", BF16, 64, 511, "lengths", False, "cudnn"),  # No bias: any length.
    ("cuda", F32, 64, 512, "segments", False, "xla"),  # cuDNN has no float32 flash kernel.
    ("cuda", BF16, 160, 512, "segments", False, "xla"),  # Head dim beyond 128.
    ("cuda", BF16, 64, 512, "segments", True, "einsum"),  # Only einsum has probability dropout.
    ("rocm", BF16, 64, 512, "segments", False, "xla"),
    ("tpu", BF16, 64, 512, "segments", False, "splash"),
    ("tpu", BF16, 64, 200, "segments", False, "xla"),  # Splash blocks are 128 tokens.
    ("cpu", F32, 16, 512, "segments", False, "xla"),
])
def test_auto_selects_the_kernel_for_the_platform(platform, dtype, head_dim, length, mask,
                                                  dropout, expected):
    assert select_attention("auto", platform=platform, dtype=dtype, head_dim=head_dim,
                            length=length, mask=mask, dropout=dropout) == expected


def test_explicit_kernels_are_kept_or_refused_with_the_field_named():
    kwargs = dict(dtype=BF16, head_dim=64, length=512, mask="segments", dropout=False)
    assert select_attention("xla", platform="cuda", **kwargs) == "xla"
    assert select_attention("einsum", platform="tpu", **kwargs) == "einsum"
    assert select_attention("cudnn", platform="cuda", **kwargs) == "cudnn"
    with pytest.raises(ValueError, match="model.attention_impl='cudnn' needs an NVIDIA GPU"):
        select_attention("cudnn", platform="cpu", **kwargs)
    with pytest.raises(ValueError, match="model.attention_impl='splash' needs a TPU"):
        select_attention("splash", platform="cuda", **kwargs)


def test_attention_kernel_reads_the_model_and_the_platform(monkeypatch):
    c = model_config("distil6")
    c.vocab_size = 30522
    student = make_encoder(c)  # bf16, 12 heads of 64.
    monkeypatch.setattr(attention_lib, "platform", lambda: "cuda")
    assert model_lib.attention_kernel(student, 512) == "cudnn"
    assert model_lib.attention_kernel(student.clone(attention_dropout_rate=0.1), 512,
                                      train=True) == "einsum"
    monkeypatch.setattr(attention_lib, "platform", lambda: "tpu")
    assert model_lib.attention_kernel(student, 512) == "splash"
    monkeypatch.setattr(attention_lib, "platform", lambda: "cpu")
    assert model_lib.attention_kernel(student, 512) == "xla"


def _encoder(impl: str, mask: str = "segments", length: int = 16, remat: str = "none"):
    c = model_config("tiny_student")  # One layer: compiles fast.
    c.dtype, c.vocab_size, c.max_position_embeddings = "float32", 64, length
    c.attention_impl, c.attention_mask, c.remat = impl, mask, remat
    return make_encoder(c)


def _rows(length: int, packed: bool, seed: int = 0):
    """Two rows: packed documents (or one) followed by padding, with in-segment positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 64, size=(2, length)).astype(np.int32)
    segments = np.ones_like(ids)
    if packed:
        segments[:, length // 3:] = 2
        segments[0, 2 * length // 3:] = 3
    segments[1, length - length // 4:] = 0
    positions = np.zeros_like(ids)
    for r in range(2):
        for s in np.unique(segments[r]):
            where = segments[r] == s
            positions[r, where] = np.arange(where.sum())
    return jnp.asarray(ids), jnp.asarray(segments), jnp.asarray(positions)


def _hidden(model, params, rows):
    _, out = jax.jit(lambda p, *r: model.apply({"params": p}, *r))(params, *rows)
    return np.asarray(out["hidden"])


def _params(model, length):
    ids = jnp.zeros((1, length), jnp.int32)
    return jax.jit(lambda r: nn.unbox(model.init(r, ids, jnp.ones_like(ids), ids))["params"])(
        jax.random.PRNGKey(0))


def test_xla_attention_matches_einsum_on_packed_rows():
    rows = _rows(16, packed=True)
    reference = _encoder("einsum")
    params = _params(reference, 16)
    real = np.asarray(rows[1]) > 0
    expected = _hidden(reference, params, rows)
    np.testing.assert_allclose(_hidden(_encoder("xla"), params, rows)[real], expected[real],
                               rtol=1e-5, atol=1e-5)
    # A dense mask that ignored segments would mix documents: make sure it matters here.
    unpacked = (rows[0], (rows[1] > 0).astype(jnp.int32), rows[2])
    assert not np.allclose(_hidden(reference, params, unpacked)[real], expected[real], atol=1e-3)


@pytest.mark.parametrize("impl", ["xla", "einsum"])
def test_lengths_mask_matches_segments_on_unpacked_rows(impl):
    rows = _rows(16, packed=False)
    params = _params(_encoder(impl), 16)
    real = np.asarray(rows[1]) > 0
    np.testing.assert_allclose(_hidden(_encoder(impl, "lengths"), params, rows)[real],
                               _hidden(_encoder(impl, "segments"), params, rows)[real],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask", ["segments", "lengths"])
def test_cudnn_receives_the_mask_form_it_supports(monkeypatch, mask):
    # No GPU here: pretend to be on one and record what reaches jax.nn.dot_product_attention,
    # running XLA's implementation in cuDNN's place.
    calls = []
    original = jax.nn.dot_product_attention

    def recording(q, k, v, **kwargs):
        calls.append(kwargs)
        return original(q, k, v, **{**kwargs, "implementation": "xla"})

    monkeypatch.setattr(attention_lib, "platform", lambda: "cuda")
    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    rows = _rows(16, packed=mask == "segments")
    model = _encoder("cudnn", mask)
    params = _params(_encoder("einsum"), 16)
    real = np.asarray(rows[1]) > 0
    got = _hidden(model, params, rows)
    assert calls and all(c["implementation"] == "cudnn" for c in calls)
    if mask == "segments":
        assert all(set(c) == {"implementation", "mask"} for c in calls)
        assert calls[0]["mask"].dtype == jnp.bool_ and calls[0]["mask"].shape == (2, 1, 16, 16)
    else:  # cuDNN's padding mask type: no dense mask, no bias.
        assert all(set(c) == {"implementation", "key_value_seq_lengths"} for c in calls)
        lengths = calls[0]["key_value_seq_lengths"]
        assert lengths.dtype == jnp.int32 and lengths.shape == (2,)
    monkeypatch.setattr(jax.nn, "dot_product_attention", original)
    expected = _hidden(_encoder("einsum", mask), params, rows)
    np.testing.assert_allclose(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_tpu_auto_runs_splash_under_a_mesh_and_matches_einsum(monkeypatch):
    # Pretend to compile for a TPU: `auto` picks splash attention, which runs here in the Pallas
    # interpreter, per shard of a data × tensor mesh (batch and heads split).
    calls = []
    original = attention_lib.splash_attention

    def recording(q, k, v, segment_ids, **kwargs):
        calls.append(dict(mesh=jax.sharding.get_abstract_mesh(), **kwargs))
        return original(q, k, v, segment_ids, interpret=True)  # No TPU here: interpret it.

    monkeypatch.setattr(attention_lib, "platform", lambda: "tpu")
    monkeypatch.setattr(attention_lib, "splash_attention", recording)
    length = 128
    rows = _rows(length, packed=True)
    reference = _encoder("einsum", length=length)
    params = _params(reference, length)
    real = np.asarray(rows[1]) > 0
    expected = _hidden(reference, params, rows)
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.DEFAULT_RULES):
        got = _hidden(_encoder("auto", length=length), params, rows)
    assert len(calls) == 1
    assert dict(calls[0]["mesh"].shape) == {"data": 2, "fsdp": 1, "tensor": 2}
    np.testing.assert_allclose(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_remat_policies_give_the_same_gradients():
    rows = _rows(16, packed=True)
    params = _params(_encoder("xla"), 16)
    # A fixed random projection (a sum of squares would be LayerNorm-invariant: zero gradients).
    direction = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 32))

    policies = ["none", *model_lib.REMAT_POLICIES]

    @jax.jit
    def all_grads(params):  # One program for every policy: one compilation.
        def loss(p, remat):
            _, out = _encoder("xla", remat=remat).apply(
                {"params": p}, *rows, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
            return jnp.vdot(out["hidden"], direction)
        return [jax.grad(loss)(params, remat) for remat in policies]

    expected, *others = all_grads(params)
    for got in others:  # Dropout masks too must be recomputed identically.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                     got, expected)


def test_model_fields_are_validated_and_old_configs_still_load():
    old = model_config("tiny").to_dict()
    del old["attention_mask"]
    # A config.json written before remat policies had names and attention masks had a field.
    c = ml_collections.ConfigDict({**old, "vocab_size": 64, "remat": True})
    encoder = make_encoder(c)
    assert (encoder.remat, encoder.attention_mask) == ("full", "segments")
    c = model_config("tiny")
    c.vocab_size = 64
    c.remat = "everything"
    with pytest.raises(ValueError, match="model.remat must be none, full"):
        make_encoder(c)
    c.remat = "none"
    c.attention_mask = "causal"
    with pytest.raises(ValueError, match="model.attention_mask must be segments or lengths"):
        make_encoder(c)
    c.attention_mask = "segments"
    c.attention_impl = "flash"
    with pytest.raises(ValueError, match="model.attention_impl must be one of"):
        make_encoder(c)


HEADS, BATCH, LENGTH = 2, 4, 256
# Attention probabilities [batch, heads, length, length]: what a fused kernel never materialises.
SCORES = f"tensor<{BATCH}x{HEADS}x{LENGTH}x{LENGTH}x"


def _lowered_training_step(monkeypatch, platform: str, mask: str,
                           loss: LossSpec = LossSpec(head_chunk=64)) -> str:
    """The StableHLO of `distil_step` (2-layer teacher → 1-layer student) lowered for `platform`.

    Lowering needs no accelerator: this checks, on a CPU, that the program a GPU or TPU would
    compile calls the fused kernels in every layer, forward and backward, as `auto` promises.
    """
    monkeypatch.setattr(attention_lib, "platform", lambda: platform)
    if platform == "cuda":
        # Lowering asks the cuDNN library for its version and the GPU for its compute capability:
        # answer as an H100 with cuDNN 9.10 would. JAX's layout, dtype and shape checks still run.
        fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
        monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
        monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)

    def encoder(size, layers):
        c = model_config(size)
        c.update(num_layers=layers, hidden_size=64, num_heads=HEADS, intermediate_size=128,
                 vocab_size=256, attention_mask=mask)  # bf16, auto: the training defaults.
        return make_encoder(c)

    teacher, student = encoder("base", 2), encoder("distil6", 1)
    optimizer = optax.adamw(1e-4)

    def abstract_params(model, dtype=None):
        ids = jnp.zeros((1, LENGTH), jnp.int32)
        shapes = jax.eval_shape(
            lambda: nn.unbox(model.init(jax.random.PRNGKey(0), ids, ids + 1, ids,
                                         logits_at="all"))["params"])
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype), shapes)

    params = abstract_params(student)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    state = TrainState(step=scalar, params=params, opt_state=jax.eval_shape(optimizer.init, params),
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32), skipped_steps=scalar,
                       bad_streak=scalar)
    batch = {k: jax.ShapeDtypeStruct((1, BATCH, LENGTH), jnp.int32)
             for k in ("input_ids", "segment_ids", "positions")}
    step = functools.partial(
        distil_step, student=student, teacher=teacher, optimizer=optimizer,
        schedule=optax.constant_schedule(1e-4), loss=loss,
        masking=MaskingSpec(mask_id=4, vocab_size=256, special_ids=(0, 1, 2, 3, 4)))
    traced = jax.jit(step).trace(state, abstract_params(teacher, jnp.bfloat16), batch, None)
    return traced.lower(lowering_platforms=(platform,)).as_text()


def _kernel_calls(text: str, target: str) -> int:
    """How often the program runs the custom call `target`.

    A call inside an outlined function (JAX outlines each splash kernel variant once) counts once
    per call of that function.
    """
    total = 0
    for function in text.split("func.func ")[1:]:
        name = re.match(r"(?:public |private )?@([\w$.]+)", function).group(1)
        calls = 1 if name == "main" else len(re.findall(rf"call @{re.escape(name)}\(", text))
        total += function.count(target) * calls
    return total


@pytest.mark.parametrize("platform, mask, forward, backward", [
    ("cuda", "segments", "__cudnn$fmhaScaleBiasSoftmax(", "__cudnn$fmhaScaleBiasSoftmaxBackward("),
    ("cuda", "lengths", "__cudnn$fmhaSoftmax(", "__cudnn$fmhaSoftmaxBackward("),
    ("tpu", "segments", "tpu_custom_call(", None),
])
def test_training_step_lowers_to_fused_attention_kernels(monkeypatch, platform, mask, forward,
                                                         backward):
    text = _lowered_training_step(monkeypatch, platform, mask)
    if backward is None:  # Splash: a Mosaic kernel per layer forward, two (dq, dkv) backward.
        assert _kernel_calls(text, forward) == 2 + 1 + 2
    else:  # Teacher and student forward in every layer; the student's backward in its one layer.
        assert _kernel_calls(text, forward) == 2 + 1 and _kernel_calls(text, backward) == 1
    assert SCORES not in text


@pytest.mark.parametrize("platform, forward, backward", [
    ("cuda", "__cudnn$fmhaScaleBiasSoftmax(", "__cudnn$fmhaScaleBiasSoftmaxBackward("),
    ("tpu", "tpu_custom_call(", None),
])
def test_distilled_layers_keep_the_fused_kernels_and_chunk_their_relations(
        monkeypatch, platform, forward, backward):
    # MiniLM's relations (4 relation heads) between the student's layer and the teacher's last,
    # and TinyBERT's attention scores of the same pair, in chunks of 64 query rows, beside L_cos
    # (which reads both models' last outputs, so no attention output is dead code): the layers
    # themselves still attend through the fused kernels, and the terms' scores exist one chunk
    # at a time, never whole.
    loss = LossSpec(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=1.0, relation_chunk=64,
                    relations=Relations(weight=1.0, heads=4, student_layer=0, teacher_layer=1),
                    attention_scores=AttentionScores(weight=1.0, pairs=((0, 1),)))
    text = _lowered_training_step(monkeypatch, platform, "segments", loss)
    if backward is None:
        assert _kernel_calls(text, forward) == 2 + 1 + 2
    else:
        assert _kernel_calls(text, forward) == 2 + 1 and _kernel_calls(text, backward) == 1
    assert SCORES not in text
    assert f"tensor<{BATCH}x4x64x{LENGTH}x" in text  # A chunk of relations.
    assert f"tensor<{BATCH}x{HEADS}x64x{LENGTH}x" in text  # A chunk of attention scores.


def test_xla_attention_would_materialise_the_scores(monkeypatch):
    # The check above can fail: XLA's own attention (CPU here) holds the [b, h, l, l] scores.
    assert SCORES in _lowered_training_step(monkeypatch, "cpu", "segments")
