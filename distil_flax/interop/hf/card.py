"""Model cards: the README.md every export carries, written through huggingface_hub's API.

The metadata is a `ModelCardData`: library_name "transformers", the pipeline tag of the exported
head (`PIPELINE_TAGS`), base_model (a distillation's teacher, a fine-tuning's init checkpoint:
its Hub id, or its folder's name), `license: other` with `license_name: todo` for the user to
settle, and tags. The body of a run's card (`run_card`) is read from its workdir:

  recipe      every loss term of config.json's `loss` section with its weight (the `alpha_*`
              fields, and any sub-section with a `weight` field), the teacher and the layer map,
              steps and tokens seen (`train/real_tokens` of metrics.jsonl for real tokens), the
              corpus; for fine-tuning the task, the init checkpoint and the task teacher;
  metrics     the held-out evaluation of the exported step: best.json, or the last `eval/`
              record of metrics.jsonl up to that step;
  reproduce   the training command (`reproduce.training_command`), the export command, and
              config.json itself.

The metadata's `model-index` states the same metrics, and those of results files given to the
export (a GLUE suite table, an embedding evaluation report), as the Hub reads them
(`model_index.eval_results`); the files' results also get a section.

A workdir without metrics (or with unreadable ones) still exports: the card says what it lacks.
An export of parameters given in Python (`plain_card`) says only what the model is.
"""

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from absl import logging
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from distil_flax.interop.hf import hub, model_index, reproduce
from distil_flax.losses import TERMS
from distil_flax.model import student_init
from distil_flax.training import metric_writers

PIPELINE_TAGS = {"mlm": "fill-mask", "none": "feature-extraction",
                 "seq_cls": "text-classification", "token_cls": "token-classification",
                 "qa": "question-answering", "multiple_choice": None}  # The Hub has no such tag.
# Model types whose position table starts at row pad_token_id + 1 (`hf.names.OFFSET_FAMILIES`).
_OFFSET_TYPES = ("roberta", "xlm-roberta")
_AUTO_CLASSES = {"mlm": "AutoModelForMaskedLM", "none": "AutoModel",
                 "seq_cls": "AutoModelForSequenceClassification",
                 "token_cls": "AutoModelForTokenClassification",
                 "qa": "AutoModelForQuestionAnswering",
                 "multiple_choice": "AutoModelForMultipleChoice"}
# What the weights of `config.loss` weigh, the feature terms' as they declare it; other sections
# (a newer run's terms) go by their name.
_LOSS_TERMS = {
    "alpha_ce": "soft targets: T²·KL(teacher ‖ student) of the MLM distributions",
    "alpha_mlm": "masked-LM cross-entropy on the true tokens",
    "alpha_cos": "1 − cos between the final hidden states of teacher and student",
    **{term.name: term.card for term in TERMS},
}


def _card(data: ModelCardData, sections: Sequence[str]) -> ModelCard:
    """A card from its metadata and its body's sections (the YAML is huggingface_hub's)."""
    body = "\n\n".join(s.strip() for s in sections if s and s.strip())
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _card_data(head: str, hf_config: Mapping[str, Any], *, base_model: str | None = None,
               tags: Sequence[str] = (), datasets: Sequence[str] = (), name: str = "",
               eval_results: Sequence[EvalResult] = ()) -> ModelCardData:
    return ModelCardData(
        library_name="transformers", pipeline_tag=PIPELINE_TAGS[head], base_model=base_model,
        license="other", license_name="todo", datasets=list(datasets) or None,
        tags=["distil_flax", *tags, hf_config["model_type"]],
        model_name=name if eval_results else None, eval_results=list(eval_results) or None)


def plain_card(hf_config: Mapping[str, Any], head: str, *, name: str,
               has_tokenizer: bool) -> ModelCard:
    """The card of an export of parameters given in Python: what the model is, how to load it."""
    return _card(_card_data(head, hf_config), [
        f"# {name}",
        "Exported by distil_flax from parameters given in Python, so this card knows no training "
        "recipe or metrics; `python -m distil_flax.export_hf --workdir=RUN` writes them.",
        _model_section(hf_config, head),
        _usage(name, head, has_tokenizer, hf_config["model_type"]), _LICENSE])


