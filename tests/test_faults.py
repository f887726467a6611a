"""Fault injection: preemption, kill -9, corrupt checkpoints, NaNs, full disks, bad inputs, and
two runs on one workdir. Run alone with `pytest -m fault`.

Each fault is injected into the real `train_and_evaluate` (in this process) or the real CLI (in a
subprocess), and the outcome is compared with an uninterrupted run of the same config, bit for
bit. In-process runs use the tiny student config on 8 simulated devices; CLI runs use the tiny
teacher config on one device, which starts in a few seconds. All share one persistent XLA
compilation cache (`conftest.py`), so that the many restarts compile each program once.

The moments of the CLI's signals come from DISTIL_FLAX_FAULT_SEED (default 8); run with other
seeds to try other moments.
"""

import itertools
import json
import logging
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from distil_flax.distill import train
from distil_flax.interop import sources
from distil_flax.model import heads
from distil_flax.training import loop
from distil_flax.training.checkpoint import (
    ITEMS,
    TMP_SUFFIX,
    CheckpointWriteError,
    checkpoint_dir,
    restore_params,
)
from distil_flax.training.checksums import CHECKSUMS, CorruptCheckpointError, verify_step
from distil_flax.training.config_files import load_config, load_json
from distil_flax.training.metric_writers import read_metrics
from distil_flax.training.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError

pytestmark = pytest.mark.fault

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8  # In-process runs: checkpoints at 4 and 8 (train.checkpoint_every=4).
SEED = int(os.environ.get("DISTIL_FLAX_FAULT_SEED", "8"))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _student_config(vocab_path, teacher_workdir, **train_overrides):
    c = load_config(os.path.join(ROOT, "configs/quickstart.py:tiny"))
    c.data.tokenizer = vocab_path
    c.teacher.checkpoint = teacher_workdir
    c.train.num_steps = STEPS
    c.train.checkpoint_every = 4
    c.train.eval_every = 0
    c.train.log_every = 2
    for key, value in train_overrides.items():
        setattr(c.train, key, value)
    return c


def _checkpoint(workdir, step=None):
    """(step, params, train item, data item) of a checkpoint, read without a target."""
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS,
                               options=options) as manager:
        step = manager.latest_step() if step is None else step
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(), train=ocp.args.StandardRestore(),
            data=ocp.args.JsonRestore()))
    return step, jax.device_get(restored["params"]), jax.device_get(restored["train"]), \
        restored["data"]


def _assert_same_run_state(workdir_a, workdir_b):
    """Parameters, optimizer state, counters, PRNG key and data position are bit-identical."""
    step_a, params_a, train_a, data_a = _checkpoint(workdir_a)
    step_b, params_b, train_b, data_b = _checkpoint(workdir_b)
    assert step_a == step_b
    assert data_a == data_b
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
    jax.tree.map(np.testing.assert_array_equal, train_a, train_b)


def _steps(workdir):
    directory = checkpoint_dir(workdir)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _inject(monkeypatch, fault):
    """Calls `fault(call_index, state, teacher_params, batch, token_weights)` before every step.

    `call_index` counts this process's steps from 1; `fault` returns the step's arguments.
    """
    real = train.compile_steps

    def compile_steps(*args, **kwargs):
        step_fn, eval_fn = real(*args, **kwargs)
        calls = itertools.count(1)

        def faulty(*step_args):
            return step_fn(*fault(next(calls), *step_args))

        return faulty, eval_fn

    monkeypatch.setattr(train, "compile_steps", compile_steps)


def _largest_file(step_dir, item):
    files = [os.path.join(root, n) for root, _, names in os.walk(os.path.join(step_dir, item))
             for n in names]
    return max(files, key=os.path.getsize)


def _garble(path):
    """Flips 16 bytes in the middle: the size stays, the content does not."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(16)
        f.seek(-len(data), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _snapshot(workdir):
    """What a failed run must not change: file names under the workdir and config.json."""
    names = sorted(os.path.relpath(os.path.join(r, n), workdir)
                   for r, _, ns in os.walk(workdir) for n in ns)
    return names, open(os.path.join(workdir, "config.json")).read()


# ---------------------------------------------------------------------------------------------
# In-process runs shared by the tests below
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(tmp_path_factory, vocab_path, teacher_workdir):
    """An uninterrupted 8-step distillation run: the reference every faulty run must match."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    train.train_and_evaluate(_student_config(vocab_path, teacher_workdir), workdir)
    return workdir


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, vocab_path, teacher_workdir):
    """The same run, sent SIGTERM during step 3 (a scheduler's preemption notice)."""
    workdir = str(tmp_path_factory.mktemp("preempted"))
    monkeypatch = pytest.MonkeyPatch()

    def sigterm_at_3(call, *args):
        if call == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return args

    _inject(monkeypatch, sigterm_at_3)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        metrics = train.train_and_evaluate(_student_config(vocab_path, teacher_workdir), workdir)
    finally:
        monkeypatch.undo()
    assert metrics == {}  # Stopped, not finished.
    assert signal.getsignal(signal.SIGTERM) == handler  # The run's handler is gone again.
    return workdir


