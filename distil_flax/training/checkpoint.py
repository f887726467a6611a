"""Orbax checkpoints of a run: async, sharded, keep-K, verified, and enough to continue exactly.

A checkpoint step holds three items, so that readers can take only what they need:
  params  — the trained model's parameters (a teacher or an export reads just this),
  train   — step, optimizer state, PRNG key and the non-finite-step counters,
  data    — the data iterator's position (JSON).

What a crash can and cannot do to them:
  * Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only
    when every item is written, so a step directory with a plain number is complete; a kill
    mid-save leaves only the temporary directory, which is ignored and removed on the next start.
  * Old steps are deleted only after a newer step has been renamed into place, and they are first
    renamed into `checkpoints/deleted/` (emptied at the next save), so that a kill during the
    deletion never leaves a half-deleted directory that looks like a step.
  * Orbax does not notice a garbled array file: it restores whatever values the bytes decode to.
    So before the rename, every file of the step's items is listed with its size and CRC-32 in
    `<step>/checksums.json` (`checksums.py`; part of the atomic commit), and every restore
    checks them first.
    A step that fails the check, or that Orbax cannot read, is reported by step and file; a
    run falls back to the newest intact step (or stops, if told to be strict).
Checksums cover local and network file systems, where truncation and bit rot happen. On object
storage (`gs://`) objects are written whole and checked by the store itself, and reading a whole
checkpoint back after every save would cost more than it protects; no checksums are kept there.
"""

import os
import re
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from distil_flax.training import background_reports
from distil_flax.training.checksums import (
    CorruptCheckpointError,
    is_local,
    verify_step,
    write_checksums,
)
from distil_flax.training.train_state import TrainState

