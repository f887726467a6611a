"""The prepared-data format: sharded ArrayRecord files of token ids and a JSON manifest.

A prepared directory holds, for each split (`train`, `eval`):

    {split}-{unit:05d}.array_record   one record per piece: its token ids as little-endian uint16
                                      (uint32 when the vocabulary has more than 65 536 ids), no
                                      [CLS]/[SEP] — the packer adds those
    {split}-{unit:05d}.lengths.npy    uint32 [records]: each piece's length, so that every host
                                      can plan the packing of all rows without reading tokens
    token_counts.npy                  int64 [vocab_size]: how often each id occurs in train pieces,
                                      for masking's frequency smoothing
    manifest.json                     tokenizer fingerprint and vocab size, max_len, dtype, the
                                      shards with their record and token counts, a histogram of
                                      piece lengths per split, what was dropped and why, and the
                                      preparation's throughput

A piece is a document, or a part of a long one cut at sentence (else token) boundaries, of at most
`max_len` tokens. ArrayRecord is written with one record per chunk (`group_size:1`), so any
record is read by index without decompressing its neighbours: the loader shuffles globally.

The manifest is written last, atomically; a directory without one is an unfinished preparation.
"""

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator

import numpy as np

MANIFEST = "manifest.json"
TOKEN_COUNTS = "token_counts.npy"
FORMAT_VERSION = 1
SPLITS = ("train", "eval")
# One record per chunk: random access reads exactly the record asked for.
WRITER_OPTIONS = "group_size:1"
LENGTH_DTYPE = np.dtype("<u4")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (BERT's 30 522 do), else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(split: str, unit: int) -> str:
    return f"{split}-{unit:05d}.array_record"


def lengths_path(shard_path: str) -> str:
    """The piece-length file beside a shard."""
    return shard_path[: -len(".array_record")] + ".lengths.npy"


@dataclasses.dataclass(frozen=True)
class Split:
    """The pieces of one split of a prepared directory, readable by global record index.

    Attributes:
      name: "train" or "eval".
      directory: the prepared directory.
      paths: its shard files, in unit order.
      shard_records: records (pieces) in each shard.
      num_tokens: tokens in all pieces (no [CLS]/[SEP]).
      length_histogram: int64 [max_len + 1]; entry n counts pieces of n tokens.
      dtype: the stored id type.
      fingerprint: the tokenizer fingerprint the pieces were made with.
    """

    name: str
    directory: str
    paths: tuple[str, ...]
    shard_records: tuple[int, ...]
    num_tokens: int
    length_histogram: np.ndarray
    dtype: np.dtype
    fingerprint: str

    @property
    def num_records(self) -> int:
        return sum(self.shard_records)

    def data_source(self):
        """A grain/ArrayRecord random-access source of the raw records (bytes)."""
        import grain  # The loader's dependency; preparing data needs only array_record.

        with self._damage_named():
            return grain.sources.ArrayRecordDataSource(list(self.paths))

    @contextlib.contextmanager
    def _damage_named(self) -> Iterator[None]:
        """A shard that fails ArrayRecord's own block checks (garbled after it was written) is a
        ValueError naming the directory: raised in the loader's threads, it stops the run in one
        line instead of ArrayRecord's RuntimeError and its traceback."""
        try:
            yield
        except RuntimeError as error:
            reason = str(error).strip().split("; ")[0] or repr(error)
            raise ValueError(f"the prepared data in {self.directory} is damaged ({reason}); move "
                             "it aside (or set another data.dir) to prepare it again") from None

    def lengths(self) -> np.ndarray:
        """int64 [num_records]: every piece's length, in record order (4 bytes a piece on disk).

        Raises:
          ValueError: if a lengths file disagrees with its shard's record count.
        """
        parts = []
        for path, count in zip(self.paths, self.shard_records):
            lengths = np.load(lengths_path(path))
            if lengths.shape != (count,):
                raise ValueError(f"{lengths_path(path)} has {lengths.shape[0]} lengths for "
                                 f"{count} records: the prepared data is damaged.")
            parts.append(lengths.astype(np.int64))
        return np.concatenate(parts) if parts else np.zeros([0], np.int64)

    def read(self, source, indices: list[int]) -> list[np.ndarray]:
        """Token ids of the records at global `indices`, read from `source` (`data_source()`).

        Raises:
          ValueError: a shard is damaged (`_damage_named`).
        """
        with self._damage_named():
            records = source.__getitems__(indices)
        return [np.frombuffer(r, dtype=self.dtype) for r in records]

    def segments_per_epoch(self, seq_len: int) -> tuple[int, int]:
        """(segments, real tokens incl. [CLS]/[SEP]) one epoch packs at `seq_len`.

        Pieces longer than `seq_len - 2` are cut into several segments by the loader.
        """
        lengths = np.arange(len(self.length_histogram))
        counts = self.length_histogram
        pieces_each = -(-lengths // (seq_len - 2))
        segments = int(np.sum(counts * pieces_each))
        return segments, int(np.sum(counts * lengths)) + 2 * segments

    def rows_per_epoch(self, seq_len: int) -> int:
        """Packed rows in one epoch at `seq_len`, estimated as if there were no padding.

        Best-fit packing pads well under 1 %, so this is within a percent of the true count.
        """
        _, tokens = self.segments_per_epoch(seq_len)
        return -(-tokens // seq_len)


class PreparedDataset:
    """A prepared directory, opened and checked: its manifest, splits and token counts."""

    def __init__(self, directory: str):
        """Opens `directory`.

        Raises:
          FileNotFoundError: no manifest (nothing, or an unfinished preparation, is there), or
            a shard the manifest lists is missing.
          ValueError: a manifest of another format version.
        """
        self.directory = os.fspath(directory)
        path = os.path.join(self.directory, MANIFEST)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No prepared data in {self.directory!r} (data.dir): {MANIFEST} is missing. Run "
                "`python -m distil_flax.data.prepare --config=CONFIG` first (a preparation "
                "that was stopped resumes where it stopped).")
        with open(path, encoding="utf-8") as f:
            self.manifest = json.load(f)
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} has format version {version}; this code reads version "
                             f"{FORMAT_VERSION}. Prepare the data again.")
        for split in SPLITS:
            for shard in self.manifest["splits"][split]["shards"]:
                shard_path = os.path.join(self.directory, shard["path"])
                for needed in (shard_path, lengths_path(shard_path)):
                    if not os.path.isfile(needed):
                        raise FileNotFoundError(f"{needed} is listed in {path} but missing.")

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def max_len(self) -> int:
        return self.manifest["options"]["max_len"]

    def check_tokenizer(self, tokenizer) -> None:
        """Raises ValueError unless the shards were made by this very tokenizer."""
        prepared = self.manifest["tokenizer"]
        if (prepared["fingerprint"], prepared["vocab_size"]) != (
                tokenizer.fingerprint, tokenizer.vocab_size):
            raise ValueError(
                f"The prepared data in {self.directory!r} (data.dir) was tokenized with "
                f"{prepared['path']!r} (vocab size {prepared['vocab_size']}, fingerprint "
                f"{prepared['fingerprint']}), but data.tokenizer is {tokenizer.path!r} (vocab size "
                f"{tokenizer.vocab_size}, fingerprint {tokenizer.fingerprint}): its ids would mean "
                "other tokens. Prepare the data with this tokenizer into another data.dir, or set "
                "data.tokenizer to the one the data was prepared with.")

    def split(self, name: str) -> Split:
        entry = self.manifest["splits"][name]
        shards = entry["shards"]
        return Split(
            name=name, directory=self.directory,
            paths=tuple(os.path.join(self.directory, s["path"]) for s in shards),
            shard_records=tuple(s["records"] for s in shards),
            num_tokens=entry["tokens"],
            length_histogram=np.asarray(entry["length_histogram"], dtype=np.int64),
            dtype=np.dtype(self.manifest["dtype"]), fingerprint=self.fingerprint)

    def token_counts(self) -> np.ndarray:
        """int64 [vocab_size]: occurrences of each id in the train split's pieces."""
        counts = np.load(os.path.join(self.directory, TOKEN_COUNTS))
        if counts.shape != (self.vocab_size,):
            raise ValueError(f"{TOKEN_COUNTS} in {self.directory} has shape {counts.shape}, "
                             f"expected ({self.vocab_size},).")
        return counts
