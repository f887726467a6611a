"""SQuAD v1.1 extractive QA: reading, windowed features, and n-best span decoding.

Local files: `data.dir` holds `train-v1.1.json` and `dev-v1.1.json` (the official release), or
TFDS `squad/v1.1`. A training answer whose text is not at its `answer_start` in the context is
skipped and counted, as BERT's reference code does; evaluation keeps every question.

Features follow BERT's `run_squad.py`: `[CLS] question [SEP] context window [SEP]` (framed by the
tokenizer's family: `<s> question </s></s> context window </s>` for RoBERTa), the question
cut to `max_query_length` tokens, long contexts split into windows `doc_stride` tokens apart.
Each context token keeps its character span in the context, so a predicted token span maps back
to the exact characters of the original text. A training window that does not contain the
whole answer points at `[CLS]` (position 0). Decoding scores `start + end` logits over the
`n_best_size` best starts and ends of every window, keeps spans of at most `max_answer_length`
tokens inside the context, starting where the window gives the token its most context, and
takes the best over the question's windows.
"""

import dataclasses
import json
import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from distil_flax.data.tokenizer import Tokenizer
from distil_flax.downstream.tasks import base, tfds_source
from distil_flax.downstream.tasks import metrics as m
from distil_flax.downstream.tasks import text as text_lib

FILES = {"train": "train-v1.1.json", "dev": "dev-v1.1.json"}
_TFDS_SPLITS = {"train": "train", "dev": "validation"}


@dataclasses.dataclass(frozen=True)
class SquadExample:
    """One question on one context; `answers`/`answer_starts` are the gold spans (characters)."""

    qid: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]


def _field(record: Any, key: str, kind: type | tuple[type, ...], where: str):
    """`record[key]`, checked to be a `kind`; ValueError naming the location otherwise."""
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{where} lacks {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{where}.{key} is a {type(value).__name__}, expected {names}")
    return value


def read_json(path: str, *, train: bool) -> tuple[list[SquadExample], dict[str, int]]:
    """Reads a file in the official SQuAD v1.1 JSON format.

    Args:
      path: e.g. `train-v1.1.json`.
      train: check that each question's first answer is found at its `answer_start` (the one
        training reads), skipping and counting those that are not.

    Returns:
      (examples, skipped counts by reason).

    Raises:
      ValueError: not JSON, or a missing/mistyped field (named with its location).
    """
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object with 'data', got "
                         f"{type(document).__name__}")
    tally = base.SkipTally(path)
    examples = []
    for a, article in enumerate(_field(document, "data", list, path)):
        for p, paragraph in enumerate(_field(article, "paragraphs", list, f"{path}: data[{a}]")):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = _field(paragraph, "context", str, where)
            for q, qa in enumerate(_field(paragraph, "qas", list, where)):
                qa_where = f"{where}.qas[{q}]"
                qid = str(_field(qa, "id", (str, int), qa_where))
                question = _field(qa, "question", str, qa_where)
                answers = _field(qa, "answers", list, qa_where)
                texts = tuple(_field(x, "text", str, f"{qa_where}.answers") for x in answers)
                starts = tuple(_field(x, "answer_start", int, f"{qa_where}.answers")
                               for x in answers)
                example = SquadExample(qid, question, context, texts, starts)
                reason = _training_problem(example) if train else None
                if reason:
                    tally.skip(reason, f"id {qid}")
                    continue
                examples.append(example)
    tally.report(len(examples))
    return examples, tally.as_dict()


def _training_problem(example: SquadExample) -> str | None:
    """Why the example cannot train a span head (None if it can)."""
    if not example.answers:
        return "no answer"
    if not example.question.strip():
        return "empty question"
    text, start = example.answers[0], example.answer_starts[0]
    if not text.strip():
        return "empty answer"
    if example.context[start:start + len(text)] != text:
        return "answer text not at answer_start in the context"
    return None


