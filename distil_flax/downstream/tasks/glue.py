"""The nine GLUE tasks, from the original TSV files (as `download_glue_data.py` lays them out) or
TFDS `glue/*`.

Local files: `data.dir` is a task's folder (e.g. `glue_data/MRPC`) holding `train.tsv` and
`dev.tsv` (MNLI: `dev_matched.tsv` and `dev_mismatched.tsv`). Columns are found by the header
names of each task's files; CoLA's train/dev files have no header (source, label, original
judgement, sentence). Fields are split on tabs only, quotes are text (GLUE's files are not CSV).
A row with the wrong number of fields, an unparsable label or an empty text is skipped and
counted (QQP's train file has a few such rows); a missing column is an error.
"""

import dataclasses
from typing import Callable

import ml_collections
import numpy as np

from distil_flax.downstream.tasks import base, tfds_source
from distil_flax.downstream.tasks import metrics as m


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a GLUE task's TSV files keep their texts and label."""

    text_columns: tuple[str, ...]  # Header names; or, without a header, "#i" for column i.
    label_column: str
    num_fields: int = 0  # Only for files without a header: fields per row.


@dataclasses.dataclass(frozen=True)
class _Spec:
    folder: str  # The task's folder name in the GLUE download.
    label_names: tuple[str, ...]  # Class names (TFDS's, and HF's id2label); () for regression.
    file_labels: tuple[str, ...]  # The same classes as the TSV files spell them.
    layout: _Layout
    tfds_text: tuple[str, ...]  # Feature names in TFDS `glue/<task>`.
    metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    score_metrics: tuple[str, ...]
    eval_splits: tuple[str, ...] = ("dev",)


def _accuracy(p, y):
    return {"accuracy": m.accuracy(p, y)}


def _f1_accuracy(p, y):
    return {"f1": m.f1(p, y), "accuracy": m.accuracy(p, y)}


def _correlations(p, y):
    return {"pearson": m.pearson(p, y), "spearman": m.spearman(p, y)}


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

SPECS = {
    "cola": _Spec("CoLA", ("unacceptable", "acceptable"), _BINARY,
                  _Layout(("#3",), "#1", num_fields=4), ("sentence",),
                  lambda p, y: {"matthews_corr": m.matthews_corrcoef(p, y)}, ("matthews_corr",)),
    "sst2": _Spec("SST-2", ("negative", "positive"), _BINARY, _Layout(("sentence",), "label"),
                  ("sentence",), _accuracy, ("accuracy",)),
    "mrpc": _Spec("MRPC", ("not_equivalent", "equivalent"), _BINARY,
                  _Layout(("#1 String", "#2 String"), "Quality"), ("sentence1", "sentence2"),
                  _f1_accuracy, ("f1", "accuracy")),
    "stsb": _Spec("STS-B", (), (), _Layout(("sentence1", "sentence2"), "score"),
                  ("sentence1", "sentence2"), _correlations, ("pearson", "spearman")),
    "qqp": _Spec("QQP", ("not_duplicate", "duplicate"), _BINARY,
                 _Layout(("question1", "question2"), "is_duplicate"), ("question1", "question2"),
                 _f1_accuracy, ("f1", "accuracy")),
    "mnli": _Spec("MNLI", ("entailment", "neutral", "contradiction"),
                  ("entailment", "neutral", "contradiction"),
                  _Layout(("sentence1", "sentence2"), "gold_label"), ("premise", "hypothesis"),
                  _accuracy, ("accuracy",), eval_splits=("dev_matched", "dev_mismatched")),
    "qnli": _Spec("QNLI", _NLI2, _NLI2, _Layout(("question", "sentence"), "label"),
                  ("question", "sentence"), _accuracy, ("accuracy",)),
    "rte": _Spec("RTE", _NLI2, _NLI2, _Layout(("sentence1", "sentence2"), "label"),
                 ("sentence1", "sentence2"), _accuracy, ("accuracy",)),
    "wnli": _Spec("WNLI", ("not_entailment", "entailment"), _BINARY,
                  _Layout(("sentence1", "sentence2"), "label"), ("sentence1", "sentence2"),
                  _accuracy, ("accuracy",)),
}

# Our split names → TFDS's.
_TFDS_SPLITS = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
                "dev_mismatched": "validation_mismatched"}


