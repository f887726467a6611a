"""Orbax checkpoints of a run: async, sharded, keep-K, and enough to continue exactly.

A checkpoint step holds three items, so that readers can take only what they need:
  params  — the trained model's parameters (a teacher or an export reads just this),
  train   — step, optimizer state and PRNG key,
  data    — the data iterator's position (JSON).
Orbax writes each step into a temporary directory and renames it when complete, so a crash never
leaves a half-written step that looks finished, and old steps are deleted only after a newer one
has been committed.
"""

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from distil_flax.step import TrainState

ITEMS = ("params", "train", "data")


def checkpoint_dir(workdir: str) -> epath.Path:
    path = epath.Path(workdir)
    if "://" not in str(workdir):
        path = path.absolute()  # Orbax's async writers refuse relative paths.
    return path / "checkpoints"


class Checkpointer:
    """Saves and restores a run's `TrainState` and data position under `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, save_every: int, keep: int, async_save: bool = True):
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(
            checkpoint_dir(workdir), options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict, *, force: bool = False) -> bool:
        """Starts saving `state` (at `step`, passed to avoid a device sync) in the background.

        Without `force`, saves only every `save_every` steps. Returns whether a save started.
        """
        if not force and step % self.save_every:
            return False
        if step in self.manager.all_steps():
            return False  # Already saved (e.g. the final step was also a periodic one).
        train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        return self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), train=ocp.args.StandardSave(train),
            data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restores the given (default: latest) step into the shardings of `abstract_state`.

        Args:
          abstract_state: a TrainState of `jax.ShapeDtypeStruct`s carrying shardings.
        """
        step = self.latest_step() if step is None else step
        train = {"step": abstract_state.step, "opt_state": abstract_state.opt_state,
                 "rng": abstract_state.rng}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            train=ocp.args.StandardRestore(train), data=ocp.args.JsonRestore()))
        state = TrainState(step=restored["train"]["step"], params=restored["params"],
                           opt_state=restored["train"]["opt_state"], rng=restored["train"]["rng"])
        return state, restored["data"]

    def wait(self) -> None:
        """Blocks until background saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def restore_params(workdir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """Reads only the `params` item of a run's checkpoint (a teacher, or a model to export).

    Returns:
      (params, step) — the parameters in the shardings of `abstract_params`, and which step.
    """
    directory = checkpoint_dir(workdir)
    with ocp.CheckpointManager(directory, item_names=ITEMS,
                               options=ocp.CheckpointManagerOptions(
                                   read_only=True, create=False, save_interval_steps=0)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))
    return restored["params"], step
