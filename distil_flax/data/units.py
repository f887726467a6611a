"""Tokenizes one unit of a corpus into record shards: the work of one preparation worker.

`prepare.py` cuts a corpus into units (`corpus.py`) and runs `prepare_unit` on each, in a pool of
`data.workers` processes; it writes the unit's train and eval shards in the format `records.py`
describes, then a summary that marks the unit done. What happens to a document:
  1. read and decode (`readers.py` counts empty, undecodable, unparsable and oversized records);
  2. cut into sentences, all sentences tokenized in one batch call (the ids of a document's
     sentences concatenate to the ids of the whole document: sentences are cut before
     whitespace, which every supported tokenizer treats as a word boundary);
  3. dropped and counted if shorter than `data.min_tokens` or if more than
     `data.max_unk_fraction` of its tokens are [UNK] (DistilBERT's preprocessing drops both);
  4. cut into pieces of at most `data.max_len` tokens: whole sentences while they fit, a
     sentence longer than a piece at token boundaries; with `data.min_len` > 0 each piece's most
     is drawn between the two instead, log-uniformly and seeded by the document's text, so that
     pieces mix sentence and passage lengths (the loader cuts pieces again, at token
     boundaries, into segments that fit its rows: a `max_len` several times the row length lets
     it fill rows to within a percent, where pieces cut at sentence ends to fit one row each
     would leave 3-11 % of every row empty);
  5. sent to the eval split when a hash of its text falls in 1 of `data.eval_every` buckets (so
     duplicates of a held-out document are held out too), else to train.
"""

import contextlib
import dataclasses
import hashlib
import os
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from distil_flax.data import corpus, readers, records
from distil_flax.data import tokenizer as tokenizer_lib
from distil_flax.training import atomic

# Documents tokenized per call: large enough to amortise the call, small enough that one batch of
# sentence ids (Python lists) stays far below a worker's memory.
_DOCUMENTS_PER_BATCH = 256

# Sentence ends: ., ! or ?, optionally closed by a quote or bracket, before whitespace. The
# whitespace stays with the next sentence, so that space-aware tokenizers (byte-level BPE,
# SentencePiece) see the same word boundaries as in the whole document.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?=\s)|(?<=[.!?][\"'”’)\]])(?=\s)")


@dataclasses.dataclass(frozen=True)
class Options:
    """How documents become pieces (the `data` config fields of the same names)."""

    max_len: int = 2048
    min_len: int = 0
    min_tokens: int = 10
    max_unk_fraction: float = 0.5
    eval_every: int = 50
    unit_bytes: int = 64 << 20

    def __post_init__(self):
        if self.max_len < 1:
            raise ValueError(f"data.max_len must be positive, got {self.max_len}.")
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(f"data.min_len must be in [0, data.max_len={self.max_len}] (0: "
                             f"every piece up to data.max_len), got {self.min_len}.")
        if self.eval_every < 0:
            raise ValueError(f"data.eval_every must be >= 0 (0: no eval split), got "
                             f"{self.eval_every}.")
        if not 0 < self.max_unk_fraction <= 1:
            raise ValueError(f"data.max_unk_fraction must be in (0, 1], got "
                             f"{self.max_unk_fraction}.")
        if self.unit_bytes <= 0:
            raise ValueError(f"data.unit_bytes must be positive, got {self.unit_bytes}.")


# ------------------------------------------------------------------------------ documents


def split_sentences(text: str) -> list[str]:
    """Cuts text before the whitespace that follows a sentence end; "".join gives it back."""
    return _SENTENCE_END.split(text)


