"""The model card (README.md) every export carries: parsed back with huggingface_hub's
`ModelCard.load`, its metadata (library, pipeline tag, base model, license placeholder, tags, the
model-index of results as the Hub reads it) and its body (loss weights, layer map, tokens seen,
held-out metrics, commands that reproduce the run, the training command checked to give
config.json exactly). Results files given to an export (a GLUE suite table, an embedding
evaluation report) land in the model-index; a bad one stops the export in one `error:` line."""

import json
import os
import shlex

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Every load below is from a local folder.
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from absl import flags  # noqa: E402
from flax import linen as nn  # noqa: E402
from helpers import error_line, save_params_checkpoint  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402
from huggingface_hub.repocard_data import model_index_to_eval_results  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from distil_flax import model as model_lib  # noqa: E402
from distil_flax.interop import export as export_hf  # noqa: E402
from distil_flax.interop import hf  # noqa: E402
from distil_flax.training import config_files  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", ".")


def _vocab(tmp_path) -> str:
    path = tmp_path / "vocab.txt"
    path.write_text("".join(w + "\n" for w in WORDS))
    return str(path)


def _params(model_cfg):
    init = model_lib.init_fn(model_lib.make_encoder(model_cfg))
    return jax.device_get(nn.unbox(init(jax.random.PRNGKey(0))))


def _student_workdir(tmp_path, *, metrics: bool):
    """A distillation run's workdir as train.py leaves it: config.json, a checkpoint at step 20
    and (optionally) the metrics.jsonl the loop writes (train/ every 10 steps, eval/ at 20)."""
    c = config_files.load_config(os.path.join(ROOT, "configs/quickstart.py:tiny"))
    c.teacher.checkpoint = "hf://org/teacher-bert"
    c.data.tokenizer = _vocab(tmp_path)
    c.model.vocab_size = len(WORDS)
    if "hidden_states" in c.loss:  # An intermediate-layer term, a sub-section with a weight.
        c.loss.hidden_states.weight = 3.0
    workdir = tmp_path / "student"
    workdir.mkdir()
    config_files.save_json(c, workdir / "config.json")
    save_params_checkpoint(workdir, 20, _params(c.model))
    if metrics:
        records = [{"step": 10, "train/loss": 9.0, "train/real_tokens": 400.0},
                   {"step": 20, "train/loss": 8.0, "train/real_tokens": 420.0},
                   {"step": 20, "eval/student_mlm_accuracy": 0.25, "eval/agreement": 0.5,
                    "eval/teacher_mlm_accuracy": 0.75}]
        (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(workdir), c


def _parse_command(argv: list[str]):
    """The config `python -m distil_flax.main ARGS` would run, parsed as its flags parse it."""
    argv = ["main", *argv[3:]]
    values = flags.FlagValues()
    # config_flags finds the `--config.*` overrides in the argv it is given.
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    values(argv)
    return values


def _assert_reproduces(card_text: str, module: str, config_file: str, workdir: str,
                       monkeypatch) -> None:
    """The card's training command parses (from the repository root) to config.json exactly."""
    block = card_text.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines()
                if line.startswith("python")]
    train = next(c for c in commands if c[2] == module)
    assert train[:4] == ["python", "-m", module, f"--config={config_file}"], train
    monkeypatch.chdir(ROOT)
    parsed = _parse_command(train)
    assert parsed.workdir == workdir
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.loads(parsed.config.to_json_best_effort()) == json.load(f)
    assert any(c[2] == "distil_flax.export_hf" for c in commands)


def _model_index(readme) -> set[tuple]:
    """(task, dataset, config, split, metric, value) of each result of a card's model-index, as
    huggingface_hub reads it back: `ModelCard.load`'s `eval_results`, which must equal what
    `model_index_to_eval_results` makes of the raw `model-index` metadata."""
    card = ModelCard.load(readme)
    results = card.data.eval_results or []
    metadata = yaml.safe_load(open(readme).read().split("---\n")[1])
    if not results:
        assert "model-index" not in metadata and card.data.model_name is None
        return set()
    name, raw = model_index_to_eval_results(metadata["model-index"])
    assert name == card.data.model_name == os.path.basename(os.path.dirname(readme))
    assert raw == results
    return {(r.task_type, r.dataset_type, r.dataset_config, r.dataset_split, r.metric_type,
             round(r.metric_value, 6)) for r in results}


