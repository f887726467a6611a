"""Which attention kernel a layer runs, and the kernels that need more than one call.

`select_attention` picks, for the platform the step compiles for: cuDNN's fused flash attention
on NVIDIA GPUs, the Pallas splash kernel on TPUs, XLA's attention elsewhere, and the plain einsum
where attention dropout is on (only it implements dropout). `encoder.Attention` asks it at
trace time; the bench and the tests ask it too (`encoder.attention_kernel`), so that what they
report is what the model runs.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array

IMPLS = ("auto", "xla", "cudnn", "splash", "einsum")
MASKS = ("segments", "lengths")

def platform() -> str:
    """"cuda", "rocm", "tpu" or "cpu": where the step is compiled for."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    from jax.extend import backend as jax_backend

    version = jax_backend.get_backend().platform_version.lower()
    return "rocm" if "rocm" in version else "cuda"


def _splash_available() -> bool:
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention  # noqa: F401
    except ImportError:
        return False
    return True


def select_attention(requested: str, *, platform: str, dtype: Any, head_dim: int, length: int,
                     mask: str, dropout: bool) -> str:
    """The attention kernel to run: "einsum", "xla", "cudnn" or "splash".

    Args:
      requested: `model.attention_impl`.
      platform: "cuda", "rocm", "tpu" or "cpu".
      dtype: compute dtype of queries and keys.
      head_dim, length: per-head width and row length.
      mask: `model.attention_mask` ("segments" or "lengths").
      dropout: whether attention-probability dropout is active (only einsum implements it).
    """
    if dropout:
        return "einsum"
    if requested == "auto":
        if platform == "tpu" and length % 128 == 0 and _splash_available():
            return "splash"  # Its blocks are multiples of 128 tokens.
        if platform == "cuda" and _cudnn_supports(dtype, head_dim, length, mask):
            return "cudnn"
        return "xla"
    if requested == "cudnn" and platform != "cuda":
        raise ValueError(
            f"model.attention_impl='cudnn' needs an NVIDIA GPU, but the step runs on {platform}; "
            "use 'auto' or 'xla'")
    if requested == "splash" and platform != "tpu":
        raise ValueError(
            f"model.attention_impl='splash' needs a TPU, but the step runs on {platform}; use "
            "'auto' or 'xla'")
    return requested


def _cudnn_supports(dtype: Any, head_dim: int, length: int, mask: str) -> bool:
    # cuDNN flash attention: half-precision inputs, head_dim a multiple of 8 up to 128 (256 on
    # Hopper; 128 is enough here). A boolean mask reaches cuDNN as an additive bias, which its
    # training kernels accept only for even sequence lengths.
    return (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
            and head_dim <= 128 and (mask == "lengths" or length % 2 == 0))


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, *,
                     interpret: bool = False) -> Array:
    """Pallas splash attention (TPU) restricted to equal segment ids.

    Args:
      q, k, v: [batch, length, heads, head_dim]; length a multiple of 128.
      segment_ids: [batch, length] int32; a token attends to keys with the same id.
      interpret: run the kernel in the Pallas interpreter (any backend; for tests).

    Returns:
      [batch, length, heads, head_dim].

    A Pallas kernel cannot be partitioned by XLA, so under a mesh it runs per shard through
    `shard_map`, with batch and heads split as the logical rules in effect say.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    def local(q, k, v, segment_ids):
        _, length, heads, head_dim = q.shape
        block = min(512, length)
        sizes = splash.BlockSizes(
            block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
        kernel = splash.make_splash_mha(
            splash.MultiHeadMask([splash.FullMask((length, length))] * heads),
            block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        def run(q, k, v, s):  # One row: [heads, length, head_dim].
            return kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))

        heads_first = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731
        out = jax.vmap(run)(heads_first(q * head_dim**-0.5), heads_first(k), heads_first(v),
                            segment_ids)
        return heads_first(out)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids)
    spec = nn.logical_to_mesh_axes(("batch", "length", "act_heads", "act_kv"))
    if spec[1] is not None or spec[3] is not None:
        raise ValueError("splash attention needs whole rows and heads on each device: the mesh "
                         "rules must not shard `length` or `act_kv`")
    segment_spec = jax.sharding.PartitionSpec(spec[0], None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, segment_spec),
                         out_specs=spec, check_vma=False)(q, k, v, segment_ids)
