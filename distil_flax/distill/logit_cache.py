"""Builds a logits cache: the MLM teacher's top-k logits at E static masks of every segment.

`build(config, output)` cuts every piece of the run's prepared data into the segments the loader
packs at `data.seq_len`, draws masking e of each segment of a unit from one generator seeded by
(seed, e, split, unit) (`masking.static_mask`: the run's masking fields, the training split's
with frequency smoothing, the held-out split's uniform as a live evaluation's), packs the masked
segments into rows (attention stays within a segment, so each one's logits are those of the
segment alone, wherever the loader packs it later), runs the teacher as a live one would (its
parameters cast to `teacher.param_dtype`), and keeps at each masked position its k largest
logits and its log-partition at `loss.temperature` (`data/teacher_logits.py`). Shards are
written, resumed and checked as every cache's (`data/cache_build.py`); the draw depends only on
the seed and the unit, so a resumed build writes the same bytes.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from distil_flax import data
from distil_flax.data import cache_build, packing, records, teacher_logits, teacher_targets
from distil_flax.distill import masking as masking_lib
from distil_flax.distill import teachers
from distil_flax.distill import train as train_lib
from distil_flax.model.encoder import encoder_only
from distil_flax.training import partitioning


def build(c: ml_collections.ConfigDict, output: str, *, teacher: str = "", top_k: int = 64,
          maskings: int = 4, seed: int | None = None, precision: str = "float32",
          batch_size: int = 32, units: tuple[int, int] | None = None) -> dict | None:
    """Builds (or resumes) the logits cache of `teacher` over the config's data in `output`.

    Args:
      c: a distillation config: its data and masking sections, loss.temperature,
        teacher.param_dtype.
      teacher: the teacher (`interop.sources`), with its MLM head; "" for teacher.checkpoint.
      top_k: logits kept per masked position.
      maskings: static maskings of every segment (epoch e trains on masking e mod E).
      seed: of the masks; None: the config's seed.
      precision: float32 or bfloat16, as the logits are stored.
      batch_size: packed rows per teacher forward pass.
      units: (k, n): only units k, k + n, ...; no manifest is written.

    Returns:
      The manifest, or None when `units` built a part.

    Raises:
      ValueError: naming the flag or field: no teacher, one without an MLM head or of another
        vocabulary than the data's, a bad option, an output holding another cache.
    """
    spec = teacher or c.teacher.checkpoint
    cache_build.check_request(spec, precision, top_k=top_k, maskings=maskings,
                              batch_size=batch_size)
    if not c.masking.mask_prob:
        raise ValueError("masking.mask_prob is 0: a logits cache holds the teacher's logits at "
                         "masked positions, and there would be none")
    tokenizer = data.load_tokenizer(c.data.tokenizer, c.data.lowercase)
    if top_k > tokenizer.vocab_size:
        raise ValueError(f"--top_k={top_k} exceeds the vocabulary ({tokenizer.vocab_size})")
    train_rows, _ = data.build_datasets(c.data, tokenizer)
    dataset = records.PreparedDataset(train_rows.split.directory)
    mesh = partitioning.make_mesh(c.mesh)
    model, params, _, _ = teachers.load_teacher(
        c, tokenizer.vocab_size, mesh, partitioning.rules_from_config(c.mesh.rules), spec=spec,
        field="--teacher" if teacher else "teacher.checkpoint", needs_mlm_head=True)
    spec_masks = train_lib.masking_spec(c, tokenizer)
    weights = None
    if c.masking.smoothing:
        weights = masking_lib.smoothing_weights(
            data.token_counts(train_rows, tokenizer.vocab_size), c.masking.smoothing,
            spec_masks.special_ids)
    seed = int(c.seed if seed is None else seed)
    seq_len, temperature = int(c.data.seq_len), float(c.loss.temperature)
    wanted = {
        "kind": teacher_targets.LOGITS,
        "teacher": {"spec": spec, "digest": teacher_targets.parameter_digest(
            jax.device_get(encoder_only(params))), "num_layers": model.num_layers,
            "hidden_size": model.hidden_size, "vocab_size": model.vocab_size},
        "data": teacher_targets.describe_data(dataset), "seq_len": seq_len, "top_k": top_k,
        "maskings": maskings, "seed": seed, "temperature": temperature,
        "masking": {f: c.masking[f] for f in teacher_logits.MASKING_FIELDS},
        "precision": precision, "param_dtype": str(c.teacher.param_dtype)}
    params = partitioning.cast(params, jnp.dtype(c.teacher.param_dtype))
    # Every prediction of a teacher row has a slot: a segment of n tokens holds at most
    # ceil(p·n) ≤ p·n + 1, so a row at most p·seq_len plus one per segment.
    slots = math.ceil(spec_masks.mask_prob * seq_len) + packing.max_segments(seq_len)

    @jax.jit
    def top_logits(input_ids, segment_ids, positions, at):
        logits, _ = model.apply({"params": params}, input_ids, segment_ids, positions,
                                logits_at=at)
        logits = logits.astype(jnp.float32)
        values, ids = jax.lax.top_k(logits, top_k)
        return ids, values, jax.nn.logsumexp(logits / temperature, axis=-1)

    def selection_weights(split):
        # Held-out masks are uniform, as a live run's evaluation draws them (`step.eval_step`):
        # smoothing's rarer tokens would score another task than the live evaluation.
        return weights if split.name == "train" else None

    dtype = teacher_logits.record_dtype(top_k, precision)
    sources = {}

    def shard(split: records.Split, unit: int, first: int, count: int):
        if split.name not in sources:
            sources[split.name] = split.data_source()
        segments = cache_build.unit_segments(split, sources[split.name], first, count, seq_len)
        masked, keys, positions, inputs = [], [], [], []
        for e in range(maskings):
            rng = np.random.default_rng([seed, e, records.SPLITS.index(split.name), unit])
            chosen_by = selection_weights(split)
            for j, ids in enumerate(segments):
                where, read = masking_lib.static_mask(ids, rng, spec_masks, chosen_by)
                corrupted = np.array(ids, np.int32)
                corrupted[where] = read
                masked.append(corrupted)
                keys.append(np.full(len(where), e * len(segments) + j, np.int64))
                positions.append(where)
                inputs.append(read)
        tokens = sum(len(s) + 2 for s in masked)
        out = np.zeros([sum(len(p) for p in positions)], dtype)
        if not len(out):
            return out, tokens, len(segments)
        counts = np.array([len(p) for p in positions])
        lengths = np.array([len(s) for s in masked], np.int64)
        seg_rows, seg_starts = packing.assign_rows(lengths + 2, seq_len)
        n_rows = int(seg_rows.max()) + 1
        rows = packing.write_rows(np.concatenate(masked), lengths, seg_rows, seg_starts, n_rows,
                                  seq_len, tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id)
        position = np.concatenate(positions)
        row = np.repeat(seg_rows, counts)
        column = np.repeat(seg_starts, counts) + 1 + position
        order = np.lexsort((column, row))
        slot = np.empty_like(order)
        slot[order] = np.arange(len(order)) - np.searchsorted(row[order], row[order])
        padded = -(-n_rows // batch_size) * batch_size  # One shape for every batch: one compile.
        at = np.zeros([padded, slots], np.int32)
        at[row, slot] = column
        rows = {k: np.pad(v, ((0, padded - n_rows), (0, 0))) for k, v in rows.items()}
        results = [jax.device_get(top_logits(*(rows[f][b:b + batch_size] for f in (
            "input_ids", "segment_ids", "positions")), at[b:b + batch_size]))
            for b in range(0, padded, batch_size)]
        ids, values, log_z = (np.concatenate([r[i] for r in results]) for i in range(3))
        out["key"], out["position"] = np.concatenate(keys), position
        out["input_id"] = np.concatenate(inputs)
        out["label"] = np.concatenate([s[p] for s, p in zip(segments * maskings, positions)])
        out["top_ids"], out["log_z"] = ids[row, slot], log_z[row, slot]
        out["top_logits"] = teacher_logits.encode_values(values[row, slot], precision)
        return out, tokens, len(segments)

    return cache_build.build_shards(output, dataset, wanted, shard, units)