ITEMS = ("params", "train", "data")
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step being written.
QUARANTINE = "corrupt_checkpoints"  # Beside `checkpoints/`: steps a fallback moved aside.
TRASH = "deleted"  # Inside `checkpoints/`: old steps renamed away by Orbax, removed by us.


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, quota, permissions); committed steps are intact.

    Raising it is what tells the failure: the tracebacks Orbax's threads print about it go to
    DEBUG (`background_reports`).
    """


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    path = epath.Path(workdir)
    if "://" not in os.fspath(workdir):
        path = path.absolute()  # Orbax's async writers refuse relative paths.
    return path / "checkpoints"


def _reason(error: BaseException) -> str:
    """A one-line cause for an Orbax/TensorStore error, whose messages run to pages."""
    text = str(error)
    code = re.search(r"os_error_code='(\d+)'", text)
    if code:
        return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first if len(first) <= 300 else first[:300] + " ..."




# ---------------------------------------------------------------------------------------------
# The run's checkpointer
# ---------------------------------------------------------------------------------------------


def _train_item(state: TrainState) -> dict:
    """The `train` item: everything in the state but the parameters (their own item)."""
    item = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
            "skipped_steps": state.skipped_steps, "bad_streak": state.bad_streak}
    if state.projections:  # Only runs that have them: older checkpoints lack the key.
        item["projections"] = state.projections
    return item


class Checkpointer:
    """Saves and restores a run's `TrainState` and data position under `workdir/checkpoints`.

    Only one run may write a workdir at a time (the loop holds `workdir_lock.WorkdirLock`);
    that is what makes it safe to delete the half-written steps of a killed run on start.

    Args:
      workdir: the run directory; checkpoints go to `workdir/checkpoints`.
      save_every: steps between periodic saves.
      keep: how many of the newest steps to keep.
      async_save: write in the background while the loop goes on; else each save blocks.
    """

    def __init__(self, workdir: str, *, save_every: int, keep: int, async_save: bool = True):
        self.save_every = save_every
        self.async_save = async_save
        self.directory = checkpoint_dir(workdir)
        self._saving: int | None = None  # The step of the latest save.
        self._in_flight = False  # `_saving` was not waited for yet.
        self._failed = False
        local = is_local(self.directory)
        # Always Orbax's async checkpointer: its commit callback is where checksums are written;
        # a synchronous save is an async one followed by a wait.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            todelete_subdir=TRASH if local else None,
            async_options=ocp.AsyncOptions(
                post_finalization_callback=self._before_commit if local else None))
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._empty_trash()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _before_commit(self) -> None:
        """Orbax's post-finalization callback: items are written, the rename has not happened.

        Runs on the primary process's background thread, after all processes finished writing.
        """
        step = self._saving
        candidates = sorted((p for p in self.directory.iterdir()
                             if p.name.startswith(f"{step}{TMP_SUFFIX}")),
                            key=lambda p: p.stat().mtime)
        # No temporary directory: a file system where Orbax commits in place (a commit file).
        step_dir = candidates[-1] if candidates else self.directory / str(step)
        count = write_checksums(step_dir, ITEMS)
        logging.debug("Checksummed %d files of checkpoint step %s.", count, step)

    def save(self, step: int, state: TrainState, data_state: dict, *, force: bool = False) -> bool:
        """Starts saving `state` (at `step`, passed to avoid a device sync) in the background.

        Without `force`, saves only every `save_every` steps. Returns whether a save started.

        Raises:
          CheckpointWriteError: this save, or the previous background one, failed.
        """
        if not force and step % self.save_every:
            return False
        if step in self.manager.all_steps():
            return False  # Already saved (e.g. the final step was also a periodic one).
        self.wait()  # The previous save must be committed before `_saving` names this one.
        self._begin(step)
        try:
            started = self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                train=ocp.args.StandardSave(_train_item(state)),
                data=ocp.args.JsonSave(data_state)), force=True)
        except Exception as error:  # noqa: BLE001 — TensorStore and Orbax raise many types.
            raise self._write_error(step, error) from error
        if not self.async_save:
            self.wait()
        return started

    def save_params(self, step: int, params: Any, record: dict) -> None:
        """Saves only `params`, with `record` (JSON) as the data item, and waits for the commit.

        For a best-evaluation checkpoint: the record (step, score, metrics) commits atomically
        with the parameters it describes.

        Raises:
          CheckpointWriteError: the save failed.
        """
        self.wait()
        self._begin(step)
        try:
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), data=ocp.args.JsonSave(record)), force=True)
        except Exception as error:  # noqa: BLE001
            raise self._write_error(step, error) from error
        self.wait()

    def read_record(self, step: int) -> dict:
        """The data item of `step` (checked against its checksums first)."""
        verify_step(self.directory, step, items=("data",))
        return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))[
            "data"]

    def trained_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """Shapes of what `step` trains, by path: the `params` item ("layers_0/..."), and the
        loss's projections in the `train` item ("projections/hidden/kernel")."""
        handler = ocp.StandardCheckpointHandler()
        projections = handler.metadata(self.directory / str(step) / "train").get("projections")
        return trained_shapes(handler.metadata(self.directory / str(step) / "params"),
                              projections or {})

    def _empty_trash(self) -> None:
        """Removes the old steps Orbax renamed into `deleted/` (none is being renamed now)."""
        trash = self.directory / TRASH
        if jax.process_index() == 0 and is_local(trash) and trash.exists():
            shutil.rmtree(trash, ignore_errors=True)

    def _begin(self, step: int) -> None:
        """What every save does first (the previous one is committed)."""
        self._empty_trash()
        self._saving, self._in_flight = step, True
        background_reports.REPORTS.begin()

    def _settle(self, failed: bool) -> None:
        """The save in flight, if any, is committed or failed: its held reports may go."""
        if self._in_flight:
            self._in_flight = False
            background_reports.REPORTS.end(failed)

    def wait(self) -> None:
        """Blocks until background saves are committed.

        Raises:
          CheckpointWriteError: the save in flight failed.
        """
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            raise self._write_error(self._saving, error) from error
        self._settle(failed=False)

    def _write_error(self, step: int | None, error: BaseException) -> CheckpointWriteError:
        self._failed = True
        self._settle(failed=True)  # Raised next: what background threads printed goes to DEBUG.
        self.manager.reload()  # The failed step stays a temporary directory, never a step.
        committed = self.all_steps()
        kept = (f"committed steps {committed} are intact; a restart resumes from step "
                f"{committed[-1]}" if committed else "no step was committed yet")
        return CheckpointWriteError(
            f"saving checkpoint step {step} to {self.directory} failed: {_reason(error)}. The "
            f"{kept}. Free disk space (or fix the directory's permissions or quota) and rerun.")

    # ------------------------------------------------------------------------------ restore

    def restore(self, abstract_state: TrainState, step: int | None = None
                ) -> tuple[TrainState, dict]:
        """Restores the given (default: latest) step into the shardings of `abstract_state`.

        Checks the step's checksums first. For a run's restart, prefer `restore_latest`, which
        falls back past corrupt steps.

        Args:
          abstract_state: a TrainState of `jax.ShapeDtypeStruct`s carrying shardings.

        Raises:
          CorruptCheckpointError: the step's files do not match their checksums.
        """
        step = self.latest_step() if step is None else step
        verify_step(self.directory, step)
        return self._restore(abstract_state, step)

    def _restore(self, abstract_state: TrainState, step: int) -> tuple[TrainState, dict]:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            train=ocp.args.StandardRestore(_train_item(abstract_state)),
            data=ocp.args.JsonRestore()))
        return TrainState(params=restored["params"], **restored["train"]), restored["data"]

    def restore_latest(self, abstract_state: TrainState, *, strict: bool = False
                       ) -> tuple[TrainState, dict, int] | None:
        """Restores the newest intact step; None if there is no step at all.

        Newest first, each step is checked against its checksums, then read. A step that fails
        is logged by step and file and the next older one is tried; once one is restored, the
        failed newer steps are moved to `workdir/corrupt_checkpoints/` (never deleted), so that
        the run can save those steps again. A step whose checksums match but which still cannot
        be read is not corrupt (the config changed, or a bug): that error is raised as is.

        Args:
          abstract_state: a TrainState of `jax.ShapeDtypeStruct`s carrying shardings.
          strict: raise on the first bad step instead of falling back.

        Returns:
          (state, data_state, step), or None for a workdir without checkpoints.

        Raises:
          CorruptCheckpointError: with `strict`, the latest step is bad; or no step is intact
            (then nothing was moved).
        """
        failures: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                verified = verify_step(self.directory, step)
            except CorruptCheckpointError as error:
                problem = str(error)
            else:
                try:
                    state, data_state = self._restore(abstract_state, step)
                except Exception as error:  # noqa: BLE001 — Orbax raises bare Exceptions too.
                    if verified and isinstance(error, (ValueError, OSError, KeyError)):
                        raise  # The files are as written: not corruption.
                    problem = f"checkpoint step {step} cannot be read: {_reason(error)}"
                else:
                    if failures:
                        self._quarantine([s for s, _ in failures], restored=step)
                    return state, data_state, step
            failures.append((step, problem))
            if strict:
                older = [s for s in self.all_steps() if s < step]
                hint = (f"set train.strict_restore=False to fall back to step {older[-1]}"
                        if older else "no older step exists")
                raise CorruptCheckpointError(f"{problem}. Stopping (train.strict_restore): "
                                             f"{hint}, or move {self.directory / str(step)} aside.")
            logging.error("%s; trying an older step.", problem)
        if failures:
            raise CorruptCheckpointError(
                f"no checkpoint in {self.directory} can be restored ("
                + "; ".join(p for _, p in failures) + "). Nothing was moved or deleted; to "
                f"start over, move {self.directory} aside.")
        return None

    def _quarantine(self, steps: list[int], restored: int) -> None:
        """Moves bad steps out of Orbax's sight, to `workdir/corrupt_checkpoints/<step>-<time>`."""
        if jax.process_index() == 0:
            target_root = self.directory.parent / QUARANTINE
            target_root.mkdir(parents=True, exist_ok=True)
            for step in steps:
                source = self.directory / str(step)
                target = target_root / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                try:
                    source.rename(target)
                except OSError as error:  # Object stores may not rename directories.
                    raise CorruptCheckpointError(
                        f"checkpoint step {step} is unreadable and could not be moved aside "
                        f"({error}); move {source} out of {self.directory} and rerun to resume "
                        f"from step {restored}") from error
                logging.warning("Moved corrupt checkpoint step %d to %s.", step, target)
        if jax.process_count() > 1:  # Every host must see the same steps before the next save.
            multihost_utils.sync_global_devices("distil_flax_quarantine")
        self.manager.reload()

    def close(self) -> None:
        """Waits for the save in flight, then releases Orbax's threads.

        Raises:
          CheckpointWriteError: the save in flight failed (not raised again after a failure
            was already reported).
        """
        try:
            if not self._failed:
                self.wait()
                self._empty_trash()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 — the failed save's error was raised already.
                if not self._failed:
                    raise


def shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """Shapes of a tree's arrays (or their metadata) by path ("encoder/layers_0/...")."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
            tuple(leaf.shape) for path, leaf in flat}


def trained_shapes(params: Any, projections: Any) -> dict[str, tuple[int, ...]]:
    """`shapes_by_path` of the parameters, with the projections' under "projections/"."""
    return {**shapes_by_path(params),
            **{f"projections/{k}": v for k, v in shapes_by_path(projections).items()}}


def restore_params(workdir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """Reads only the `params` item of a run's checkpoint (a teacher, or a model to export).

    No fallback: a teacher or an export must be exactly the step asked for (default: latest).

    Returns:
      (params, step) — the parameters in the shardings of `abstract_params`, and which step.

    Raises:
      FileNotFoundError: no checkpoint in the workdir.
      CorruptCheckpointError: the step's parameter files are corrupt.
    """
    directory = checkpoint_dir(workdir)
    with ocp.CheckpointManager(directory, item_names=ITEMS,
                               options=ocp.CheckpointManagerOptions(
                                   read_only=True, create=False, save_interval_steps=0)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        verified = verify_step(directory, step, items=("params",))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params)))
        except (ValueError, OSError) as error:
            if verified:
                raise  # The files are as written: not corruption.
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {directory} cannot be read: {_reason(error)}"
            ) from error
    return restored["params"], step