def test_sigterm_saves_the_current_step_and_resume_is_bit_identical(
        preempted, straight, vocab_path, teacher_workdir, tmp_path):
    assert _steps(preempted) == [3]  # Saved at the step it was in, not at a periodic one.
    assert not os.path.exists(os.path.join(preempted, LOCK_NAME))  # Released for the restart.

    resumed = str(tmp_path / "resumed")
    shutil.copytree(preempted, resumed)
    train.train_and_evaluate(_student_config(vocab_path, teacher_workdir), resumed)
    assert _steps(resumed) == [3, 4, 8]
    _assert_same_run_state(straight, resumed)
    straight_losses = [r["train/loss"] for r in read_metrics(straight) if "train/loss" in r]
    resumed_losses = [r["train/loss"] for r in read_metrics(resumed) if "train/loss" in r]
    assert resumed_losses[-2:] == straight_losses[-2:]  # Steps 5-8 after the restart.


# ---------------------------------------------------------------------------------------------
# Corrupt checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage,message", [
    (lambda step_dir: _garble(_largest_file(step_dir, "params")), "does not match its CRC-32"),
    (lambda step_dir: _truncate(_largest_file(step_dir, "train")), r"bytes, \d+ were written"),
    (lambda step_dir: os.remove(os.path.join(step_dir, "data", "metadata")), "is missing"),
    (lambda step_dir: open(os.path.join(step_dir, CHECKSUMS), "w").write("{"), "unreadable"),
])
def test_verify_names_the_step_and_file(straight, tmp_path, damage, message):
    workdir = str(tmp_path / "run")
    shutil.copytree(straight, workdir)
    directory = checkpoint_dir(workdir)
    assert verify_step(directory, 8) and verify_step(directory, 4)
    damage(str(directory / "8"))
    with pytest.raises(CorruptCheckpointError, match=rf"checkpoint step 8: .*{message}"):
        verify_step(directory, 8)
    assert verify_step(directory, 4)  # Other steps are untouched.


def test_orbax_alone_restores_a_garbled_file_silently(straight, tmp_path):
    """Why checksums exist: without them the garbled step reads back as wrong numbers."""
    workdir = str(tmp_path / "run")
    shutil.copytree(straight, workdir)
    _, params, _, _ = _checkpoint(workdir, 8)
    _garble(_largest_file(str(checkpoint_dir(workdir) / "8"), "params"))
    _, garbled, _, _ = _checkpoint(workdir, 8)
    differ = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), params, garbled))
    assert any(differ)
    # The teacher / export path checks them: it refuses rather than loading garbage.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with pytest.raises(CorruptCheckpointError, match="checkpoint step 8: .*CRC-32"):
        restore_params(workdir, abstract)


def test_corrupt_latest_steps_fall_back_to_the_newest_intact_one(
        straight, preempted, vocab_path, teacher_workdir, tmp_path, caplog):
    # Steps 3, 4 and 8 on disk; 8 garbled, 4 truncated: the run must go back to 3.
    workdir = str(tmp_path / "run")
    shutil.copytree(preempted, workdir)
    c = _student_config(vocab_path, teacher_workdir)
    train.train_and_evaluate(c, workdir)
    directory = checkpoint_dir(workdir)
    garbled = _largest_file(str(directory / "8"), "params")
    _garble(garbled)
    _truncate(_largest_file(str(directory / "4"), "train"))

    # Strict: stop, name the step and file, move nothing.
    c.train.strict_restore = True
    before = _snapshot(workdir)
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint step 8: {garbled} does not"):
        train.train_and_evaluate(c, workdir)
    assert _snapshot(workdir) == before

    # Default: fall back to step 3, move 8 and 4 aside, and finish exactly like the straight run.
    c.train.strict_restore = False
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(c, workdir)
    assert "checkpoint step 8" in caplog.text and "checkpoint step 4" in caplog.text
    assert "Resuming from step 3" in caplog.text
    moved = sorted(os.listdir(os.path.join(workdir, "corrupt_checkpoints")))
    assert [name.split("-")[0] for name in moved] == ["4", "8"]
    assert _steps(workdir) == [3, 4, 8]
    _assert_same_run_state(straight, workdir)


