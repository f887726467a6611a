"""What each attention head, feed-forward neuron, hidden channel and layer of a trained encoder
contributes, measured on a calibration sample, and the units a narrower student keeps.

Activation-based importance, as Minitron measures it (Muralidharan et al., "Compact Language
Models via Pruning and Knowledge Distillation", 2024): one forward pass per calibration batch, no
gradients. Per row, the mean over its real tokens of

    head h of layer l      ‖attention output of h‖₂ (before the output projection mixes heads)
    neuron n of layer l    |GELU activation of n|: what the feed-forward output projection reads
    hidden channel c       |c| in the output of every LayerNorm (embeddings, and both of each
                           layer's), summed over them

then the L2 norm of those row means over all calibration rows (Minitron's best aggregation:
mean over the sequence, L2 over the batch). A layer's importance is Block Importance (Men et al.,
"ShortGPT", 2024): 1 − the mean cosine between its input and output hidden states over real
tokens, so a layer that changes little is the first to go.

Sums are accumulated in float64 on the host from jitted float32 partial sums: given the same
batches the result is the same on one device or sharded over many (the batch's sharding decides
where the rows are, not what they sum to, up to float32 reduction order).
"""

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from distil_flax.model.encoder import Encoder
from distil_flax.model.student_init import Pruning

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Importance:
    """Importance of every unit of one encoder (numpy float64): larger matters more."""

    heads: np.ndarray  # [layers, heads]
    neurons: np.ndarray  # [layers, intermediate]
    channels: np.ndarray  # [hidden]
    layers: np.ndarray  # [layers]
    rows: int  # Calibration rows measured.


def _partial_sums(model: Encoder, params: Any, batch: dict[str, Array]) -> dict[str, Array]:
    """One batch's sums of squared row means (heads, neurons, channels) and Block Importance's
    cosine sums, in float32."""
    (_, out), state = model.apply(
        {"params": params}, batch["input_ids"], batch["segment_ids"], batch["positions"],
        return_all_hidden=True, mutable=["intermediates"])
    found = state["intermediates"]
    real = (batch["segment_ids"] > 0).astype(jnp.float32)  # [batch, length]
    per_row = jnp.maximum(jnp.sum(real, axis=1), 1.0)

    def row_means(values):  # [batch, length, units] → [batch, units]
        return jnp.einsum("bl...,bl->b...", values.astype(jnp.float32), real) / per_row[:, None]

    def squares(values):  # Σ over rows of the squared row means: the L2 over the batch, squared.
        return jnp.sum(jnp.square(row_means(values)), axis=0)

    layers = [found[f"layers_{i}"] for i in range(model.num_layers)]
    hidden = out["hidden_states"]  # The embeddings' LayerNorm, then each layer's last.
    norms = [hidden[0]] + [x for i, layer in enumerate(layers)
                           for x in (layer["normalised"][0], hidden[i + 1])]
    cosines = []
    for before, after in zip(hidden[:-1], hidden[1:]):
        a, b = before.astype(jnp.float32), after.astype(jnp.float32)
        cos = jnp.sum(a * b, -1) / jnp.maximum(
            jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
        cosines.append(jnp.sum(cos * real))
    return {
        "heads": jnp.stack([squares(jnp.linalg.norm(
            layer["attention"]["heads"][0].astype(jnp.float32), axis=-1)) for layer in layers]),
        "neurons": jnp.stack([squares(jnp.abs(layer["neurons"][0])) for layer in layers]),
        "channels": sum(squares(jnp.abs(x)) for x in norms),
        "cosines": jnp.stack(cosines),
        "tokens": jnp.sum(real),
        "rows": jnp.asarray(real.shape[0], jnp.float32),
    }


def measure(model: Encoder, params: Any, batches: Iterable[dict[str, Array]]) -> Importance:
    """Importance of `model`'s units over `batches`.

    Args:
      model: the encoder (its dropout is off: no "dropout" rng is given).
      params: its parameters, in any sharding.
      batches: `input_ids`, `segment_ids`, `positions`, each [batch, length], global arrays in
        any sharding (call inside the mesh's context so that activation constraints apply).

    Raises:
      ValueError: no batch, or no real token in them.
    """
    step = jax.jit(lambda p, b: _partial_sums(model, p, b))
    totals: dict[str, np.ndarray] = {}
    for batch in batches:
        sums = jax.device_get(step(params, batch))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + np.asarray(value, np.float64)
    if not totals or not totals["tokens"]:
        raise ValueError("init.prune: the calibration batches hold no real token")
    return Importance(
        heads=np.sqrt(totals["heads"]), neurons=np.sqrt(totals["neurons"]),
        channels=np.sqrt(totals["channels"]), layers=1.0 - totals["cosines"] / totals["tokens"],
        rows=int(totals["rows"]))


def _most_important(scores: np.ndarray, count: int) -> tuple[int, ...]:
    """Indices of the `count` largest scores, ascending; ties go to the lower index."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores)))
    return tuple(sorted(int(i) for i in order[:count]))


def keep(importance: Importance, *, layers: tuple[int, ...] | int, hidden_size: int,
         num_heads: int, intermediate_size: int) -> Pruning:
    """The student that keeps the most important units at the given sizes.

    Args:
      importance: the teacher's.
      layers: the teacher layer of each student layer, or a number of layers to keep: those of
        the highest Block Importance, in the teacher's order.
      hidden_size, num_heads, intermediate_size: the student's.

    Raises:
      ValueError: a size larger than the teacher's.
    """
    teacher_layers, teacher_heads = importance.heads.shape
    for name, wanted, have in (
            ("model.hidden_size", hidden_size, len(importance.channels)),
            ("model.num_heads", num_heads, teacher_heads),
            ("model.intermediate_size", intermediate_size, importance.neurons.shape[1]),
            ("model.num_layers", layers if isinstance(layers, int) else len(layers),
             teacher_layers)):
        if wanted > have:
            raise ValueError(f"init.prune keeps units of the teacher, but {name} ({wanted}) is "
                             f"larger than the teacher's ({have})")
    if isinstance(layers, int):
        layers = _most_important(importance.layers, layers)
    return Pruning(
        layers=tuple(int(i) for i in layers),
        channels=_most_important(importance.channels, hidden_size),
        heads=tuple(_most_important(importance.heads[i], num_heads) for i in layers),
        neurons=tuple(_most_important(importance.neurons[i], intermediate_size) for i in layers))
