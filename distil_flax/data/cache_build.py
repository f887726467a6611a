"""Writing a teacher cache, whatever its targets: the request, one shard per prepared unit written
whole and resumed, and the manifest, last (`teacher_targets` is the format and its reading).

  - Resumable: a shard is written whole under a temporary name and renamed into place
    (`training/atomic`); a rerun keeps the shards that are there and builds the rest. A shard's
    targets depend only on its unit's segments (and, for static masks, on the seed), so a
    resumed build writes the same bytes as an uninterrupted one.
  - Parallel: `units=(k, n)` builds units k, k + n, ... (one of n hosts or processes, as
    `data.prepare --units`); the run without `units` builds what is missing and writes the
    manifest with each shard's size and CRC-32.
  - Refusing: `request.json`, written before any shard, says what the directory is being built
    for; a directory being built for another request is refused rather than mixed.
"""

import json
import os
import time
from collections.abc import Callable

import numpy as np
from absl import logging

from distil_flax.data import records, teacher_targets
from distil_flax.training import atomic, progress

REQUEST = "request.json"

# (split, unit, its first record, its records) → (the shard's array, tokens it read, segments).
ShardFn = Callable[[records.Split, int, int, int], tuple[np.ndarray, int, int]]


def check_request(teacher: str, precision: str, **positive: int) -> None:
    """Refuses, naming the flag, a build without a teacher, of an unknown precision, or with a
    count (`--batch_size`, ...) below 1."""
    if not teacher:
        raise ValueError("no teacher: pass --teacher or set teacher.checkpoint")
    if precision not in teacher_targets.PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(teacher_targets.PRECISIONS)}, "
                         f"got {precision!r}")
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name} must be positive, got {value}")


def unit_segments(split: records.Split, source, first: int, count: int, seq_len: int
                  ) -> list[np.ndarray]:
    """The token ids of every segment of records [first, first + count), in key order."""
    max_piece = seq_len - 2
    pieces = split.read(source, list(range(first, first + count)))
    return [piece[start:start + max_piece] for piece in pieces
            for start in range(0, max(len(piece), 1), max_piece)]


def build_shards(output: str, dataset: records.PreparedDataset, wanted: dict, shard: ShardFn,
                 units: tuple[int, int] | None = None) -> dict | None:
    """Builds (or resumes) every missing shard in `output`, then the manifest.

    Args:
      wanted: what the cache is (its kind, teacher, data, seq_len, options): the request, and
        the manifest's head.
      shard: computes one unit's shard.
      units: (k, n): only units k, k + n, ...; no manifest is written.

    Returns:
      The manifest, or None when `units` built a part.

    Raises:
      ValueError: naming --output, when it holds a cache of another request.
    """
    kind = wanted["kind"]
    os.makedirs(output, exist_ok=True)
    _check_output(output, wanted)
    atomic.remove_stale(output)
    jobs = []
    for name in records.SPLITS:
        split = dataset.split(name)
        first = 0
        for unit, count in enumerate(split.shard_records):
            if units is None or unit % units[1] == units[0]:
                jobs.append((split, unit, first, count))
            first += count
    todo = [job for job in jobs if not os.path.isfile(
        os.path.join(output, teacher_targets.shard_name(job[0].name, job[1], kind)))]
    logging.info("Teacher cache (%s) in %s: %d units, %d already built.", kind, output,
                 len(jobs), len(jobs) - len(todo))
    start, tokens, segments = time.perf_counter(), 0, 0
    with progress.Progress("cache", len(todo), "units") as shown:
        for split, unit, first, count in todo:
            array, unit_tokens, unit_segment_count = shard(split, unit, first, count)
            path = os.path.join(output, teacher_targets.shard_name(split.name, unit, kind))
            with atomic.replaced(path, suffix=".npy") as tmp:
                np.save(tmp, array)
            tokens += unit_tokens
            segments += unit_segment_count
            shown.update(1, segments=segments, tokens=tokens)
    seconds = time.perf_counter() - start
    if units is not None:
        return None
    return _write_manifest(output, dataset, wanted, {
        "seconds": round(seconds, 3), "tokens": tokens, "segments": segments,
        "units": len(todo), "tokens_per_second": round(tokens / max(seconds, 1e-9))})


def _check_output(output: str, wanted: dict) -> None:
    """Refuses a directory that holds (part of) a cache of another request."""
    path = os.path.join(output, REQUEST)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            try:
                found = json.load(f)
            except ValueError:
                found = None
        if found != wanted:
            differ = sorted(k for k in wanted if not isinstance(found, dict)
                            or found.get(k) != wanted[k])
            raise ValueError(f"--output={output!r} holds a teacher cache of another request "
                             f"({', '.join(differ)} differ): choose another --output")
    elif any(name.endswith(".npy") for name in os.listdir(output)):
        raise ValueError(f"--output={output!r} holds cache shards of an unknown request: choose "
                         "another --output")
    else:
        atomic.write_json(path, wanted)


def _write_manifest(output: str, dataset: records.PreparedDataset, wanted: dict,
                    throughput: dict) -> dict:
    kind = wanted["kind"]
    splits = {}
    shape = None
    for name in records.SPLITS:
        split = dataset.split(name)
        counts = teacher_targets.segment_counts(split.lengths(), int(wanted["seq_len"]))
        bounds = np.r_[0, np.cumsum(split.shard_records)]
        shards = []
        for unit in range(len(split.paths)):
            shard = teacher_targets.shard_name(name, unit, kind)
            path = os.path.join(output, shard)
            if not os.path.isfile(path):
                raise ValueError(f"{path} is missing: a part built with --units is not finished; "
                                 "rerun without --units to build it")
            array = np.load(path, mmap_mode="r")
            segments = int(counts[bounds[unit]:bounds[unit + 1]].sum())
            if kind == teacher_targets.KIND and array.shape[0] != segments:
                raise ValueError(f"{path} holds {array.shape[0]} targets for {segments} "
                                 "segments: move it aside and rerun to rebuild it")
            shape = list(array.shape[1:])
            size, crc = teacher_targets.file_crc32(path)
            shards.append({"path": shard, "segments": segments, "rows": int(array.shape[0]),
                           "bytes": size, "crc32": crc})
        splits[name] = {"shards": shards, "segments": int(counts.sum()),
                        "rows": sum(s["rows"] for s in shards)}
    total_bytes = sum(s["bytes"] for split in splits.values() for s in split["shards"])
    tokens = sum(int(dataset.split(n).num_tokens) + 2 * splits[n]["segments"]
                 for n in records.SPLITS)
    manifest = {**wanted, "format_version": teacher_targets.FORMAT_VERSION,
                "splits": splits, "bytes": total_bytes, "tokens": tokens,
                "bytes_per_million_tokens": round(total_bytes / max(tokens, 1) * 1e6),
                "build": throughput}
    if kind == teacher_targets.KIND:
        manifest["width"] = shape[0] if shape else None
    atomic.write_json(os.path.join(output, teacher_targets.MANIFEST), manifest, fsync=True)
    logging.info("Teacher cache (%s) in %s: %d segments, %.1f MB (%.1f MB per million tokens); "
                 "this run %d tokens/s.", kind, output,
                 sum(s["segments"] for s in splits.values()), total_bytes / 1e6,
                 manifest["bytes_per_million_tokens"] / 1e6, throughput["tokens_per_second"])
    return manifest