def test_no_intact_checkpoint_stops_and_moves_nothing(preempted, vocab_path, teacher_workdir,
                                                      tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(preempted, workdir)
    os.remove(os.path.join(str(checkpoint_dir(workdir) / "3"), "params", "_METADATA"))
    before = _snapshot(workdir)
    with pytest.raises(CorruptCheckpointError, match="no checkpoint in .* can be restored"):
        train.train_and_evaluate(_student_config(vocab_path, teacher_workdir), workdir)
    assert _snapshot(workdir) == before


def test_a_step_without_its_files_and_checksums_falls_back(straight, vocab_path,
                                                            teacher_workdir, tmp_path):
    """No checksums to check and no array files: Orbax raises a bare Exception on restore."""
    workdir = str(tmp_path / "run")
    shutil.copytree(straight, workdir)
    step_dir = checkpoint_dir(workdir) / "8"
    os.remove(step_dir / CHECKSUMS)
    for item in ("params", "train"):
        for root, _, names in os.walk(step_dir / item):
            for name in names:
                if name not in ("_METADATA", "_sharding", "manifest.ocdbt"):
                    os.remove(os.path.join(root, name))
    c = _student_config(vocab_path, teacher_workdir, num_steps=12)
    train.train_and_evaluate(c, workdir)  # Resumes from step 4 and finishes.
    assert _steps(workdir)[-1] == 12
    assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))[0].startswith("8-")


# ---------------------------------------------------------------------------------------------
# Non-finite steps
# ---------------------------------------------------------------------------------------------


def test_nonfinite_steps_are_skipped_counted_and_a_streak_stops_the_run(
        vocab_path, teacher_workdir, tmp_path, monkeypatch, caplog):
    """A teacher whose MLM bias turns NaN on chosen steps: L_ce goes NaN, L_mlm and L_cos not."""
    bad = {3, 6, 7, 8}

    def nan_teacher(call, state, teacher_params, batch, token_weights):
        if call in bad:
            teacher_params = {**teacher_params, "mlm_bias": teacher_params["mlm_bias"] * jnp.nan}
        return state, teacher_params, batch, token_weights

    _inject(monkeypatch, nan_teacher)
    workdir = str(tmp_path / "run")
    c = _student_config(vocab_path, teacher_workdir, checkpoint_every=1, keep_checkpoints=20,
                        max_consecutive_nonfinite=3)
    with caplog.at_level(logging.WARNING), pytest.raises(loop.NonFiniteError) as stopped:
        train.train_and_evaluate(c, workdir)
    message = str(stopped.value)
    assert "3 consecutive steps" in message and "steps 6-8" in message
    # Which terms: L_ce and what depends on it, not L_mlm or L_cos.
    assert "first: step 6: loss_ce=nan, loss=nan, grad_norm=nan, update_norm=nan)" in message
    # The lone bad step.
    assert "step 3: loss_ce=nan, loss=nan, grad_norm=nan, update_norm=nan" in caplog.text

    # Stopped at the fetch of step 8 (the last), before saving it or evaluating; 1-7 were saved.
    assert _steps(workdir) == list(range(1, 8))
    saved = {step: _checkpoint(workdir, step) for step in range(1, 8)}
    # Parameters and optimizer state of each step.
    states = {step: (params, item["opt_state"]) for step, (_, params, item, _) in saved.items()}
    same = lambda a, b: all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))  # noqa: E731
    assert same(states[3], states[2])  # Skipped.
    assert not same(states[4], states[3]) and not same(states[5], states[4])  # Trained on.
    assert same(states[6], states[5]) and same(states[7], states[5])  # Skipped.
    assert all(np.isfinite(x).all() for s in states.values() for x in jax.tree.leaves(s))
    counters = saved[7][2]
    assert (counters["skipped_steps"], counters["bad_streak"]) == (3, 2)
    # Interval means leave the skipped steps out, and report the running count.
    records = {r["step"]: r for r in read_metrics(workdir) if "train/loss" in r}
    assert np.isfinite(records[4]["train/loss"]) and records[4]["train/skipped_steps"] == 1
    assert records[6]["train/skipped_steps"] == 2


