"""Reads the documents of one corpus unit: each source's records, decoded, cleaned and counted.

`corpus.py` describes the sources and plans a corpus as `Unit`s; `read_unit` yields one unit's
documents, `read_documents` those of a whole source. Records that yield no document (empty, not
JSON, without the text field, over `max_document_bytes`) and undecodable bytes are counted in a
`Tally`, never silently dropped.
"""

import itertools
import json
from collections.abc import Iterator, Sequence
from typing import Any

from distil_flax.data import corpus
from distil_flax.data.corpus import SourceSpec, Tally, Unit, bundled_chapters, tfds_source


def read_documents(
    source: str,
    paths: str | Sequence[str] = (),
    text_field: str = "text",
    *,
    tfds_split: str = "train",
    tfds_data_dir: str = "",
    max_document_bytes: int = corpus.DEFAULT_MAX_DOCUMENT_BYTES,
    tally: Tally | None = None,
) -> Iterator[str]:
    """Yields the documents of a source, in order (see the module docstring).

    Args:
      source: one of `SOURCES`.
      paths: for "text", "jsonl" and "parquet", a file path or glob, or a sequence of them (each
        glob expanded in sorted order); for "tfds", the dataset name or directory. Ignored for
        "bundled".
      text_field: the field holding the text (jsonl, parquet, tfds).
      tfds_split, tfds_data_dir: for "tfds".
      max_document_bytes: records above this size are dropped and counted.
      tally: receives the counts of what was read and skipped (a fresh one if None).

    Raises:
      ValueError: unknown source, no paths for a source that needs them, or nothing to read.
      FileNotFoundError: a pattern that matches no file, or a TFDS dataset that is not prepared.
    """
    spec = SourceSpec(source, paths, text_field, tfds_split, tfds_data_dir, max_document_bytes)
    units = corpus.plan_units(spec, unit_bytes=None)
    tally = Tally() if tally is None else tally
    return itertools.chain.from_iterable(read_unit(spec, unit, tally) for unit in units)


def read_unit(spec: SourceSpec, unit: Unit, tally: Tally) -> Iterator[str]:
    """Yields the documents of one unit, counting what it skips in `tally`."""
    if unit.source == "bundled":
        records = ((text.encode(), f"bundled:chapter {i}") for i, text in
                   itertools.islice(enumerate(bundled_chapters()), unit.start, unit.stop))
    elif unit.source == "text":
        records = _text_records(unit, tally)
    elif unit.source == "jsonl":
        records = _jsonl_records(unit, spec.text_field, tally)
    elif unit.source == "parquet":
        records = _parquet_records(unit, spec.text_field, tally)
    else:
        records = _tfds_records(unit, spec, tally)
    for raw, where in records:
        text = _clean(raw, where, spec.max_document_bytes, tally)
        if text is not None:
            tally.add("documents")
            yield text


def _clean(raw: bytes | str, where: str, max_bytes: int, tally: Tally) -> str | None:
    """Decodes, strips and checks one record; None (counted) if it yields no document."""
    if len(raw) > max_bytes:
        tally.add("oversized", f"{where} ({len(raw)} bytes > max_document_bytes={max_bytes})")
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            tally.add("invalid_utf8", where)
            raw = raw.decode("utf-8", errors="replace")
    text = raw.strip()
    if not text:
        tally.add("empty_documents", where)
        return None
    return text


# A file with a NUL byte among its first bytes is not text (git and grep judge the same way).
_SNIFF_BYTES = 8192


def _lines(unit: Unit) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for the lines of a byte range.

    Raises:
      ValueError: the file is not UTF-8 text (binary, UTF-16 or garbled), judged by the first
        unit of the file; a stray bad byte later only costs its document (`invalid_utf8`).
    """
    with open(unit.path, "rb") as f:
        if unit.start == 0 and (nul := f.read(_SNIFF_BYTES).find(b"\0")) >= 0:
            raise ValueError(f"{unit.path} is not UTF-8 text (a NUL byte at offset {nul}: "
                             "binary, UTF-16 or garbled)")
        f.seek(unit.start)
        offset = unit.start
        while offset < unit.stop:
            line = f.readline()
            if not line:
                break
            yield offset, line
            offset += len(line)


def _text_records(unit: Unit, tally: Tally) -> Iterator[tuple[bytes, str]]:
    lines: list[bytes] = []
    first = 0
    for offset, line in _lines(unit):
        line = line.strip()
        if line:
            if not lines:
                first = offset
            lines.append(line)
        elif lines:
            yield b" ".join(lines), f"{unit.path}@{first}"
            lines = []
    if lines:
        yield b" ".join(lines), f"{unit.path}@{first}"


def _jsonl_records(unit: Unit, field: str, tally: Tally) -> Iterator[tuple[str, str]]:
    for offset, line in _lines(unit):
        where = f"{unit.path}@{offset}"
        if not line.strip():
            tally.add("empty_lines", where)
            continue
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            tally.add("invalid_utf8", where)
            try:
                record = json.loads(line.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                tally.add("invalid_json", where)
                continue
        except json.JSONDecodeError as e:
            tally.add("invalid_json", f"{where} ({e.msg})")
            continue
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            tally.add("missing_field", f"{where} (no string field {field!r}; found {keys})")
            continue
        yield text, where


def _parquet_records(unit: Unit, field: str, tally: Tally) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(unit.path)
    if field not in parquet.schema_arrow.names:
        tally.add("missing_field", f"{unit.path} (no column {field!r}; found "
                  f"{parquet.schema_arrow.names})", parquet.metadata.num_rows)
        return
    for group in range(unit.start, unit.stop):
        column = parquet.read_row_group(group, columns=[field]).column(0)
        # Binary columns may hold invalid UTF-8, which _clean counts; string columns are valid.
        for row, value in enumerate(column.to_pylist()):
            if value is None:
                tally.add("missing_field", f"{unit.path}:group {group} row {row} (null)")
                continue
            yield value, f"{unit.path}:group {group} row {row}"


def _tfds_records(unit: Unit, spec: SourceSpec, tally: Tally) -> Iterator[tuple[Any, str]]:
    source, _ = tfds_source(unit.path, spec.tfds_split)
    batch = 256  # Batched reads: ArrayRecord fetches a list of indices in one call.
    for start in range(unit.start, unit.stop, batch):
        indices = list(range(start, min(start + batch, unit.stop)))
        for index, record in zip(indices, source.__getitems__(indices)):
            value = record.get(spec.text_field) if isinstance(record, dict) else None
            where = f"tfds:{unit.path}[{spec.tfds_split}][{index}]"
            if not isinstance(value, (bytes, str)):
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                tally.add("missing_field", f"{where} (no text field {spec.text_field!r}; found "
                          f"{found})")
                continue
            yield value, where
