"""What every downstream task provides to the fine-tuning loop, and the text-classification tasks.

A task reads its splits (local files in the original formats, or TFDS), turns examples into
fixed-length rows of ids, and turns the model's outputs on an evaluation split back into the
official metrics and a predictions file. The loop (`finetune.py`) knows nothing else about it.

Rows (`Features.arrays`) carry the model inputs (`input_ids`, `token_type_ids`,
`attention_mask`, int32 [rows, length]) and the training targets the head needs (`labels` [rows]
for classification, float32 for regression; `start_positions`, `end_positions` [rows] for
extractive QA). Everything the evaluation needs besides the model's outputs stays on the host in
`Features.meta`.
"""

import abc
import collections
import dataclasses
import json
import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from distil_flax.data.tokenizer import Tokenizer
from distil_flax.downstream.tasks import metrics as metrics_lib
from distil_flax.downstream.tasks import text as text_lib
from distil_flax.training import atomic

# More than this fraction of a file's records skipped means the file is not what the task reads.
MAX_SKIPPED_FRACTION = 0.5
# Examples of each skip reason quoted in the log.
_QUOTED = 5


class SkipTally:
    """Counts records a reader leaves out, by reason, and says so in the log.

    Bad records (a malformed TSV row, a SQuAD answer that is not in its context) are skipped and
    counted rather than ending a long run; `report` logs a warning naming the file, each reason,
    its count and the first few locations, and raises when most of the file was unreadable.
    """

    def __init__(self, source: str):
        self.source = source
        self.counts: collections.Counter[str] = collections.Counter()
        self.where: dict[str, list[str]] = collections.defaultdict(list)

    def skip(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.where[reason]) < _QUOTED:
            self.where[reason].append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self, kept: int) -> None:
        """Logs what was skipped; ValueError if nothing was kept or most records were skipped."""
        details = "; ".join(f"{n} × {reason} (e.g. {', '.join(self.where[reason])})"
                            for reason, n in self.counts.most_common())
        if kept == 0 or self.total > MAX_SKIPPED_FRACTION * (kept + self.total):
            raise ValueError(f"{self.source}: {kept} usable record(s), {self.total} skipped"
                             + (f": {details}" if details else "")
                             + "; is this the right file for the task?")
        if self.total:
            logging.warning("%s: skipped %d of %d record(s): %s.", self.source, self.total,
                            kept + self.total, details)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


@dataclasses.dataclass(frozen=True)
class TextExample:
    """One text or text pair with its label: a class index, or a float for regression."""

    guid: str
    text_a: str
    text_b: str | None
    label: int | float


