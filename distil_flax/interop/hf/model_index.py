"""The `model-index` of an export's card: the results it can find, as the Hugging Face Hub reads
them (huggingface_hub's `EvalResult`s, which `ModelCardData(model_name=..., eval_results=...)`
writes as the model-index).

`eval_results` gathers them from
  the run       a fine-tuning run's evaluation of the exported step (best.json): GLUE tasks as
                text-classification on nyu-mll/glue (config = the task, split validation;
                MNLI validation_matched and validation_mismatched), IMDb on stanfordnlp/imdb
                (test), SQuAD as question-answering on rajpurkar/squad (validation); metric
                types accuracy, f1, matthews_correlation, pearsonr, spearmanr, exact_match.
                A distillation run's held-out masked-LM metrics (fill-mask on the run's corpus,
                split "held-out"), when the export keeps the MLM head that they measure;
  files         given to the export (`export_hf --results=PATH[,PATH]`), each known by its
                content (`read_results`):
                  glue          a GLUE suite table (glue.json of `python -m distil_flax.glue`,
                                or the folder holding it): its first row, the exported model
                                fine-tuned on each task, as the fine-tuning results above;
                  embeddings    an embedding evaluation report (`evaluate_embeddings
                                --output`): its student's metrics on each file — STS pairs as
                                sentence-similarity, the probe and the agreement with the
                                teacher as feature-extraction (dataset: the file's name).
"""

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

from absl import logging
from huggingface_hub import EvalResult

from distil_flax.training.config_files import read_json

GLUE_FILE = "glue.json"  # The GLUE suite's table, in its workdir.
_GLUE_NAMES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP",
               "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
# Hub datasets of the fine-tuning tasks (`downstream/tasks`): id, config, display name.
_TASKS = {**{task: ("nyu-mll/glue", task, f"GLUE {name}") for task, name in _GLUE_NAMES.items()},
          "squad": ("rajpurkar/squad", "plain_text", "SQuAD v1.1"),
          "imdb": ("stanfordnlp/imdb", "plain_text", "IMDb")}
TASK_DATASETS = {task: dataset for task, (dataset, _, _) in _TASKS.items()}
# Our evaluation splits → the Hub datasets'.
_SPLITS = {"dev": "validation", "dev_matched": "validation_matched",
           "dev_mismatched": "validation_mismatched", "test": "test"}
# The tasks' metrics (`downstream/tasks`) → the Hub's metric types and names; others (loss,
# unanswered questions) are left out.
_METRICS = {"accuracy": ("accuracy", "Accuracy"), "f1": ("f1", "F1"),
            "matthews_corr": ("matthews_correlation", "Matthews correlation"),
            "pearson": ("pearsonr", "Pearson r"), "spearman": ("spearmanr", "Spearman ρ"),
            "exact_match": ("exact_match", "Exact match")}
# A distillation's held-out metrics of the student (`distill.train.evaluate`).
_MLM_METRICS = {"student_mlm_accuracy": ("accuracy", "Masked-LM accuracy"),
                "student_perplexity": ("perplexity", "Perplexity")}
_CORPUS_NAMES = {"bundled": "World English Bible (bundled with distil_flax)"}


@dataclasses.dataclass(frozen=True)
class ResultsFile:
    """A results file given to an export, read and recognised (`read_results`)."""

    path: str
    kind: str  # "glue" | "embeddings"
    content: Mapping[str, Any]

    def describe(self) -> str:
        return {"glue": "a GLUE suite table: this model fine-tuned on each task",
                "embeddings": "an embedding evaluation report: this model's sentence "
                              "embeddings"}[self.kind]


