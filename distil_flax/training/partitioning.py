"""The device mesh and the one table that maps logical axis names to mesh axes.

Parameters and key activations are annotated with logical names in `model/encoder.py`; nothing else
in the code names a mesh axis. Change the table (config `mesh.rules`) to change how a model is laid
out.
"""

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name → mesh axes. Batch is split over every data-like axis; parameters are split over
# `fsdp` along their embedding dimension and over `tensor` along heads / MLP / vocab (Megatron).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("positions", None),
    ("types", None),
    ("transform", None),
    ("norm", None),
)


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a data × fsdp × tensor mesh; one axis may be -1 ("all remaining devices").

    Args:
      shape: sizes by axis name, e.g. the config's `mesh` section {"data": -1, "fsdp": 1, ...}.
      devices: defaults to all devices of all processes.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(shape, len(devices))
    # Auto axes: Linen's logical constraints hand sharding decisions to XLA's propagation.
    return jax.make_mesh([sizes[name] for name in MESH_AXES], MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_sizes(shape: dict[str, int], num_devices: int) -> dict[str, int]:
    """The size of each mesh axis `make_mesh` builds on `num_devices`, with -1 resolved.

    Raises:
      ValueError: sizes that are not positive (but for one -1), or whose product is not
        `num_devices`; the message names the mesh.* fields.
    """
    sizes = [int(shape[name]) for name in MESH_AXES]
    described = ", ".join(f"mesh.{n}={s}" for n, s in zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"bad mesh shape ({described}): sizes must be positive, with at most one -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise ValueError(
                f"mesh shape ({described}) does not divide the {num_devices} available devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh shape ({described}) needs {math.prod(sizes)} devices, but {num_devices} are "
            "available; set the mesh.* sizes so that their product is the device count")
    return dict(zip(MESH_AXES, sizes))


def check_batch_divides(mesh_shape: dict[str, int], field: str, batch_size: int) -> None:
    """Raises ValueError naming `field` unless `batch_size` rows split evenly where they go.

    A batch's rows are split over the data-parallel devices (mesh.data × mesh.fsdp, sizes as
    `make_mesh` resolves them on `jax.device_count()` devices; no mesh is built) and each host
    reads its own share of them (`jax.process_count()`). Checked with the config, this fails
    before a run touches its workdir, instead of in `NamedSharding` at the first batch.

    Args:
      mesh_shape: the config's `mesh` section (data, fsdp, tensor).
      field: the config field of `batch_size`, e.g. "train.batch_size".
      batch_size: global rows.
    """
    sizes = mesh_sizes(mesh_shape, jax.device_count())
    data_parallel, processes = sizes["data"] * sizes["fsdp"], jax.process_count()
    if batch_size % data_parallel or batch_size % processes:
        raise ValueError(
            f"{field} ({batch_size}) must be a multiple of the {data_parallel} data-parallel "
            f"devices (mesh.data × mesh.fsdp = {sizes['data']} × {sizes['fsdp']}) and of the "
            f"{processes} process(es)")


def rules_from_config(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
    """Normalises rules read from a config (lists become tuples, as Flax expects)."""
    normal = []
    for name, axes in rules:
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
        normal.append((name, axes))
    return tuple(normal)


def check_rules(rules: Any) -> None:
    """Raises ValueError naming mesh.rules unless it is (logical name, mesh axes) pairs.

    Mesh axes are None, one of `MESH_AXES` or a sequence of them, each used once per rule.
    Lists are accepted as tuples (a config read back from JSON holds lists).
    """
    if not isinstance(rules, (list, tuple)):
        raise ValueError(f"mesh.rules must be (logical name, mesh axes) pairs, got {rules!r}")
    for rule in rules:
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"mesh.rules entry {rule!r} is not a (logical name, mesh axes) pair")
        axes = rule[1]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        if (not isinstance(axes, (list, tuple))
                or not all(isinstance(a, str) and a in MESH_AXES for a in axes)
                or len(set(axes)) != len(axes)):
            raise ValueError(f"mesh.rules entry {rule!r}: mesh axes must be None, or distinct "
                             f"names among {', '.join(MESH_AXES)}")


def logical_to_shardings(logical_specs: Any, mesh: Mesh, rules) -> Any:
    """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def abstract_params(init_fn: Callable[[jax.Array], Any], mesh: Mesh, rules) -> Any:
    """The parameters `init_fn` makes, as `jax.ShapeDtypeStruct`s carrying their shardings.

    Args:
      init_fn: `rng → logically-boxed params` (`model.init_fn`, `heads.init_fn`).
    """
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    shardings = logical_to_shardings(nn.get_partition_spec(abstract), mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.unbox(abstract), shardings)


def sharded_init(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh, rules) -> Any:
    """Runs `init_fn` (returning logically-boxed parameters) directly into its shardings.

    Shapes come from `jax.eval_shape`, so no parameter is ever built whole on one device.

    Returns:
      (params, shardings): unboxed parameters and the matching tree of NamedShardings.
    """
    abstract = jax.eval_shape(init_fn, rng)
    shardings = logical_to_shardings(nn.get_partition_spec(abstract), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return params, shardings


def cast(params: Any, dtype: Any) -> Any:
    """`params` stored as `dtype`, each array keeping its sharding (a teacher only runs forward,
    so bf16 halves its memory and reads)."""
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                   out_shardings=jax.tree.map(lambda x: x.sharding, params))(params)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules) -> Iterator[None]:
    """The mesh and logical rules in effect while a step is traced (activation constraints)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules, leading_dims: int = 0) -> NamedSharding:
    """Sharding of a host batch [*leading, batch, length]: batch over the data-like axes."""
    spec = nn.logical_to_mesh_axes((None,) * leading_dims + ("batch", "length"), rules)
    return NamedSharding(mesh, spec)


def bytes_per_device(tree: Any) -> dict[int, int]:
    """Bytes of `tree`'s arrays held by each device (to check that sharding really splits them)."""
    totals: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device.id] = totals.get(shard.device.id, 0) + shard.data.nbytes
    return totals


def example_shardings(arrays: dict[str, np.ndarray], mesh: Mesh, rules
                      ) -> dict[str, NamedSharding]:
    """Each array split over the data-like axes along its first (example) dimension."""
    return {k: NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",) + (None,) * (v.ndim - 1),
                                                           rules))
            for k, v in arrays.items()}


def host_to_global(local: dict[str, np.ndarray],
                   sharding: NamedSharding | dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Places this host's part of a batch straight into global arrays with `sharding` (one for
    every array, or one per array by name)."""
    by_name = sharding if isinstance(sharding, dict) else dict.fromkeys(local, sharding)
    return {k: jax.make_array_from_process_local_data(by_name[k], v) for k, v in local.items()}