def run_card(workdir: str, hf_config: Mapping[str, Any], head: str, *, name: str,
             step: int | None, export_command: Sequence[str], has_tokenizer: bool,
             results: Sequence[model_index.ResultsFile] = ()) -> ModelCard:
    """The card of a run's export, read from its workdir (config.json is required; metrics,
    best.json and task_model.json are used when they are there).

    Args:
      workdir: the run.
      hf_config: the export's config.json (class, sizes, labels).
      head: "mlm", "none", or the task head ("seq_cls", "qa", ...).
      name: the model's name (the export folder's).
      step: the exported checkpoint step; None: the best one (fine-tuning).
      export_command: the export's command line, as argv.
      has_tokenizer: whether the export ships tokenizer files.
      results: results files given to the export (`model_index.read_results`).

    Raises:
      ValueError, OSError: config.json is unreadable.
    """
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    records = _records(workdir)
    if "task" in config:  # A fine-tuning run.
        best = _read_json(os.path.join(workdir, "best.json"))
        if step is None and best:
            step = best.get("step")
        run = _finetuning(config, records, best, step, workdir)
    else:
        run = _distillation(config, records, step,
                            _read_json(os.path.join(workdir, student_init.PRUNING_FILE)))
    found = model_index.eval_results(config, run.record, head=head, files=results)
    data = _card_data(head, hf_config, base_model=run.base_model, tags=run.tags,
                      datasets=run.datasets, name=name, eval_results=found)
    return _card(data, [
        f"# {name}", run.summary, _model_section(hf_config, head),
        _usage(name, head, has_tokenizer, hf_config["model_type"]),
        "## Training\n\n" + "\n".join(run.training), run.loss, run.evaluation,
        model_index.results_section(results), _reproduce(config, workdir, export_command),
        _LICENSE])


@dataclasses.dataclass
class _Run:
    """What a card says about a run."""

    summary: str
    training: list[str]  # Markdown list items.
    evaluation: str  # The Evaluation section.
    base_model: str | None
    tags: list[str]
    datasets: tuple[str, ...] = ()
    loss: str = ""  # The loss terms' table, after the list.
    record: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # What evaluation shows.


# ---------------------------------------------------------------------------------------------
# What the run did.
# ---------------------------------------------------------------------------------------------


def _distillation(config: dict, records: list[dict], step: int | None,
                  pruning: dict | None = None) -> _Run:
    loss, train, data = config.get("loss", {}), config.get("train", {}), config.get("data", {})
    terms = loss_terms(loss)
    teacher = config.get("teacher", {}).get("checkpoint") or ""
    # Every term but the plain MLM loss reads the teacher's outputs.
    distilled = bool(teacher) and any(w for n, w, _ in terms if n != "loss.alpha_mlm")
    init = config.get("init", {})
    lines = []
    if distilled:
        lines.append(f"- **Teacher**: {_source(teacher)}")
        if init.get("from_teacher") and pruning:
            lines.append(_pruned(pruning))
        elif init.get("from_teacher"):
            layer_map = tuple(init.get("layer_map") or ())
            lines.append(f"- **Student initialisation**: teacher layers {layer_map} → student "
                         f"layers {tuple(range(len(layer_map)))}")
        else:
            lines.append("- **Student initialisation**: random")
    else:
        lines.append("- **Objective**: masked-LM pretraining (no teacher)")
    loss_text = ["**Loss** = Σ weight × term (config.json's `loss`):", _table(
        ("config field", "weight", "term"),
        [(f"`{n}`", _number(w), text) for n, w, text in terms if w])]
    off = [f"`{n}`" for n, w, _ in terms if not w]
    if off:
        loss_text.append(f"Terms at weight 0 (not computed): {', '.join(off)}.")
    settings = {k: v for k, v in loss.items() if not isinstance(v, dict)
                and not k.startswith("alpha_")}
    if settings:
        loss_text.append("Loss settings: " + ", ".join(f"`loss.{k}={v}`"
                                                      for k, v in sorted(settings.items())) + ".")
    masking = config.get("masking", {})
    if masking:
        lines.append(f"- **Masking**: {masking.get('mask_prob')} of real tokens "
                     f"({masking.get('replace_with_mask')} [MASK] / "
                     f"{masking.get('replace_with_random')} random), frequency smoothing "
                     f"{masking.get('smoothing')}")
    lines.append(_optimizer(train))
    batch, seq_len = int(train.get("batch_size") or 0), int(data.get("seq_len") or 0)
    if step is not None:
        planned = f" of {_count(train['num_steps'])}" if train.get("num_steps") else ""
        line = (f"- **Steps**: {step:,}{planned}, batches of {batch:,} rows × {seq_len:,} "
                f"tokens: {step * batch * seq_len:,} token positions seen")
        real, through = _real_tokens(records, step)
        if real:
            line += (f"; {real:,.0f} real (non-padding) tokens"
                     + (f" (logged through step {through:,})" if through < step else ""))
        lines.append(line)
    lines.append(f"- **Corpus**: {_corpus(data)}")
    summary = (f"A student distilled from {_source(teacher)} with distil_flax."
               if distilled else "An encoder pretrained with masked-LM by distil_flax.")
    record = _eval_record(records, step)
    evaluation = _evaluation_section(
        record, f"Held-out masked-LM metrics on the documents the run held out (1 in "
        f"{data.get('eval_every')}; {train.get('eval_batches') or 'all'} batches)")
    return _Run(summary, lines, evaluation, _base_model(teacher) if distilled else None,
                ["distillation"] if distilled else ["masked-lm"], loss="\n\n".join(loss_text),
                record=record)


