"""Experiment trackers of `train.writers`: MLflow against a real local store read back through
MLflow's own client, W&B in offline mode read back through its own record definitions, a
resumed run continuing the same tracker run, and a failing tracker that never costs a step."""

import glob
import json
import logging as py_logging
import os
import struct

import jax
import pytest

from distil_flax.distill import train
from distil_flax.downstream import train as finetune
from distil_flax.training import trackers
from distil_flax.training.config_files import load_config
from distil_flax.training.metric_writers import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MRPC = os.path.join(ROOT, "tests", "fixtures", "glue", "MRPC")


def _distil_config(vocab_path, teacher_workdir, **train_fields):
    c = load_config(os.path.join(ROOT, "configs/quickstart.py:tiny"))
    c.data.tokenizer, c.teacher.checkpoint = vocab_path, teacher_workdir
    c.train.num_steps, c.train.log_every, c.train.eval_every = 8, 2, 4
    c.train.checkpoint_every = 2
    c.train.update(train_fields)
    return c


def _logged(workdir, key="train/loss"):
    return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


def test_mlflow_gets_config_scalars_hardware_and_results_and_a_resume_continues_its_run(
        tmp_path, vocab_path, teacher_workdir, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts in ./mlruns.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = _distil_config(vocab_path, teacher_workdir, writers="tensorboard,jsonl,mlflow",
                       tracking_uri=uri, experiment="tiny")
    workdir = str(tmp_path / "run")
    assert train.train_and_evaluate(c, workdir, stop_at_step=4) == {}
    run_id = json.loads((tmp_path / "run" / trackers.RECORD).read_text())["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "KILLED"  # Stopped; rerun to continue.
    train.train_and_evaluate(c, workdir)
    assert json.loads((tmp_path / "run" / trackers.RECORD).read_text())["mlflow"]["run_id"] == (
        run_id)
    run = client.get_run(run_id)
    experiment = client.get_experiment_by_name("tiny")
    assert run.info.experiment_id == experiment.experiment_id and run.info.run_name == "run"
    assert len(client.search_runs([experiment.experiment_id])) == 1  # One run, resumed.
    assert run.info.status == "FINISHED"
    assert run.data.params["train.learning_rate"] == str(c.train.learning_rate)
    assert run.data.params["teacher.checkpoint"] == teacher_workdir
    assert run.data.tags["devices"] == f"{jax.device_count()} × cpu"
    assert run.data.tags["platform"] == "cpu" and run.data.tags["host"]
    # Every logged step, as metrics.jsonl has it (steps 2 and 4 logged by the first process).
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert history == pytest.approx(_logged(workdir)) and sorted(history) == [2, 4, 6, 8]
    assert {m.step for m in client.get_metric_history(run_id, "eval/student_mlm_accuracy")} == {
        4, 8}
    results = json.loads(open(client.download_artifacts(run_id, "results.json",
                                                        str(tmp_path))).read())
    assert results["step"] == 8
    assert results["eval"]["student_mlm_accuracy"] == pytest.approx(
        _logged(workdir, "eval/student_mlm_accuracy")[8])


def _wandb_records(run_dir):
    """The records of an offline run's .wandb file: W&B's own Record messages, in the file's
    LevelDB-log framing (a 7-byte header, then 32 KiB blocks of 7-byte-headed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = open(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0], "rb").read()
    assert data[:4] == b":W&B"
    position, block, pending, found = 7, 32768, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:  # The block's zero padding.
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # A whole record, or the last chunk of one.
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
            pending = b""
    return found


def test_wandb_offline_resumes_its_run_with_every_step_of_a_finetuning(tmp_path,
                                                                        teacher_workdir):
    c = load_config(os.path.join(ROOT, "configs/glue.py:task=mrpc,preset=tiny"))
    c.init.checkpoint, c.data.dir = teacher_workdir, MRPC
    c.train.num_steps, c.train.checkpoint_every, c.train.eval_every, c.train.log_every = (
        6, 2, 3, 1)
    c.train.writers, c.train.wandb_mode, c.train.experiment = "jsonl,wandb", "offline", "tiny"
    workdir = str(tmp_path / "mrpc")
    assert finetune.finetune_and_evaluate(c, workdir, stop_at_step=3) == {}
    finetune.finetune_and_evaluate(c, workdir)
    run_id = json.loads((tmp_path / "mrpc" / trackers.RECORD).read_text())["wandb"]["run_id"]
    runs = sorted(glob.glob(str(tmp_path / "mrpc" / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs)
    history, config, summary = {}, {}, {}
    for run_dir in runs:
        for record in _wandb_records(run_dir):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert record.run.run_id == run_id and record.run.project == "tiny"
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in record.history.item}
                if "train/loss" in items:
                    history[items["_step"]] = items["train/loss"]
            elif kind == "summary":
                summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                for i in record.summary.update})
    assert history == pytest.approx(_logged(workdir)) and sorted(history) == list(range(1, 7))
    assert config["train.learning_rate"] == c.train.learning_rate
    assert config["task.name"] == "mrpc" and config["hardware.platform"] == "cpu"
    assert summary["final/step"] == 6 and "final/best.score" in summary
    assert not os.path.exists(os.path.join(workdir, "events.out.tfevents"))  # Not a writer.
    assert not glob.glob(os.path.join(workdir, "events.out.tfevents*"))


def test_a_failing_tracker_warns_once_and_the_other_writers_keep_every_step(
        tmp_path, vocab_path, teacher_workdir, monkeypatch, caplog):
    # MLflow cannot start (nothing listens at its server's port); W&B fails at its third write.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    c = _distil_config(vocab_path, teacher_workdir, writers="jsonl,mlflow,wandb",
                       tracking_uri="http://127.0.0.1:9", wandb_mode="offline")
    calls = []

    def failing(self, step, scalars):
        calls.append(step)
        if len(calls) == 3:
            raise ConnectionError("the server went away")

    monkeypatch.setattr(trackers._WandB, "scalars", failing)
    caplog.set_level(py_logging.WARNING)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(c, workdir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == py_logging.WARNING
                and "training goes on without it" in r.getMessage()]
    assert len(warnings) == 2
    assert warnings[0].startswith("mlflow could not start (")
    assert warnings[1].startswith("wandb failed at step 4 (ConnectionError: the server went away")
    assert len(calls) == 3  # Dropped after its failure.
    assert sorted(_logged(workdir)) == [2, 4, 6, 8]  # Every step in metrics.jsonl.
    assert "mlflow" not in json.loads((tmp_path / "run" / trackers.RECORD).read_text())


def test_writers_are_checked_before_a_run_starts(monkeypatch):
    c = load_config(os.path.join(ROOT, "configs/quickstart.py:tiny"))
    c.train.writers = "tensorboard,mlfow"
    with pytest.raises(ValueError, match="train.writers names mlfow; known writers: "):
        trackers.writers(c)
    c.train.writers, c.train.wandb_mode = "wandb", "sometimes"
    with pytest.raises(ValueError, match="train.wandb_mode must be online, offline, disabled"):
        trackers.writers(c)
    c.train.wandb_mode = ""
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r'not installed: pip install "distil_flax\[wandb\]"'):
        trackers.writers(c)
    assert trackers.flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": 2}) == {
        "a.b": 1, "a.c.d": "x", "e": 2}