def document_pieces(sentences: Sequence[Sequence[int]], max_piece: int, min_piece: int = 0,
                    seed: int = 0) -> list[list[int]]:
    """Groups a document's sentence ids into pieces of at most `max_piece` tokens.

    Whole sentences are added to a piece while they fit; a sentence longer than the piece's most
    is cut at token boundaries (its first part completes no earlier piece: it starts its own).
    Concatenating the pieces gives back the concatenated sentences.

    Args:
      sentences: token ids of each sentence, in order.
      max_piece: the most tokens in a piece (a row's length minus [CLS] and [SEP]).
      min_piece: when positive, each piece's most is drawn from [min_piece, max_piece],
        log-uniformly (as many pieces up to 32 tokens as from 128 to 256), so that one corpus
        gives sentences and passages; 0: every piece's most is max_piece.
      seed: the draws' seed (`text_hash` of the document): a document is cut the same way by
        every preparation and every host.

    Returns:
      The pieces' token ids, none empty.
    """
    draw = _piece_lengths(min_piece, max_piece, seed)
    pieces: list[list[int]] = []
    current: list[int] = []
    most = next(draw)
    for ids in sentences:
        if len(current) + len(ids) <= most:
            current.extend(ids)
            continue
        if current:
            pieces.append(current)
            most = next(draw)
        ids = list(ids)
        while len(ids) > most:
            pieces.append(ids[:most])
            ids = ids[most:]
            most = next(draw)
        current = ids
    if current:
        pieces.append(current)
    return pieces


def _piece_lengths(low: int, high: int, seed: int) -> Iterator[int]:
    """The most tokens of each next piece: `high`, or log-uniform in [low, high] when low > 0."""
    if not low or low >= high:
        while True:
            yield high
    rng = np.random.default_rng(seed)
    log_low, log_high = np.log(low), np.log(high + 1)
    while True:  # floor(e^U) for U uniform in [log low, log(high + 1)): an integer in [low, high].
        yield min(high, int(np.exp(rng.uniform(log_low, log_high))))


def text_hash(text: str) -> int:
    """A stable 64-bit hash of a document's text (its split, and the seed of its cuts)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def is_held_out(text: str, eval_every: int) -> bool:
    """Whether a document belongs to the eval split: 1 in `eval_every` by a hash of its text."""
    if eval_every <= 0:
        return False
    return text_hash(text) % eval_every == 0


# ------------------------------------------------------------------------------ one unit


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything a worker process needs for one unit (picklable)."""

    index: int
    unit: corpus.Unit
    spec: corpus.SourceSpec
    options: Options
    tokenizer_path: str
    lowercase: bool
    directory: str


_WORKER_TOKENIZERS: dict[tuple[str, bool], tokenizer_lib.Tokenizer] = {}


def _worker_tokenizer(path: str, lowercase: bool) -> tokenizer_lib.Tokenizer:
    """The worker process's tokenizer, loaded once per process (a cache, not shared state)."""
    key = (path, lowercase)
    if key not in _WORKER_TOKENIZERS:
        _WORKER_TOKENIZERS[key] = tokenizer_lib.load_tokenizer(path, lowercase=lowercase)
    return _WORKER_TOKENIZERS[key]


def done_path(directory: str, index: int) -> str:
    """Unit `index`'s summary file, whose presence marks the unit done."""
    return os.path.join(directory, f"unit-{index:05d}.json")


def counts_path(directory: str, index: int) -> str:
    """Unit `index`'s train token counts, until the manifest merges them."""
    return os.path.join(directory, f"unit-{index:05d}.counts.npy")


class _SplitWriter:
    """Writes one split of one unit to a temporary ArrayRecord file and tracks its counts."""

    def __init__(self, directory: str, split: str, index: int, max_len: int, dtype):
        from array_record.python import array_record_module

        self.name = records.shard_name(split, index)
        self.path = os.path.join(directory, self.name)
        self.tmp = atomic.temp_path(self.path)
        self.writer = array_record_module.ArrayRecordWriter(self.tmp, records.WRITER_OPTIONS)
        self._open = True
        self.dtype = dtype
        self.documents = self.records = self.tokens = 0
        self.histogram = np.zeros(max_len + 1, np.int64)
        self.lengths: list[int] = []

    def write(self, pieces: list[list[int]]) -> None:
        self.documents += 1
        for piece in pieces:
            with self._write_errors():
                self.writer.write(np.asarray(piece, dtype=self.dtype).tobytes())
            self.histogram[len(piece)] += 1
            self.lengths.append(len(piece))
            self.records += 1
            self.tokens += len(piece)

    def finish(self) -> dict[str, Any]:
        """Renames the shard and its lengths into place (or removes an empty shard).

        Returns:
          The shard's summary for the unit file.
        """
        self._open = False
        with self._write_errors():
            self.writer.close()
        if self.records:
            lengths_path = records.lengths_path(self.path)
            tmp = atomic.temp_path(lengths_path, ".npy")
            np.save(tmp, np.asarray(self.lengths, records.LENGTH_DTYPE))
            atomic.commit(tmp, lengths_path)
            atomic.commit(self.tmp, self.path)
        else:
            os.remove(self.tmp)
        return {"path": self.name if self.records else None, "documents": self.documents,
                "records": self.records, "tokens": self.tokens,
                "length_histogram": self.histogram.tolist()}

    @contextlib.contextmanager
    def _write_errors(self) -> Iterator[None]:
        """ArrayRecord's failures (a full disk among them) are RuntimeErrors: an OSError naming
        the file, as every other failed write is."""
        try:
            yield
        except RuntimeError as error:
            raise OSError(f"writing {self.tmp} failed: {error}") from error

    def abandon(self) -> None:
        """Removes the temporary shard of a unit that failed (the next run would anyway)."""
        if self._open:
            self._open = False
            with contextlib.suppress(RuntimeError):
                self.writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)