def _finetuning(config: dict, records: list[dict], best: dict | None, step: int | None,
                workdir: str) -> _Run:
    task = config.get("task", {}).get("name", "")
    init = config.get("init", {}).get("checkpoint", "")
    distill, train, data = (config.get("distill", {}), config.get("train", {}),
                            config.get("data", {}))
    described = _read_json(os.path.join(workdir, "task_model.json")) or {}
    head = described.get("head") or {}
    lines = [f"- **Task**: {task}" + (f" ({', '.join(head['label_names'])})"
                                      if head.get("label_names") else ""),
             f"- **Initial encoder**: {_source(init)}"]
    teacher = distill.get("teacher") or ""
    distilled = bool(teacher) and bool(distill.get("alpha"))
    if distilled:
        alpha, temperature = distill.get("alpha"), distill.get("temperature")
        lines.append(f"- **Task teacher**: {_source(teacher)}; loss = {alpha} × T²·KL(teacher ‖ "
                     f"student) + {_number(1 - alpha)} × task loss, T = {temperature}")
    else:
        lines.append("- **Loss**: the task's loss (no teacher)")
    lines.append(_optimizer(train))
    results = _read_json(os.path.join(workdir, "results.json")) or {}
    total = results.get("steps") or train.get("num_steps")
    if step is not None:
        lines.append(f"- **Steps**: this is step {_count(step)}"
                     + (f" of {_count(total)}" if total else "")
                     + f", batches of {_count(train.get('batch_size'))} examples (rows of at most "
                     f"{data.get('max_length')} tokens)")
    lines.append(f"- **Data**: {data.get('source')}" + (f" `{data['dir']}`" if data.get("dir")
                                                         else ""))
    if best and best.get("step") == step:
        record = {f"{split}/{k}": v for split, values in (best.get("metrics") or {}).items()
                  for k, v in values.items()} | {"score": best.get("score")}
        source = f"The best evaluation (best.json, step {_count(step)})"
    else:
        record, source = _eval_record(records, step), "Evaluation"
    summary = (f"Fine-tuned on {task} from {_source(init)} with distil_flax"
               + (f", distilled from the task teacher {_source(teacher)}." if distilled else "."))
    dataset = model_index.TASK_DATASETS.get(task)
    return _Run(summary, lines,
                _evaluation_section(record, f"{source} on the task's evaluation split(s)"),
                _base_model(init), [task, *(["distillation"] if distilled else [])],
                (dataset,) if dataset else (), record=record)


def loss_terms(loss: Mapping[str, Any]) -> list[tuple[str, float, str]]:
    """(config field, weight, what it weighs) of every term of a `loss` section: its `alpha_*`
    fields and the weights of its sub-sections (each term's `weights`; their other fields
    described inline)."""
    weight_fields = {term.name: term.weights for term in TERMS}
    terms = []
    for key, value in sorted(loss.items()):
        if isinstance(value, Mapping):
            names = [w for w in weight_fields.get(key, ("weight",)) if w in value]
            rest = ", ".join(f"{k}={v}" for k, v in sorted(value.items()) if k not in names)
            for name in names:
                what = _LOSS_TERMS.get(key, key.replace("_", " "))
                if name != "weight":  # A section of several weights: say which one.
                    what += f" ({name.removesuffix('_weight')})"
                terms.append((f"loss.{key}.{name}", float(value[name]),
                              what + (f"; {rest}" if rest else "")))
        elif key.startswith("alpha_") and not isinstance(value, Mapping):
            terms.append((f"loss.{key}", float(value), _LOSS_TERMS.get(key, key[6:])))
    return terms


