r"""Prepares a corpus once per tokenizer: text → token-id pieces in sharded ArrayRecord files.

    python -m distil_flax.data.prepare --config=configs/quickstart.py
    python -m distil_flax.data.prepare --config=configs/distil6.py \
        --config.data.tokenizer=vocab.txt --config.data.dir=data/wiki_en

reads the `data` section of a run config (the same file training takes, so that both agree on
source, tokenizer and output) and writes the format `records.py` describes into `data.dir`.

What happens to a document, in a pool of `data.workers` processes (one unit of the corpus each):
  1. read and decode (`corpus.py` counts empty, undecodable, unparsable and oversized records);
  2. cut into sentences, all sentences tokenized in one batch call (the ids of a document's
     sentences concatenate to the ids of the whole document: sentences are cut before
     whitespace, which every supported tokenizer treats as a word boundary);
  3. dropped and counted if shorter than `data.min_tokens` or if more than
     `data.max_unk_fraction` of its tokens are [UNK] (DistilBERT's preprocessing drops both);
  4. cut into pieces of at most `data.max_len` tokens: whole sentences while they fit, a
     sentence longer than a piece at token boundaries (the loader cuts pieces again, at token
     boundaries, into segments that fit its rows: a `max_len` several times the row length lets
     it fill rows to within a percent, where pieces cut at sentence ends to fit one row each
     would leave 3-11 % of every row empty);
  5. sent to the eval split when a hash of its text falls in 1 of `data.eval_every` buckets (so
     duplicates of a held-out document are held out too), else to train.

Restartable: each unit's shards are renamed into place and then marked done; a rerun skips done
units and a killed run loses only the units in flight. Workers die with the process that started
them, even one killed with SIGKILL, and a rerun first removes the temporary files that killed
processes left. A request file pins what is being prepared: rerunning with another source,
tokenizer or option into the same directory is an error (or, with --overwrite, starts over).

Exit status: 0 when the data is prepared; 1 with one line `error: ...` naming the field, file or
step when the config, an input, the output directory or a worker stops it.

Beyond one machine: the expensive part of a corpus like Wikipedia is parsing the dump, which
TFDS's builders do on Apache Beam (Dataflow, Spark or Flink): `tfds build wikipedia/20230601.en
--file_format=array_record --beam_pipeline_options=...`. Point this at the result
(`--config.data.source=tfds --config.data.paths=wikipedia/20230601.en`): at the ~0.4 M tokens per
core-second measured by `bench/data_loader.py` (bert-base-uncased vocab), a 16-core host
tokenizes its ~4 B tokens in about 10 minutes. Hosts can also share this step: every unit is
independent, so `--units=K/N` on host K of N prepares units K, K+N, ... into a shared
directory, and one last run without it merges the manifest.
"""

import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from distil_flax.data import corpus, records, worker_pool
from distil_flax.data import tokenizer as tokenizer_lib

# Documents tokenized per call: large enough to amortise the call, small enough that one batch of
# sentence ids (Python lists) stays far below a worker's memory.
_DOCUMENTS_PER_BATCH = 256

# Sentence ends: ., ! or ?, optionally closed by a quote or bracket, before whitespace. The
# whitespace stays with the next sentence, so that space-aware tokenizers (byte-level BPE,
# SentencePiece) see the same word boundaries as in the whole document.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?=\s)|(?<=[.!?][\"'”’)\]])(?=\s)")

_REQUEST = "request.json"


@dataclasses.dataclass(frozen=True)
class Options:
    """How documents become pieces (the `data` config fields of the same names)."""

    max_len: int = 2048
    min_tokens: int = 10
    max_unk_fraction: float = 0.5
    eval_every: int = 50
    unit_bytes: int = 64 << 20

    def __post_init__(self):
        if self.max_len < 1:
            raise ValueError(f"data.max_len must be positive, got {self.max_len}.")
        if self.eval_every < 0:
            raise ValueError(f"data.eval_every must be >= 0 (0: no eval split), got "
                             f"{self.eval_every}.")
        if not 0 < self.max_unk_fraction <= 1:
            raise ValueError(f"data.max_unk_fraction must be in (0, 1], got "
                             f"{self.max_unk_fraction}.")
        if self.unit_bytes <= 0:
            raise ValueError(f"data.unit_bytes must be positive, got {self.unit_bytes}.")


