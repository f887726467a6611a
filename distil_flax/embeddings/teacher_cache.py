"""Builds a teacher cache: the teacher's pooled embedding of every packed segment, once.

`build(config, teacher, output)` reads the run's prepared data (preparing it first if missing,
as training does), cuts every piece into the segments the loader packs at `data.seq_len`
(`data/teacher_targets.py` says how they are keyed), embeds them with the teacher as a live
teacher would (its parameters cast to `teacher.param_dtype`, its pooling), and writes one shard
per prepared unit, resumably and in parallel parts (`data/cache_build.py`).

  - Another tokenizer: a teacher whose tokenizer is not the data's reads each segment's text —
    the data tokenizer's decoding of its ids — tokenised with its own tokenizer and cut to its
    `max_seq_length`, so teachers of other vocabularies and widths serve the same student.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from distil_flax import data
from distil_flax.data import cache_build, packing, records, teacher_targets
from distil_flax.embeddings import embed as embed_lib
from distil_flax.embeddings import evaluate as evaluate_lib
from distil_flax.interop import sentence_transformers as st_layout
from distil_flax.training import partitioning


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
    """Builds (or resumes) the cache of `teacher`'s embeddings over the config's data in `output`.

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
    cache_build.check_request(spec, precision, batch_size=batch_size)
    tokenizer = data.load_tokenizer(c.data.tokenizer, c.data.lowercase)
    train_rows, _ = data.build_datasets(c.data, tokenizer)
    dataset = records.PreparedDataset(train_rows.split.directory)
    model = _Teacher(c, spec, tokenizer)
    seq_len = int(c.data.seq_len)
    wanted = {"kind": teacher_targets.KIND, "teacher": model.describe(),
              "data": teacher_targets.describe_data(dataset), "seq_len": seq_len,
              "pooling": model.pooling, "precision": precision,
              "param_dtype": str(c.teacher.param_dtype)}
    if model.reads_text:
        logging.info("The teacher reads each segment's text with its own tokenizer.")
    sources = {}

    def shard(split: records.Split, unit: int, first: int, count: int):
        del unit  # A unit's targets are those of its records.
        if split.name not in sources:
            sources[split.name] = split.data_source()
        segments = cache_build.unit_segments(split, sources[split.name], first, count, seq_len)
        embeddings = model.embed(segments, tokenizer, seq_len, batch_size)
        return (teacher_targets.encode(embeddings, precision),
                sum(len(s) + 2 for s in segments), len(segments))

    return cache_build.build_shards(output, dataset, wanted, shard, units)
