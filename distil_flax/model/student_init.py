"""Initialising a student from teacher layers, as DistilBERT did.

The released DistilBERT took teacher layers [0, 2, 4, 7, 9, 11]; "every other layer" is
[0, 2, 4, 6, 8, 10]. Embeddings, the embedding LayerNorm and the MLM head are copied; the pooler
only when the student has one. The initialised student computes exactly the teacher with its
unmapped layers skipped: a student without token-type embeddings (DistilBERT-shaped) gets the
teacher's token-type row 0 folded into its position embeddings, since the teacher adds that row to
every token (distillation runs it with token types 0).

RoBERTa and XLM-R teachers work unchanged: DistilRoBERTa's map is the same [0, 2, 4, 7, 9, 11], and
a RoBERTa-shaped student keeps the one-row token-type table (copied, nothing folded). Their position
table starts at row 2 (`model.position_offset`), so the student must start at the same row: a
table copied into a student that reads it from another row would be shifted by the difference.

A narrower student is pruned from the teacher (`Pruning`: the heads, feed-forward neurons and
hidden channels it keeps, chosen by `importance.keep`): every weight is sliced consistently —
Q/K/V columns and output rows per head (the head size is kept), feed-forward columns and rows per
neuron, and every axis of the hidden size (embeddings, each LayerNorm, each dense in and out, the
pooler, the MLM transform, and so the tied decoder). Which axis is which comes from the encoder's
own logical axis names (`embed`, `heads`, `mlp`, …), so nothing here lists the parameters.
Removing a head or neuron whose output is zero, or a layer that passes its input through, leaves
what the model computes unchanged; removing hidden channels changes every LayerNorm's statistics,
which distillation then repairs.
"""

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn

# Parameters outside the layers that a student takes from its teacher when it has them.
_SHARED = ("word_embeddings", "position_embeddings", "token_type_embeddings", "embeddings_norm",
           "pooler", "mlm_transform", "mlm_norm", "mlm_bias")


# Where a pruned student records what it kept, in its workdir (read by the model card).
PRUNING_FILE = "pruning.json"

# Logical axes (the encoder's names) that run over the hidden size.
_HIDDEN_AXES = ("embed", "norm", "transform")


@dataclasses.dataclass(frozen=True)
class Pruning:
    """The teacher's units a pruned student keeps, as teacher indices in ascending order."""

    layers: tuple[int, ...]  # The teacher layer of each student layer.
    channels: tuple[int, ...]  # Hidden channels (of every tensor on the hidden size).
    heads: tuple[tuple[int, ...], ...]  # Attention heads, per student layer.
    neurons: tuple[tuple[int, ...], ...]  # Feed-forward neurons, per student layer.

    def to_json(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "channels": list(self.channels),
                "heads": [list(h) for h in self.heads], "neurons": [list(n) for n in self.neurons]}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> "Pruning":
        """Raises ValueError naming the key that is missing or not a list of indices."""
        def indices(value, key):
            if not (isinstance(value, list) and all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)):
                raise ValueError(f"{key!r} is not a list of indices")
            return tuple(value)

        try:
            layers, channels = indices(record["layers"], "layers"), indices(record["channels"],
                                                                            "channels")
            nested = {key: tuple(indices(v, key) for v in record[key])
                      for key in ("heads", "neurons")}
        except KeyError as missing:
            raise ValueError(f"no {missing} key") from None
        except TypeError:
            raise ValueError("'heads' and 'neurons' must hold a list per layer") from None
        if any(len(nested[key]) != len(layers) for key in nested):
            raise ValueError("'heads' and 'neurons' must hold a list per layer")
        return cls(layers=layers, channels=channels, **nested)


def _axis_names(boxed: Any) -> Any:
    """The logical axis names of each leaf of a boxed parameter tree (`nn.Partitioned`)."""
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    if not any(is_box(x) for x in jax.tree.leaves(boxed, is_leaf=is_box)):
        raise TypeError("pruning needs the student's boxed parameters (jax.eval_shape of "
                        "encoder.init_fn), whose axis names say which axis each unit is on")
    return jax.tree.map(lambda x: x.names, boxed, is_leaf=is_box)


def _slice(array: Any, names: Sequence[str | None], kept: Mapping[str, np.ndarray]) -> Any:
    """`array` with the units of `kept` ({axis name: indices}) taken along each named axis."""
    for axis, name in enumerate(names):
        if name in kept:
            array = np.take(np.asarray(array), kept[name], axis=axis)
    return array


def _check_shapes(name: str, teacher: Any, student: Any, problems: list[str]) -> None:
    t_shapes = jax.tree.map(np.shape, teacher)
    s_shapes = jax.tree.map(np.shape, student)
    if t_shapes != s_shapes:
        problems.append(f"{name}: teacher {t_shapes} vs student {s_shapes}")


def _hidden_size(params: Mapping[str, Any]) -> int:
    return np.shape(params["word_embeddings"]["embedding"])[-1]