def _pruned(record: Mapping[str, Any]) -> str:
    """The initialisation line of a student pruned from its teacher (its pruning.json)."""
    layers, teacher = tuple(record.get("layers", ())), record.get("teacher", {})

    def kept(units: Sequence[Sequence[int]], of: str, what: str) -> str:
        counts = sorted({len(u) for u in units})
        total = f" of {teacher[of]}" if of in teacher else ""
        return f"{'/'.join(map(str, counts))}{total} {what}"

    return (f"- **Student initialisation**: pruned from the teacher ({student_init.PRUNING_FILE}"
            f" lists what it kept): teacher layers {layers} → student layers "
            f"{tuple(range(len(layers)))}, keeping in each "
            f"{kept(record.get('heads', ()), 'num_heads', 'heads')} and "
            f"{kept(record.get('neurons', ()), 'intermediate_size', 'feed-forward neurons')}, "
            f"and {kept([record.get('channels', ())], 'hidden_size', 'hidden channels')}: those "
            "with the largest activations on the first training batches")


def _optimizer(train: Mapping[str, Any]) -> str:
    return (f"- **Optimizer**: AdamW, learning rate {train.get('learning_rate')} (warmup "
            f"{train.get('warmup_fraction')} of the steps, then linear decay), weight decay "
            f"{train.get('weight_decay')}, β = ({train.get('b1')}, {train.get('b2')}), gradient "
            f"clipping {train.get('clip_norm')}")


def _corpus(data: Mapping[str, Any]) -> str:
    source = data.get("source", "")
    if source == "bundled":
        text = "the World English Bible (public domain), bundled with distil_flax"
    else:
        text = f"`{source}` from `{data.get('paths')}`"
        if source in ("jsonl", "tfds", "parquet"):
            text += f" (field `{data.get('text_field')}`)"
    tokenizer = data.get("tokenizer")
    if tokenizer:
        text += f"; tokenizer `{os.path.basename(tokenizer)}`"
        if tokenizer.endswith(".txt") and os.path.basename(tokenizer) != "merges.txt":
            text += " (lowercased)" if data.get("lowercase") else " (cased)"
    return text


def _real_tokens(records: list[dict], step: int) -> tuple[float, int]:
    """Σ over training logs up to `step` of their mean `real_tokens` per step × their steps."""
    total, last = 0.0, 0
    for record in records:
        if "train/real_tokens" in record and record["step"] <= step:
            total += record["train/real_tokens"] * (record["step"] - last)
            last = record["step"]
    return total, last


def _eval_record(records: list[dict], step: int | None) -> dict[str, float]:
    """The last `eval/` record at or before `step` (any step when None), unprefixed."""
    evals = [r for r in records if any(k.startswith("eval/") for k in r)
             and (step is None or r["step"] <= step)]
    if not evals:
        return {}
    last = evals[-1]
    return {"step": last["step"]} | {k[len("eval/"):]: v for k, v in last.items()
                                     if k.startswith("eval/")}


def _evaluation_section(record: Mapping[str, Any], what: str) -> str:
    if not record:
        return ("## Evaluation\n\nThe run's workdir records no held-out evaluation up to the "
                "exported step (no best.json, and no `eval/` records in metrics.jsonl).")
    values = {k: v for k, v in record.items() if k != "step" and v is not None}
    at = f", step {_count(record['step'])}" if "step" in record else ""
    return (f"## Evaluation\n\n{what}{at}:\n\n"
            + _table(("metric", "value"), [(k, _number(v)) for k, v in sorted(values.items())]))


# ---------------------------------------------------------------------------------------------
# The model, and how to use and reproduce it.
# ---------------------------------------------------------------------------------------------


