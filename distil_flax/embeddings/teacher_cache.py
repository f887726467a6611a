"""Builds a teacher cache: the teacher's pooled embedding of every packed segment, once.

`build(config, teacher, output)` reads the run's prepared data (preparing it first if missing,
as training does), cuts every piece into the segments the loader packs at `data.seq_len`
(`data/teacher_targets.py` says how they are keyed), embeds them with the teacher as a live
teacher would (its parameters cast to `teacher.param_dtype`, its pooling), and writes one shard
per prepared unit:

  - Resumable: a shard is written whole under a temporary name and renamed into place; a rerun
    keeps the shards that are there and builds the rest. The teacher's inputs are the same
    segments packed the same way on every run, so a resumed build writes the same bytes as an
    uninterrupted one.
  - Parallel: `units=(k, n)` builds units k, k + n, ... (one of n hosts or processes, as
    `data.prepare --units`); the run without `units` builds what is missing and writes the
    manifest, last, with each shard's size and CRC-32.
  - Another tokenizer: a teacher whose tokenizer is not the data's reads each segment's text —
    the data tokenizer's decoding of its ids — tokenised with its own tokenizer and cut to its
    `max_seq_length`, so teachers of other vocabularies and widths serve the same student.
"""

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from distil_flax import data
from distil_flax.data import packing, records, teacher_targets
from distil_flax.embeddings import embed as embed_lib
from distil_flax.embeddings import evaluate as evaluate_lib
from distil_flax.interop import sentence_transformers as st_layout
from distil_flax.training import atomic, partitioning, progress


def _segments(split: records.Split, source, first: int, count: int, seq_len: int
              ) -> list[np.ndarray]:
    """The token ids of every segment of records [first, first + count), in key order."""
    max_piece = seq_len - 2
    pieces = split.read(source, list(range(first, first + count)))
    return [piece[start:start + max_piece] for piece in pieces
            for start in range(0, max(len(piece), 1), max_piece)]


class _Teacher:
    """The teacher as the cache runs it: model, parameters, tokenizer, pooling and length."""

    def __init__(self, c: ml_collections.ConfigDict, spec: str, data_tokenizer: data.Tokenizer):
        model = evaluate_lib.load_model("teacher", spec)
        self.spec, self.path = spec, model.path
        params = embed_lib.encoder_only(model.params)
        self.digest = teacher_targets.parameter_digest(jax.device_get(params))
        self.params = partitioning.cast(params, jnp.dtype(c.teacher.param_dtype))
        self.model = embed_lib.embedding_encoder(model.model_cfg)
        self.model_cfg = model.model_cfg
        pooling = c.loss.embeddings.pooling
        self.pooling = evaluate_lib.resolve_pooling(pooling, model)[0]
        self.tokenizer = data.load_tokenizer(model.tokenizer, model.lowercase) if (
            model.tokenizer) else data_tokenizer
        self.reads_text = self.tokenizer.fingerprint != data_tokenizer.fingerprint
        sentence = st_layout.read_sentence_config(model.path) if model.source == "hf" else None
        limit = int(model.model_cfg.max_position_embeddings) - int(
            model.model_cfg.get("position_offset", 0))
        self.max_len = min(limit, (sentence and sentence.max_seq_length) or limit)
        if not self.reads_text and self.max_len < c.data.seq_len:
            raise ValueError(f"data.seq_len ({c.data.seq_len}) exceeds the teacher's longest "
                             f"input ({self.max_len} tokens)")

    def embed(self, segments: list[np.ndarray], data_tokenizer: data.Tokenizer, seq_len: int,
              batch_size: int) -> np.ndarray:
        """float32 [segments, width]."""
        if self.reads_text:
            texts = [data_tokenizer.decode(ids.tolist(), skip_special_tokens=True)
                     for ids in segments]
            packed = embed_lib.tokenize_and_pack(self.tokenizer, texts, self.max_len)
        else:
            packed = embed_lib.pack_sentences(segments, seq_len, self.tokenizer.cls_id,
                                              self.tokenizer.sep_id, self.tokenizer.pad_id)
        # One shape for every batch of every unit, so the teacher compiles once: all the slots
        # a row can hold, and rows padded to whole batches.
        missing = -packed.rows["input_ids"].shape[0] % batch_size
        packed = dataclasses.replace(
            packed, max_segments=packing.max_segments(packed.rows["input_ids"].shape[1]),
            rows={k: np.pad(v, ((0, missing), (0, 0))) for k, v in packed.rows.items()})
        return embed_lib.embed_packed(self.model, self.params, packed, pooling=self.pooling,
                                      batch_size=batch_size)

    def describe(self) -> dict:
        c = self.model_cfg
        return {"spec": self.spec, "path": self.path, "digest": self.digest,
                "num_layers": int(c.num_layers), "hidden_size": int(c.hidden_size),
                "tokenizer": self.tokenizer.fingerprint, "reads_text": self.reads_text,
                "max_len": self.max_len}


