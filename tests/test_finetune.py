"""Fine-tuning end to end on the fixture files: GLUE from a pretraining run, SQuAD from a Hugging
Face DistilBERT, task-specific distillation, exact resume, export checked against transformers."""

import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Every load below is from a local folder.
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402

from distil_flax.data import load_tokenizer  # noqa: E402
from distil_flax.downstream import train as finetune
from distil_flax.downstream.step import LossSpec, task_loss  # noqa: E402
from distil_flax.interop import export as export_hf
from distil_flax.interop import sources  # noqa: E402
from distil_flax.training import partitioning  # noqa: E402
from distil_flax.training.checkpoint import ITEMS, checkpoint_dir  # noqa: E402
from distil_flax.training.config_files import load_config  # noqa: E402
from distil_flax.training.metric_writers import read_metrics  # noqa: E402

torch = pytest.importorskip("torch", reason="export checks need torch: pip install -e '.[test]'")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def _config(spec: str, init: str, folder: str, **train):
    c = load_config(os.path.join(ROOT, spec))
    c.init.checkpoint = init
    c.data.dir = os.path.join(FIXTURES, folder)
    for key, value in train.items():
        setattr(c.train, key, value)
    return c


def _series(workdir, key):
    return [r[key] for r in read_metrics(workdir) if key in r]


def _mrpc(init, **train):
    # 16 rows, batch 8: 2 steps an epoch; 20 steps, evaluated at 10 and 20.
    return _config("configs/glue.py:task=mrpc,preset=tiny", init, "glue/MRPC",
                   **{"num_epochs": 10.0, "eval_every": 10, **train})


@pytest.fixture(scope="module")
def mrpc_run(tmp_path_factory, teacher_workdir):
    """MRPC fine-tuned from the tiny pretrained BERT of conftest (a distil_flax workdir)."""
    workdir = str(tmp_path_factory.mktemp("mrpc"))
    c = _mrpc(teacher_workdir)
    return workdir, c, finetune.finetune_and_evaluate(c, workdir)


