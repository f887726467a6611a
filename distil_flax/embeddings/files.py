"""The files `evaluate_embeddings` reads: STS pairs, labelled sentences, plain text.

Every malformed line is a ValueError naming the file and line (the command's one `error:` line).
"""

import dataclasses
import math
import os
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class StsPairs:
    sentences1: list[str]
    sentences2: list[str]
    gold: np.ndarray  # float64 [pairs]
    header: bool  # A header line was skipped.


@dataclasses.dataclass
class Labelled:
    labels: list[str]
    texts: list[str]
    header: bool


def _read_lines(path: str, flag: str) -> list[tuple[int, str]]:
    """(line number from 1, line) of every non-blank line of a UTF-8 text file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--{flag}={path}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"--{flag}={path} is a directory, not a file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # A BOM, as spreadsheets write, is not part of line 1.
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); is it "
                         f"the --{flag} file you meant?") from None
    # Split on newlines only: str.splitlines would also split at form feeds, \x1c, U+2028 …
    # inside a sentence, and line numbers in messages would no longer match an editor's.
    lines = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), start=1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        raise ValueError(f"{path} (--{flag}) is empty")
    return lines


def _header_columns(fields: Sequence[str], *names: Sequence[str]) -> list[int] | None:
    """Indices of columns named by a header line (one of each group of `names`), or None."""
    lowered = [f.strip().lower() for f in fields]
    found = []
    for group in names:
        index = next((lowered.index(n) for n in group if n in lowered), None)
        if index is None:
            return None
        found.append(index)
    return found


def _float(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def read_sts(path: str) -> StsPairs:
    """Reads sentence pairs with gold scores (see the module docstring for the format).

    Raises:
      FileNotFoundError / IsADirectoryError: no such file.
      ValueError: not UTF-8, empty, a line without enough fields or with a bad score (file and
        line named), or gold scores that are all equal (Spearman is undefined).
    """
    lines = _read_lines(path, "sts")
    first_no, first = lines[0]
    columns = _header_columns(first.split("\t"), ["sentence1"], ["sentence2"], ["score"])
    exact = columns is None  # Without a header naming them, a line is exactly three fields.
    header = not exact or (len(first.split("\t")) == 3 and _float(first.split("\t")[2]) is None)
    columns = columns or [0, 1, 2]
    s1, s2, gold = [], [], []
    for number, line in lines[1:] if header else lines:
        fields = line.split("\t")
        if (len(fields) != 3) if exact else (len(fields) <= max(columns)):
            need = "3 tab-separated fields (sentence1, sentence2, score)" if exact else (
                f"at least {max(columns) + 1} tab-separated fields (as the header on line "
                f"{first_no})")
            raise ValueError(f"{path}:{number}: expected {need}, found {len(fields)}")
        score = _float(fields[columns[2]])
        if score is None:
            raise ValueError(f"{path}:{number}: score {fields[columns[2]]!r} is not a number")
        s1.append(fields[columns[0]])
        s2.append(fields[columns[1]])
        gold.append(score)
    if not gold:
        raise ValueError(f"{path} (--sts) has a header but no sentence pairs")
    gold = np.asarray(gold, np.float64)
    if len(gold) < 2 or np.all(gold == gold[0]):
        raise ValueError(f"{path} (--sts): Spearman needs gold scores that differ; all "
                         f"{len(gold)} pair(s) score {gold[0]}")
    return StsPairs(s1, s2, gold, header)


def read_labelled(path: str) -> Labelled:
    """Reads labelled texts (see the module docstring for the format).

    Raises:
      FileNotFoundError / IsADirectoryError: no such file.
      ValueError: not UTF-8, empty, a line without a tab or with an empty label (file and line
        named), or fewer than two classes.
    """
    lines = _read_lines(path, "labelled")
    first_no, first = lines[0]
    columns = _header_columns(first.split("\t"), ["label"], ["text", "sentence"])
    labels, texts = [], []
    for number, line in lines[1:] if columns else lines:
        if columns:
            fields = line.split("\t")
            if len(fields) <= max(columns):
                raise ValueError(f"{path}:{number}: expected at least {max(columns) + 1} "
                                 f"tab-separated fields (as the header on line {first_no}), "
                                 f"found {len(fields)}")
            label, text = fields[columns[0]], fields[columns[1]]
        else:
            if "\t" not in line:
                raise ValueError(f"{path}:{number}: expected `label <TAB> text`, found no tab")
            label, text = line.split("\t", 1)  # The text may hold tabs of its own.
        if not label.strip():
            raise ValueError(f"{path}:{number}: the label is empty")
        labels.append(label.strip())
        texts.append(text)
    if len(set(labels)) < 2:
        raise ValueError(f"{path} (--labelled): a probe needs at least two labels, found "
                         f"{sorted(set(labels)) or 'none'}")
    return Labelled(labels, texts, columns is not None)


def read_text(path: str) -> list[str]:
    """One sentence per non-blank line."""
    return [line for _, line in _read_lines(path, "text")]
