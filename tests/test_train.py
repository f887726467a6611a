"""End to end: pretrain a tiny teacher, distil a student, resume exactly, fail clearly."""

import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from distil_flax.distill import train
from distil_flax.distill.config import validate
from distil_flax.training.checkpoint import Checkpointer
from distil_flax.training.config_files import load_config
from distil_flax.training.metric_writers import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _student_config(vocab_path, teacher_workdir, **train_overrides):
    c = load_config(os.path.join(ROOT, "configs/quickstart.py:tiny"))
    c.data.tokenizer = vocab_path
    c.teacher.checkpoint = teacher_workdir
    for key, value in train_overrides.items():
        setattr(c.train, key, value)
    return c


def _series(workdir, key):
    return [r[key] for r in read_metrics(workdir) if key in r]


def test_teacher_pretraining_loss_falls_and_leaves_checkpoints(teacher_workdir):
    losses = _series(teacher_workdir, "train/loss")
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1
    assert "train/loss_ce" not in read_metrics(teacher_workdir)[0]  # No teacher: no L_ce.
    assert sorted(os.listdir(os.path.join(teacher_workdir, "checkpoints"))) == ["10", "20"]
    assert os.path.exists(os.path.join(teacher_workdir, "config.json"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(teacher_workdir))


def test_distillation_end_to_end(tmp_path, vocab_path, teacher_workdir, monkeypatch):
    c = _student_config(vocab_path, teacher_workdir)
    # From teacher layers the student starts as the teacher minus a layer: on a teacher trained
    # for 20 steps its L_ce is ~1e-3 from the start, and the loss has nothing left to fall by.
    c.init.from_teacher = False
    validations = []
    monkeypatch.setattr(train.config_lib, "validate",
                        lambda c, checked=train.config_lib.validate: validations.append(1) or
                        checked(c))
    final = train.train_and_evaluate(c, str(tmp_path))
    assert len(validations) == 1  # Once on start; build takes the tokenizer it loaded.
    records = read_metrics(str(tmp_path))
    for term in ("train/loss_ce", "train/loss_mlm", "train/loss_cos", "train/agreement",
                 "train/teacher_mlm_accuracy", "train/grad_norm", "train/tokens_per_s"):
        assert term in records[0], term
    losses = _series(str(tmp_path), "train/loss")
    assert losses[-1] < losses[0]
    # The teacher's held-out accuracy is the same at every evaluation: it is never trained.
    teacher_acc = _series(str(tmp_path), "eval/teacher_mlm_accuracy")
    assert len(teacher_acc) == 2 and teacher_acc[0] == teacher_acc[1]
    assert set(final) >= {"student_mlm_accuracy", "teacher_mlm_accuracy", "agreement"}


def _final_params(workdir):
    checkpointer = Checkpointer(workdir, save_every=1, keep=10)
    step = checkpointer.latest_step()
    restored = checkpointer.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
    checkpointer.close()
    return step, jax.device_get(restored["params"]), restored["data"]


def _resume_config(vocab_path, teacher_workdir):
    return _student_config(vocab_path, teacher_workdir, num_steps=8, checkpoint_every=4,
                           eval_every=0, log_every=2)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, vocab_path, teacher_workdir):
    """An uninterrupted 8-step run on the default mesh (data parallel over 8 devices)."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    train.train_and_evaluate(_resume_config(vocab_path, teacher_workdir), workdir)
    return workdir


def test_resume_is_exact(straight, tmp_path, vocab_path, teacher_workdir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Relative workdirs, as users type them.
    resumed = "resumed"
    c = _resume_config(vocab_path, teacher_workdir)
    assert train.train_and_evaluate(c, resumed, stop_at_step=4) == {}
    assert Checkpointer(resumed, save_every=4, keep=3).latest_step() == 4
    train.train_and_evaluate(c, resumed)

    step_a, params_a, data_a = _final_params(straight)
    step_b, params_b, data_b = _final_params(resumed)
    assert step_a == step_b == 8
    assert data_a == data_b
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
    # Same losses after the restart as in the uninterrupted run.
    assert _series(straight, "train/loss")[2:] == _series(resumed, "train/loss")[2:]


def test_resume_on_another_mesh_continues_the_run(straight, tmp_path, vocab_path,
                                                  teacher_workdir):
    # Stopped on 8 data-parallel devices, resumed on data 2 × fsdp 2 × tensor 2: the checkpoint
    # is resharded into the new layout and the run goes on from the same step and data position.
    # Reductions run in another order, so the result is close to the straight run, not identical.
    c = _resume_config(vocab_path, teacher_workdir)
    moved = str(tmp_path / "moved")
    train.train_and_evaluate(c, moved, stop_at_step=4)
    _, params_at_4, _ = _final_params(moved)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    train.train_and_evaluate(c, moved)

    step_a, params_a, data_a = _final_params(straight)
    step_b, params_b, data_b = _final_params(moved)
    assert step_a == step_b == 8 and data_a == data_b
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 params_a, params_b)
    # The comparison can fail: four more steps moved the weights well beyond that tolerance.
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(params_a), jax.tree.leaves(params_at_4))) > 1e-3
    np.testing.assert_allclose(_series(moved, "train/loss")[2:],
                               _series(straight, "train/loss")[2:], rtol=1e-4)


def test_config_errors_name_the_field(tmp_path, vocab_path, teacher_workdir):
    c = _student_config(vocab_path, teacher_workdir)
    c.teacher.checkpoint = ""
    with pytest.raises(ValueError, match="teacher.checkpoint is empty"):
        validate(c)
    c.teacher.checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="teacher.checkpoint=.*does not exist"):
        validate(c)
    c = _student_config(vocab_path, teacher_workdir)
    c.data.tokenizer = str(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="data.tokenizer=.*does not exist"):
        validate(c)
    c = _student_config(vocab_path, teacher_workdir)
    c.mesh.data, c.mesh.tensor = 3, 1
    with pytest.raises(ValueError, match=r"mesh shape \(mesh.data=3, mesh.fsdp=1, mesh.tensor=1\)"):
        train.train_and_evaluate(c, str(tmp_path / "run"))
    c = _student_config(vocab_path, teacher_workdir)
    c.train.micro_batch_size = 5
    with pytest.raises(ValueError, match="train.batch_size"):
        validate(c)
    with pytest.raises(AttributeError, match="batchsize"):
        c.train.batchsize = 3  # Configs are locked: a typo is an error, not a new field.


def test_cli_reports_unknown_key_and_missing_teacher_in_one_line(tmp_path, vocab_path):
    def run(*overrides):
        return subprocess.run(
            [sys.executable, "-m", "distil_flax.main", "--config=configs/quickstart.py:tiny",
             f"--workdir={tmp_path}", f"--config.data.tokenizer={vocab_path}", *overrides],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
            env={**os.environ, "JAX_PLATFORMS": "cpu"})

    typo = run("--config.train.batchsize=3")
    assert typo.returncode != 0 and "batchsize" in typo.stderr
    missing = run(f"--config.teacher.checkpoint={tmp_path / 'no_teacher'}")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == (
        f"error: teacher.checkpoint='{tmp_path / 'no_teacher'}' does not exist")