@pytest.fixture(scope="module")
def hf_student(tmp_path_factory, vocab_path):
    """A tiny, randomly initialised DistilBertForMaskedLM folder with the test vocabulary."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf_student")
    config = transformers.DistilBertConfig(
        vocab_size=load_tokenizer(vocab_path).vocab_size, dim=32, n_layers=1, n_heads=2,
        hidden_dim=64, max_position_embeddings=32)
    transformers.DistilBertForMaskedLM(config).save_pretrained(folder)
    shutil.copy(vocab_path, folder / "vocab.txt")
    return str(folder)


@pytest.fixture(scope="module")
def squad_run(tmp_path_factory, hf_student):
    """SQuAD fine-tuned from the HF folder: 6 questions in 32-token windows, 10 steps."""
    workdir = str(tmp_path_factory.mktemp("squad"))
    c = _config("configs/squad.py:preset=tiny", hf_student, "squad", num_epochs=10.0,
                eval_every=5)
    return workdir, c, finetune.finetune_and_evaluate(c, workdir)


def test_glue_from_a_pretraining_run(mrpc_run):
    workdir, _, results = mrpc_run
    losses = _series(workdir, "train/loss")
    assert len(losses) == 20 and np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1
    assert _series(workdir, "eval/dev/f1") and [r["step"] for r in read_metrics(workdir)
                                                  if "eval/score" in r] == [10, 20]
    best, last = results["best"], results["last"]
    assert last["step"] == 20 and best["score"] >= last["score"]
    metrics = last["metrics"]["dev"]
    assert set(metrics) == {"f1", "accuracy", "loss"}  # MRPC reports F1 and accuracy.
    assert last["score"] == pytest.approx((metrics["f1"] + metrics["accuracy"]) / 2)
    assert results["model"]["head"] == "BertForSequenceClassification"
    assert results["train_examples"] == 16 and results["skipped"] == {"train": {}, "dev": {}}
    assert json.loads(open(os.path.join(workdir, "results.json")).read()) == results
    # The predictions file is GLUE's submission format, one row per dev example.
    with open(last["predictions"]["dev"]) as f:
        rows = f.read().splitlines()
    assert rows[0] == "index\tprediction" and len(rows) == 9
    assert {r.split("\t")[1] for r in rows[1:]} <= {"0", "1"}
    steps = lambda d: sorted(p for p in os.listdir(checkpoint_dir(d)) if p.isdigit())  # noqa: E731
    assert steps(os.path.join(workdir, "best")) == [str(best["step"])]  # Only the best is kept.
    assert steps(workdir)[-1] == "20"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))


def test_export_of_a_glue_run_matches_transformers(mrpc_run, tmp_path):
    workdir, c, results = mrpc_run
    output = tmp_path / "hf"
    export_hf.export_run(workdir, str(output))
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        output, output_loading_info=True)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.config.id2label == {0: "not_equivalent", 1: "equivalent"}
    # Our features of the dev pairs are what the exported tokenizer gives.
    run = finetune.build(c)
    split, features = run.eval_data["dev"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(output)
    encoded = tokenizer([e.text_a for e in split.examples], [e.text_b for e in split.examples],
                        padding="max_length", max_length=features.arrays["input_ids"].shape[1],
                        return_tensors="np")
    for ours, theirs in (("input_ids", "input_ids"), ("token_type_ids", "token_type_ids"),
                         ("attention_mask", "attention_mask")):
        np.testing.assert_array_equal(features.arrays[ours], encoded[theirs])
    # The exported model's logits are the best checkpoint's, and score what results.json says.
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    best = sources.open_source(workdir)
    params, _ = sources.task_params(best, mesh, partitioning.DEFAULT_RULES)
    ours, _ = sources.task_model(best.model_cfg, best.head).apply(
        {"params": params}, *(features.arrays[k] for k in
                                   ("input_ids", "attention_mask", "token_type_ids")))
    with torch.no_grad():
        theirs = model(**{k: torch.tensor(v) for k, v in encoded.items()}).logits.numpy()
    assert np.abs(np.asarray(ours) - theirs).max() < 1e-4
    accuracy = float(np.mean(theirs.argmax(-1) == features.arrays["labels"]))
    assert accuracy == pytest.approx(results["best"]["metrics"]["dev"]["accuracy"])


def test_squad_from_a_hugging_face_checkpoint(squad_run, tmp_path):
    workdir, _, results = squad_run
    losses = _series(workdir, "train/loss")
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3
    last = results["last"]
    assert set(last["metrics"]["dev"]) == {"exact_match", "f1", "unanswered"}
    assert last["metrics"]["dev"]["unanswered"] == 0
    assert last["score"] == last["metrics"]["dev"]["f1"]
    with open(last["predictions"]["dev"]) as f:
        predictions = json.load(f)
    with open(os.path.join(FIXTURES, "squad", "dev-v1.1.json")) as f:
        context = json.load(f)["data"][0]["paragraphs"][0]["context"]
    assert set(predictions) == {"d1", "d2", "d3"}
    assert all(p and p in context for p in predictions.values())  # Spans of the context.

    output = tmp_path / "hf_qa"
    export_hf.export_run(workdir, str(output))
    model, info = transformers.AutoModelForQuestionAnswering.from_pretrained(
        output, output_loading_info=True)
    assert type(model).__name__ == "DistilBertForQuestionAnswering"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    best = sources.open_source(workdir)
    params, _ = sources.task_params(best, mesh, partitioning.DEFAULT_RULES)
    ids = np.array([[2, 40, 41, 42, 3, 50, 51, 52, 53, 3, 0, 0]])
    mask = (np.arange(12) < 10).astype(np.int64)[None]
    ours, _ = sources.task_model(best.model_cfg, best.head).apply(
        {"params": params}, ids, mask)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    theirs = np.stack([out.start_logits.numpy(), out.end_logits.numpy()], -1)
    assert np.abs(np.asarray(ours)[:, :10] - theirs[:, :10]).max() < 1e-4


def test_task_specific_distillation(mrpc_run, hf_student, tmp_path):
    teacher_workdir, _, _ = mrpc_run
    c = _mrpc(hf_student, num_epochs=5.0, eval_every=10)
    c.distill.teacher = teacher_workdir
    results = finetune.finetune_and_evaluate(c, str(tmp_path))
    kd = _series(str(tmp_path), "train/loss_distill")
    task = _series(str(tmp_path), "train/loss_task")
    total = _series(str(tmp_path), "train/loss")
    assert len(kd) == 10 and all(k > 0 for k in kd)
    # loss = α·T²·KL + (1 − α)·CE with α = 0.5, at every step.
    np.testing.assert_allclose(total, 0.5 * np.array(kd) + 0.5 * np.array(task), rtol=1e-5)
    assert results["teacher"] == teacher_workdir
    assert results["model"]["head"] == "DistilBertForSequenceClassification"

    c.distill.teacher = str(tmp_path)  # A teacher fine-tuned on another task is refused.
    c.task.name = "sst2"
    c.data.dir = os.path.join(FIXTURES, "glue", "SST-2")
    with pytest.raises(ValueError, match="cannot teach this run: it was fine-tuned on 'mrpc', "
                                         "not 'sst2'"):
        finetune.build(c)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(student, teacher, temperature):
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) per row."""
    log_t = _log_softmax(teacher / temperature)
    return temperature**2 * (np.exp(log_t) * (log_t - _log_softmax(student / temperature))).sum(-1)