def _model_section(hf_config: Mapping[str, Any], head: str) -> str:
    c = hf_config
    if c["model_type"] == "distilbert":
        layers, hidden, heads, ffn = c["n_layers"], c["dim"], c["n_heads"], c["hidden_dim"]
    else:
        layers, hidden, heads, ffn = (c["num_hidden_layers"], c["hidden_size"],
                                      c["num_attention_heads"], c["intermediate_size"])
    # RoBERTa's table holds pad_token_id + 1 rows before the first position.
    offset = c.get("pad_token_id", 1) + 1 if c["model_type"] in _OFFSET_TYPES else 0
    rows = [("class", f"`{c['architectures'][0]}`"),
            ("layers × hidden", f"{layers} × {hidden} ({heads} heads, feed-forward {ffn})"),
            ("vocabulary", f"{c['vocab_size']:,}"),
            ("max positions", f"{c['max_position_embeddings'] - offset:,}")]
    if c.get("id2label") and head in ("seq_cls", "token_cls"):
        rows.append(("labels", ", ".join(str(v) for _, v in sorted(
            c["id2label"].items(), key=lambda kv: int(kv[0])))))
    if c.get("problem_type"):
        rows.append(("problem type", c["problem_type"]))
    return "## Model\n\n" + _table(("", ""), rows)


def _usage(name: str, head: str, has_tokenizer: bool, model_type: str = "bert") -> str:
    if not has_tokenizer:
        return ("## Usage\n\nThis export ships no tokenizer (the run named none): load the "
                f"weights with `transformers.{_AUTO_CLASSES[head]}.from_pretrained(\"{name}\")` "
                "and the run's vocabulary with the matching tokenizer class.")
    if PIPELINE_TAGS[head]:
        mask = "<mask>" if model_type in _OFFSET_TYPES else "[MASK]"
        example = {"fill-mask": f'"The capital of France is {mask}."',
                   "question-answering": 'question="Who?", context="…"'}.get(
                       PIPELINE_TAGS[head], '"Some text."')
        code = (f"from transformers import pipeline\n\n"
                f"run = pipeline(\"{PIPELINE_TAGS[head]}\", model=\"{name}\")  # The folder, or "
                f"its Hub id.\nprint(run({example}))")
    else:
        code = (f"from transformers import AutoTokenizer, {_AUTO_CLASSES[head]}\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")\n"
                f"model = {_AUTO_CLASSES[head]}.from_pretrained(\"{name}\")")
    return f"## Usage\n\n```python\n{code}\n```"


def _reproduce(config: dict, workdir: str, export_command: Sequence[str]) -> str:
    train_argv, note = reproduce.training_command(config, workdir)
    lines = ["## Reproduce", ""]
    if train_argv:
        lines += ["Train (from the repository's root), then export:", "", "```bash",
                  reproduce.shell(train_argv), reproduce.shell(export_command), "```"]
    else:
        lines += [f"{note} Train with a config that gives the config.json below, then export:",
                  "", "```bash", reproduce.shell(export_command), "```"]
    lines += ["", "<details><summary>The run's config.json</summary>", "", "```json",
              json.dumps(config, indent=2, sort_keys=True), "```", "", "</details>"]
    return "\n".join(lines)


_LICENSE = ("## License\n\n**TODO**: this card says `license: other` (`license_name: todo`); "
            "set the license the teacher's and the training data's terms allow before "
            "publishing.")


# ---------------------------------------------------------------------------------------------
# Small readers and formatters.
# ---------------------------------------------------------------------------------------------


def _records(workdir: str) -> list[dict]:
    if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
        return []
    try:
        return metric_writers.read_metrics(workdir)
    except (OSError, ValueError) as error:
        logging.warning("Model card: %s/metrics.jsonl is unreadable (%s); the card leaves out "
                        "its metrics.", workdir, error)
        return []


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as error:
        logging.warning("Model card: %s is unreadable (%s); the card leaves it out.", path, error)
        return None
    return value if isinstance(value, dict) else None


def _source(spec: str) -> str:
    """A checkpoint as the card names it: a link for a Hub model, else the path."""
    repo = hub.hub_model_id(spec) if spec else None
    if repo:
        return f"[{repo}](https://huggingface.co/{repo})"
    return f"`{spec}`" if spec else "(none)"


def _base_model(spec: str) -> str | None:
    """A Hub id for the metadata; a local checkpoint's folder name when it has none."""
    if not spec:
        return None
    return hub.hub_model_id(spec) or os.path.basename(os.path.normpath(spec))


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _number(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])