# ---------------------------------------------------------------------------------------------
# Full disk
# ---------------------------------------------------------------------------------------------


# Orbax's failed background write leaves TensorStore callbacks aimed at its closed event loop;
# Python reports them as unraisable when they fire. They are noise, not the run's errors.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_disk_full_while_saving_keeps_the_committed_steps(
        preempted, straight, vocab_path, teacher_workdir, tmp_path):
    """RLIMIT_FSIZE makes every write past 200 kB fail (EFBIG), as a full disk fails with ENOSPC.

    Python ignores SIGXFSZ, so the write returns an error instead of killing the process; the
    limit is lifted before anything but the run writes.
    """
    workdir = str(tmp_path / "run")
    shutil.copytree(preempted, workdir)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        with pytest.raises(CheckpointWriteError) as failed:
            train.train_and_evaluate(_student_config(vocab_path, teacher_workdir), workdir)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(failed.value)
    assert f"saving checkpoint step 4 to {checkpoint_dir(workdir)} failed: File too large" \
        in message
    assert "committed steps [3] are intact; a restart resumes from step 3" in message
    assert _steps(workdir) == [3] and verify_step(checkpoint_dir(workdir), 3)
    assert not os.path.exists(os.path.join(workdir, LOCK_NAME))

    # With space again, the same command finishes the run as if nothing had happened.
    train.train_and_evaluate(_student_config(vocab_path, teacher_workdir), workdir)
    _assert_same_run_state(straight, workdir)


# ---------------------------------------------------------------------------------------------
# Bad inputs: one clear error, the workdir untouched
# ---------------------------------------------------------------------------------------------


def _change(section, **fields):
    def apply(c, tmp_path):
        for key, value in fields.items():
            setattr(getattr(c, section), key, value)
    return apply


def _teacher_without_config(c, tmp_path):
    (tmp_path / "not_a_run").mkdir()
    c.teacher.checkpoint = str(tmp_path / "not_a_run")


def _data_of_another_tokenizer(c, tmp_path):
    """The run's prepared data, read with a vocab of the same size whose last two tokens swap."""
    from distil_flax import data
    from distil_flax.data import prepare

    prepared = prepare.default_directory(c.data, data.load_tokenizer(c.data.tokenizer))
    lines = open(c.data.tokenizer).read().splitlines()
    lines[-2:] = lines[-1], lines[-2]
    (tmp_path / "vocab.txt").write_text("\n".join(lines) + "\n")
    c.data.tokenizer, c.data.dir = str(tmp_path / "vocab.txt"), prepared


def _teacher_that_is_a_fine_tuning_run(c, tmp_path):
    teacher = tmp_path / "sst2"
    shutil.copytree(c.teacher.checkpoint, teacher)
    sources.write_task_model(str(teacher), model_cfg=load_json(teacher / "config.json").model,
                             head=heads.TaskHead("seq_cls", 2), tokenizer=c.data.tokenizer,
                             lowercase=True, task="sst2")
    c.teacher.checkpoint = str(teacher)


def _teacher_with_a_damaged_task_model(c, tmp_path):
    teacher = tmp_path / "sst2"
    shutil.copytree(c.teacher.checkpoint, teacher)
    (teacher / "task_model.json").write_text('{"task": "sst2"}')
    c.teacher.checkpoint = str(teacher)


def _empty_tokenizer(c, tmp_path):
    (tmp_path / "vocab.txt").write_text("")
    c.data.tokenizer = str(tmp_path / "vocab.txt")


