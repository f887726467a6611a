"""The model card (README.md) every export carries: parsed back with huggingface_hub's
`ModelCard.load`, its metadata (library, pipeline tag, base model, license placeholder, tags) and
its body (loss weights, layer map, tokens seen, held-out metrics, commands that reproduce the run,
the training command checked to give config.json exactly)."""

import json
import os
import shlex

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Every load below is from a local folder.
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
from absl import flags  # noqa: E402
from flax import linen as nn  # noqa: E402
from helpers import save_params_checkpoint  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from distil_flax import model as model_lib  # noqa: E402
from distil_flax.interop import export as export_hf  # noqa: E402
from distil_flax.interop import hf
from distil_flax.training import (
    config_files,  # noqa: E402
)

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


def test_an_export_without_metrics_still_has_a_card(tmp_path):
    workdir, _ = _student_workdir(tmp_path, metrics=False)
    export_hf.export_run(workdir, str(tmp_path / "out"), head="none")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.pipeline_tag == "feature-extraction"
    assert card.data.base_model == "org/teacher-bert"
    assert "records no held-out evaluation" in card.text
    assert "10,240 token positions seen" in card.text and "real (non-padding)" not in card.text
    assert "--head=none" in card.text


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
