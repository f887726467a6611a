"""Experiment trackers beside TensorBoard and metrics.jsonl: MLflow and Weights & Biases.

`train.writers` names a run's writers (`WRITERS`). A tracker gets the config (flattened:
`train.learning_rate`), every scalar at its step, the host and its devices, and at the end the
final results. A resumed run continues the same tracker run: its id is kept in the workdir's
`trackers.json`. A tracker that fails (an unreachable server, bad credentials, a full store)
logs one warning naming it and is dropped; the other writers go on, so no step is lost from
them. Both libraries are optional extras (`pip install "distil_flax[mlflow]"`, `[wandb]`);
naming one that is not installed is refused before the run starts.
"""

import dataclasses
import importlib.util
import json
import os
import platform
import secrets
import socket
import time
from typing import Any, Mapping

import jax
import ml_collections
from absl import logging
from etils import epath

from distil_flax.training import atomic

WRITERS = ("tensorboard", "jsonl", "mlflow", "wandb")
RECORD = "trackers.json"  # workdir/trackers.json: each tracker's run id, for a resumed run.
_PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}


def add_fields(train: ml_collections.ConfigDict) -> None:
    """The writer fields of a trainer's `train` section (both trainers have them)."""
    train.writers = "tensorboard,jsonl"  # Comma-separated, any of: tensorboard jsonl mlflow wandb.
    # MLflow's tracking server or store (http://HOST:5000, sqlite:///mlflow.db); "": the
    # MLFLOW_TRACKING_URI variable, else MLflow's default.
    train.tracking_uri = ""
    train.experiment = "distil_flax"  # The MLflow experiment and the W&B project.
    train.run_name = ""  # The tracker run's name; "": the workdir's folder name.
    train.wandb_entity = ""  # The W&B team or user; "": the logged-in default.
    train.wandb_mode = ""  # online | offline | disabled; "": WANDB_MODE, else online.


def writers(c: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The writers `train.writers` names (a config.json saved before it: TensorBoard and JSONL).

    Raises:
      ValueError: an unknown writer, or a tracker whose library is not installed (named).
    """
    names = tuple(w.strip() for w in c.train.get("writers", "tensorboard,jsonl").split(",")
                  if w.strip())
    unknown = [n for n in names if n not in WRITERS]
    if unknown:
        raise ValueError(f"train.writers names {', '.join(unknown)}; known writers: "
                         f"{', '.join(WRITERS)}")
    for name in names:
        if name in _PACKAGES and importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ValueError(f"train.writers names {name}, which is not installed: "
                             f"pip install \"distil_flax[{name}]\"")
    mode = c.train.get("wandb_mode", "")
    if mode not in ("", "online", "offline", "disabled"):
        raise ValueError(f"train.wandb_mode must be online, offline, disabled or \"\", got "
                         f"{mode!r}")
    return names


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the loop needs to open a run's trackers."""

    names: tuple[str, ...] = ("tensorboard", "jsonl")
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # Flattened.
    tracking_uri: str = ""
    experiment: str = "distil_flax"
    run_name: str = ""
    wandb_entity: str = ""
    wandb_mode: str = ""

    @classmethod
    def of(cls, c: ml_collections.ConfigDict) -> "Settings":
        t = c.train
        return cls(writers(c), flatten(c.to_dict()), t.get("tracking_uri", ""),
                   t.get("experiment", "distil_flax"), t.get("run_name", ""),
                   t.get("wandb_entity", ""), t.get("wandb_mode", ""))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"learning_rate": 1e-4}} → {"train.learning_rate": 1e-4}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def hardware() -> dict[str, str]:
    """The host and its devices, logged with the config."""
    devices = jax.devices()
    return {"host": socket.gethostname(), "platform": devices[0].platform,
            "devices": f"{len(devices)} × {devices[0].device_kind}",
            "processes": str(jax.process_count()), "jax": jax.__version__,
            "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------
# The trackers
# ---------------------------------------------------------------------------------------------


class _MLflow:
    name = "mlflow"

    def __init__(self, settings: Settings, run_name: str, run_id: str | None):
        # A tracker must not hold training up for minutes: MLflow retries a failed request 7
        # times with exponential backoff by default. Variables set by the user win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri=settings.tracking_uri or None)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(settings.experiment)
            experiment_id = (experiment.experiment_id if experiment
                             else self.client.create_experiment(settings.experiment))
            run_id = self.client.create_run(experiment_id, run_name=run_name,
                                            tags=hardware()).info.run_id
            known = {}
        else:
            self.client.update_run(run_id, status="RUNNING")
            known = self.client.get_run(run_id).data.params
        self.run_id = run_id
        # Params never change in MLflow: a resumed run adds only the new ones.
        params = [Param(k, str(v)[:6000]) for k, v in settings.config.items() if k not in known]
        changed = sorted(k for k, v in settings.config.items()
                         if k in known and known[k] != str(v)[:6000])
        if changed:
            logging.info("mlflow: the resumed run %s keeps its first values of %s.", run_id,
                         ", ".join(changed[:10]))
        for start in range(0, len(params), 100):  # MLflow's limit per batch.
            self.client.log_batch(run_id, params=params[start:start + 100])

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, float(v), now, step) for k, v in scalars.items()])

    def results(self, results: Mapping[str, Any]) -> None:
        self.client.log_dict(self.run_id, dict(results), "results.json")

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