def source_spec(data_config) -> corpus.SourceSpec:
    """The `corpus.SourceSpec` of a config's `data` section."""
    return corpus.SourceSpec(
        source=data_config.source, paths=tuple(p for p in data_config.paths.split(",") if p),
        text_field=data_config.text_field, tfds_split=data_config.tfds_split,
        tfds_data_dir=data_config.tfds_data_dir,
        max_document_bytes=data_config.max_document_bytes)


def options(data_config) -> Options:
    return Options(max_len=data_config.max_len, min_tokens=data_config.min_tokens,
                   max_unk_fraction=data_config.max_unk_fraction,
                   eval_every=data_config.eval_every, unit_bytes=data_config.unit_bytes)


# ------------------------------------------------------------------------------ documents


def split_sentences(text: str) -> list[str]:
    """Cuts text before the whitespace that follows a sentence end; "".join gives it back."""
    return _SENTENCE_END.split(text)


def document_pieces(sentences: Sequence[Sequence[int]], max_piece: int) -> list[list[int]]:
    """Groups a document's sentence ids into pieces of at most `max_piece` tokens.

    Whole sentences are added to a piece while they fit; a sentence longer than `max_piece` is
    cut at token boundaries (its first part completes no earlier piece: it starts its own).
    Concatenating the pieces gives back the concatenated sentences.

    Args:
      sentences: token ids of each sentence, in order.
      max_piece: the most tokens in a piece (a row's length minus [CLS] and [SEP]).

    Returns:
      The pieces' token ids, none empty.
    """
    pieces: list[list[int]] = []
    current: list[int] = []
    for ids in sentences:
        if len(current) + len(ids) <= max_piece:
            current.extend(ids)
            continue
        if current:
            pieces.append(current)
        ids = list(ids)
        while len(ids) > max_piece:
            pieces.append(ids[:max_piece])
            ids = ids[max_piece:]
        current = ids
    if current:
        pieces.append(current)
    return pieces


def is_held_out(text: str, eval_every: int) -> bool:
    """Whether a document belongs to the eval split: 1 in `eval_every` by a hash of its text."""
    if eval_every <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % eval_every == 0


# ------------------------------------------------------------------------------ one unit


@dataclasses.dataclass(frozen=True)
class _Job:
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


def _done_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"unit-{index:05d}.json")


def _counts_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"unit-{index:05d}.counts.npy")


class _SplitWriter:
    """Writes one split of one unit to a temporary ArrayRecord file and tracks its counts."""

    def __init__(self, directory: str, split: str, index: int, max_len: int, dtype):
        from array_record.python import array_record_module

        self.name = records.shard_name(split, index)
        self.path = os.path.join(directory, self.name)
        self.tmp = records.temp_path(self.path)
        self.writer = array_record_module.ArrayRecordWriter(self.tmp, records.WRITER_OPTIONS)
        self.dtype = dtype
        self.documents = self.records = self.tokens = 0
        self.histogram = np.zeros(max_len + 1, np.int64)
        self.lengths: list[int] = []

    def write(self, pieces: list[list[int]]) -> None:
        self.documents += 1
        for piece in pieces:
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
        self.writer.close()
        if self.records:
            lengths_path = records.lengths_path(self.path)
            tmp = records.temp_path(lengths_path, ".npy")
            np.save(tmp, np.asarray(self.lengths, records.LENGTH_DTYPE))
            os.replace(tmp, lengths_path)
            os.replace(self.tmp, self.path)
        else:
            os.remove(self.tmp)
        return {"path": self.name if self.records else None, "documents": self.documents,
                "records": self.records, "tokens": self.tokens,
                "length_histogram": self.histogram.tolist()}


