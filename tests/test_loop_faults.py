"""Faults handled once, in the run loop, and so the same in distillation and fine-tuning.

Each test runs against both trainers where the fault applies to both: SIGTERM and Ctrl-C (save
the step in flight, exit 0), a second Ctrl-C (abort, exit 130), a signal during start-up, a
streak of non-finite steps, and the pieces the loop is made of (the guarded update, the best
checkpoint, closing, metrics.jsonl). Run alone with `pytest -m fault`.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distil_flax.distill import train
from distil_flax.downstream import train as finetune
from distil_flax.interop import sources
from distil_flax.training import best_params, loop, train_state
from distil_flax.training.checkpoint import checkpoint_dir, restore_params
from distil_flax.training.checksums import CorruptCheckpointError, verify_step
from distil_flax.training.config_files import load_config
from distil_flax.training.metric_writers import MetricWriter, read_metrics
from distil_flax.training.workdir_lock import LOCK_NAME

pytestmark = pytest.mark.fault

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MRPC = os.path.join(ROOT, "tests", "fixtures", "glue", "MRPC")


# ---------------------------------------------------------------------------------------------
# The two commands, long enough to be interrupted
# ---------------------------------------------------------------------------------------------


def _command(kind, workdir, vocab_path, teacher_workdir):
    if kind == "distil":
        return [sys.executable, "-m", "distil_flax.main",
                "--config=configs/quickstart_teacher.py:tiny", f"--workdir={workdir}",
                f"--config.data.tokenizer={vocab_path}", "--config.train.num_steps=100000",
                "--config.train.checkpoint_every=100000", "--config.train.log_every=1",
                "--config.train.eval_every=0", "--config.train.eval_batches=1"]
    return [sys.executable, "-m", "distil_flax.finetune",
            "--config=configs/glue.py:task=mrpc,preset=tiny", f"--workdir={workdir}",
            f"--config.init.checkpoint={teacher_workdir}", f"--config.data.dir={MRPC}",
            "--config.train.num_epochs=100000", "--config.train.log_every=1",
            "--config.train.eval_every=100000", "--config.train.checkpoint_every=100000"]


def _start(kind, workdir, vocab_path, teacher_workdir, log):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    with open(log, "w") as out:
        return subprocess.Popen(_command(kind, workdir, vocab_path, teacher_workdir), cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_for(condition, process, what, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert process.poll() is None, f"the run ended with status {process.returncode}"
        time.sleep(0.01)
    raise TimeoutError(what)


def _training(workdir):
    """True once the run logged a step (metrics.jsonl is written and fsync'ed per record)."""
    path = os.path.join(workdir, "metrics.jsonl")
    return os.path.exists(path) and '"train/loss"' in open(path).read()


def _committed(workdir):
    directory = checkpoint_dir(workdir)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) \
        if directory.exists() else []


# Each trainer and each signal once: the handling is the loop's, shared by both.
@pytest.mark.parametrize("kind,sig", [("distil", signal.SIGINT), ("finetune", signal.SIGTERM)],
                         ids=["distil-SIGINT", "finetune-SIGTERM"])
def test_a_signal_saves_the_step_in_flight_and_exits_0(kind, sig, vocab_path, teacher_workdir,
                                                       tmp_path):
    workdir = str(tmp_path / "run")
    process = _start(kind, workdir, vocab_path, teacher_workdir, log := tmp_path / "log")
    _wait_for(lambda: _training(workdir), process, "no step was logged")
    process.send_signal(sig)
    assert process.wait(timeout=180) == 0, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    stopped = int(text.split("Stopping at step ")[1].split(" ")[0])
    assert f"Stopping at step {stopped} ({sig.name})" in text
    assert _committed(workdir) == [stopped] and stopped >= 1
    assert verify_step(checkpoint_dir(workdir), stopped)
    assert not os.path.exists(os.path.join(workdir, LOCK_NAME))
    # Every logged training step up to the saved one is in metrics.jsonl, once.
    logged = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
    assert logged == list(range(1, stopped + 1))


def test_a_second_ctrl_c_aborts_with_one_line(capsys):
    """The first Ctrl-C asks for a save; the second raises, and the command says so in one line.

    In-process, so that the two signals cannot race the save of a tiny model."""
    from distil_flax.training import cli
    from distil_flax.training.stop_signals import StopSignals

    def job():
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGINT)
            assert signals.reason(0) == "SIGINT"  # Finish the step, save it, stop.
            os.kill(os.getpid(), signal.SIGINT)  # Raises KeyboardInterrupt here.
            time.sleep(5)
        raise AssertionError("the second Ctrl-C did not abort")

    with pytest.raises(SystemExit) as exit_:
        cli.run(job)
    assert exit_.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: interrupted by a second Ctrl-C"), err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Restored.