def _fold_token_types(teacher_params: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher's position embeddings [positions, embed] plus its token-type row 0.

    BERT embeds word + position + token type before the LayerNorm; with token types all 0 this
    table stands in for the last two, so a model without token types computes the same. A new
    array of the teacher's type (numpy or jax): the teacher's own table is left as it was.
    """
    positions = teacher_params["position_embeddings"]["embedding"]
    type_0 = teacher_params["token_type_embeddings"]["embedding"][0]
    return {"embedding": positions + type_0}


def init_from_teacher(teacher_params: Mapping[str, Any], student_params: Mapping[str, Any],
                      layer_map: Sequence[int], *,
                      num_heads: tuple[int, int] | None = None,
                      position_offset: tuple[int, int] | None = None,
                      pruning: Pruning | None = None) -> dict[str, Any]:
    """Returns student parameters with student layer i taken from teacher layer layer_map[i].

    The student then computes what the teacher computes with token types 0 and only the mapped
    layers (pruned: only the kept units). The result shares the teacher's arrays (all but the
    folded or sliced ones): copy it into the student's shardings before training (the step
    donates the student's buffers).

    Args:
      teacher_params: the teacher's parameter tree.
      student_params: a student parameter tree (or its `jax.eval_shape`), giving the structure;
        boxed (as `encoder.init_fn` makes it) when pruning, for its logical axis names.
      layer_map: teacher layer index for each student layer (pruning: `pruning.layers`).
      num_heads: (teacher's, student's) attention heads; needed when pruning. The parameters do
        not show them (kernels keep a flat heads × head_dim axis), yet a different split of the
        same weights computes something else.
      position_offset: (teacher's, student's) `position_offset`, when known: the row where each
        model's positions start. The tables' shapes do not show it either.
      pruning: the teacher's units a narrower student keeps; None: all of them.

    Raises:
      ValueError: the hidden sizes differ without `pruning`, the heads' size differs with it,
        the map's length differs from the student's depth or names a teacher layer that does not
        exist, or the two models' heads, position offsets or shapes differ (e.g. a position
        table of another length).
    """
    names = None if pruning is None else _axis_names(student_params)
    student_params = nn.unbox(student_params)
    teacher_width, student_width = _hidden_size(teacher_params), _hidden_size(student_params)
    if pruning is None:
        # Checked first: a narrower student fails every shape below, and the fix is pruning.
        if teacher_width != student_width:
            raise ValueError(
                f"init.from_teacher copies teacher layers, but the teacher's hidden size "
                f"({teacher_width}) differs from model.hidden_size ({student_width}): a narrower "
                f"student is pruned from the teacher (init.prune) or starts from random init "
                f"(--config.init.from_teacher=False)")
        if num_heads is not None and num_heads[0] != num_heads[1]:
            raise ValueError(
                f"init.from_teacher copies teacher layers, but the teacher's number of heads "
                f"({num_heads[0]}) differs from model.num_heads ({num_heads[1]})")
    else:
        if num_heads is None:
            raise ValueError("pruning needs num_heads: (the teacher's, the student's)")
        # The attention width (heads × head size) of each model, from its first query kernel.
        widths = [np.shape(p["layers_0"]["attention"]["query"]["kernel"])[-1]
                  for p in (teacher_params, student_params)]
        head_size = widths[0] // num_heads[0]
        if widths[1] != num_heads[1] * head_size:
            raise ValueError(
                f"init.prune keeps the teacher's heads of {head_size}, but the student's "
                f"{num_heads[1]} heads are {widths[1] // num_heads[1]} wide: set "
                f"model.num_heads={max(student_width // head_size, 1)} for a hidden size of "
                f"{student_width} (or model.head_dim={head_size})")
        layer_map = pruning.layers
        channels = np.asarray(pruning.channels, np.int64)
        shared_kept = {axis: channels for axis in _HIDDEN_AXES}
        # A head's columns of the flat heads × head_size axis.
        layer_kept = [dict(shared_kept, mlp=np.asarray(neurons, np.int64), heads=(
            np.asarray(heads, np.int64)[:, None] * head_size + np.arange(head_size)).reshape(-1))
            for heads, neurons in zip(pruning.heads, pruning.neurons)]
    if position_offset is not None and position_offset[0] != position_offset[1]:
        raise ValueError(
            f"init.from_teacher copies the teacher's position table, whose positions start at row "
            f"{position_offset[0]}, but model.position_offset is {position_offset[1]} (RoBERTa "
            f"and XLM-R: 2, BERT: 0)")
    student_layers = sorted(k for k in student_params if k.startswith("layers_"))
    teacher_layers = sum(k.startswith("layers_") for k in teacher_params)
    layer_map = [int(i) for i in layer_map]
    if len(layer_map) != len(student_layers):
        raise ValueError(
            f"init.layer_map {layer_map} has {len(layer_map)} entries but the student has "
            f"{len(student_layers)} layers")
    if any(not 0 <= i < teacher_layers for i in layer_map):
        raise ValueError(
            f"init.layer_map {layer_map} names layers outside the teacher's "
            f"0..{teacher_layers - 1}")

    # A student without the teacher's token types still gets the row the teacher always adds.
    fold = ("token_type_embeddings" in teacher_params
            and "token_type_embeddings" not in student_params)
    params: dict[str, Any] = {}
    problems: list[str] = []
    for name in student_params:
        if name.startswith("layers_"):
            index = int(name.split("_")[1])
            source = f"layers_{layer_map[index]}"
        elif name in _SHARED and name in teacher_params:
            index, source = None, name
        else:
            raise ValueError(f"the teacher has no parameters for the student's {name!r}")
        taken = (_fold_token_types(teacher_params) if name == "position_embeddings" and fold
                 else teacher_params[source])
        if pruning is not None:
            kept = shared_kept if index is None else layer_kept[index]
            taken = jax.tree.map(lambda a, n: _slice(a, n, kept), taken, names[name])
        _check_shapes(f"{name} <- {source}", taken, student_params[name], problems)
        params[name] = taken
    if problems:
        if any(p.startswith("position_embeddings") for p in problems):
            problems.append("(the position table has model.max_position_embeddings + "
                            "model.position_offset rows: RoBERTa's 512 + 2)")
        raise ValueError("student and teacher shapes differ:\n  " + "\n  ".join(problems))
    return params
