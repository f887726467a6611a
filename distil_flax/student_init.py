"""Initialising a student from teacher layers, as DistilBERT did.

The released DistilBERT took teacher layers [0, 2, 4, 7, 9, 11]; "every other layer" is
[0, 2, 4, 6, 8, 10]. Embeddings, the embedding LayerNorm and the MLM head are copied; token-type
embeddings and the pooler only when the student has them.
"""

from typing import Any, Mapping, Sequence

import jax
import numpy as np

# Parameters outside the layers that a student takes from its teacher when it has them.
_SHARED = ("word_embeddings", "position_embeddings", "token_type_embeddings", "embeddings_norm",
           "pooler", "mlm_transform", "mlm_norm", "mlm_bias")


def _check_shapes(name: str, teacher: Any, student: Any, problems: list[str]) -> None:
    t_shapes = jax.tree.map(np.shape, teacher)
    s_shapes = jax.tree.map(np.shape, student)
    if t_shapes != s_shapes:
        problems.append(f"{name}: teacher {t_shapes} vs student {s_shapes}")


def init_from_teacher(teacher_params: Mapping[str, Any], student_params: Mapping[str, Any],
                      layer_map: Sequence[int]) -> dict[str, Any]:
    """Returns student parameters with student layer i taken from teacher layer layer_map[i].

    The result shares the teacher's arrays: copy it into the student's shardings before training
    (the step donates the student's buffers).

    Args:
      teacher_params: the teacher's parameter tree.
      student_params: a student parameter tree (or its `jax.eval_shape`), giving the structure.
      layer_map: teacher layer index for each student layer.

    Raises:
      ValueError: the map's length differs from the student's depth, names a teacher layer that
        does not exist, or the two models' shapes differ (e.g. a different hidden size).
    """
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

    params: dict[str, Any] = {}
    problems: list[str] = []
    for name in student_params:
        if name.startswith("layers_"):
            source = f"layers_{layer_map[int(name.split('_')[1])]}"
        elif name in _SHARED and name in teacher_params:
            source = name
        else:
            raise ValueError(f"the teacher has no parameters for the student's {name!r}")
        _check_shapes(f"{name} <- {source}", teacher_params[source], student_params[name], problems)
        params[name] = teacher_params[source]
    if problems:
        raise ValueError("student and teacher shapes differ:\n  " + "\n  ".join(problems))
    return params