def prepare_unit(job: _Job) -> dict[str, Any]:
    """Tokenizes one unit into its train and eval shards; returns (and writes) its summary.

    The shards are renamed into place before the summary is written: a unit with a summary on
    disk is complete.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    tokenizer = _worker_tokenizer(job.tokenizer_path, job.lowercase)
    opts = job.options
    dtype = records.token_dtype(tokenizer.vocab_size)
    writers = {split: _SplitWriter(job.directory, split, job.index, opts.max_len, dtype)
               for split in records.SPLITS}
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    tally = corpus.Tally()
    documents = corpus.read_unit(job.spec, job.unit, tally)
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
            pieces = document_pieces(ids, opts.max_len)
            split = "eval" if is_held_out(text, opts.eval_every) else "train"
            writers[split].write(pieces)
            if split == "train":
                train_ids.extend(pieces)
        if train_ids:
            ids = np.concatenate([np.asarray(p, np.int64) for p in train_ids])
            counts += np.bincount(ids, minlength=tokenizer.vocab_size)
    summary = {"unit": job.unit.describe(), "tally": tally.to_json(),
               "splits": {split: w.finish() for split, w in writers.items()},
               "seconds": time.perf_counter() - start,
               # CPU time of the worker (all its threads): tokens per CPU-second is what one
               # core delivers, whatever else shares the machine.
               "cpu_seconds": time.process_time() - cpu_start}
    tmp = records.temp_path(_counts_path(job.directory, job.index), ".npy")
    np.save(tmp, counts)
    os.replace(tmp, _counts_path(job.directory, job.index))
    records.write_json_atomically(_done_path(job.directory, job.index), summary)
    return summary


# ------------------------------------------------------------------------------ a corpus


def request(data_config, tokenizer: tokenizer_lib.Tokenizer) -> dict[str, Any]:
    """What a preparation is of: source, input files and sizes, tokenizer and options.

    Two preparations with equal requests write identical shards.
    """
    spec = source_spec(data_config)
    inputs: list[Any] = []
    if spec.source in ("text", "jsonl", "parquet"):
        inputs = [[os.path.abspath(f), os.path.getsize(f)]
                  for f in corpus.expand_paths(spec.paths)]
    elif spec.source == "tfds":
        inputs = [os.path.abspath(corpus.tfds_directory(spec))]
    return {
        "format_version": records.FORMAT_VERSION,
        "source": {**dataclasses.asdict(spec), "paths": list(spec.paths)},
        "inputs": inputs,
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
        "options": dataclasses.asdict(options(data_config)),
    }


def default_directory(data_config, tokenizer: tokenizer_lib.Tokenizer) -> str:
    """`data.dir`, or when empty a directory under `data.cache_dir` named by the request."""
    if data_config.dir:
        return os.path.expanduser(data_config.dir)
    key = hashlib.sha256(json.dumps(request(data_config, tokenizer), sort_keys=True).encode())
    return os.path.join(os.path.expanduser(data_config.cache_dir), key.hexdigest()[:16])


def _make_writable(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-test{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"Cannot write prepared data to {directory!r} (data.dir): "
                         f"{e.strerror or e}.") from None


def _check_request(directory: str, wanted: dict[str, Any], overwrite: bool) -> None:
    """Pins the directory to one request; a different one is an error unless overwriting."""
    path = os.path.join(directory, _REQUEST)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            found = json.load(f)
        if found == wanted:
            return
        if not overwrite:
            differ = sorted(k for k in wanted if found.get(k) != wanted[k])
            raise ValueError(
                f"{directory!r} (data.dir) holds a preparation of other data ({', '.join(differ)} "
                "differ). Choose another data.dir, or pass --overwrite to replace it.")
        for name in os.listdir(directory):
            if name.endswith((".array_record", ".json", ".npy")) or ".tmp" in name:
                os.remove(os.path.join(directory, name))
    records.write_json_atomically(path, wanted)


def prepare(
    data_config,
    *,
    tokenizer: tokenizer_lib.Tokenizer | None = None,
    directory: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    units: tuple[int, int] | None = None,
) -> str:
    """Prepares the corpus a config's `data` section names; returns the prepared directory.

    Does nothing for a directory that is already complete for the same request.

    Args:
      data_config: the `data` section of a run config.
      tokenizer: the loaded `data.tokenizer` (loaded here if None).
      directory: output; default `default_directory(data_config, tokenizer)`.
      workers: processes (default `data.workers`; 0 there means every core). 1 works in this
        process.
      overwrite: replace a preparation of another request in `directory`.
      units: (k, n) to prepare only units k, k+n, ... (one of n hosts); no manifest is written.

    Raises:
      ValueError: bad options, an unwritable directory, one holding another preparation, or a
        corpus that yields no training document (the message lists what was dropped).
      FileNotFoundError: inputs that do not exist.
    """
    if tokenizer is None:
        tokenizer = tokenizer_lib.load_tokenizer(data_config.tokenizer, data_config.lowercase)
    directory = directory or default_directory(data_config, tokenizer)
    spec, opts = source_spec(data_config), options(data_config)
    wanted = request(data_config, tokenizer)
    _make_writable(directory)
    _check_request(directory, wanted, overwrite)
    # What killed runs left half-written (never data: only renamed files and summaries count).
    stale = records.remove_stale_temp_files(directory)
    if stale:
        logging.info("Removed %d temporary file(s) of stopped runs from %s: %s", len(stale),
                     directory, ", ".join(stale[:5]) + (", ..." if len(stale) > 5 else ""))
    if os.path.isfile(os.path.join(directory, records.MANIFEST)):
        logging.info("Data in %s is already prepared.", directory)
        return directory

    plan = corpus.plan_units(spec, opts.unit_bytes)
    selected = range(len(plan)) if units is None else range(units[0], len(plan), units[1])
    jobs = [_Job(i, plan[i], spec, opts, tokenizer.path, data_config.lowercase, directory)
            for i in selected
            if not (os.path.isfile(_done_path(directory, i))
                    and os.path.isfile(_counts_path(directory, i)))]
    workers = workers or data_config.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(jobs)))
    logging.info("Preparing %s into %s: %d units (%d already done), %d worker(s).",
                 spec.source, directory, len(selected), len(selected) - len(jobs), workers)
    start = time.perf_counter()
    tokens, cpu_seconds = 0, 0.0
    for done, summary in enumerate(_run(jobs, workers), start=1):
        unit_tokens = sum(s["tokens"] for s in summary["splits"].values())
        tokens += unit_tokens
        cpu_seconds += summary["cpu_seconds"]
        logging.info("Unit %d/%d %s: %d tokens in %.1f s.", done, len(jobs), summary["unit"],
                     unit_tokens, summary["seconds"])
    seconds = time.perf_counter() - start
    throughput = {"seconds": round(seconds, 3), "tokens": tokens, "workers": workers,
                  "units": len(jobs), "tokens_per_second": round(tokens / max(seconds, 1e-9)),
                  "cpu_seconds": round(cpu_seconds, 3),
                  "tokens_per_cpu_second": round(tokens / max(cpu_seconds, 1e-9))}
    if jobs:
        logging.info("Prepared %d tokens in %.1f s: %.0f tokens/s with %d worker(s), %.0f per "
                     "CPU-second.", tokens, seconds, tokens / max(seconds, 1e-9), workers,
                     throughput["tokens_per_cpu_second"])
    if units is None and not os.path.isfile(os.path.join(directory, records.MANIFEST)):
        _write_manifest(directory, plan, wanted, tokenizer, throughput)
    return directory


def _run(jobs: list[_Job], workers: int):
    """Yields each job's summary as it finishes, in this process or a pool of `workers`."""
    if workers == 1:
        for job in jobs:
            yield prepare_unit(job)
        return
    yield from worker_pool.run(prepare_unit, jobs, workers)


