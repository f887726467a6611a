"""A student narrower than its teacher, pruned from it: whether a run prunes, and what it keeps.

`student_pruning` measures the teacher's units on the first training batches (`model.importance`)
and keeps the most important at the student's sizes; a run that resumes keeps what its
pruning.json records instead, so its loss compares on the units its checkpoints were cut to.
"""

import jax
import ml_collections
from absl import logging

from distil_flax import data
from distil_flax.interop import sources
from distil_flax.model import Encoder, importance, student_init
from distil_flax.training import partitioning


def student_pruning(c: ml_collections.ConfigDict, teacher: Encoder, teacher_params,
                    student: Encoder, train_rows, mesh, rules,
                    workdir: str | None) -> student_init.Pruning | None:
    """What the student keeps of the teacher; None when `init.from_teacher` copies layers whole.

    Raises:
      ValueError: the student is larger than the teacher, or the workdir's record is damaged.
    """
    if not prunes(c, teacher, student):
        return None
    if workdir and sources.available_steps(workdir):
        recorded = sources.read_pruning(workdir)
        if recorded is not None:
            return recorded
    return prune_plan(c, teacher, teacher_params, student, train_rows, mesh, rules)


def prunes(c: ml_collections.ConfigDict, teacher: Encoder, student: Encoder) -> bool:
    """Whether `init.from_teacher` prunes: the student is narrower, or init.prune picks layers."""
    widths = lambda m: (m.hidden_size, m.num_heads, m.intermediate_size)  # noqa: E731
    return c.init.prune.layers == "importance" or widths(teacher) != widths(student)


def prune_plan(c: ml_collections.ConfigDict, teacher: Encoder, teacher_params, student: Encoder,
               train_rows, mesh, rules) -> student_init.Pruning:
    """The teacher's units the student keeps: the most important on the first
    `init.prune.calibration_batches` training batches (`model.importance`), sharded as the step.

    The batches are the first of the data's seeded order, whatever the step a run resumes at;
    a resumed run reads what it kept from its pruning.json instead (`student_pruning`).
    """
    batches = data.BatchIterator(train_rows, c.train.micro_batch_size or c.train.batch_size,
                                 seed=c.seed, process_index=jax.process_index(),
                                 process_count=jax.process_count())
    sharding = partitioning.batch_sharding(mesh, rules)
    calibration = (partitioning.host_to_global(next(batches), sharding)
                   for _ in range(c.init.prune.calibration_batches))
    with partitioning.mesh_context(mesh, rules):
        measured = importance.measure(teacher, teacher_params, calibration)
    layers = (c.model.num_layers if c.init.prune.layers == "importance"
              else tuple(c.init.layer_map))
    pruning = importance.keep(measured, layers=layers, hidden_size=student.hidden_size,
                              num_heads=student.num_heads,
                              intermediate_size=student.intermediate_size)
    logging.info("Pruned from the teacher (importance over %d calibration rows): layers %s, %d "
                 "of %d hidden channels, heads %s, neurons %s.", measured.rows,
                 list(pruning.layers), len(pruning.channels), teacher.hidden_size,
                 [len(h) for h in pruning.heads], [len(n) for n in pruning.neurons])
    return pruning