@pytest.mark.parametrize("change,error,message", [
    (_change("model", hidden_size=16, num_heads=1, intermediate_size=64), ValueError,
     r"loss.alpha_cos compares hidden states, but the teacher's hidden size \(32\) differs from "
     r"model.hidden_size \(16\)"),
    (_change("model", hidden_size=48, num_heads=3, intermediate_size=96), ValueError,
     r"init.prune keeps units of the teacher, but model.hidden_size \(48\) is larger than the "
     r"teacher's \(32\)"),
    (_change("model", vocab_size=1999), ValueError,
     r"model.vocab_size \(1999\) differs from data.tokenizer's \(2000\)"),
    (_change("mesh", data=3), ValueError, r"mesh shape \(mesh.data=3, mesh.fsdp=1, "
     r"mesh.tensor=1\) needs 3 devices, but 8 are available"),
    (_change("train", log_every=0), ValueError, "train.log_every must be finite and ≥ 1, got 0"),
    (_teacher_without_config, ValueError, "is neither a distil_flax workdir nor a Hugging Face"),
    (_teacher_that_is_a_fine_tuning_run, ValueError,
     r"teacher.checkpoint=.*sst2' is a fine-tuning run \(it holds task_model.json\)"),
    (_teacher_with_a_damaged_task_model, ValueError,
     r"sst2/task_model.json is damaged: it lacks model, head, tokenizer, lowercase"),
    (_change("train", batch_size=12), ValueError, r"train.batch_size \(12\)"),
    (_change("train", learning_rate=float("nan")), ValueError, "train.learning_rate"),
    (_empty_tokenizer, ValueError, r"vocab.txt lacks special token\(s\) \[PAD\]"),
    (_data_of_another_tokenizer, ValueError, r"The prepared data in .* was tokenized with .*"
     r"its ids would mean other tokens"),
])
def test_bad_inputs_fail_clearly_and_leave_the_workdir_untouched(
        straight, vocab_path, teacher_workdir, tmp_path, change, error, message):
    workdir = str(tmp_path / "run")
    shutil.copytree(straight, workdir)
    before = _snapshot(workdir)
    c = _student_config(vocab_path, teacher_workdir)
    change(c, tmp_path)
    with pytest.raises(error, match=message):
        train.train_and_evaluate(c, workdir)
    assert _snapshot(workdir) == before


def test_a_garbled_prepared_shard_stops_the_run_naming_the_data(vocab_path, tmp_path):
    """ArrayRecord's block checks catch it in the loader's threads: a ValueError naming the
    directory (one `error:` line) rather than a RuntimeError traceback."""
    from distil_flax import data

    c = load_config(os.path.join(ROOT, "configs/quickstart_teacher.py:tiny"))
    c.data.tokenizer = vocab_path
    c.data.dir = str(tmp_path / "prepared")
    c.train.num_steps, c.train.eval_batches = 4, 1
    data.build_datasets(c.data, data.load_tokenizer(vocab_path, lowercase=c.data.lowercase))
    shard = next(str(p) for p in (tmp_path / "prepared").iterdir()
                 if p.name.startswith("train-") and p.name.endswith(".array_record"))
    with open(shard, "r+b") as f:  # Every block of the shard: the first batch reads one.
        for offset in range(1024, os.path.getsize(shard) - 16, 16384):
            f.seek(offset)
            f.write(bytes(b ^ 0xFF for b in f.read(16)))
            f.seek(offset + 16)
    with pytest.raises(ValueError, match=rf"the prepared data in {c.data.dir} is damaged "
                                         r"\(Corrupted Riegeli"):
        train.train_and_evaluate(c, str(tmp_path / "run"))


