"""Teacher outputs as data: the cache format, its checks, and each packed segment's targets.

A teacher cache (`python -m distil_flax.cache_teacher`) holds, for every segment the loader can
pack from a prepared directory, one kind of target:

    {split}-{unit:05d}.embeddings.npy   the teacher's pooled sentence embedding: float32 or
                                        bfloat16 (stored as its uint16 bits) [segments of the
                                        unit's pieces, width], in record order
    {split}-{unit:05d}.logits.npy       top-k MLM logits under static masks (`teacher_logits`)
    manifest.json                       written last (`cache_build`): the kind, the teacher (its
                                        spec and a digest of its parameters), the data it was
                                        built over (directory, digest, tokenizer), seq_len, the
                                        kind's options, and each shard with its segment count,
                                        size and CRC-32

A piece of n tokens is packed as ceil(n / (seq_len − 2)) segments, segment j holding its tokens
[j·(seq_len − 2), (j + 1)·(seq_len − 2)) (`batches.py`): the segments, and with them the keys
(record, j), depend only on the prepared lengths and seq_len, never on the shuffle. So a cache
is built once per (teacher, data, seq_len) and serves every epoch, seed and student.

Why .npy and not ArrayRecord: every target is one fixed-size row, so a memory-mapped array reads
any segment's row by index with no decoding and no per-record framing; each shard is still one
file per prepared unit, written whole (`training/atomic.py`) and checked by its CRC-32.

`check` and `verify` hold a cache against the run before a step is taken (`run_targets` opens a
run's caches with them): another teacher, tokenizer, data, seq_len, pooling, masking or
temperature, or a damaged shard, is a ValueError naming `teacher.cache`.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any

import ml_dtypes
import numpy as np

from distil_flax.data import records
from distil_flax.training.checksums import file_crc32

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
KIND = "embeddings"
LOGITS = "logits"  # The other kind (`teacher_logits`).
PRECISIONS = ("float32", "bfloat16")
FIELD = "teacher_embeddings"  # The batch field: float32 [rows, packing.max_segments, width].


def shard_name(split: str, unit: int, kind: str = KIND) -> str:
    return f"{split}-{unit:05d}.{kind}.npy"


def segment_counts(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Segments each piece of `lengths` tokens is packed as at `seq_len` (at least one)."""
    return np.maximum(1, -(-np.asarray(lengths, np.int64) // (seq_len - 2)))


def data_digest(dataset: records.PreparedDataset) -> str:
    """What identifies a preparation's pieces: its tokenizer and every shard's records and
    tokens, with the length histograms (not its timings, which differ between equal runs)."""
    splits = {name: {key: dataset.manifest["splits"][name][key]
                     for key in ("shards", "length_histogram", "records", "tokens")}
              for name in records.SPLITS}
    text = json.dumps({"tokenizer": dataset.manifest["tokenizer"]["fingerprint"],
                       "splits": splits}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_data(dataset: records.PreparedDataset) -> dict:
    """The data a cache is built over, as its manifest names it."""
    return {"directory": dataset.directory, "digest": data_digest(dataset),
            "tokenizer": dataset.fingerprint}


def parameter_digest(params: Any) -> str:
    """A digest of an encoder's parameters as float32 (names, shapes and values), so that a
    cache names the very weights it was computed with, whatever folder or format held them."""
    digest = hashlib.sha256()

    def visit(prefix: str, tree: Any) -> None:
        if isinstance(tree, dict) or hasattr(tree, "items"):
            for key in sorted(tree):
                visit(f"{prefix}/{key}", tree[key])
            return
        array = np.ascontiguousarray(np.asarray(tree, np.float32))
        digest.update(f"{prefix}:{array.shape};".encode())
        digest.update(array.tobytes())

    visit("", params)
    return digest.hexdigest()[:16]


def encode(embeddings: np.ndarray, precision: str) -> np.ndarray:
    """float32 [n, width] as stored: float32, or bfloat16's bits as uint16."""
    embeddings = np.asarray(embeddings, np.float32)
    if precision == "bfloat16":
        return embeddings.astype(ml_dtypes.bfloat16).view(np.uint16)
    return embeddings


def decode(stored: np.ndarray, precision: str) -> np.ndarray:
    if precision == "bfloat16":
        return stored.view(ml_dtypes.bfloat16).astype(np.float32)
    return np.asarray(stored, np.float32)


@dataclasses.dataclass(frozen=True)
class Expected:
    """What a run needs of a cache (`Targets.open` refuses a cache made for anything else)."""

    data: records.PreparedDataset
    seq_len: int
    pooling: str  # "" takes the cache's (loss.embeddings.pooling=auto).
    teacher_digest: str = ""  # Of the teacher the run loaded, "" when it loads none.
    # What a logits cache must have been built with: the run's masking section's fields
    # (`teacher_logits.MASKING_FIELDS`) and loss.temperature.
    masking: dict | None = None
    temperature: float | None = None


class SegmentIndex:
    """Where a split's packed segments are in a cache: their shard and their index in it."""

    def __init__(self, split: records.Split, seq_len: int):
        counts = segment_counts(split.lengths(), seq_len)
        self.seq_len = seq_len
        # The segment index of each record's first segment.
        self.record_base = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.shard_segments = np.add.reduceat(
            counts, np.r_[0, np.cumsum(split.shard_records)[:-1]]).astype(np.int64) if len(
                counts) else np.zeros([len(split.shard_records)], np.int64)
        self.bounds = np.r_[0, np.cumsum(self.shard_segments)].astype(np.int64)

    def locate(self, record: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, index within the shard) of segments (record, first token `offset`)."""
        keys = self.record_base[record] + np.asarray(offset, np.int64) // (self.seq_len - 2)
        shard = np.searchsorted(self.bounds, keys, side="right") - 1
        return shard, keys - self.bounds[shard]


class CacheSplit:
    """One split of one embeddings cache: every segment's stored row, by (record, segment)."""

    def __init__(self, directory: str, manifest: dict, split: records.Split, seq_len: int):
        entry = manifest["splits"][split.name]
        self.precision = manifest["precision"]
        self.width = manifest["width"]
        self.index = SegmentIndex(split, seq_len)
        self.arrays = []
        for shard, expected in zip(entry["shards"], self.index.shard_segments.tolist()):
            path = os.path.join(directory, shard["path"])
            array = np.load(path, mmap_mode="r")
            if array.shape != (shard["segments"], self.width) or shard["segments"] != expected:
                raise ValueError(
                    f"teacher.cache: {path} holds {array.shape[0]} targets, but the data has "
                    f"{expected} segments in that unit: it belongs to other data")
            self.arrays.append(array)

    def gather(self, record: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """float32 [n, width]: the targets of segments (record, first token `offset`)."""
        shard, local = self.index.locate(record, offset)
        out = np.empty([len(shard), self.width], np.float32)
        for s in np.unique(shard).tolist():
            where = shard == s
            out[where] = decode(self.arrays[s][local[where]], self.precision)
        return out


def read_manifest(directory: str) -> dict:
    """A cache's manifest.

    Raises:
      ValueError: naming `teacher.cache`, when there is none (an unfinished build) or it is
        garbled or of another format.
    """
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"teacher.cache={directory!r} holds no finished cache ({MANIFEST} is "
                         "missing): run (or rerun, to resume) python -m distil_flax.cache_teacher")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        version, kind = manifest["format_version"], manifest["kind"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"teacher.cache: {path} is unreadable ({error}); build the cache "
                         "again") from None
    if version != FORMAT_VERSION or kind not in (KIND, LOGITS):
        raise ValueError(f"teacher.cache: {path} is a {kind!r} cache of format {version}; this "
                         f"code reads {KIND!r} and {LOGITS!r} caches of format {FORMAT_VERSION}")
    return manifest


def verify(directory: str, manifest: dict) -> None:
    """Checks every shard's size and CRC-32 against the manifest.

    Raises:
      ValueError: naming the first file that is missing, truncated or garbled.
    """
    for split in records.SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            path = os.path.join(directory, shard["path"])
            if not os.path.isfile(path):
                raise ValueError(f"teacher.cache: {path} is listed in its manifest but missing")
            size, crc = file_crc32(path)
            if (size, crc) != (shard["bytes"], shard["crc32"]):
                raise ValueError(
                    f"teacher.cache: {path} does not match its manifest ({size} bytes, CRC-32 "
                    f"{crc:#010x}; {shard['bytes']} and {shard['crc32']:#010x} were written): "
                    "it is damaged; move it aside and rerun cache_teacher to rebuild it")


def check(directory: str, manifest: dict, expected: Expected) -> None:
    """Raises ValueError naming `teacher.cache` when the cache was made for another teacher,
    tokenizer, data, seq_len, pooling (embeddings), masking or temperature (logits) than the
    run's."""
    named = f"teacher.cache={directory!r}"
    data = manifest["data"]
    if data["tokenizer"] != expected.data.fingerprint:
        raise ValueError(f"{named} was built over data tokenized with another tokenizer "
                         f"(fingerprint {data['tokenizer']}, the run's "
                         f"{expected.data.fingerprint})")
    if data["digest"] != data_digest(expected.data):
        raise ValueError(f"{named} was built over other data ({data['directory']}, digest "
                         f"{data['digest']}) than the run's {expected.data.directory} (digest "
                         f"{data_digest(expected.data)})")
    if manifest["seq_len"] != expected.seq_len:
        raise ValueError(f"{named} was built at data.seq_len={manifest['seq_len']}, which cuts "
                         f"pieces into other segments than the run's {expected.seq_len}")
    if manifest["kind"] == LOGITS:
        _check_masking(named, manifest, expected)
    elif expected.pooling and manifest["pooling"] != expected.pooling:
        raise ValueError(f"{named} holds {manifest['pooling']}-pooled embeddings, but "
                         f"loss.embeddings.pooling is {expected.pooling}")
    teacher = manifest["teacher"]
    if expected.teacher_digest and teacher["digest"] != expected.teacher_digest:
        raise ValueError(
            f"{named} was made with another teacher ({teacher['spec']}, parameter digest "
            f"{teacher['digest']}) than teacher.checkpoint's (digest {expected.teacher_digest})")


def _check_masking(named: str, manifest: dict, expected: Expected) -> None:
    for field, built in manifest["masking"].items():
        if expected.masking is not None and expected.masking[field] != built:
            raise ValueError(f"{named} holds the teacher's logits under static masks drawn with "
                             f"masking.{field}={built}, but the run has {expected.masking[field]}")
    if expected.temperature is not None and manifest["temperature"] != expected.temperature:
        raise ValueError(f"{named} holds the teacher's log-partition at loss.temperature="
                         f"{manifest['temperature']}, but the run has {expected.temperature}")


@dataclasses.dataclass(frozen=True)
class PackedSegments:
    """The segments of some packed rows, as the loader placed them: each one's piece (global
    record index) and first token there, row, slot (its rank in the row), start column, and the
    epoch it is read in [segments]."""

    record: np.ndarray
    offset: np.ndarray
    row: np.ndarray
    slot: np.ndarray
    start: np.ndarray
    epoch: np.ndarray