def test_a_distillation_export_carries_its_recipe_and_metrics(tmp_path, monkeypatch):
    workdir, c = _student_workdir(tmp_path, metrics=True)
    output = tmp_path / "distil-student"
    written = export_hf.export_run(workdir, str(output))
    assert "README.md" in written

    card = ModelCard.load(output / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "fill-mask"
    assert card.data.base_model == "org/teacher-bert"
    assert card.data.license == "other" and card.data.license_name == "todo"
    assert {"distil_flax", "distillation", "distilbert"} <= set(card.data.tags)
    text = card.text
    assert "# distil-student" in text and "DistilBertForMaskedLM" in text
    assert "[org/teacher-bert](https://huggingface.co/org/teacher-bert)" in text
    # Every weighted loss term with its weight, and the layer map.
    for name, weight in (("loss.alpha_ce", "5.0"), ("loss.alpha_mlm", "2.0"),
                         ("loss.alpha_cos", "1.0")):
        assert f"| `{name}` | {weight} |" in text
    if "hidden_states" in c.loss:
        assert "| `loss.hidden_states.weight` | 3.0 |" in text
    assert f"teacher layers {tuple(c.init.layer_map)}" in text
    # 20 steps × 16 rows × 32 tokens; real tokens 10 × 400 + 10 × 420 from metrics.jsonl.
    assert "10,240 token positions seen; 8,200 real (non-padding) tokens" in text
    assert "World English Bible" in text
    assert "| student_mlm_accuracy | 0.25 |" in text and "| agreement | 0.5 |" in text
    assert "step 20" in text
    assert f"--workdir={workdir}" in text and f"--output={output}" in text
    assert '"alpha_ce": 5.0' in text  # config.json itself.
    _assert_reproduces(text, "distil_flax.main", "configs/quickstart.py:tiny", workdir,
                       monkeypatch)
    # The student's held-out masked-LM accuracy, on the run's corpus (not the teacher's).
    assert _model_index(output / "README.md") == {
        ("fill-mask", "bundled", None, "held-out", "accuracy", 0.25)}


def test_an_export_without_metrics_still_has_a_card(tmp_path):
    workdir, _ = _student_workdir(tmp_path, metrics=False)
    export_hf.export_run(workdir, str(tmp_path / "out"), head="none")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.pipeline_tag == "feature-extraction"
    assert card.data.base_model == "org/teacher-bert"
    assert "records no held-out evaluation" in card.text
    assert "10,240 token positions seen" in card.text and "real (non-padding)" not in card.text
    assert "--head=none" in card.text
    assert _model_index(tmp_path / "out" / "README.md") == set()


def test_a_torn_metrics_file_still_exports(tmp_path):
    workdir, _ = _student_workdir(tmp_path, metrics=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "r+") as f:
        text = f.read()
        f.seek(0)
        f.write("{not json\n" + text)  # A damaged record in the middle: skipped, named.
    export_hf.export_run(workdir, str(tmp_path / "out"))
    assert "records no held-out evaluation" not in ModelCard.load(
        tmp_path / "out" / "README.md").text  # The other records still give the metrics.


def test_plain_exports_have_a_card(tmp_path):
    cfg = model_lib.model_config("tiny")
    cfg.vocab_size = len(WORDS)
    cfg.max_position_embeddings = 24
    params = _params(cfg)
    hf.export_hf(params, cfg, tmp_path / "mlm", tokenizer_path=_vocab(tmp_path))
    card = ModelCard.load(tmp_path / "mlm" / "README.md")
    assert card.data.pipeline_tag == "fill-mask" and card.data.library_name == "transformers"
    assert card.data.base_model is None and "bert" in card.data.tags
    assert "BertForMaskedLM" in card.text and 'pipeline("fill-mask", model="mlm")' in card.text


def test_a_pretraining_run_card_from_the_real_loop(teacher_workdir, tmp_path, monkeypatch):
    """conftest's teacher: MLM pretraining, 20 steps, metrics.jsonl as the loop writes it."""
    output = tmp_path / "teacher-hf"
    export_hf.export_run(teacher_workdir, str(output))
    card = ModelCard.load(output / "README.md")
    assert card.data.pipeline_tag == "fill-mask" and card.data.base_model is None
    assert "masked-lm" in card.data.tags and "distillation" not in card.data.tags
    text = card.text
    assert "masked-LM pretraining (no teacher)" in text
    assert "| `loss.alpha_mlm` | 1.0 |" in text and "| `loss.alpha_ce` |" not in text
    assert "Terms at weight 0 (not computed): `loss.alpha_ce`" in text
    assert "real (non-padding) tokens" in text
    assert "| student_mlm_accuracy |" in text and "step 20" in text
    _assert_reproduces(text, "distil_flax.main", "configs/quickstart_teacher.py:tiny",
                       teacher_workdir, monkeypatch)


def test_a_fine_tuning_export_carries_the_task_and_best_metrics(teacher_workdir, tmp_path,
                                                                 monkeypatch):
    from distil_flax.downstream import train as finetune

    c = config_files.load_config(os.path.join(ROOT, "configs/glue.py:task=mrpc,preset=tiny"))
    c.init.checkpoint = teacher_workdir
    c.data.dir = os.path.join(ROOT, "tests", "fixtures", "glue", "MRPC")
    c.train.num_steps = 4
    c.train.eval_every = 2
    workdir = str(tmp_path / "mrpc")
    results = finetune.finetune_and_evaluate(c, workdir)
    output = tmp_path / "mrpc-hf"
    export_hf.export_run(workdir, str(output))

    card = ModelCard.load(output / "README.md")
    assert card.data.pipeline_tag == "text-classification"
    assert card.data.base_model == os.path.basename(teacher_workdir)
    assert card.data.datasets == ["nyu-mll/glue"] and "mrpc" in card.data.tags
    text = card.text
    assert "BertForSequenceClassification" in text
    assert "not_equivalent, equivalent" in text
    best = results["best"]
    assert f"best.json, step {best['step']}" in text
    assert f"| dev/f1 | {hf.card._number(best['metrics']['dev']['f1'])} |" in text
    assert "- **Loss**: the task's loss (no teacher)" in text
    dev = best["metrics"]["dev"]
    assert _model_index(output / "README.md") == {
        ("text-classification", "nyu-mll/glue", "mrpc", "validation", metric, round(dev[metric], 6))
        for metric in ("accuracy", "f1")}
    _assert_reproduces(text, "distil_flax.finetune", "configs/glue.py:task=mrpc,preset=tiny",
                       workdir, monkeypatch)


def test_loss_terms_read_every_weighted_section():
    loss = {"alpha_ce": 5.0, "alpha_mlm": 0.0, "temperature": 2.0, "head_chunk": 128,
            "hidden_states": {"weight": 1.5, "layer_map": [1, 3]},
            "relations": {"weight": 0.0, "pairs": "qq,kk,vv"}, "future_term": {"weight": 2}}
    terms = {name: weight for name, weight, _ in hf.loss_terms(loss)}
    assert terms == {"loss.alpha_ce": 5.0, "loss.alpha_mlm": 0.0,
                     "loss.hidden_states.weight": 1.5, "loss.relations.weight": 0.0,
                     "loss.future_term.weight": 2.0}


def test_a_task_distillation_card_from_a_hub_student(tmp_path):
    """Fine-tuning from `hf://` with a task teacher: the card of `run_card`, written by hand."""
    from distil_flax.downstream import config as finetune_config
    from distil_flax.model import heads

    c = finetune_config.base_config()
    c.task.name = "sst2"
    c.init.checkpoint = "hf://org/student@main"
    c.distill.teacher = "runs/sst2_bert"
    workdir = tmp_path / "sst2"
    workdir.mkdir()
    config_files.save_json(c, workdir / "config.json")
    (workdir / "best.json").write_text(json.dumps(
        {"step": 30, "score": 0.9, "metrics": {"dev": {"accuracy": 0.9, "loss": 0.25}}}))
    (workdir / "results.json").write_text(json.dumps({"steps": 40}))
    cfg = model_lib.model_config("tiny_student")
    cfg.vocab_size = len(WORDS)
    head = heads.TaskHead("seq_cls", 2, ("negative", "positive"))
    card = hf.run_card(str(workdir), hf.hf_task_config(cfg, head), "seq_cls", name="sst2-hf",
                       step=None, export_command=["python", "-m", "distil_flax.export_hf"],
                       has_tokenizer=False)
    card.save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "org/student" and card.data.datasets == ["nyu-mll/glue"]
    assert card.data.pipeline_tag == "text-classification"
    assert {"distillation", "sst2", "distilbert"} <= set(card.data.tags)
    text = card.text
    assert "[org/student](https://huggingface.co/org/student)" in text
    assert "loss = 0.5 × T²·KL(teacher ‖ student) + 0.5 × task loss, T = 2.0" in text
    assert "`runs/sst2_bert`" in text and "this is step 30 of 40" in text
    assert "| dev/accuracy | 0.9 |" in text and "best.json, step 30" in text
    assert "ships no tokenizer" in text
    assert "--config=configs/glue.py:task=sst2" in text  # The base config is glue.py's.
    assert "--config.init.checkpoint=hf://org/student@main" in text


def test_without_the_repositorys_configs_the_card_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(hf.reproduce, "CONFIGS_DIR", str(tmp_path / "absent"))
    workdir, _ = _student_workdir(tmp_path, metrics=False)
    export_hf.export_run(workdir, str(tmp_path / "out"))
    text = ModelCard.load(tmp_path / "out" / "README.md").text
    assert "`configs/` is not at hand" in text and "python -m distil_flax.main" not in text
    assert "python -m distil_flax.export_hf" in text and '"alpha_ce": 5.0' in text


# ---------------------------------------------------------------------------------------------
# The model-index: the run's results and those of files given to the export.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task, metrics, expected", [
    ("mnli", {"dev_matched": {"accuracy": 0.81, "loss": 0.5}, "dev_mismatched": {"accuracy": 0.8}},
     {("text-classification", "nyu-mll/glue", "mnli", "validation_matched", "accuracy", 0.81),
      ("text-classification", "nyu-mll/glue", "mnli", "validation_mismatched", "accuracy", 0.8)}),
    ("cola", {"dev": {"matthews_corr": 0.3}},
     {("text-classification", "nyu-mll/glue", "cola", "validation", "matthews_correlation",
       0.3)}),
    ("stsb", {"dev": {"pearson": 0.85, "spearman": 0.84}},
     {("text-classification", "nyu-mll/glue", "stsb", "validation", "pearsonr", 0.85),
      ("text-classification", "nyu-mll/glue", "stsb", "validation", "spearmanr", 0.84)}),
    ("squad", {"dev": {"exact_match": 70.5, "f1": 80.25, "unanswered": 0}},
     {("question-answering", "rajpurkar/squad", "plain_text", "validation", "exact_match", 70.5),
      ("question-answering", "rajpurkar/squad", "plain_text", "validation", "f1", 80.25)}),
    ("imdb", {"test": {"accuracy": 0.9}},
     {("text-classification", "stanfordnlp/imdb", "plain_text", "test", "accuracy", 0.9)}),
])
def test_a_fine_tuning_card_states_its_best_metrics_in_the_model_index(tmp_path, task, metrics,
                                                                       expected):
    """Each task's splits and metrics as the Hub names them (best.json, by `run_card`)."""
    from distil_flax.downstream import config as finetune_config
    from distil_flax.model import heads

    c = finetune_config.base_config()
    c.task.name = task
    c.init.checkpoint = "runs/student"
    workdir = tmp_path / task
    workdir.mkdir()
    config_files.save_json(c, workdir / "config.json")
    (workdir / "best.json").write_text(json.dumps({"step": 30, "score": 0.5, "metrics": metrics}))
    cfg = model_lib.model_config("tiny_student")
    cfg.vocab_size = len(WORDS)
    head = (heads.TaskHead("qa", 2) if task == "squad"
            else heads.TaskHead("seq_cls", 1 if task == "stsb" else 2))
    card = hf.run_card(str(workdir), hf.hf_task_config(cfg, head), head.head, name=f"{task}-hf",
                       step=None, export_command=["python", "-m", "distil_flax.export_hf"],
                       has_tokenizer=False)
    card.save(tmp_path / f"{task}-hf" / "README.md")
    assert _model_index(tmp_path / f"{task}-hf" / "README.md") == expected