def test_resuming_with_another_model_names_the_fields(straight, vocab_path, teacher_workdir,
                                                      tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(straight, workdir)
    before = _snapshot(workdir)
    c = _student_config(vocab_path, teacher_workdir)
    c.model.intermediate_size = 96
    c.init.from_teacher = False  # Else the teacher's layers (width 64) refuse to fit first.
    with pytest.raises(ValueError, match=r"checkpoints of a model with other parameter shapes "
                                         r"\(.*model.intermediate_size is 64 there and 96 here\)"):
        train.train_and_evaluate(c, workdir)
    assert _snapshot(workdir) == before
    c = _student_config(vocab_path, teacher_workdir, num_steps=STEPS)
    c.model.dropout_rate = 0.0  # Not a shape: resuming is allowed (and there is nothing to do).
    train.train_and_evaluate(c, workdir)


# ---------------------------------------------------------------------------------------------
# Converter inputs: a Hugging Face teacher folder, damaged; an export of a corrupt checkpoint
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_teacher(tmp_path_factory, teacher_workdir):
    """The tiny teacher exported as a BertForMaskedLM folder (what `teacher.checkpoint` reads)."""
    from distil_flax.interop import export as export_hf

    folder = str(tmp_path_factory.mktemp("hf") / "teacher")
    export_hf.export_run(teacher_workdir, folder)
    return folder


def _truncate_weights(folder):
    _truncate(os.path.join(folder, "model.safetensors"))


def _other_architecture(folder):
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    json.dump(config | {"model_type": "gpt2"}, open(path, "w"))


def _drop_a_tensor(folder):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    del tensors["bert.encoder.layer.1.output.dense.bias"]
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("damage,message", [
    (_truncate_weights, "model.safetensors is not a readable safetensors file"),
    (_other_architecture, "model_type 'gpt2' is not supported"),
    (_drop_a_tensor, r"lacks key\(s\) \['bert.encoder.layer.1.output.dense.bias'\]"),
])
def test_damaged_hugging_face_teacher_is_refused(hf_teacher, straight, vocab_path,
                                                 teacher_workdir, tmp_path, damage, message):
    teacher = str(tmp_path / "teacher")
    shutil.copytree(hf_teacher, teacher)
    damage(teacher)
    workdir = str(tmp_path / "run")
    shutil.copytree(straight, workdir)
    before = _snapshot(workdir)
    c = _student_config(vocab_path, teacher_workdir)
    c.teacher.checkpoint = teacher
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(c, workdir)
    assert _snapshot(workdir) == before


def test_export_of_a_corrupt_checkpoint_writes_nothing(straight, tmp_path):
    from distil_flax.interop import export as export_hf

    workdir = str(tmp_path / "run")
    shutil.copytree(straight, workdir)
    _truncate(_largest_file(str(checkpoint_dir(workdir) / "8"), "params"))
    output = tmp_path / "exported"
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint step 8: .* \(truncated\?\)"):
        export_hf.export_run(workdir, str(output))
    assert not output.exists() and os.listdir(tmp_path) == ["run"]
    export_hf.export_run(workdir, str(output), step=4)  # An intact step still exports.
    assert (output / "model.safetensors").exists()


def _garbled_without_checksums(workdir, step):
    """The fault checksums guard against, and then the checksums gone too: a step damaged after
    its commit (16 bytes flipped in its largest params file) that nothing could check."""
    step_dir = str(checkpoint_dir(workdir) / str(step))
    _garble(_largest_file(step_dir, "params"))
    os.remove(os.path.join(step_dir, CHECKSUMS))


def test_a_step_without_checksums_is_refused_by_export_and_teacher_loading(
        teacher_workdir, vocab_path, tmp_path):
    from distil_flax.interop import export as export_hf

    teacher = str(tmp_path / "teacher")
    shutil.copytree(teacher_workdir, teacher)
    newest = _steps(teacher)[-1]
    _garbled_without_checksums(teacher, newest)
    missing = rf"checkpoint step {newest}: .*checksums.json is missing"
    with pytest.raises(CorruptCheckpointError, match=missing):
        export_hf.export_run(teacher, str(tmp_path / "exported"))
    assert not (tmp_path / "exported").exists()
    run = str(tmp_path / "student")
    with pytest.raises(CorruptCheckpointError, match=missing):
        train.train_and_evaluate(_student_config(vocab_path, teacher), run)
    assert not os.path.exists(os.path.join(run, LOCK_NAME))


def test_resume_falls_back_past_a_step_without_checksums_and_moves_damaged_records_aside(
        straight, vocab_path, teacher_workdir, tmp_path, caplog):
    """Two faults of one resume: the newest step was garbled and lost its checksums; a line in
    the middle of metrics.jsonl was overwritten by something else."""
    workdir = str(tmp_path / "run")
    shutil.copytree(straight, workdir)
    _garbled_without_checksums(workdir, 8)
    metrics = os.path.join(workdir, "metrics.jsonl")
    lines = open(metrics).read().splitlines()
    lines[1] = lines[1][:len(lines[1]) // 2]  # Torn: the rest of the record is gone.
    open(metrics, "w").write("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(_student_config(vocab_path, teacher_workdir, num_steps=12),
                                 workdir)
    assert _steps(workdir)[-1] == 12
    assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))[0].startswith("8-")
    aside = [n for n in os.listdir(workdir) if n.startswith("metrics.damaged-")]
    assert len(aside) == 1 and open(os.path.join(workdir, aside[0])).read() == lines[1] + "\n"
    assert f"line(s) 2 are not JSON records; moved them to {os.path.join(workdir, aside[0])}" \
        in caplog.text
    records = read_metrics(workdir)
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == sorted(steps) and steps[-1] == 12  # The records past step 4 were redone.


def test_an_export_killed_mid_write_leaves_only_litter_the_next_export_removes(straight,
                                                                             tmp_path):
    from distil_flax.interop import export as export_hf

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # A pid that no longer runs: the writer that was killed.
    stale = tmp_path / f".exported.tmp-{dead.pid}-0123abcd"
    live = tmp_path / f".exported.tmp-{os.getpid()}-4567cdef"  # Another export, still writing.
    for folder in (stale, live):
        folder.mkdir()
        (folder / "config.json").write_text("{")
    export_hf.export_run(straight, str(tmp_path / "exported"))
    assert not stale.exists() and live.exists()
    assert (tmp_path / "exported" / "model.safetensors").exists()