class _WandB:
    name = "wandb"

    def __init__(self, settings: Settings, run_name: str, run_id: str | None, workdir: str):
        import wandb
        self.run = wandb.init(
            project=settings.experiment, entity=settings.wandb_entity or None, name=run_name,
            id=run_id or secrets.token_hex(4), resume="allow", dir=workdir,
            mode=settings.wandb_mode or None,
            config={**settings.config, **{f"hardware.{k}": v for k, v in hardware().items()}})
        self.run_id = self.run.id

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def results(self, results: Mapping[str, Any]) -> None:
        self.run.summary.update(flatten(results, "final/"))

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class Trackers:
    """The run's trackers, each dropped with one warning at its first failure."""

    def __init__(self, workdir: str, settings: Settings):
        self._live = []
        wanted = [n for n in settings.names if n in _PACKAGES]
        if not wanted:
            return
        path = epath.Path(workdir) / RECORD
        record = _read_record(path)
        run_name = settings.run_name or os.path.basename(os.path.normpath(workdir))
        for name in wanted:
            run_id = record.get(name, {}).get("run_id")
            try:
                tracker = (_MLflow(settings, run_name, run_id) if name == "mlflow"
                           else _WandB(settings, run_name, run_id, workdir))
            except Exception as error:  # noqa: BLE001 — any failure: warn and go on without it.
                _warn(name, "could not start", error)
                continue
            self._live.append(tracker)
            if run_id is None:
                record[name] = {"run_id": tracker.run_id}
                atomic.write_json(path, record)
            else:
                logging.info("%s: continuing run %s.", name, run_id)

    def _each(self, what: str, method: str, *args) -> None:
        for tracker in list(self._live):
            try:
                getattr(tracker, method)(*args)
            except Exception as error:  # noqa: BLE001 — as above.
                _warn(tracker.name, what, error)
                self._live.remove(tracker)

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._each(f"failed at step {step}", "scalars", step, scalars)

    def results(self, results: Mapping[str, Any]) -> None:
        self._each("failed to log the results", "results", results)

    def close(self, finished: bool) -> None:
        self._each("failed to close the run", "close", finished)
        self._live = []


def _warn(name: str, what: str, error: Exception) -> None:
    text = " ".join(str(error).split())[:300]
    logging.warning("%s %s (%s: %s); training goes on without it, the other writers keep "
                    "every step.", name, what, type(error).__name__, text)


def _read_record(path: epath.Path) -> dict:
    """trackers.json, or {} (with a warning when it is damaged: new tracker runs start)."""
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
        if isinstance(record, dict):
            return record
    except ValueError:
        pass
    logging.warning("%s is damaged; the trackers start new runs.", path)
    return {}