def test_task_losses_by_hand():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    labels = np.array([0, 2, 1, 2])
    spec = LossSpec(head="seq_cls", alpha=0.3, temperature=2.0)
    loss, metrics = task_loss(student, {"labels": labels}, spec, teacher)
    ce = -_log_softmax(student)[np.arange(4), labels].mean()
    kd = _kl(student, teacher, 2.0).mean()
    assert float(metrics["loss_task"]) == pytest.approx(ce, rel=1e-5)
    assert float(metrics["loss_distill"]) == pytest.approx(kd, rel=1e-5)
    assert float(loss) == pytest.approx(0.3 * kd + 0.7 * ce, rel=1e-5)

    # Extractive QA: start and end distributions over each row's real positions only; padding
    # logits, however large, change nothing.
    s, t = rng.normal(size=(2, 6, 2)), rng.normal(size=(2, 6, 2))
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    s_padded = np.where(mask[..., None] > 0, s, 100.0)
    batch = {"attention_mask": mask, "start_positions": np.array([1, 2]),
             "end_positions": np.array([3, 2])}
    spec = LossSpec(head="qa", alpha=0.5, temperature=2.0)
    loss, metrics = task_loss(s_padded, batch, spec, t)
    ce = kd = 0.0
    for row in range(2):
        n = mask[row].sum()
        for k, target in ((0, batch["start_positions"][row]), (1, batch["end_positions"][row])):
            ce += -_log_softmax(s[row, :n, k])[target] / 4
            kd += _kl(s[row, :n, k], t[row, :n, k], 2.0) / 4
    assert float(metrics["loss_task"]) == pytest.approx(ce, rel=1e-5)
    assert float(metrics["loss_distill"]) == pytest.approx(kd, rel=1e-5)
    assert float(loss) == pytest.approx(0.5 * kd + 0.5 * ce, rel=1e-5)

    # Regression (STS-B): squared error to the label, and to the teacher's score.
    spec = LossSpec(head="seq_cls", regression=True, alpha=0.5)
    scores, teacher_scores = np.array([[1.0], [3.0]]), np.array([[2.0], [2.0]])
    loss, metrics = task_loss(scores, {"labels": np.array([1.5, 4.0])}, spec, teacher_scores)
    assert float(metrics["loss_task"]) == pytest.approx((0.25 + 1.0) / 2)
    assert float(loss) == pytest.approx(0.5 * 1.0 + 0.5 * 0.625)

    # Token classification: only weighted tokens count.
    logits = rng.normal(size=(1, 3, 2))
    weighted = {"labels": np.array([[1, 0, 1]]), "label_weights": np.array([[1.0, 0.0, 1.0]])}
    _, metrics = task_loss(logits, weighted, LossSpec(head="token_cls"))
    expected = -(_log_softmax(logits[0, 0])[1] + _log_softmax(logits[0, 2])[1]) / 2
    assert float(metrics["loss_task"]) == pytest.approx(expected, rel=1e-5)


def _checkpoint_params(workdir):
    with ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS) as manager:
        step = manager.latest_step()
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore()))
    return step, jax.device_get(restored["params"])


def test_resume_is_exact(mrpc_run, teacher_workdir, tmp_path):
    straight, _, results = mrpc_run
    resumed = str(tmp_path)
    c = _mrpc(teacher_workdir)
    assert finetune.finetune_and_evaluate(c, resumed, stop_at_step=10) == {}
    again = finetune.finetune_and_evaluate(c, resumed)
    step_a, params_a = _checkpoint_params(straight)
    step_b, params_b = _checkpoint_params(resumed)
    assert step_a == step_b == 20
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
    assert _series(straight, "train/loss")[10:] == _series(resumed, "train/loss")[10:]
    assert again["last"]["metrics"] == results["last"]["metrics"]
    assert again["best"]["step"] == results["best"]["step"]


def test_cli_reports_a_bad_config_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "distil_flax.finetune",
         "--config=configs/glue.py:task=sst2,preset=tiny", f"--workdir={tmp_path / 'run'}",
         f"--config.init.checkpoint={tmp_path / 'nowhere'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: init.checkpoint='{tmp_path / 'nowhere'}' does not exist")
    assert not (tmp_path / "run").exists()