def test_cli_wrong_type_names_the_field(tmp_path, vocab_path):
    result = subprocess.run(
        [sys.executable, "-m", "distil_flax.main", "--config=configs/quickstart_teacher.py:tiny",
         f"--workdir={tmp_path / 'run'}", f"--config.data.tokenizer={vocab_path}",
         "--config.train.batch_size=eight"], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode != 0
    assert "train.batch_size" in result.stderr and "eight" in result.stderr
    assert not os.path.exists(tmp_path / "run")


def test_cli_values_out_of_range_are_one_line_naming_the_field(tmp_path, vocab_path,
                                                               teacher_workdir):
    """NaN weights and temperatures used to train as "finished" runs that skipped every step."""
    mrpc = os.path.join(ROOT, "tests", "fixtures", "glue", "MRPC")
    distil = ["distil_flax.main", "--config=configs/quickstart_teacher.py:tiny",
              f"--config.data.tokenizer={vocab_path}"]
    finetune = ["distil_flax.finetune", "--config=configs/glue.py:task=mrpc,preset=tiny",
                f"--config.init.checkpoint={teacher_workdir}", f"--config.data.dir={mrpc}"]
    cases = {
        "loss.temperature=nan": (distil, "must be finite and > 0, got nan"),
        "train.weight_decay=nan": (distil, "must be finite and ≥ 0, got nan"),
        "train.warmup_fraction=-1": (distil, "must be in [0, 1], got -1.0"),
        "distill.temperature=inf": (finetune, "must be finite and > 0, got inf"),
    }
    running = {
        override: subprocess.Popen(
            [sys.executable, "-m", *command, f"--workdir={tmp_path / str(i)}",
             f"--config.{override}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        for i, (override, (command, _)) in enumerate(cases.items())}
    for i, (override, process) in enumerate(running.items()):
        _, stderr = process.communicate(timeout=300)
        field, says = override.split("=")[0], cases[override][1]
        assert process.returncode == 1 and "Traceback" not in stderr, stderr
        assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
            f"error: {field} {says}"], stderr
        assert not os.path.exists(tmp_path / str(i))


def test_cli_unknown_preset_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "distil_flax.main", "--config=configs/quickstart_teacher.py:huge",
         f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "unknown preset 'huge'" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# The workdir lock
# ---------------------------------------------------------------------------------------------


def _write_lock(workdir, **owner):
    os.makedirs(workdir, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": 0, "start": "", "heartbeat": time.time(),
              "started": "earlier"} | owner
    with open(os.path.join(workdir, LOCK_NAME), "w") as f:
        json.dump(record, f)


def test_a_live_owner_on_this_host_is_refused(straight, vocab_path, teacher_workdir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(straight, workdir)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(workdir, pid=owner.pid)
        before = _snapshot(workdir)
        with pytest.raises(WorkdirLockedError, match=f"is in use by pid {owner.pid} on host "):
            train.train_and_evaluate(_student_config(vocab_path, teacher_workdir), workdir)
        assert _snapshot(workdir) == before  # Its lock and checkpoints stay as they were.
    finally:
        owner.kill()
        owner.wait()


def test_a_dead_owner_on_this_host_is_taken_over(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_lock(str(tmp_path), pid=gone.pid)
    with caplog.at_level(logging.WARNING), WorkdirLock(tmp_path) as lock:
        assert f"from pid {gone.pid}" in caplog.text and "no longer running" in caplog.text
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock.path.exists()  # Released.


def test_another_hosts_lock_is_judged_by_its_heartbeat(tmp_path):
    _write_lock(str(tmp_path), host="elsewhere", pid=1)
    path = tmp_path / LOCK_NAME
    stop = threading.Event()

    def beat():  # The owner on the other host, alive.
        while not stop.wait(0.05):
            _write_lock(str(tmp_path), host="elsewhere", pid=1)

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        with pytest.raises(WorkdirLockedError, match="in use by pid 1 on host elsewhere"):
            WorkdirLock(tmp_path, heartbeat_s=0.4).acquire()
    finally:
        stop.set()
        beating.join()
    # The owner died: its heartbeat stops, and the lock is taken after 2.5 intervals.
    with WorkdirLock(tmp_path, heartbeat_s=0.4):
        assert json.loads(path.read_text())["host"] == socket.gethostname()


def test_a_run_whose_lock_was_taken_notices(tmp_path):
    lock = WorkdirLock(tmp_path, heartbeat_s=0.05)
    with lock:
        _write_lock(str(tmp_path), host="elsewhere", pid=1)
        assert lock.lost.wait(2.0)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "elsewhere"  # Not removed.


# ---------------------------------------------------------------------------------------------
# The CLI killed with SIGKILL at random moments, and a second run on a busy workdir
# ---------------------------------------------------------------------------------------------

CLI_STEPS = 16


def _cli(workdir, vocab_path, log, *flags):
    """Starts the CLI on the tiny teacher config, one device, a checkpoint every step.

    Its output goes to the file `log` (a pipe nobody reads would block a long run).
    """
    command = [sys.executable, "-m", "distil_flax.main",
               "--config=configs/quickstart_teacher.py:tiny", f"--workdir={workdir}",
               f"--config.data.tokenizer={vocab_path}", f"--config.train.num_steps={CLI_STEPS}",
               "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=2",
               "--config.train.log_every=4", "--config.train.eval_every=0",
               "--config.train.eval_batches=1", *flags]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_for_step(workdir, above, process, timeout=120):
    """Waits until a step > `above` is committed; returns it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(checkpoint_dir(workdir)):
            steps = _steps(workdir)
            if steps and steps[-1] > above:
                return steps[-1]
        assert process.poll() is None, f"the run ended with status {process.returncode}"
        time.sleep(0.02)
    raise TimeoutError(f"no checkpoint past step {above} in {workdir}")


@pytest.fixture(scope="module")
def prepared_teacher_data(vocab_path):
    """Prepares the tiny teacher config's data once, so that CLI runs only read it."""
    from distil_flax import data

    c = load_config(os.path.join(ROOT, "configs/quickstart_teacher.py:tiny"))
    c.data.tokenizer = vocab_path
    data.build_datasets(c.data, data.load_tokenizer(vocab_path, lowercase=c.data.lowercase))


def test_kill_9_and_sigterm_at_random_moments_then_resume_bit_identically(
        prepared_teacher_data, vocab_path, tmp_path):
    """kill -9, SIGTERM, kill -9 at seeded random moments of a run saving every step."""
    reference, interrupted = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    logs = iter(str(tmp_path / f"run{i}.log") for i in itertools.count())
    read = lambda path: open(path).read()  # noqa: E731
    uninterrupted = _cli(reference, vocab_path, reference_log := next(logs))

    # A second run on the busy workdir is refused, and does not disturb the first.
    _wait_for_step(reference, 0, uninterrupted)
    second = _cli(reference, vocab_path, log := next(logs))
    assert second.wait(timeout=120) == 1
    assert read(log).strip().splitlines()[-1].startswith(
        f"error: workdir {reference} is in use by pid {uninterrupted.pid} on host ")

    rng = random.Random(SEED)
    latest = 0
    outcomes = []
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        process = _cli(interrupted, vocab_path, log := next(logs))
        committed = _wait_for_step(interrupted, latest, process)
        time.sleep(rng.uniform(0.0, 0.3))  # Anywhere in a step or a save.
        process.send_signal(sig)
        process.wait(timeout=120)
        steps = _steps(interrupted)
        partial = [p for p in os.listdir(checkpoint_dir(interrupted)) if TMP_SUFFIX in p]
        outcomes.append((sig.name, committed, steps, partial, process.returncode))
        # What was committed before the signal survives, and every step on disk is complete:
        # an older step goes only after a newer one is committed (keep_checkpoints=2, and a
        # third stays until the deletion that follows the commit).
        assert steps and steps[-1] >= committed and len(steps) <= 3, outcomes
        assert all(verify_step(checkpoint_dir(interrupted), s) for s in steps)
        if sig == signal.SIGTERM:  # Saves the step it is in and exits 0.
            assert process.returncode == 0, read(log)
            assert f"Stopping at step {steps[-1]} (SIGTERM)" in read(log)
        else:
            assert process.returncode == -signal.SIGKILL
        latest = steps[-1]

    final = _cli(interrupted, vocab_path, log := next(logs))
    assert final.wait(timeout=300) == 0, read(log)
    assert f"Resuming from step {latest}" in read(log)
    assert "no longer running" in read(log)  # The killed run's lock was taken over.
    assert uninterrupted.wait(timeout=300) == 0, read(reference_log)
    _assert_same_run_state(reference, interrupted)
    print("signal, step committed before it, steps on disk after, half-written steps left, "
          "exit status:", outcomes)