def read_results(paths: Sequence[str], *, field: str = "--results",
                 workdir: str = "") -> list[ResultsFile]:
    """Reads results files, each a GLUE suite table or an embedding evaluation report.

    Args:
      paths: the files (a folder: the glue.json it holds).
      field: the flag that named them, for the errors.
      workdir: the exported run; a file that reports another model, or nothing of this one,
        is warned about.

    Raises:
      ValueError: naming the file: missing, not JSON, or not one of the kinds above.
    """
    read = []
    for path in paths:
        file = os.path.join(path, GLUE_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ValueError(f"{field}={path}: no such file" if file == path else
                             f"{field}={path}: a folder without {GLUE_FILE}")
        try:
            content = read_json(file)
        except (OSError, ValueError) as error:
            raise ValueError(f"{field}={path}: {error}") from None
        kind = _kind(content)
        if kind is None:
            raise ValueError(
                f"{field}={file}: neither a GLUE suite table ({GLUE_FILE} of distil_flax.glue: "
                "tasks, rows) nor an embedding evaluation report (evaluate_embeddings --output: "
                "metrics, models, data)")
        results = ResultsFile(file, kind, content)
        model = (content["rows"][0].get("model") if kind == "glue"
                 else content["models"].get("student", {}).get("path")) or ""
        if workdir and model and _name(model) != _name(workdir):
            logging.warning("%s reports %s, but the export is of %s: its results go into the "
                            "card as given.", file, model, workdir)
        if not file_results(results):
            logging.warning("%s holds no result of the exported model.", file)
        read.append(results)
    return read


def _kind(content: Any) -> str | None:
    """What a results file is, from its content: "glue", "embeddings" or None."""
    if not isinstance(content, dict):
        return None
    rows = content.get("rows")
    if (isinstance(content.get("tasks"), list) and isinstance(rows, list) and rows
            and all(isinstance(r, dict) and isinstance(r.get("tasks"), dict) for r in rows)
            and all(isinstance(t, dict) and isinstance(t.get("metrics"), dict)
                    for t in rows[0]["tasks"].values())):
        return "glue"
    metrics, data = content.get("metrics"), content.get("data")
    if (isinstance(metrics, dict) and isinstance(metrics.get("student"), dict)
            and isinstance(content.get("models"), dict) and isinstance(data, dict)
            and all(isinstance(d, dict) and "path" in d for d in data.values())):
        return "embeddings"
    return None


def eval_results(config: Mapping[str, Any], record: Mapping[str, Any], *, head: str,
                 files: Sequence[ResultsFile] = ()) -> list[EvalResult]:
    """Every result an export's card states in its model-index.

    Args:
      config: the run's config.json.
      record: the run's evaluation of the exported step, as the card shows it: a fine-tuning
        run's `split/metric` values, a distillation's `eval/` metrics unprefixed; {}: none.
      head: the export's head; a distillation's masked-LM metrics need "mlm".
      files: results files given to the export (`read_results`).
    """
    results = []
    if "task" in config:
        results += task_results(config["task"].get("name", ""), record)
    elif head == "mlm":
        results += _mlm_results(config.get("data", {}), record)
    for file in files:
        results += file_results(file)
    return results


def file_results(file: ResultsFile) -> list[EvalResult]:
    """The results a file holds for the exported model: a GLUE table's first row, an embedding
    report's student."""
    if file.kind == "glue":
        return [r for task, entry in file.content["rows"][0]["tasks"].items()
                for r in task_results(task, entry["metrics"])]
    return _embedding_results(file.content)


def task_results(task: str, metrics: Mapping[str, Any]) -> list[EvalResult]:
    """A fine-tuning task's `split/metric` values (its best.json, a GLUE table's entry)."""
    if task not in _TASKS:
        return []
    dataset, config, name = _TASKS[task]
    results = []
    for key, value in sorted(metrics.items()):
        split, _, metric = key.rpartition("/")
        if metric in _METRICS and split and _is_number(value):
            metric_type, metric_name = _METRICS[metric]
            results.append(EvalResult(
                task_type="question-answering" if task == "squad" else "text-classification",
                dataset_type=dataset, dataset_name=name, dataset_config=config,
                dataset_split=_SPLITS.get(split, split), metric_type=metric_type,
                metric_name=metric_name, metric_value=float(value)))
    return results


def _mlm_results(data: Mapping[str, Any], record: Mapping[str, Any]) -> list[EvalResult]:
    source = data.get("source") or "bundled"
    paths = ", ".join(os.path.basename(p.strip().rstrip("/"))
                      for p in str(data.get("paths") or "").split(",") if p.strip())
    name = _CORPUS_NAMES.get(source) or (data.get("paths") if source == "tfds" else paths)
    return [EvalResult(task_type="fill-mask", dataset_type=source, dataset_name=name or source,
                       dataset_split="held-out", metric_type=metric_type,
                       metric_name=metric_name, metric_value=float(record[key]))
            for key, (metric_type, metric_name) in _MLM_METRICS.items()
            if _is_number(record.get(key))]


def _embedding_results(report: Mapping[str, Any]) -> list[EvalResult]:
    """The student's metrics of an evaluate_embeddings report, one dataset per file."""
    metrics, data = report["metrics"]["student"], report["data"]
    # metric → (the file it is measured on, task type, metric type, metric name).
    known = {"sts_spearman": ("sts", "sentence-similarity", "spearmanr",
                              "Spearman ρ of cosine similarity and gold score"),
             "probe_accuracy": ("labelled", "feature-extraction", "accuracy",
                                "Linear probe accuracy (cross-validated)"),
             "text_cosine_spearman": ("text", "feature-extraction", "spearmanr",
                                      "Spearman ρ of pair cosines against the teacher's")}
    results = []
    for key, value in metrics.items():
        if key.startswith("text_recall@"):
            k = key.removeprefix("text_recall@")
            what = ("text", "feature-extraction", f"recall@{k}",
                    f"Recall@{k} of the teacher's nearest neighbours")
        else:
            what = known.get(key)
        if what is None or what[0] not in data or not _is_number(value):
            continue
        file = os.path.basename(str(data[what[0]]["path"]))
        results.append(EvalResult(
            task_type=what[1], dataset_type=file, dataset_name=f"{file} (--{what[0]})",
            metric_type=what[2], metric_name=what[3], metric_value=float(value)))
    return results


def results_section(files: Sequence[ResultsFile]) -> str:
    """The card's section of the results files' results (its model-index states them too)."""
    if not files:
        return ""
    lines = ["## Further results", ""]
    for file in files:
        rows = []
        for r in file_results(file):
            where = ", ".join(x for x in (r.dataset_config, r.dataset_split) if x)
            rows.append((r.task_type, r.dataset_name + (f" ({where})" if where else ""),
                         r.metric_name or r.metric_type, f"{r.metric_value:.4g}"))
        lines += [f"From `{os.path.basename(file.path)}` ({file.describe()}):", ""]
        if rows:
            lines += ["| task | dataset | metric | value |", "|---|---|---|---|"]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        else:
            lines.append("No result of this model.")
        lines.append("")
    return "\n".join(lines)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _name(spec: str) -> str:
    return os.path.basename(os.path.normpath(spec.split("@")[0]))