def _glue_table(path, student: str) -> None:
    """glue.json as `python -m distil_flax.glue` writes it: a row per model, each task's best."""
    def row(name, model, base):
        return {"name": name, "model": model, "score": None, "missing": ["qqp"], "tasks": {
            "mnli": {"score": base, "step": 8, "workdir": f"glue/{name}/mnli",
                     "metrics": {"dev_matched/accuracy": base, "dev_matched/loss": 0.7,
                                 "dev_mismatched/accuracy": base - 0.01}},
            "cola": {"score": base / 2, "step": 8, "workdir": f"glue/{name}/cola",
                     "metrics": {"dev/matthews_corr": base / 2}},
            "stsb": {"score": base, "step": 8, "workdir": f"glue/{name}/stsb",
                     "metrics": {"dev/pearson": base, "dev/spearman": base - 0.02}}}}

    tasks = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    path.write_text(json.dumps({"tasks": tasks, "rows": [
        row("student", student, 0.75), row("teacher", "hf://org/teacher-bert", 0.85)],
        "retention": None}))


def test_a_glue_suite_table_given_to_the_export(tmp_path):
    """`--results=glue.json`: the first row's (the exported model's) tasks, beside the run's
    own held-out metrics; the teacher's row is not this model's."""
    workdir, _ = _student_workdir(tmp_path, metrics=True)
    _glue_table(tmp_path / "glue.json", workdir)
    output = tmp_path / "student-hf"
    export_hf.export_run(workdir, str(output), results=[str(tmp_path / "glue.json")])
    glue = {("mnli", "validation_matched", "accuracy", 0.75),
            ("mnli", "validation_mismatched", "accuracy", 0.74),
            ("cola", "validation", "matthews_correlation", 0.375),
            ("stsb", "validation", "pearsonr", 0.75), ("stsb", "validation", "spearmanr", 0.73)}
    assert _model_index(output / "README.md") == {
        ("fill-mask", "bundled", None, "held-out", "accuracy", 0.25),
        *(("text-classification", "nyu-mll/glue", task, split, metric, value)
          for task, split, metric, value in glue)}
    text = ModelCard.load(output / "README.md").text
    assert "## Further results" in text and "From `glue.json` (a GLUE suite table" in text
    assert ("| text-classification | GLUE MNLI (mnli, validation_matched) | Accuracy | 0.75 |"
            in text)
    assert f"--results={tmp_path / 'glue.json'}" in text  # The export command reproduces it.


