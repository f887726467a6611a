"""Downstream metrics against hand-computed values and the official scripts' edge cases."""

import math

import pytest

from distil_flax.downstream.tasks import metrics as m

# Two classes: TP = 2 (rows 0, 4), FP = 1 (row 1), TN = 2 (rows 2, 3), FN = 1 (row 5).
PREDICTIONS = [1, 1, 0, 0, 1, 0]
LABELS = [1, 0, 0, 0, 1, 1]


def test_accuracy_and_f1_by_hand():
    assert m.accuracy(PREDICTIONS, LABELS) == pytest.approx(4 / 6)
    # F1 = 2·TP / (2·TP + FP + FN) = 4 / 6; accuracy happens to agree here, so check a case
    # where they differ (the MRPC mix-up): all predicted positive.
    assert m.f1(PREDICTIONS, LABELS) == pytest.approx(4 / 6)
    assert m.f1([1, 1, 1, 1], [1, 0, 0, 0]) == pytest.approx(2 / 5)
    assert m.accuracy([1, 1, 1, 1], [1, 0, 0, 0]) == pytest.approx(1 / 4)
    # No positive predicted nor true: sklearn's zero_division gives 0, not a crash.
    assert m.f1([0, 0], [0, 0]) == 0.0


def test_matthews_corrcoef_by_hand():
    # (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 − 1) / sqrt(3·3·3·3).
    assert m.matthews_corrcoef(PREDICTIONS, LABELS) == pytest.approx(1 / 3)
    assert m.matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert m.matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)
    # Three classes, confusion rows (true) [2 0 0; 1 0 1; 0 1 1]: t = [2 2 2], p = [3 1 2],
    # trace 3, n 6 → (3·6 − 12) / sqrt((36 − 14)(36 − 12)).
    assert m.matthews_corrcoef([0, 2, 1, 0, 0, 2], [0, 1, 2, 0, 1, 2]) == pytest.approx(
        6 / math.sqrt(22 * 24))


def test_matthews_corrcoef_is_zero_for_a_constant_side():
    # A classifier that predicts one class for all of CoLA scores 0, as GLUE's sklearn call does.
    assert m.matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0
    assert m.matthews_corrcoef([1, 0, 1, 0], [1, 1, 1, 1]) == 0.0


def test_correlations_by_hand():
    # Pearson of [1 2 3] and [2 4 7]: cov 5, var 2 and 114/9.
    assert m.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    # Spearman with a tie: ranks [1 2.5 2.5 4] and [1 3 2 4] → 4.5 / sqrt(4.5 · 5).
    assert m.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert m.pearson([1, 1, 1], [1, 2, 3]) == 0.0  # Undefined: reported as 0, not NaN.
    assert m.spearman([1, 2, 3], [5, 5, 5]) == 0.0


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="same length"):
        m.accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="no examples"):
        m.f1([], [])


def test_glue_score_reproduces_the_paper_row():
    # DistilBERT's GLUE dev row of the paper's Table 1; its macro-score is 77.0.
    distilbert = {"cola": 51.3, "mnli": 82.2, "mrpc": 87.5, "qnli": 89.2, "qqp": 88.5,
                  "rte": 59.9, "sst2": 91.3, "stsb": 86.9, "wnli": 56.3}
    assert round(m.glue_score(distilbert), 1) == 77.0
    # A task's score averages its metrics: MRPC F1 and accuracy.
    assert m.task_score({"f1": 0.9, "accuracy": 0.8}) == pytest.approx(0.85)
    with pytest.raises(ValueError, match=r"missing \['wnli'\]"):
        m.glue_score({k: v for k, v in distilbert.items() if k != "wnli"})


def test_squad_normalisation():
    assert m.normalize_answer("The  Red Sea!") == "red sea"
    assert m.normalize_answer("an apple, a day") == "apple day"
    assert m.normalize_answer("Theatre") == "theatre"  # "the" only as a whole word.
    assert m.normalize_answer("(1,000)") == "1000"


def test_squad_exact_match_and_f1():
    assert m.squad_exact_match("the Red Sea.", "Red Sea") == 1.0
    assert m.squad_exact_match("Red", "Red Sea") == 0.0
    # Tokens [mount sinai in third] against [mount sinai]: P = 2/4, R = 1.
    assert m.squad_f1("Mount Sinai in the third", "Mount Sinai") == pytest.approx(2 / 3)
    assert m.squad_f1("", "Mount Sinai") == 0.0  # Empty prediction.
    # v1.1's quirks: answers that normalise to nothing match exactly, but share no token.
    assert m.squad_exact_match("a", "The") == 1.0
    assert m.squad_f1("a", "The") == 0.0


def test_squad_scores_take_the_best_gold_answer_and_count_unanswered():
    gold = {"q1": ["Moses", "Moses"], "q2": ["the Red Sea", "Red Sea"],
            "q3": ["Mount Sinai", "Sinai"], "q4": ["Egypt"]}
    predictions = {"q1": "Moses", "q2": "crossed the Red Sea", "q3": "Sinai"}  # q4 unanswered.
    scores = m.squad_scores(predictions, gold)
    # q2: max over golds of F1([crossed red sea], [red sea]) = 0.8; q3 matches its second gold.
    assert scores["exact_match"] == pytest.approx(100 * 2 / 4)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8 + 1 + 0) / 4)
    assert scores["unanswered"] == 1
