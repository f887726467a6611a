r"""Prepares a corpus once per tokenizer: reads the `data` section of a run config (the same file
training takes, so that both agree on source, tokenizer and output) and writes the text as
token-id pieces in sharded ArrayRecord files (the format `records.py` describes) into `data.dir`.

    python -m distil_flax.data.prepare --config=configs/distil6.py \
        --config.data.tokenizer=vocab.txt --config.data.dir=data/wiki_en

Each unit of the corpus is tokenized in a pool of `data.workers` processes (`units.py` says what
happens to a document there: read, cut into sentences and tokenized, dropped if too short or
mostly [UNK], cut into pieces, sent to the train or eval split).

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
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags, logging

from distil_flax.data import corpus, records, worker_pool
from distil_flax.data import tokenizer as tokenizer_lib
from distil_flax.data import units as units_lib
from distil_flax.training import atomic, cli, fields, progress

_REQUEST = "request.json"


def source_spec(data_config) -> corpus.SourceSpec:
    """The `corpus.SourceSpec` of a config's `data` section."""
    return corpus.SourceSpec(
        source=data_config.source, paths=tuple(p for p in data_config.paths.split(",") if p),
        text_field=data_config.text_field, tfds_split=data_config.tfds_split,
        tfds_data_dir=data_config.tfds_data_dir,
        max_document_bytes=data_config.max_document_bytes)


def options(data_config) -> units_lib.Options:
    return units_lib.Options(max_len=data_config.max_len, min_len=data_config.min_len,
                             min_tokens=data_config.min_tokens,
                             max_unk_fraction=data_config.max_unk_fraction,
                             eval_every=data_config.eval_every, unit_bytes=data_config.unit_bytes)


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
    opts = dataclasses.asdict(options(data_config))
    if not opts["min_len"]:  # Fixed lengths: the request of preparations made before min_len.
        del opts["min_len"]
    return {
        "format_version": records.FORMAT_VERSION,
        "source": {**dataclasses.asdict(spec), "paths": list(spec.paths)},
        "inputs": inputs,
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
        "options": opts,
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
    atomic.write_json(path, wanted, indent=1)


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
    stale = atomic.remove_stale(directory)
    if stale:
        logging.info("Removed %d temporary file(s) of stopped runs from %s: %s", len(stale),
                     directory, ", ".join(stale[:5]) + (", ..." if len(stale) > 5 else ""))
    if os.path.isfile(os.path.join(directory, records.MANIFEST)):
        logging.info("Data in %s is already prepared.", directory)
        return directory

    plan = corpus.plan_units(spec, opts.unit_bytes)
    selected = range(len(plan)) if units is None else range(units[0], len(plan), units[1])
    jobs = [units_lib.Job(i, plan[i], spec, opts, tokenizer.path, data_config.lowercase,
                          directory)
            for i in selected
            if not (os.path.isfile(units_lib.done_path(directory, i))
                    and os.path.isfile(units_lib.counts_path(directory, i)))]
    workers = workers or data_config.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(jobs)))
    logging.info("Preparing %s into %s: %d units (%d already done), %d worker(s).",
                 spec.source, directory, len(selected), len(selected) - len(jobs), workers)
    start = time.perf_counter()
    tokens, cpu_seconds, documents, shards = 0, 0.0, 0, 0
    with progress.Progress("prepare", len(jobs), "units") as shown:
        for summary in _run(jobs, workers):
            splits = summary["splits"].values()
            unit_tokens = sum(s["tokens"] for s in splits)
            tokens += unit_tokens
            documents += sum(s["documents"] for s in splits)
            shards += sum(1 for s in splits if s["path"])
            cpu_seconds += summary["cpu_seconds"]
            logging.debug("Unit %s: %d tokens in %.1f s.", summary["unit"], unit_tokens,
                          summary["seconds"])
            shown.update(1, documents=documents, tokens=tokens, shards=shards)
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


def _run(jobs: list[units_lib.Job], workers: int):
    """Yields each job's summary as it finishes, in this process or a pool of `workers`."""
    if workers == 1:
        for job in jobs:
            yield units_lib.prepare_unit(job)
        return
    yield from worker_pool.run(units_lib.prepare_unit, jobs, workers)


def _write_manifest(directory: str, plan: list[corpus.Unit], wanted: dict[str, Any],
                    tokenizer: tokenizer_lib.Tokenizer, throughput: dict[str, Any]) -> None:
    """Merges the unit summaries and counts into token_counts.npy and, last, manifest.json."""
    tally = corpus.Tally()
    splits = {s: {"documents": 0, "records": 0, "tokens": 0, "shards": [],
                  "length_histogram": None} for s in records.SPLITS}
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    for i in range(len(plan)):
        with open(units_lib.done_path(directory, i), encoding="utf-8") as f:
            summary = json.load(f)
        tally.merge(corpus.Tally.from_json(summary["tally"]))
        try:
            counts += np.load(units_lib.counts_path(directory, i))
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
    atomic.write_json(os.path.join(directory, records.MANIFEST), manifest, indent=1)
    for i in range(len(plan)):
        # Merged; the unit summaries stay as a record.
        os.remove(units_lib.counts_path(directory, i))
    train, held = splits["train"], splits["eval"]
    logging.info("Manifest: train %d documents → %d pieces, %d tokens; eval %d documents, %d "
                 "tokens; read and dropped: %s.", train["documents"], train["records"],
                 train["tokens"], held["documents"], held["tokens"], dict(tally.counts))


# ------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str]) -> None:
    del argv
    # A config, input, directory or worker problem ends in one `error:` line (exit status 1);
    # Ctrl-C or SIGTERM stops at once (workers die with this process).
    cli.run(lambda: _prepare_and_report(flags.FLAGS), sigterm_aborts=True,
            interrupted="interrupted; rerun the same command to continue (finished units are "
                        "kept)")


def parse_units(value: str) -> tuple[int, int] | None:
    """The --units flag: "K/N" → (K, N); "" → None."""
    if not value:
        return None
    k, sep, n = value.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise ValueError(f"--units={value!r}: expected K/N, this host's K of N (0 <= K < N)")
    return int(k), int(n)


def _prepare_and_report(flags_) -> None:
    units = parse_units(flags_.units)
    fields.check(flags_.config, fields.DATA)
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
    from ml_collections import config_flags  # Here: the loader benchmark runs without it.

    config_flags.DEFINE_config_file("config", None, "Run config whose `data` section to prepare.",
                                    lock_config=True)
    flags.mark_flag_as_required("config")
    flags.DEFINE_integer("workers", 0, "Worker processes (default: data.workers).")
    flags.DEFINE_bool("overwrite", False, "Replace a preparation of other data in data.dir.")
    flags.DEFINE_string("units", "", "K/N: prepare only units K, K+N, ... (one of N hosts).")


if __name__ == "__main__":
    _define_flags()
    cli.main(main)