class SquadTask(base.Task):
    name = "squad"
    head = "qa"
    num_labels = 2
    eval_splits = ("dev",)
    score_metrics = ("f1",)

    def read(self, split: str, data: ml_collections.ConfigDict) -> base.Split:
        if split not in FILES:
            raise ValueError(f"SQuAD has splits train and dev, not {split!r}")
        if data.source == "tfds":
            return self._read_tfds(split, data)
        override = data.train_file if split == "train" else data.eval_file
        path = base.split_file(data, FILES[split], override)
        examples, skipped = read_json(path, train=split == "train")
        return base.Split(split, examples, path, skipped)

    def _read_tfds(self, split: str, data: ml_collections.ConfigDict) -> base.Split:
        records, _, source = tfds_source.load_split("squad/v1.1", _TFDS_SPLITS[split],
                                                    data.tfds_data_dir)
        tally = base.SkipTally(source)
        examples = []
        for r in records:
            answers = r["answers"]
            example = SquadExample(str(r["id"]), r["question"], r["context"],
                                   tuple(answers["text"]), tuple(answers["answer_start"]))
            reason = _training_problem(example) if split == "train" else None
            if reason:
                tally.skip(reason, f"id {example.qid}")
                continue
            examples.append(example)
        tally.report(len(examples))
        return base.Split(split, examples, source, tally.as_dict())

    def featurize(self, split: base.Split, tokenizer: Tokenizer, data: ml_collections.ConfigDict
                  ) -> base.Features:
        return build_features(split.examples, tokenizer, max_length=data.max_length,
                              doc_stride=data.doc_stride, max_query_length=data.max_query_length,
                              train=split.name == "train")

    def evaluate(self, split: base.Split, features: base.Features, outputs: np.ndarray
                 ) -> tuple[dict[str, float], dict[str, Any]]:
        """Args: outputs [rows, length, 2]: start and end logits of every window."""
        predictions, nbest = decode(split.examples, features, outputs[..., 0], outputs[..., 1],
                                    n_best_size=self.n_best_size,
                                    max_answer_length=self.max_answer_length)
        scores = m.squad_scores(predictions, {e.qid: e.answers for e in split.examples})
        return scores, {"predictions": predictions, "nbest": nbest}

    # Decoding settings; `finetune` sets them from the config's data section.
    n_best_size: int = 20
    max_answer_length: int = 30

    def write_predictions(self, directory: str, split: base.Split, predictions: Any) -> str:
        """The official evaluation script's input `{id: answer}`, and the n-best lists beside."""
        path = os.path.join(directory, f"squad_{split.name}.json")
        base.write_json(path, predictions["predictions"])
        base.write_json(os.path.join(directory, f"squad_{split.name}_nbest.json"),
                        predictions["nbest"])
        return path


def _windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, length) of the context windows, as BERT's run_squad.py lays them out."""
    spans, start = [], 0
    while True:
        length = min(num_tokens - start, window)
        spans.append((start, length))
        if start + length >= num_tokens:
            return spans
        start += min(length, stride)


def _max_context(spans: list[tuple[int, int]], num_tokens: int) -> np.ndarray:
    """For each context token, the window where it has the most context on both sides.

    BERT's `_check_is_max_context`: score = min(left, right) + 0.01 · window length.

    Returns:
      int32 [num_tokens]: index into `spans`.
    """
    scores = np.full((len(spans), num_tokens), -np.inf)
    positions = np.arange(num_tokens)
    for i, (start, length) in enumerate(spans):
        inside = (positions >= start) & (positions < start + length)
        left, right = positions - start, start + length - 1 - positions
        scores[i, inside] = (np.minimum(left, right) + 0.01 * length)[inside]
    return np.argmax(scores, axis=0).astype(np.int32)


def build_features(examples: list[SquadExample], tokenizer: Tokenizer, *, max_length: int,
                   doc_stride: int, max_query_length: int, train: bool) -> base.Features:
    """Windows of every example as model rows.

    Returns:
      Features with arrays `input_ids`, `token_type_ids`, `attention_mask` [rows, length]
      (length ≤ max_length) and, when `train`, `start_positions`/`end_positions` [rows]; meta
      `example_index` [rows], `offsets` [rows, length, 2] (character span of each context token in
      its context, −1 elsewhere) and `max_context` [rows, length] (bool).
    """
    specials = tokenizer.num_special_tokens(pair=True)
    if max_query_length + specials + 1 > max_length:
        raise ValueError(f"data.max_query_length ({max_query_length}) leaves no room for the "
                         f"context in data.max_length ({max_length})")
    if doc_stride <= 0:
        raise ValueError(f"data.doc_stride must be positive, got {doc_stride}")
    questions = tokenizer.encode_batch([e.question for e in examples])
    contexts = text_lib.encode_with_offsets(tokenizer, [e.context for e in examples])
    rows: list[tuple] = []
    empty = 0
    for index, (example, question, (ctx_ids, ctx_offsets)) in enumerate(
            zip(examples, questions, contexts)):
        question = question[:max_query_length]
        if not len(ctx_ids):
            empty += 1
            continue
        window = max_length - len(question) - specials
        spans = _windows(len(ctx_ids), window, doc_stride)
        best = _max_context(spans, len(ctx_ids))
        if train:
            answer_start = example.answer_starts[0]
            answer_end = answer_start + len(example.answers[0])
        for span_index, (start, length) in enumerate(spans):
            framed = tokenizer.frame(question, ctx_ids[start:start + length].tolist())
            first = framed.b_start  # Row position of the window's first context token.
            offsets = ctx_offsets[start:start + length]
            labels = (0, 0)
            if train and offsets[0, 0] <= answer_start and offsets[-1, 1] >= answer_end:
                # The last token starting at or before the answer, the first ending at or after.
                token_start = int(np.nonzero(offsets[:, 0] <= answer_start)[0][-1])
                token_end = int(np.nonzero(offsets[:, 1] >= answer_end)[0][0])
                labels = (first + token_start, first + token_end)
            rows.append((index, framed, first, offsets,
                         best[start:start + length] == span_index, labels))
    if empty:
        # Not skipped silently: an evaluation question without windows scores 0.
        logging.warning("%d SQuAD example(s) have an empty context and no windows.", empty)

    length = text_lib.row_length(max((len(r[1].input_ids) for r in rows), default=1),
                                 max_length)
    n = len(rows)
    arrays = {name: np.zeros((n, length), np.int32)
              for name in ("input_ids", "token_type_ids", "attention_mask")}
    arrays["input_ids"][:] = tokenizer.pad_id
    offsets_out = np.full((n, length, 2), -1, np.int32)
    max_context = np.zeros((n, length), bool)
    positions = np.zeros((n, 2), np.int32)
    for r, (_, framed, first, offsets, is_max, labels) in enumerate(rows):
        ids = framed.input_ids
        arrays["input_ids"][r, :len(ids)] = ids
        arrays["attention_mask"][r, :len(ids)] = 1
        arrays["token_type_ids"][r, :len(ids)] = framed.token_type_ids
        offsets_out[r, first:first + len(offsets)] = offsets
        max_context[r, first:first + len(offsets)] = is_max
        positions[r] = labels
    if train:
        arrays["start_positions"] = positions[:, 0].copy()
        arrays["end_positions"] = positions[:, 1].copy()
    meta = {"example_index": np.array([r[0] for r in rows], np.int32), "offsets": offsets_out,
            "max_context": max_context}
    return base.Features(arrays, meta)