class GlueTask(base.TextClassificationTask):
    """One GLUE task; `name` is a key of `SPECS` (cola, sst2, mrpc, stsb, qqp, mnli, ...)."""

    def __init__(self, name: str):
        if name not in SPECS:
            raise ValueError(f"task.name={name!r} is not a GLUE task; GLUE tasks: {sorted(SPECS)}")
        self.name = name
        self.spec = SPECS[name]
        self.label_names = self.spec.label_names
        self.file_labels = self.spec.file_labels
        self.num_labels = len(self.label_names) or 1
        self.eval_splits = self.spec.eval_splits
        self.score_metrics = self.spec.score_metrics

    def metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return self.spec.metrics(predictions, labels)

    def read(self, split: str, data: ml_collections.ConfigDict) -> base.Split:
        if split != "train" and split not in self.eval_splits:
            raise ValueError(f"GLUE {self.name} has splits train, {', '.join(self.eval_splits)}; "
                             f"not {split!r}")
        if data.source == "tfds":
            return self._read_tfds(split, data)
        override = data.train_file if split == "train" else data.eval_file
        if override and split != "train" and len(self.eval_splits) > 1:
            raise ValueError(f"data.eval_file names one file, but {self.name} evaluates on "
                             f"{self.eval_splits}: set data.dir to the task's folder instead")
        path = base.split_file(data, f"{split}.tsv", override)
        examples, skipped = read_tsv(path, self)
        return base.Split(split, examples, path, skipped)

    def _read_tfds(self, split: str, data: ml_collections.ConfigDict) -> base.Split:
        records, info, source = tfds_source.load_split(f"glue/{self.name}", _TFDS_SPLITS[split],
                                                       data.tfds_data_dir)
        names = [] if self.is_regression else tfds_source.label_names(info)
        if names and names != list(self.label_names):
            raise ValueError(f"{source}: label names {names}, expected {list(self.label_names)}")
        examples = []
        for index, record in enumerate(records):
            texts = [record[f] for f in self.spec.tfds_text]
            examples.append(base.TextExample(
                str(record.get("idx", index)), texts[0], texts[1] if len(texts) > 1 else None,
                float(record["label"]) if self.is_regression else int(record["label"])))
        if not examples:
            raise ValueError(f"{source} is empty")
        return base.Split(split, examples, source)


def read_tsv(path: str, task: GlueTask) -> tuple[list[base.TextExample], dict[str, int]]:
    """Reads a GLUE TSV file of `task`'s format.

    Returns:
      (examples, skipped): the usable rows, and counts of skipped rows by reason (also logged).

    Raises:
      ValueError: a column the task needs is missing from the header (named, with the header
        found), or most rows are unusable.
    """
    layout = task.spec.layout
    tally = base.SkipTally(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # The newline that ends the last row.
    lines = [line.rstrip("\r") for line in lines]
    if layout.num_fields:  # No header (CoLA's train and dev files).
        first = 0
        columns = {f"#{i}": i for i in range(layout.num_fields)}
        num_fields = layout.num_fields
    else:
        if not lines:
            raise ValueError(f"{path} is empty: expected a header row and examples")
        header = lines[0].split("\t")
        needed = [*layout.text_columns, layout.label_column]
        missing = [c for c in needed if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} for GLUE {task.name}; the "
                             f"header has {header}")
        first = 1
        columns = {name: i for i, name in enumerate(header)}
        num_fields = len(header)
    label_index = {label: i for i, label in enumerate(task.file_labels)}
    examples = []
    for line_number, line in enumerate(lines[first:], start=first + 1):
        where = f"line {line_number}"
        if not line.strip():
            tally.skip("empty line", where)
            continue
        fields = line.split("\t")
        if len(fields) != num_fields:
            tally.skip(f"not {num_fields} tab-separated fields", where)
            continue
        texts = [fields[columns[c]].strip() for c in layout.text_columns]
        if not all(texts):
            tally.skip("empty text", where)
            continue
        raw = fields[columns[layout.label_column]].strip()
        if task.is_regression:
            try:
                label = float(raw)
            except ValueError:
                tally.skip("label is not a number", where)
                continue
        elif raw in label_index:
            label = label_index[raw]
        else:
            tally.skip(f"label not one of {list(task.file_labels)}", where)
            continue
        # The file's own index where it has one (what GLUE's submission format refers to).
        guid = fields[columns["index"]] if "index" in columns else str(line_number - first - 1)
        examples.append(base.TextExample(guid, texts[0], texts[1] if len(texts) > 1 else None,
                                         label))
    tally.report(len(examples))
    return examples, tally.as_dict()
