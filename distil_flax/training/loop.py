"""The one run loop of every trainer (distillation in `distill/`, fine-tuning in `downstream/`).

A trainer says what differs — what its state holds, its compiled step, its batches, its
evaluation and what "best" means — as a `Trainer`; this module does the rest, once for all:

    exclusive(workdir)       signal handlers, then the workdir lock (one run per workdir)
    run(trainer, ...)        refuse checkpoints of other shapes → resume the newest intact step
                             (or init) → on_start → steps, with the log / eval / checkpoint
                             cadence → a last checkpoint and a final evaluation

Faults are handled here, so they are handled everywhere: SIGTERM and Ctrl-C save the step in
flight and return (`stop_signals.py`, agreed across hosts); non-finite steps are skipped by the
step (`train_state.apply_update`), reported here, and a streak stops the run; every
`metrics.jsonl` record is on disk before the next checkpoint commits; the best evaluation's
parameters commit with their record before `best.json` names them; and closing never masks the
first error. The host stays at most two steps ahead of the device and copies metrics back only
every `log_every` steps, at evaluations and checkpoints.
"""

import contextlib
import dataclasses
import sys
import time
from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np
from absl import logging
from clu import parameter_overview

from distil_flax.training import partitioning, trackers
from distil_flax.training.best_params import BestParams
from distil_flax.training.checkpoint import Checkpointer, trained_shapes
from distil_flax.training.metric_writers import MetricWriter
from distil_flax.training.progress import Progress
from distil_flax.training.stop_signals import StopSignals
from distil_flax.training.train_state import TrainState
from distil_flax.training.workdir_lock import WorkdirLock, WorkdirLockedError


class NonFiniteError(FloatingPointError):
    """`train.max_consecutive_nonfinite` steps in a row had non-finite values."""


