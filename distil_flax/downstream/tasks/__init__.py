"""Downstream tasks for fine-tuning: GLUE, SQuAD v1.1 and IMDb, with their official metrics."""

from distil_flax.downstream.tasks.base import Features, Split, Task
from distil_flax.downstream.tasks.glue import SPECS as GLUE_SPECS
from distil_flax.downstream.tasks.glue import GlueTask
from distil_flax.downstream.tasks.imdb import ImdbTask
from distil_flax.downstream.tasks.squad import SquadTask

TASK_NAMES = (*GLUE_SPECS, "squad", "imdb")


def get_task(name: str) -> Task:
    """The task called `name`: a GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli),
    "squad" (v1.1) or "imdb"."""
    if name == "squad":
        return SquadTask()
    if name == "imdb":
        return ImdbTask()
    if name in GLUE_SPECS:
        return GlueTask(name)
    raise ValueError(f"task.name={name!r} is unknown; tasks: {list(TASK_NAMES)}")


__all__ = ["Features", "GlueTask", "ImdbTask", "Split", "SquadTask", "Task", "TASK_NAMES",
           "get_task"]
