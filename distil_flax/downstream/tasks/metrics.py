"""Downstream metrics, computed as the official scripts compute them.

GLUE (as the GLUE benchmark and `sklearn.metrics`, which GLUE's and BERT's scripts call):
  CoLA Matthews correlation; MRPC and QQP F1 of the positive class and accuracy; STS-B Pearson
  and Spearman correlation; MNLI matched and mismatched accuracy; QNLI, RTE, SST-2, WNLI accuracy.
  A task's score is the unweighted mean of its metrics (MRPC: (F1 + accuracy) / 2), and the GLUE
  macro-score is the mean of the nine task scores, WNLI included, MNLI counted once as the mean of
  matched and mismatched — the DistilBERT paper's Table 1 (its DistilBERT row averages to 77.0).
SQuAD v1.1 (`evaluate-v1.1.py`): answers normalised (lowercase, punctuation and the articles
  a/an/the removed, whitespace collapsed); exact match and bag-of-tokens F1 take the max over the
  gold answers; both are percentages over every question, an unanswered one scoring 0.

Every function takes plain Python sequences or numpy arrays and returns Python floats in [0, 1]
(correlations in [-1, 1]) except the SQuAD scores, which are percentages as the script prints.
"""

import collections
import math
import re
import string
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

# The nine GLUE tasks whose scores the macro-score averages (the diagnostic AX is not one).
GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")


def _as_labels(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must be "
                         "1-D and of the same length")
    if not len(labels):
        raise ValueError("no examples to score")
    return predictions, labels


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label."""
    predictions, labels = _as_labels(predictions, labels)
    return float(np.mean(predictions == labels))


def f1(predictions: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the `positive` class (sklearn's binary F1): 0 when it is never predicted nor true."""
    predictions, labels = _as_labels(predictions, labels)
    true_positive = np.sum((predictions == positive) & (labels == positive))
    predicted = np.sum(predictions == positive)
    actual = np.sum(labels == positive)
    if predicted + actual == 0:
        return 0.0  # sklearn's zero_division default for an F1 with no positives anywhere.
    return float(2 * true_positive / (predicted + actual))


def matthews_corrcoef(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation (multi-class form, as sklearn): 0 when either side is constant."""
    predictions, labels = _as_labels(predictions, labels)
    classes = np.union1d(predictions, labels)
    index = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), np.float64)
    np.add.at(confusion, ([index[x] for x in labels], [index[x] for x in predictions]), 1)
    t = confusion.sum(axis=1)  # True occurrences of each class.
    p = confusion.sum(axis=0)  # Predicted occurrences.
    c = np.trace(confusion)
    s = confusion.sum()
    cov_yp = c * s - t @ p
    cov_pp = s * s - p @ p
    cov_yy = s * s - t @ t
    if cov_pp == 0 or cov_yy == 0:
        return 0.0  # All one class on a side: the correlation is undefined; sklearn reports 0.
    return float(cov_yp / math.sqrt(cov_yy * cov_pp))


def pearson(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Pearson correlation; 0 when either side is constant (undefined)."""
    predictions, labels = _as_labels(predictions, labels)
    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    return float(stats.pearsonr(predictions.astype(np.float64), labels.astype(np.float64))[0])


def spearman(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Spearman rank correlation, ties given their average rank; 0 when a side is constant."""
    predictions, labels = _as_labels(predictions, labels)
    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    return float(stats.spearmanr(predictions.astype(np.float64), labels.astype(np.float64))[0])


def task_score(metrics: Mapping[str, float]) -> float:
    """A GLUE task's score: the unweighted mean of its metrics."""
    if not metrics:
        raise ValueError("a task score needs at least one metric")
    return float(np.mean(list(metrics.values())))


def glue_score(task_scores: Mapping[str, float]) -> float:
    """The GLUE macro-score: the mean of the nine task scores (see the module docstring).

    Args:
      task_scores: each GLUE task's score (`task_score` of its metrics), keyed by the names in
        `GLUE_TASKS`; MNLI's is the mean of its matched and mismatched accuracy.

    Raises:
      ValueError: a task is missing or unknown (named).
    """
    missing = [t for t in GLUE_TASKS if t not in task_scores]
    unknown = sorted(set(task_scores) - set(GLUE_TASKS))
    if missing or unknown:
        raise ValueError(f"the GLUE score needs exactly the tasks {list(GLUE_TASKS)}; missing "
                         f"{missing}, unknown {unknown}")
    return float(np.mean([task_scores[t] for t in GLUE_TASKS]))


# ----------------------------------------------------------------------------------------------
# SQuAD v1.1.
# ----------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop articles, collapse whitespace (in the script's order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 of normalised answers; 0 when they share no token (v1.1's rule, which
    also scores an empty prediction against an empty gold answer as 0)."""
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Mapping[str, str],
                 gold_answers: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 in percent over every question of `gold_answers`.

    Args:
      predictions: question id → predicted answer text.
      gold_answers: question id → its gold answer texts (the max over them counts).

    Returns:
      {"exact_match", "f1"} in [0, 100], and "unanswered": questions without a prediction (each
      scored 0, as the official script does after printing a message).
    """
    if not gold_answers:
        raise ValueError("no questions to score")
    exact = f1_total = 0.0
    unanswered = 0
    for qid, golds in gold_answers.items():
        if qid not in predictions:
            unanswered += 1
            continue
        prediction = predictions[qid]
        exact += max(squad_exact_match(prediction, g) for g in golds)
        f1_total += max(squad_f1(prediction, g) for g in golds)
    n = len(gold_answers)
    return {"exact_match": 100.0 * exact / n, "f1": 100.0 * f1_total / n,
            "unanswered": float(unanswered)}