class Batches(Protocol):
    """A trainer's training batches: endless, with a position to checkpoint and restore."""

    def __next__(self) -> Any: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When the loop logs, evaluates and saves, and how it treats checkpoints and bad steps."""

    log_every: int
    eval_every: int  # 0: only the final evaluation.
    checkpoint_every: int
    keep_checkpoints: int
    async_checkpoints: bool = True
    strict_restore: bool = False
    max_consecutive_nonfinite: int = 0  # 0: skip bad steps and go on.


@dataclasses.dataclass
class Evaluation:
    """One evaluation: scalars to log, and for trainers that keep a best checkpoint, its score."""

    scalars: dict[str, float]
    score: float | None = None  # Higher is better; read where the trainer keeps a best checkpoint.
    record: dict = dataclasses.field(default_factory=dict)  # Saved with the best parameters.


@dataclasses.dataclass
class Trainer:
    """Everything that differs between trainers."""

    mesh: jax.sharding.Mesh
    rules: tuple
    abstract: TrainState  # Shapes and shardings (`train_state.abstract_state`).
    init_state: Callable[[], TrainState]  # A fresh run's state, in those shardings.
    step: Callable[[TrainState, Any], tuple[TrainState, dict]]  # (state, next(batches)).
    batches: Batches
    num_steps: int
    cadence: Cadence
    evaluate: Callable[[TrainState, int], Evaluation]
    # Scalars logged beside the step's metrics: (step, steps since the last log, seconds).
    throughput: Callable[[int, int, float], dict[str, float]]
    # After the state is restored or made, before the first step: write what describes the run.
    on_start: Callable[[TrainState], None] = lambda state: None
    # Why a workdir's checkpoints have other parameter shapes, in the config's words.
    explain_shapes: Callable[[], list[str]] = lambda: []
    keep_best: bool = False  # Keep the best evaluation's parameters (by `Evaluation.score`).
    # The writers and trackers of `train.writers` (`trackers.Settings.of(config)`).
    tracking: trackers.Settings = dataclasses.field(default_factory=trackers.Settings)


@dataclasses.dataclass
class Outcome:
    state: TrainState
    step: int
    finished: bool  # False: stopped by a signal or `stop_at_step` (rerun to continue).
    evaluation: Evaluation | None  # The final one (None when stopped).
    best: dict | None  # The best evaluation's record, for trainers that keep one.


@dataclasses.dataclass
class Session:
    lock: WorkdirLock
    signals: StopSignals


@contextlib.contextmanager
def exclusive(workdir: str) -> Iterator[Session]:
    """Signal handlers first (a signal during start-up stops cleanly), then the workdir lock."""
    with StopSignals() as signals, WorkdirLock(workdir,
                                               enabled=jax.process_index() == 0) as lock:
        yield Session(lock, signals)


# ---------------------------------------------------------------------------------------------
# Non-finite steps
# ---------------------------------------------------------------------------------------------

_COUNTERS = ("nonfinite", "skipped_steps", "bad_streak")


class _NonFiniteMonitor:
    """Reads the step's non-finite counters when metrics are fetched, and applies the policy.

    The step itself skips every non-finite update (`train_state.apply_update`); this only
    reports them, averages the interval's metrics over the finite steps, and stops the run after
    `max_consecutive` bad steps in a row (0: never).
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.first_bad = ""  # What went non-finite first in the current streak.

    def scalars(self, history: list[dict], last_step: int) -> dict[str, float]:
        """Fetches an interval's metrics (steps `last_step - len(history) + 1` ...), means them.

        Raises:
          NonFiniteError: the streak of skipped steps reached `max_consecutive`.
        """
        fetched = jax.device_get(history)
        first_step = last_step - len(fetched) + 1
        bad = [(first_step + i, m) for i, m in enumerate(fetched) if m["nonfinite"]]
        good = [m for m in fetched if not m["nonfinite"]] or fetched
        scalars = {k: float(np.mean([m[k] for m in good])) for k in fetched[0]
                   if k not in _COUNTERS}
        scalars["skipped_steps"] = float(fetched[-1]["skipped_steps"])
        streak = int(fetched[-1]["bad_streak"])
        if bad:
            logging.warning("Skipped the update of %d step(s) with non-finite values: %s. %d "
                            "skipped in total.", len(bad),
                            "; ".join(self._describe(step, m) for step, m in bad[:5]),
                            int(scalars["skipped_steps"]))
        start = last_step - streak + 1  # First step of the current streak.
        if not streak:
            self.first_bad = ""
        elif start >= first_step:
            self.first_bad = self._describe(start, fetched[start - first_step])
        elif not self.first_bad:  # The streak began before this process resumed the run.
            self.first_bad = self._describe(*bad[0])
        if self.max_consecutive and streak >= self.max_consecutive:
            raise NonFiniteError(
                f"{streak} consecutive steps had non-finite values (steps "
                f"{last_step - streak + 1}-{last_step}; first: {self.first_bad}), reaching "
                f"train.max_consecutive_nonfinite={self.max_consecutive}. Their updates were "
                f"skipped, so the parameters and every checkpoint are those of step "
                f"{last_step - streak} or earlier. Lower train.learning_rate, check the data at "
                "those steps, or raise the limit (0: skip and continue).")
        return scalars

    @staticmethod
    def _describe(step: int, metrics: dict) -> str:
        # The loss terms first, then their sum, then what the optimizer made of it.
        watched = (sorted(k for k in metrics if k.startswith("loss_"))
                   + ["loss", "grad_norm", "update_norm"])
        terms = [f"{k}={float(metrics[k])}" for k in watched
                 if k in metrics and not np.isfinite(metrics[k])]
        return f"step {step}: " + ", ".join(terms or ["non-finite gradients"])


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _check_resumable(trainer: Trainer, checkpointer: Checkpointer, workdir: str) -> None:
    """Refuses to resume checkpoints of other parameter shapes (other settings may change).

    Raises:
      ValueError: naming what differs — the trainer's config fields, else the parameters.
    """
    step = checkpointer.latest_step()
    if step is None:
        return
    try:
        saved = checkpointer.trained_shapes(step)
    except Exception as error:  # noqa: BLE001 — unreadable: the restore reports it by file.
        logging.warning("Cannot read the parameter shapes of checkpoint step %d (%s).", step,
                        error)
        return
    ours = trained_shapes(trainer.abstract.params, trainer.abstract.projections)
    if ours == saved:
        return
    differ = trainer.explain_shapes() or [
        f"{name} is {saved.get(name)} there and {ours.get(name)} here"
        for name in sorted(set(ours) | set(saved)) if ours.get(name) != saved.get(name)][:5]
    raise ValueError(
        f"{workdir} holds checkpoints of a model with other parameter shapes ("
        + "; ".join(differ) + "). A run resumes only with the model (and the loss projections) "
        "it started with: use a new --workdir, or the original model and loss settings.")


def _close_all(*closers: Callable[[], None]) -> None:
    """Calls every closer; raises the first failure unless an error is already on its way."""
    in_flight = sys.exc_info()[0] is not None
    failures = []
    for close in closers:
        try:
            close()
        except Exception as error:  # noqa: BLE001 — reported below, never masking another.
            failures.append(error)
    raised = failures[0] if failures and not in_flight else None
    for error in failures:
        if error is not raised:  # The raised one becomes the command's `error:` line.
            logging.error("While closing the run: %s", error)
    if raised is not None:
        raise raised