def test_commands_without_a_loop_abort_on_sigterm_in_one_line(capsys):
    """Preparing data, training a vocabulary and exporting have nothing to save: SIGTERM stops
    them as Ctrl-C does, with their own line; the handler is put back after."""
    from distil_flax.training import cli

    before = signal.getsignal(signal.SIGTERM)

    def job():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not abort")

    with pytest.raises(SystemExit) as exit_:
        cli.run(job, sigterm_aborts=True, interrupted="interrupted: nothing was written")
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: interrupted: nothing was written")
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_during_start_up_exits_0_and_releases_the_workdir(vocab_path, teacher_workdir,
                                                                  tmp_path):
    workdir = str(tmp_path / "run")
    process = _start("distil", workdir, vocab_path, teacher_workdir, log := tmp_path / "log")
    # The lock is taken before data, models and the compiled step are built.
    _wait_for(lambda: os.path.exists(os.path.join(workdir, LOCK_NAME)), process, "no lock")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=180) == 0, log.read_text()
    assert "Stopping at step 0 (SIGTERM)" in log.read_text()
    assert not os.path.exists(os.path.join(workdir, LOCK_NAME))


def _noting_signals(process, timeout=60):
    """Waits until the command's first handlers are in place (`early_signals`: it catches
    SIGTERM, which Python alone does not), a moment before it imports JAX."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(f"/proc/{process.pid}/status") as f:
            caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        assert process.poll() is None, f"the command ended with status {process.returncode}"
        time.sleep(0.005)
    raise TimeoutError("the command never installed its handlers")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("signals, status, says", [
    ((signal.SIGINT,), 0, "Ctrl-C while starting: stopped before the run touched its workdir"),
    ((signal.SIGTERM,), 0, "SIGTERM while starting: stopped before the run touched its workdir"),
    ((signal.SIGINT, signal.SIGINT), 130,
     "error: interrupted by a second Ctrl-C while starting, before anything was written"),
], ids=["ctrl-c", "sigterm", "two-ctrl-c"])
def test_a_signal_while_a_run_imports_stops_it_before_it_touches_the_workdir(
        signals, status, says, vocab_path, teacher_workdir, tmp_path):
    """Python's own Ctrl-C, landing in JAX's import or XLA's callbacks, was lost or a
    traceback; now it is noted from the first moment and honoured before the lock."""
    workdir = str(tmp_path / "run")
    process = _start("distil", workdir, vocab_path, teacher_workdir, log := tmp_path / "log")
    _noting_signals(process)
    for sig in signals:
        process.send_signal(sig)
        time.sleep(0.05)
    assert process.wait(timeout=180) == status, log.read_text()
    text = log.read_text()
    assert says in text
    assert "Traceback" not in text and "Exception ignored" not in text, text
    assert [line for line in text.splitlines() if line.startswith("error:")] == (
        [says] if status else [])
    assert not os.path.exists(workdir)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_ctrl_c_while_an_export_imports_aborts_in_one_line(teacher_workdir, tmp_path):
    output = tmp_path / "exported"
    process = subprocess.Popen(
        [sys.executable, "-m", "distil_flax.export_hf", f"--workdir={teacher_workdir}",
         f"--output={output}"], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _noting_signals(process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        "error: interrupted: --output was left as it was (an export is renamed into place "
        "whole); rerun the same command"]
    assert not output.exists()


# ---------------------------------------------------------------------------------------------
# Non-finite values
# ---------------------------------------------------------------------------------------------


def test_a_nan_learning_rate_never_reaches_the_weights():
    """Loss and gradients are finite; the update is not: the step is skipped and counted."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    optimizer = optax.adamw(float("nan"))
    replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = train_state.abstract_state(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                     params), optimizer, replicated)
    state = train_state.fresh_state(params, optimizer, abstract, jax.random.PRNGKey(0))
    grads = jax.tree.map(jnp.ones_like, params)
    new, metrics = train_state.apply_update(state, grads, {"loss": jnp.float32(1.0)},
                                            optimizer=optimizer,
                                            schedule=optax.constant_schedule(float("nan")))
    jax.tree.map(np.testing.assert_array_equal, new.params, params)
    assert int(metrics["nonfinite"]) == 1 and int(new.skipped_steps) == 1
    assert int(new.bad_streak) == 1 and int(new.step) == 1
    assert np.isfinite(float(metrics["grad_norm"]))


def _distil_config(vocab_path, teacher_workdir):
    c = load_config(os.path.join(ROOT, "configs/quickstart.py:tiny"))
    c.data.tokenizer = vocab_path
    c.teacher.checkpoint = teacher_workdir
    c.train.num_steps, c.train.checkpoint_every, c.train.eval_every = 12, 2, 0
    return c