@dataclasses.dataclass
class Split:
    """The examples of one split, where they came from, and what was skipped reading them."""

    name: str
    examples: list[Any]
    source: str
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Features:
    """Model rows of a split. `arrays` go to the device; `meta` stays on the host."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return len(self.arrays["input_ids"])


def split_file(data: ml_collections.ConfigDict, default_name: str, override: str) -> str:
    """The file of a split: `override` if set, else `default_name` inside `data.dir`.

    Raises:
      ValueError: neither is set, or the file does not exist (naming the config field).
    """
    if override:
        path = override
    elif data.dir:
        path = os.path.join(data.dir, default_name)
    else:
        raise ValueError(f"data.dir is empty: point it at the folder holding {default_name} (or "
                         "set data.source='tfds')")
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist (data.dir={data.dir!r}); expected the task's "
                         f"original file {default_name}")
    return path


class Task(abc.ABC):
    """A downstream task: its head, its splits, and how its outputs are scored."""

    name: str
    head: str  # A kind in `heads.HEADS`.
    num_labels: int  # Classes; 1 for regression; 2 (start, end) for extractive QA.
    label_names: tuple[str, ...] = ()
    eval_splits: tuple[str, ...] = ("dev",)
    score_metrics: tuple[str, ...] = ("accuracy",)  # Averaged (over splits too) into the score.

    @abc.abstractmethod
    def read(self, split: str, data: ml_collections.ConfigDict) -> Split:
        """Reads the split named `split` ("train" or one of `eval_splits`) as `data` says."""

    @abc.abstractmethod
    def featurize(self, split: Split, tokenizer: Tokenizer, data: ml_collections.ConfigDict
                  ) -> Features:
        """Turns a split's examples into model rows."""

    @abc.abstractmethod
    def evaluate(self, split: Split, features: Features, outputs: np.ndarray
                 ) -> tuple[dict[str, float], Any]:
        """Official metrics of one evaluation split and its predictions (for `write_predictions`).

        Args:
          outputs: the head's float32 outputs for every row of `features`, in order.
        """

    @abc.abstractmethod
    def write_predictions(self, directory: str, split: Split, predictions: Any) -> str:
        """Writes predictions in the task's official format; returns the file's path."""

    def score(self, metrics_by_split: dict[str, dict[str, float]]) -> float:
        """The task's single score, which selects the best checkpoint: the mean of its
        `score_metrics` over its evaluation splits (MNLI: matched and mismatched accuracy)."""
        return metrics_lib.task_score(
            {f"{s}/{k}": v for s, m in metrics_by_split.items() for k, v in m.items()
             if k in self.score_metrics})

    @property
    def is_regression(self) -> bool:
        return self.head == "seq_cls" and self.num_labels == 1


class TextClassificationTask(Task):
    """Single texts or pairs → a class (or a score): GLUE and IMDb."""

    head = "seq_cls"

    def featurize(self, split: Split, tokenizer: Tokenizer, data: ml_collections.ConfigDict
                  ) -> Features:
        examples = split.examples
        pairs = any(e.text_b is not None for e in examples)
        arrays, truncated = text_lib.encode_pairs(
            tokenizer, [e.text_a for e in examples],
            [e.text_b or "" for e in examples] if pairs else None, data.max_length)
        dtype = np.float32 if self.is_regression else np.int32
        arrays["labels"] = np.array([e.label for e in examples], dtype)
        if truncated:
            logging.info("%s: %d of %d example(s) truncated to data.max_length=%d tokens.",
                         split.source, truncated, len(examples), data.max_length)
        return Features(arrays, {"truncated": truncated})

    @abc.abstractmethod
    def metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """The task's official metrics of predicted classes (or scores) against labels."""

    def evaluate(self, split: Split, features: Features, outputs: np.ndarray
                 ) -> tuple[dict[str, float], np.ndarray]:
        labels = features.arrays["labels"]
        if self.is_regression:
            predictions = outputs[:, 0]
            loss = float(np.mean((predictions - labels) ** 2))
        else:
            predictions = np.argmax(outputs, axis=-1)
            log_p = outputs - _logsumexp(outputs)
            loss = float(-np.mean(log_p[np.arange(len(labels)), labels]))
        metrics = self.metrics(predictions, labels)
        metrics["loss"] = loss
        return metrics, predictions

    file_labels: tuple[str, ...] = ()  # Class names as written in the task's own files.

    def write_predictions(self, directory: str, split: Split, predictions: np.ndarray) -> str:
        """GLUE's submission format, `index<TAB>prediction`, labels spelt as in the task's files."""
        path = os.path.join(directory, f"{self.name}_{split.name}.tsv")
        os.makedirs(directory, exist_ok=True)
        lines = ["index\tprediction\n"]
        for example, value in zip(split.examples, predictions):
            shown = (f"{float(value):.3f}" if self.is_regression
                     else self.file_labels[int(value)])
            lines.append(f"{example.guid}\t{shown}\n")
        atomic.write_text(path, "".join(lines))
        return path


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = np.max(x, axis=-1, keepdims=True)
    return top + np.log(np.sum(np.exp(x - top), axis=-1, keepdims=True))


def write_json(path: str, value: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic.write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")