def test_an_embedding_evaluation_given_to_a_sentence_transformers_export(tmp_path):
    """`--results=report.json` of `evaluate_embeddings`: the student's metric on each file."""
    from distil_flax.embeddings.evaluate import evaluate

    workdir, _ = _student_workdir(tmp_path, metrics=True)
    config = json.loads(open(os.path.join(workdir, "config.json")).read())
    config["teacher"]["checkpoint"] = str(tmp_path / "teacher")  # A folder not at hand.
    open(os.path.join(workdir, "config.json"), "w").write(json.dumps(config))
    words = ("cat", "mat", "on", "sat", "the")
    (tmp_path / "sts.tsv").write_text("".join(f"the cat sat\tthe {w} sat on the mat\t{i}\n"
                                              for i, w in enumerate(words)))
    (tmp_path / "text.txt").write_text("".join(f"the {a} sat on the {b} .\n"
                                               for a in words for b in words[:3]))
    report = evaluate(workdir, workdir, sts=str(tmp_path / "sts.tsv"),
                      text=str(tmp_path / "text.txt"), init_only=False, neighbours=2, max_len=16,
                      output=str(tmp_path / "report.json"))
    student = report["metrics"]["student"]
    output = tmp_path / "student-st"
    export_hf.export_run(workdir, str(output), output_format="sentence-transformers",
                         pooling="mean", results=[str(tmp_path / "report.json")])
    # No fill-mask result: the export has no MLM head.
    assert _model_index(output / "README.md") == {
        ("sentence-similarity", "sts.tsv", None, None, "spearmanr",
         round(student["sts_spearman"], 6)),
        ("feature-extraction", "text.txt", None, None, "spearmanr",
         round(student["text_cosine_spearman"], 6)),
        ("feature-extraction", "text.txt", None, None, "recall@2",
         round(student["text_recall@2"], 6))}
    card = ModelCard.load(output / "README.md")
    assert card.data.library_name == "sentence-transformers"
    assert "From `report.json` (an embedding evaluation report" in card.text


def test_a_bad_results_file_stops_the_export_in_one_line(tmp_path, capsys):
    workdir, _ = _student_workdir(tmp_path, metrics=True)
    (tmp_path / "garbled.json").write_bytes(b"\xff\xfe{not json")
    (tmp_path / "other.json").write_text(json.dumps({"rows": [], "metrics": {}}))
    (tmp_path / "folder").mkdir()
    output = tmp_path / "out"
    for name, says in (("missing.json", "no such file"), ("garbled.json", "not valid JSON"),
                       ("other.json", "neither a GLUE suite table"),
                       ("folder", "a folder without glue.json")):
        path = str(tmp_path / name)
        line = error_line(capsys, lambda: export_hf.export_run(workdir, str(output),
                                                               results=[path]))
        assert line.startswith(f"error: --results={path}") and says in line, line
    assert not output.exists()