def build(c: ml_collections.ConfigDict, output: str, *, teacher: str = "",
          precision: str = "float32", batch_size: int = 64,
          units: tuple[int, int] | None = None) -> dict | None:
    """Builds (or resumes) the cache of `teacher` over the config's data in `output`.

    Args:
      c: a distillation config: its data section, data.seq_len, teacher.param_dtype and
        loss.embeddings.pooling (auto: the teacher folder's).
      output: the cache directory.
      teacher: the teacher (`interop.sources`); "" for `teacher.checkpoint`.
      precision: float32 or bfloat16, as the targets are stored.
      batch_size: packed rows per teacher forward pass.
      units: (k, n): only units k, k + n, ...; no manifest is written.

    Returns:
      The manifest, or None when `units` built a part.

    Raises:
      ValueError: naming the flag or field: no teacher, a bad precision, a teacher that does not
        fit the data, an output holding a cache of another teacher or data.
    """
    spec = teacher or c.teacher.checkpoint
    if not spec:
        raise ValueError("no teacher: pass --teacher or set teacher.checkpoint")
    if precision not in teacher_targets.PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(teacher_targets.PRECISIONS)}, "
                         f"got {precision!r}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
    tokenizer = data.load_tokenizer(c.data.tokenizer, c.data.lowercase)
    train_rows, _ = data.build_datasets(c.data, tokenizer)
    dataset = records.PreparedDataset(train_rows.split.directory)
    model = _Teacher(c, spec, tokenizer)
    wanted = {"teacher": model.describe(), "data": {
        "directory": dataset.directory, "digest": teacher_targets.data_digest(dataset),
        "tokenizer": dataset.fingerprint}, "seq_len": int(c.data.seq_len),
        "pooling": model.pooling, "precision": precision,
        "param_dtype": str(c.teacher.param_dtype)}
    os.makedirs(output, exist_ok=True)
    _check_output(output, wanted)
    atomic.remove_stale(output)
    seq_len = int(c.data.seq_len)
    jobs = []
    for name in records.SPLITS:
        split = dataset.split(name)
        first = 0
        for unit, (path, count) in enumerate(zip(split.paths, split.shard_records)):
            if units is None or unit % units[1] == units[0]:
                jobs.append((split, unit, first, count))
            first += count
    todo = [job for job in jobs
            if not os.path.isfile(os.path.join(output, teacher_targets.shard_name(
                job[0].name, job[1])))]
    logging.info("Teacher cache of %s (%s pooling, %s) in %s: %d units, %d already built%s.",
                 spec, model.pooling, precision, output, len(jobs), len(jobs) - len(todo),
                 "; the teacher reads each segment's text with its own tokenizer"
                 if model.reads_text else "")
    start, tokens, segments_done = time.perf_counter(), 0, 0
    sources = {}
    with progress.Progress("cache", len(todo), "units") as shown:
        for split, unit, first, count in todo:
            if split.name not in sources:
                sources[split.name] = split.data_source()
            segments = _segments(split, sources[split.name], first, count, seq_len)
            embeddings = model.embed(segments, tokenizer, seq_len, batch_size)
            path = os.path.join(output, teacher_targets.shard_name(split.name, unit))
            with atomic.replaced(path, suffix=".npy") as tmp:
                np.save(tmp, teacher_targets.encode(embeddings, precision))
            tokens += sum(len(s) + 2 for s in segments)
            segments_done += len(segments)
            shown.update(1, segments=segments_done, tokens=tokens)
    seconds = time.perf_counter() - start
    if units is not None:
        return None
    return _write_manifest(output, dataset, wanted, model, {
        "seconds": round(seconds, 3), "tokens": tokens, "segments": segments_done,
        "units": len(todo), "tokens_per_second": round(tokens / max(seconds, 1e-9))})


REQUEST = "request.json"  # What the directory is being built for, written before any shard.


def _check_output(output: str, wanted: dict) -> None:
    """Refuses a directory that holds (part of) a cache of another teacher, data or option."""
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
    elif any(name.endswith(f".{teacher_targets.KIND}.npy") for name in os.listdir(output)):
        raise ValueError(f"--output={output!r} holds cache shards of an unknown request: choose "
                         "another --output")
    else:
        atomic.write_json(path, wanted)


def _write_manifest(output: str, dataset: records.PreparedDataset, wanted: dict,
                    model: _Teacher, throughput: dict) -> dict:
    splits = {}
    width = None
    for name in records.SPLITS:
        split = dataset.split(name)
        counts = teacher_targets.segment_counts(split.lengths(), int(wanted["seq_len"]))
        bounds = np.r_[0, np.cumsum(split.shard_records)]
        shards = []
        for unit in range(len(split.paths)):
            shard = teacher_targets.shard_name(name, unit)
            path = os.path.join(output, shard)
            if not os.path.isfile(path):
                raise ValueError(f"{path} is missing: a part built with --units is not finished; "
                                 "rerun without --units to build it")
            array = np.load(path, mmap_mode="r")
            expected = int(counts[bounds[unit]:bounds[unit + 1]].sum())
            if array.shape[0] != expected:
                raise ValueError(f"{path} holds {array.shape[0]} targets for {expected} "
                                 "segments: move it aside and rerun to rebuild it")
            width = int(array.shape[1])
            size, crc = teacher_targets.file_crc32(path)
            shards.append({"path": shard, "segments": expected, "bytes": size, "crc32": crc})
        splits[name] = {"shards": shards, "segments": int(counts.sum())}
    total_bytes = sum(s["bytes"] for split in splits.values() for s in split["shards"])
    tokens = sum(int(dataset.split(n).num_tokens) + 2 * splits[n]["segments"]
                 for n in records.SPLITS)
    manifest = {**wanted, "format_version": teacher_targets.FORMAT_VERSION,
                "kind": teacher_targets.KIND, "width": width, "splits": splits,
                "bytes": total_bytes, "tokens": tokens,
                "bytes_per_million_tokens": round(total_bytes / max(tokens, 1) * 1e6),
                "build": throughput}
    atomic.write_json(os.path.join(output, teacher_targets.MANIFEST), manifest, fsync=True)
    logging.info("Teacher cache in %s: %d segments of %d, %.1f MB (%.1f MB per million tokens); "
                 "this run %d tokens/s.", output, sum(s["segments"] for s in splits.values()),
                 width, total_bytes / 1e6, manifest["bytes_per_million_tokens"] / 1e6,
                 throughput["tokens_per_second"])
    return manifest
