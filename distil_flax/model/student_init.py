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
                      position_offset: tuple[int, int] | None = None) -> dict[str, Any]:
    """Returns student parameters with student layer i taken from teacher layer layer_map[i].

    The student then computes what the teacher computes with token types 0 and only the mapped
    layers. The result shares the teacher's arrays (all but a folded position table): copy it into
    the student's shardings before training (the step donates the student's buffers).

    Args:
      teacher_params: the teacher's parameter tree.
      student_params: a student parameter tree (or its `jax.eval_shape`), giving the structure.
      layer_map: teacher layer index for each student layer.
      num_heads: (teacher's, student's) attention heads, when known. The parameters do not show
        them (kernels keep a flat heads × head_dim axis), yet a different split of the same
        weights computes something else.
      position_offset: (teacher's, student's) `position_offset`, when known: the row where each
        model's positions start. The tables' shapes do not show it either.

    Raises:
      ValueError: the hidden sizes differ (a narrower student cannot copy layers), the map's
        length differs from the student's depth or names a teacher layer that does not exist, or
        the two models' heads, position offsets or shapes differ (e.g. a different intermediate
        size, or a position table of another length).
    """
    # Checked first: a narrower student fails every shape below, and the fix is a config switch.
    teacher_width, student_width = _hidden_size(teacher_params), _hidden_size(student_params)
    if teacher_width != student_width:
        raise ValueError(
            f"init.from_teacher copies teacher layers, but the teacher's hidden size "
            f"({teacher_width}) differs from model.hidden_size ({student_width}): a narrower "
            f"student starts from random init (set --config.init.from_teacher=False)")
    if num_heads is not None and num_heads[0] != num_heads[1]:
        raise ValueError(
            f"init.from_teacher copies teacher layers, but the teacher's number of heads "
            f"({num_heads[0]}) differs from model.num_heads ({num_heads[1]})")
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
            source = f"layers_{layer_map[int(name.split('_')[1])]}"
        elif name in _SHARED and name in teacher_params:
            source = name
        else:
            raise ValueError(f"the teacher has no parameters for the student's {name!r}")
        _check_shapes(f"{name} <- {source}", teacher_params[source], student_params[name], problems)
        if name == "position_embeddings" and fold:
            params[name] = _fold_token_types(teacher_params)
        else:
            params[name] = teacher_params[source]
    if problems:
        if any(p.startswith("position_embeddings") for p in problems):
            problems.append("(the position table has model.max_position_embeddings + "
                            "model.position_offset rows: RoBERTa's 512 + 2)")
        raise ValueError("student and teacher shapes differ:\n  " + "\n  ".join(problems))
    return params