def run(trainer: Trainer, workdir: str, session: Session, *,
        stop_at_step: int | None = None) -> Outcome:
    """Resumes (or starts) `trainer`'s run in `workdir` and trains to `trainer.num_steps`.

    Args:
      trainer: what the run trains, and how it evaluates.
      workdir: checkpoints, metrics.jsonl, TensorBoard events and best/ go here.
      session: from `exclusive(workdir)`.
      stop_at_step: save and return at this step, as a preempted run would.

    Raises:
      CorruptCheckpointError: no intact checkpoint to resume from (or, with
        `cadence.strict_restore`, the latest one is bad).
      CheckpointWriteError: a checkpoint could not be written (disk full, permissions).
      NonFiniteError: `cadence.max_consecutive_nonfinite` steps in a row were not finite.
      WorkdirLockedError: another run took the workdir over.
    """
    cadence, is_main = trainer.cadence, jax.process_index() == 0
    checkpointer = Checkpointer(workdir, save_every=cadence.checkpoint_every,
                                keep=cadence.keep_checkpoints,
                                async_save=cadence.async_checkpoints)
    closers = [checkpointer.close]
    try:
        _check_resumable(trainer, checkpointer, workdir)
        restored = checkpointer.restore_latest(trainer.abstract, strict=cadence.strict_restore)
        if restored is not None:
            state, data_state, step = restored
            trainer.batches.set_state(data_state)  # Refuses a position of other data.
            logging.info("Resuming from step %d (checkpoint in %s).", step, workdir)
        else:
            state, step = trainer.init_state(), 0
        best = BestParams(workdir) if trainer.keep_best else None
        if best is not None:
            closers.append(best.close)
        trainer.on_start(state)  # Only now: a run that cannot start leaves the workdir as it was.
        if is_main:
            logging.info("Parameters:\n%s", parameter_overview.get_parameter_overview(
                state.params, include_stats=False))
        writer = MetricWriter(workdir, enabled=is_main, total_steps=trainer.num_steps,
                              resume_step=step, settings=trainer.tracking)
        finished = False
        closers.append(lambda: writer.close(finished))
        outcome = _loop(trainer, session, checkpointer, best, writer, state, step, stop_at_step)
        if outcome.finished:
            writer.write_results({"step": outcome.step, "eval": outcome.evaluation.scalars,
                                  **({"best": outcome.best} if outcome.best else {})})
        finished = outcome.finished
        return outcome
    finally:
        _close_all(*closers)  # The checkpointer first: its error matters most.


def _pace(progress: Progress) -> dict[str, float]:
    """steps/s and the seconds left, from the progress window (none until it has measured)."""
    rate, eta = progress.rate.per_second(), progress.eta()
    return {} if rate is None else {"steps_per_s": rate, "eta_s": eta}


def _loop(trainer: Trainer, session: Session, checkpointer: Checkpointer, best: BestParams | None,
          writer: MetricWriter, state: TrainState, step: int, stop_at_step: int | None
          ) -> Outcome:
    cadence, batches = trainer.cadence, trainer.batches
    monitor = _NonFiniteMonitor(cadence.max_consecutive_nonfinite)
    history: list[dict] = []
    last_time, last_step = time.time(), step
    first_step = step + 1  # This process's first step compiles the program.
    # steps/s and the ETA come from a window of logged intervals that leaves compilation and
    # evaluations out; the console line is the plain output, the bar only shows on a terminal.
    progress = Progress("train", trainer.num_steps, "steps", initial=step, lines=False,
                        enabled=writer.enabled)

    def evaluate() -> Evaluation:
        nonlocal last_time
        evaluation = trainer.evaluate(state, step)
        writer.write_scalars(step, evaluation.scalars, prefix="eval/")
        if best is not None and best.offer(step, evaluation.score, evaluation.record, state.params):
            logging.info("New best score %.4f at step %d.", evaluation.score, step)
        last_time = time.time()  # Evaluation time is not training throughput.
        progress.set(step, measure=False)
        return evaluation

    stopped = ""
    with partitioning.mesh_context(trainer.mesh, trainer.rules), progress:
        while step < trainer.num_steps:
            if session.lock.lost.is_set():
                raise WorkdirLockedError(
                    f"another run took over {session.lock.path} (this one was unresponsive for "
                    "longer than the lock's heartbeat window); stopping without saving")
            stopped = session.signals.reason(step) or ("stop_at_step" if step == stop_at_step
                                                       else "")
            if stopped:
                break
            state, metrics = trainer.step(state, next(batches))
            step += 1
            if history:
                # Keep at most two steps in flight: the host still runs ahead of the device,
                # but a preemption notice or a checkpoint never waits on a long queue.
                history[-1]["loss"].block_until_ready()
            history.append(metrics)
            logged = step % cadence.log_every == 0 or step == trainer.num_steps
            if step == first_step and not logged:
                # Measure from the end of the compiling step (it waits for the program).
                metrics["loss"].block_until_ready()
                last_time, last_step = time.time(), step
                progress.set(step, measure=False)
            progress.tick(step)
            if logged:
                scalars = monitor.scalars(history, step)  # Fetches the interval's metrics.
                history = []
                elapsed = time.time() - last_time
                scalars.update(trainer.throughput(step, step - last_step, elapsed))
                progress.set(step, measure=step > first_step)
                scalars.update(_pace(progress))
                writer.write_scalars(step, scalars, prefix="train/")
                last_time, last_step = time.time(), step
            if cadence.eval_every and step % cadence.eval_every == 0 and step < trainer.num_steps:
                evaluate()
            checkpointer.save(step, state, batches.get_state())
        if stopped:
            logging.warning("Stopping at step %d (%s): saving a checkpoint.", step, stopped)
            checkpointer.save(step, state, batches.get_state(), force=True)
            return Outcome(state, step, False, None, best and best.record)
        checkpointer.save(step, state, batches.get_state(), force=True)
        evaluation = evaluate()
    return Outcome(state, step, True, evaluation, best and best.record)