def _finetune_config(teacher_workdir):
    c = load_config(os.path.join(ROOT, "configs/glue.py:task=mrpc,preset=tiny"))
    c.init.checkpoint = teacher_workdir
    c.data.dir = MRPC
    c.train.num_steps, c.train.checkpoint_every, c.train.eval_every = 12, 2, 100
    return c


@pytest.mark.parametrize("kind", ["distil", "finetune"])
def test_a_streak_of_nonfinite_steps_stops_either_trainer(kind, vocab_path, teacher_workdir,
                                                          tmp_path):
    """A learning rate so large that the weights overflow: every later step is non-finite."""
    if kind == "distil":
        c, run = _distil_config(vocab_path, teacher_workdir), train.train_and_evaluate
    else:
        c, run = _finetune_config(teacher_workdir), finetune.finetune_and_evaluate
    c.train.learning_rate, c.train.warmup_fraction = 1e36, 0.0
    c.train.max_consecutive_nonfinite, c.train.log_every = 3, 1
    workdir = str(tmp_path / "run")
    with pytest.raises(loop.NonFiniteError, match="train.max_consecutive_nonfinite=3"):
        run(c, workdir)
    records = [r for r in read_metrics(workdir) if "train/loss" in r]
    assert records and all(np.isfinite(r["train/loss"]) for r in records[:1])
    assert records[-1]["train/skipped_steps"] >= 1
    assert not os.path.exists(os.path.join(workdir, LOCK_NAME))


# ---------------------------------------------------------------------------------------------
# The best checkpoint: committed with its record, checksummed
# ---------------------------------------------------------------------------------------------


def _params():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {"dense": {"kernel": jax.device_put(jnp.arange(64.0).reshape(8, 8), sharding)}}


def test_best_params_commit_with_their_record(tmp_path):
    workdir = str(tmp_path)
    best = best_params.BestParams(workdir)
    assert best.offer(3, 0.5, {"metrics": {"dev": {"acc": 0.5}}}, _params())
    assert not best.offer(4, 0.5, {}, _params())  # Not better.
    best.close()
    record = json.loads((tmp_path / best_params.BEST_RECORD).read_text())
    assert record == {"step": 3, "score": 0.5, "metrics": {"dev": {"acc": 0.5}}}
    assert verify_step(checkpoint_dir(tmp_path / best_params.BEST_DIR), 3)
    # A kill between the commit and best.json: the record is rebuilt from the checkpoint, and a
    # later equal score is still not "better".
    (tmp_path / best_params.BEST_RECORD).unlink()
    again = best_params.BestParams(workdir)
    assert again.record == record
    assert json.loads((tmp_path / best_params.BEST_RECORD).read_text())
    assert not again.offer(5, 0.5, {}, _params())
    again.close()


def test_a_garbled_best_checkpoint_is_refused(tmp_path):
    best = best_params.BestParams(str(tmp_path))
    best.offer(3, 1.0, {}, _params())
    best.close()
    step_dir = checkpoint_dir(tmp_path / best_params.BEST_DIR) / "3" / "params"
    files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.seek(os.path.getsize(largest) // 2)
        f.write(b"\xff" * 8)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            _params())
    # What export and a task-distillation teacher read (`interop.sources.task_params`).
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint step 3: .* CRC-32"):
        restore_params(str(tmp_path / sources.BEST_DIR), abstract)


# ---------------------------------------------------------------------------------------------
# Closing, and metrics.jsonl
# ---------------------------------------------------------------------------------------------


def test_closing_calls_every_closer_and_never_masks_the_first_error():
    calls = []

    def failing(name):
        def close():
            calls.append(name)
            raise OSError(f"{name} failed")
        return close

    with pytest.raises(OSError, match="checkpointer failed"):
        loop._close_all(failing("checkpointer"), failing("writer"))
    assert calls == ["checkpointer", "writer"]
    calls.clear()
    with pytest.raises(KeyError, match="the first error"):
        try:
            raise KeyError("the first error")
        finally:
            loop._close_all(failing("checkpointer"), failing("writer"))
    assert calls == ["checkpointer", "writer"]


def test_a_torn_last_record_is_skipped_and_dropped_on_resume(tmp_path):
    writer = MetricWriter(str(tmp_path))
    for step in (1, 2, 3):
        writer.write_scalars(step, {"loss": float(step)}, prefix="train/")
    writer.close()
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 4, "train/lo')  # A full disk, or a kill.
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
    # Resuming from step 2: the torn line and the records past the checkpoint go.
    writer = MetricWriter(str(tmp_path), resume_step=2)
    writer.write_scalars(3, {"loss": 30.0}, prefix="train/")
    writer.close()
    assert [(r["step"], r["train/loss"]) for r in read_metrics(str(tmp_path))] == [
        (1, 1.0), (2, 2.0), (3, 30.0)]