def prepare_unit(job: Job) -> dict[str, Any]:
    """Tokenizes one unit into its train and eval shards; returns (and writes) its summary.

    The shards are renamed into place before the summary is written: a unit with a summary on
    disk is complete. A unit that fails removes its temporary shards.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    tokenizer = _worker_tokenizer(job.tokenizer_path, job.lowercase)
    dtype = records.token_dtype(tokenizer.vocab_size)
    writers = {split: _SplitWriter(job.directory, split, job.index, job.options.max_len, dtype)
               for split in records.SPLITS}
    try:
        tally, counts = _tokenize_unit(job, tokenizer, writers)
        splits = {split: w.finish() for split, w in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abandon()
        raise
    summary = {"unit": job.unit.describe(), "tally": tally.to_json(), "splits": splits,
               "seconds": time.perf_counter() - start,
               # CPU time of the worker (all its threads): tokens per CPU-second is what one
               # core delivers, whatever else shares the machine.
               "cpu_seconds": time.process_time() - cpu_start}
    tmp = atomic.temp_path(counts_path(job.directory, job.index), ".npy")
    np.save(tmp, counts)
    atomic.commit(tmp, counts_path(job.directory, job.index))
    atomic.write_json(done_path(job.directory, job.index), summary, indent=1)
    return summary


def _tokenize_unit(job: Job, tokenizer: tokenizer_lib.Tokenizer,
                   writers: dict[str, "_SplitWriter"]) -> tuple[corpus.Tally, np.ndarray]:
    """Reads, filters and tokenizes the unit's documents into `writers`; returns what it met and
    the training split's token counts."""
    opts = job.options
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    tally = corpus.Tally()
    documents = readers.read_unit(job.spec, job.unit, tally)
    while True:
        batch = [text for _, text in zip(range(_DOCUMENTS_PER_BATCH), documents)]
        if not batch:
            break
        sentences = [split_sentences(text) for text in batch]
        flat = tokenizer.encode_batch([s for doc in sentences for s in doc], num_threads=1)
        train_ids: list[list[int]] = []
        offset = 0
        for text, doc_sentences in zip(batch, sentences):
            ids = flat[offset:offset + len(doc_sentences)]
            offset += len(doc_sentences)
            n_tokens = sum(len(s) for s in ids)
            if n_tokens < opts.min_tokens:
                tally.add("too_short", f"{job.unit.describe()}: {text[:40]!r}")
                continue
            n_unk = sum(s.count(tokenizer.unk_id) for s in ids)
            if n_unk > opts.max_unk_fraction * n_tokens:
                tally.add("mostly_unk", f"{job.unit.describe()}: {text[:40]!r}")
                continue
            pieces = document_pieces(ids, opts.max_len, opts.min_len, text_hash(text))
            split = "eval" if is_held_out(text, opts.eval_every) else "train"
            writers[split].write(pieces)
            if split == "train":
                train_ids.extend(pieces)
        if train_ids:
            ids = np.concatenate([np.asarray(p, np.int64) for p in train_ids])
            counts += np.bincount(ids, minlength=tokenizer.vocab_size)
    return tally, counts