def decode(examples: list[SquadExample], features: base.Features, start_logits: np.ndarray,
           end_logits: np.ndarray, *, n_best_size: int, max_answer_length: int
           ) -> tuple[dict[str, str], dict[str, list[dict]]]:
    """Best answer text of every question from its windows' logits.

    Args:
      examples: the split's examples (as featurised).
      features: their windows (`build_features`).
      start_logits, end_logits: float [rows, length].
      n_best_size: starts and ends considered per window, and answers kept per question.
      max_answer_length: longest answer in tokens.

    Returns:
      (predictions, nbest): question id → answer text ("" when no valid span exists), and
      question id → up to `n_best_size` candidates {text, probability, start_logit, end_logit}
      sorted by score, probabilities softmaxed over the kept candidates.
    """
    offsets, max_context = features.meta["offsets"], features.meta["max_context"]
    candidates: dict[int, list[tuple[float, float, float, int, int]]] = {}
    for row, example_index in enumerate(features.meta["example_index"]):
        in_context = offsets[row, :, 0] >= 0
        starts_ok = in_context & max_context[row]
        start = np.where(starts_ok, start_logits[row], -np.inf)
        end = np.where(in_context, end_logits[row], -np.inf)
        top_start = np.argsort(-start, kind="stable")[:n_best_size]
        top_end = np.argsort(-end, kind="stable")[:n_best_size]
        top_start = top_start[np.isfinite(start[top_start])]
        top_end = top_end[np.isfinite(end[top_end])]
        s, e = np.meshgrid(top_start, top_end, indexing="ij")
        ok = (e >= s) & (e - s + 1 <= max_answer_length)
        s, e = s[ok], e[ok]
        # Only a window's n best spans can be among its question's n best.
        order = np.argsort(-(start[s] + end[e]), kind="stable")[:n_best_size]
        found = candidates.setdefault(int(example_index), [])
        for si, ei in zip(s[order], e[order]):
            found.append((float(start[si] + end[ei]), float(start[si]), float(end[ei]),
                          int(offsets[row, si, 0]), int(offsets[row, ei, 1])))
    predictions, nbest = {}, {}
    for index, example in enumerate(examples):
        found = sorted(candidates.get(index, []), key=lambda c: -c[0])
        kept, seen = [], set()
        for score, s_logit, e_logit, char_start, char_end in found:
            text = example.context[char_start:char_end].strip()
            if text in seen:  # Windows overlap: the same span comes from several of them.
                continue
            seen.add(text)
            kept.append((score, s_logit, e_logit, text))
            if len(kept) == n_best_size:
                break
        if not kept:
            predictions[example.qid], nbest[example.qid] = "", []
            continue
        scores = np.array([k[0] for k in kept])
        probabilities = np.exp(scores - scores.max())
        probabilities /= probabilities.sum()
        predictions[example.qid] = kept[0][3]
        nbest[example.qid] = [
            {"text": text, "probability": float(p), "start_logit": s_logit, "end_logit": e_logit}
            for (_, s_logit, e_logit, text), p in zip(kept, probabilities)]
    return predictions, nbest
