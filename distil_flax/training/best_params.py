"""The parameters of a trainer's best evaluation, kept beside its resumable checkpoints (the
loop offers every evaluation; `interop.sources` reads them for export and task distillation).
"""

import json
import math
import os

import jax
from etils import epath

from distil_flax.training import atomic
from distil_flax.training.checkpoint import Checkpointer

BEST_DIR = "best"  # workdir/best/checkpoints/<step>: the best evaluation's parameters.
BEST_RECORD = "best.json"  # Its record, readable without Orbax (a copy of what it committed).


class BestParams:
    """The parameters of the best evaluation so far, under `workdir/best`, with their record.

    The record (step, score, what the evaluation found) is the checkpoint's data item, so it
    commits with the parameters; `best.json` is written after the commit, as a copy. A kill at
    any moment leaves either the old best or the new one, whole and checksummed.
    """

    def __init__(self, workdir: str):
        self.checkpointer = Checkpointer(os.path.join(workdir, BEST_DIR), save_every=1, keep=1,
                                         async_save=False)
        self.record_path = epath.Path(workdir) / BEST_RECORD
        step = self.checkpointer.latest_step()
        self.record = None if step is None else self.checkpointer.read_record(step)
        self._write_record()  # A kill between the commit and best.json left it stale.

    @property
    def score(self) -> float:
        return -math.inf if self.record is None else self.record["score"]

    def offer(self, step: int, score: float, record: dict, params) -> bool:
        """Saves `params` if `score` (higher is better) beats the best so far, with `record`
        (what the evaluation found); returns whether."""
        if not score > self.score:
            return False
        record = {"step": step, "score": score, **record}
        self.checkpointer.save_params(step, params, record)  # Returns once committed.
        self.record = record
        self._write_record()
        return True

    def _write_record(self) -> None:
        if self.record is not None and jax.process_index() == 0:
            text = json.dumps(self.record, indent=2, sort_keys=True) + "\n"
            if not self.record_path.exists() or self.record_path.read_text() != text:
                atomic.write_text(self.record_path, text)

    def close(self) -> None:
        self.checkpointer.close()
