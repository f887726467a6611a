"""Metrics to the console and to the writers `train.writers` names: TensorBoard event files
(tensorboardX: no TensorFlow needed), `metrics.jsonl` in the workdir (one JSON object a write,
for notebooks and scripts), and the experiment trackers of `trackers.py` (MLflow, W&B).

`metrics.jsonl` survives what a checkpoint survives: each record is flushed and fsync'ed when it
is written, before the loop's next checkpoint save can commit, so no kill loses the records of a
committed step. A run that resumes from step N drops the records past N that its killed
predecessor wrote (they are written again, with the same values), and a record cut short by a
full disk or a kill is dropped on reopening and skipped by `read_metrics`. A damaged line
elsewhere (something else wrote over the file) is moved on reopening to
`metrics.damaged-<time>.jsonl` beside it, named in one warning, and the run goes on.
"""

import json
import os
import time
from typing import Any, Mapping

from absl import logging
from etils import epath

from distil_flax.training import atomic, progress, trackers

# Shown first and with short names on the console line; everything goes to TensorBoard.
_CONSOLE = (("loss", "loss"), ("loss_ce", "ce"), ("loss_mlm", "mlm"), ("loss_cos", "cos"),
            ("student_mlm_accuracy", "acc"), ("agreement", "agree"), ("learning_rate", "lr"),
            ("grad_norm", "|g|"), ("tokens_per_s", "tok/s"), ("mfu", "mfu"),
            ("steps_per_s", "steps/s"), ("eta_s", "ETA"))


def _format(value: float, key: str = "") -> str:
    if key == "eta_s":
        return progress.duration(value)
    if abs(value) >= 1e4:
        return f"{value:.3g}"
    return f"{value:.4g}"


class MetricWriter:
    """Writes scalars to the run's writers; only the main process (process 0) writes anything.

    Args:
      workdir: where TensorBoard events and metrics.jsonl go.
      enabled: False in every process but the main one.
      total_steps: shown on the console line.
      resume_step: the step a resumed run restarts from (later records are dropped).
      settings: `train.writers` and the trackers' fields (default: TensorBoard and JSONL).
    """

    def __init__(self, workdir: str, *, enabled: bool = True, total_steps: int | None = None,
                 resume_step: int | None = None, settings: trackers.Settings | None = None):
        settings = settings or trackers.Settings()
        self.enabled = enabled
        self.total_steps = total_steps
        self._tb = self._jsonl = self._trackers = None
        self._start = time.time()
        if not enabled:
            return
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        if "tensorboard" in settings.names:
            from tensorboardX import SummaryWriter  # Heavy import; only the writing process.
            # tensorboardX writes to local paths and, through its own file system layer, gs://.
            self._tb = SummaryWriter(logdir=str(workdir), flush_secs=30)
        if "jsonl" in settings.names:
            path = epath.Path(workdir) / "metrics.jsonl"
            if resume_step is not None and path.exists():
                _keep_records(path, resume_step)
            self._jsonl = path.open("a")
        self._trackers = trackers.Trackers(workdir, settings)

    def write_scalars(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        named = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
        if self._tb is not None:
            for name, value in named.items():
                self._tb.add_scalar(name, value, step)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **named}) + "\n")
            self._jsonl.flush()
            if hasattr(self._jsonl, "fileno"):  # A local file (gs:// objects are written whole).
                os.fsync(self._jsonl.fileno())
        self._trackers.scalars(step, named)
        logging.info("%s", self.console_line(step, scalars, prefix))

    def write_results(self, results: Mapping[str, Any]) -> None:
        """The run's final results, for the trackers (the trainers write their own files)."""
        if self.enabled:
            self._trackers.results(results)

    def console_line(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> str:
        done = f"{step}/{self.total_steps}" if self.total_steps else str(step)
        shown = [f"{short} {_format(float(scalars[key]), key)}" for key, short in _CONSOLE
                 if key in scalars]
        shown += [f"{key} {_format(float(v))}" for key, v in sorted(scalars.items())
                  if key not in dict(_CONSOLE)]
        elapsed = time.time() - self._start
        return f"[{prefix or 'train/'}] step {done} | " + " | ".join(shown) + (
            f" | {elapsed:.0f}s")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def close(self, finished: bool = True) -> None:
        """Closes every writer; `finished`: the run reached its last step."""
        tb, jsonl, tracked = self._tb, self._jsonl, self._trackers
        self._tb = self._jsonl = self._trackers = None
        closers = [c for c in (tb and tb.close, jsonl and jsonl.close,
                               tracked and (lambda: tracked.close(finished))) if c]
        errors = []
        for close in closers:
            try:
                close()
            except Exception as error:  # noqa: BLE001 — the others still close.
                errors.append(error)
        if errors:
            raise errors[0]


def _parse(lines: list[str]) -> tuple[list[dict], dict[int, str]]:
    """(records, damaged lines by 1-based number) of the lines of a file; a last line cut short
    (a kill, a full disk) is neither: it is dropped."""
    records, damaged = [], {}
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a record")
            records.append(record)
        except ValueError:
            if index < len(lines) - 1:
                damaged[index + 1] = line
    return records, damaged


def _keep_records(path: epath.Path, last_step: int) -> None:
    """Rewrites `path` without a torn last line, without the records past `last_step`, and
    with any damaged line moved to a file beside it."""
    text = path.read_text()
    lines = text.splitlines()
    records, damaged = _parse(lines)
    kept = [r for r in records if r.get("step", 0) <= last_step]
    if len(kept) == sum(1 for line in lines if line.strip()) and text.endswith("\n"):
        return
    if damaged:
        aside = path.parent / f"metrics.damaged-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        atomic.write_text(aside, "".join(line + "\n" for line in damaged.values()))
        logging.warning("%s: line(s) %s are not JSON records; moved them to %s and resumed.",
                        path, ", ".join(map(str, damaged)), aside)
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """The records of a run's `metrics.jsonl`, in order (for notebooks and tests); a damaged
    line is skipped, with a warning naming it."""
    path = epath.Path(workdir) / "metrics.jsonl"
    records, damaged = _parse(path.read_text().splitlines())
    if damaged:
        logging.warning("%s: skipped line(s) %s, which are not JSON records.", path,
                        ", ".join(map(str, damaged)))
    return records