def _write_manifest(directory: str, plan: list[corpus.Unit], wanted: dict[str, Any],
                    tokenizer: tokenizer_lib.Tokenizer, throughput: dict[str, Any]) -> None:
    """Merges the unit summaries and counts into token_counts.npy and, last, manifest.json."""
    tally = corpus.Tally()
    splits = {s: {"documents": 0, "records": 0, "tokens": 0, "shards": [],
                  "length_histogram": None} for s in records.SPLITS}
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    for i in range(len(plan)):
        with open(_done_path(directory, i), encoding="utf-8") as f:
            summary = json.load(f)
        tally.merge(corpus.Tally.from_json(summary["tally"]))
        try:
            counts += np.load(_counts_path(directory, i))
        except FileNotFoundError:
            if os.path.isfile(os.path.join(directory, records.MANIFEST)):
                return  # A concurrent preparation of the same request merged first.
            raise
        for name, part in summary["splits"].items():
            split = splits[name]
            for key in ("documents", "records", "tokens"):
                split[key] += part[key]
            histogram = np.asarray(part["length_histogram"], np.int64)
            split["length_histogram"] = (histogram if split["length_histogram"] is None
                                         else split["length_histogram"] + histogram)
            if part["path"]:
                split["shards"].append({"path": part["path"], "records": part["records"],
                                        "tokens": part["tokens"]})
    for split in splits.values():
        split["length_histogram"] = split["length_histogram"].tolist()
    if not splits["train"]["records"]:
        raise ValueError(
            f"No training document came out of {wanted['source']['source']} "
            f"{wanted['source']['paths']}: {dict(tally.counts)} (first cases: {tally.first}); "
            f"{splits['eval']['documents']} document(s) went to eval (data.eval_every="
            f"{wanted['options']['eval_every']}). Check data.paths, data.text_field, "
            "data.min_tokens and data.max_unk_fraction.")
    np.save(os.path.join(directory, records.TOKEN_COUNTS), counts)
    manifest = {
        "format_version": records.FORMAT_VERSION,
        "tokenizer": {"path": os.path.abspath(tokenizer.path),
                      "fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                      "pad_id": tokenizer.pad_id, "unk_id": tokenizer.unk_id,
                      "cls_id": tokenizer.cls_id, "sep_id": tokenizer.sep_id,
                      "mask_id": tokenizer.mask_id},
        "dtype": records.token_dtype(tokenizer.vocab_size).str,
        "source": wanted["source"], "options": wanted["options"], "units": len(plan),
        "splits": splits, "tally": tally.to_json(), "preparation": throughput,
    }
    records.write_json_atomically(os.path.join(directory, records.MANIFEST), manifest)
    for i in range(len(plan)):
        os.remove(_counts_path(directory, i))  # Merged; the unit summaries stay as a record.
    train, held = splits["train"], splits["eval"]
    logging.info("Manifest: train %d documents → %d pieces, %d tokens; eval %d documents, %d "
                 "tokens; read and dropped: %s.", train["documents"], train["records"],
                 train["tokens"], held["documents"], held["tokens"], dict(tally.counts))


