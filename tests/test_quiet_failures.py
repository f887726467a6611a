"""A failure the main thread reports as one `error:` line is not also told by background threads.

A full disk during a checkpoint fails the writes of Orbax's and TensorStore's threads; their
tracebacks (dozens) go to DEBUG, shown with `--verbosity=1`, and the run ends in one line. A
background error that no reported failure explains still prints. Run alone with `pytest -m fault`.
"""

import os
import shutil
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import pytest

from distil_flax.training.checkpoint import Checkpointer, checkpoint_dir
from distil_flax.training.checksums import verify_step
from distil_flax.training.train_state import TrainState

pytestmark = pytest.mark.fault

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Above the metrics the run appends, below the checkpoint's array files (~100-400 kB).
FILE_SIZE_LIMIT = 100_000
# `python -m distil_flax.main` with every write past FILE_SIZE_LIMIT failing (EFBIG, as ENOSPC
# on a full disk; Python ignores SIGXFSZ). Set in the child itself: a preexec_fn would run
# Python in a fork of this multithreaded (JAX) process.
FULL_DISK = ("import resource, runpy; "
             "resource.setrlimit(resource.RLIMIT_FSIZE, "
             f"({FILE_SIZE_LIMIT}, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
             "runpy.run_module('distil_flax.main', run_name='__main__', alter_sys=True)")


def _cli(workdir, vocab_path, *flags, full_disk=False):
    """The tiny teacher's CLI on one device, on to step 24 (the teacher has steps 10 and 20).

    With `full_disk`, the compilation cache is off, so that only the run writes.
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    if full_disk:
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    return subprocess.run(
        [sys.executable, *(["-c", FULL_DISK] if full_disk else ["-m", "distil_flax.main"]),
         "--config=configs/quickstart_teacher.py:tiny",
         f"--workdir={workdir}", f"--config.data.tokenizer={vocab_path}",
         "--config.train.num_steps=24", "--config.train.checkpoint_every=4",
         "--config.train.eval_every=0", "--config.train.eval_batches=1", *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _steps(workdir):
    return sorted(int(p.name) for p in checkpoint_dir(workdir).iterdir() if p.name.isdigit())


def test_disk_full_while_saving_ends_in_one_line(vocab_path, teacher_workdir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(teacher_workdir, workdir)
    committed = _steps(workdir)
    assert committed == [10, 20]

    failed = _cli(workdir, vocab_path, full_disk=True)
    output = failed.stdout + failed.stderr
    assert failed.returncode == 1, output
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert errors[0].startswith(f"error: saving checkpoint step 24 to {checkpoint_dir(workdir)} "
                                "failed: File too large"), errors
    assert "Traceback" not in output and "Exception ignored" not in output, output
    assert _steps(workdir) == committed
    assert all(verify_step(checkpoint_dir(workdir), step) for step in committed)

    # The background tracebacks are not lost: they are DEBUG records.
    verbose = _cli(workdir, vocab_path, "--verbosity=1", full_disk=True)
    assert verbose.returncode == 1
    assert "Background error of a failed checkpoint save" in verbose.stderr
    assert "Traceback" in verbose.stderr and "OUT_OF_RANGE" in verbose.stderr

    # With space again, the same command finishes the run from the committed steps.
    resumed = _cli(workdir, vocab_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Resuming from step 20" in resumed.stderr
    assert _steps(workdir)[-1] == 24


class _RaisesWhenCollected:
    def __del__(self):
        raise RuntimeError("a bug in a background thread")


def test_a_background_error_no_failed_save_explains_still_prints(tmp_path, monkeypatch):
    """While a save is in flight a background report is held; the save succeeds, so it prints."""
    printed = []
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    state = TrainState(step=jnp.int32(1), params={"w": jnp.ones(3)},
                       opt_state={"m": jnp.zeros(3)}, rng=jnp.zeros(2, jnp.uint32),
                       skipped_steps=jnp.int32(0), bad_streak=jnp.int32(0))
    checkpointer = Checkpointer(str(tmp_path), save_every=1, keep=1)
    try:
        assert checkpointer.save(1, state, {"position": 1})
        thread = threading.Thread(target=_RaisesWhenCollected)  # Collected in the thread.
        thread.start()
        thread.join()
        assert printed == []  # Held: the save's outcome is not known yet.
        checkpointer.wait()
    finally:
        checkpointer.close()
    assert [str(report.exc_value) for report in printed] == ["a bug in a background thread"]
    assert checkpointer.latest_step() == 1