# ------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from distil_flax import cli

    del argv

    def job() -> None:
        try:
            _prepare_and_report(flags.FLAGS)
        except KeyboardInterrupt:  # cli's own message is about a training run's checkpoints.
            cli.fail("interrupted; rerun the same command to continue (finished units are "
                     "kept)", status=130)

    # A config, input, directory or worker problem ends in one `error:` line (exit status 1).
    cli.run(job)


def _units(value: str) -> tuple[int, int] | None:
    """The --units flag: "K/N" → (K, N); "" → None."""
    if not value:
        return None
    k, sep, n = value.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise ValueError(f"--units={value!r}: expected K/N, this host's K of N (0 <= K < N)")
    return int(k), int(n)


def _prepare_and_report(flags_) -> None:
    units = _units(flags_.units)
    directory = prepare(flags_.config.data, workers=flags_.workers or None,
                        overwrite=flags_.overwrite, units=units)
    if units is None:
        dataset = records.PreparedDataset(directory)
        manifest = dataset.manifest
        print(f"Prepared data in {directory}: " + ", ".join(
            f"{name} {s['documents']} documents, {s['records']} pieces, {s['tokens']} tokens"
            for name, s in manifest["splits"].items())
            + f"; {manifest['preparation']['tokens_per_second']} tokens/s with "
            f"{manifest['preparation']['workers']} worker(s) this run; counted: "
            f"{manifest['tally']['counts']}.")


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Run config whose `data` section to prepare.",
                                    lock_config=True)
    flags.mark_flag_as_required("config")
    flags.DEFINE_integer("workers", 0, "Worker processes (default: data.workers).")
    flags.DEFINE_bool("overwrite", False, "Replace a preparation of other data in data.dir.")
    flags.DEFINE_string("units", "", "K/N: prepare only units K, K+N, ... (one of N hosts).")


if __name__ == "__main__":
    from distil_flax import cli

    _define_flags()
    cli.main(main)
