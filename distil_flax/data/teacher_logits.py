"""Cached MLM targets: the teacher's top-k logits at static masks, and each packed row's share.

DistilBERT's L_ce reads the teacher's distribution over the vocabulary at the masked positions.
A logits cache (`python -m distil_flax.cache_teacher --targets=logits`) holds it for E static
maskings of every segment (BERT's original "duplication factor"): masking e of a segment is
drawn once, by the cache's seed, so the cached logits belong to the very inputs the student is
given. Epoch e of training reads masking e mod E; evaluation reads masking 0, whose masks are
uniform (no frequency smoothing), as a live run's evaluation draws them.

Shard `{split}-{unit:05d}.logits.npy` (`teacher_targets.shard_name`): one record per prediction,
sorted by key = masking · (the unit's segments) + segment, then by position:

    key         int64      masking and segment, as above
    position    int16      the token's index in its segment (0: the first token after [CLS])
    input_id    int32      what student and teacher read there: [MASK], a random token, itself
    label       int32      the token
    top_ids     int32[k]   the teacher's k largest logits, largest first ...
    top_logits  [k]        ... their values: float32, or bfloat16 stored as its uint16 bits
    log_z       float32    log Σ_v exp(z_v / T) over the whole vocabulary, at the cache's T

The log-partition keeps the truncated distribution a proper one: the teacher's probabilities of
the top k at temperature T are exp(z / T − log_z), and what they leave is the tail's mass. The
loss (`losses.triple.top_k_kl`) compares the student on those k + 1 outcomes.

A row holds `prediction_slots(seq_len, mask_prob)` predictions: half as many again as a row's
expected share, since each segment's count is drawn by itself. A row whose segments hold more
keeps its first slots' targets (weight 1) and reads the rest of its masked inputs unscored: the
inputs stay exactly what the teacher read, so no target is ever misaligned.
"""

import math
import os

import ml_dtypes
import numpy as np

from distil_flax.data import records, teacher_targets

# The masking section's fields a cache is built with, and that a run must have to read it.
MASKING_FIELDS = ("mask_prob", "replace_with_mask", "replace_with_random", "smoothing")
# The batch fields a logits cache adds to a row (beside overwriting its input_ids).
FIELDS = ("mlm_positions", "mlm_labels", "mlm_weights", "teacher_top_ids", "teacher_top_logits",
          "teacher_log_z")


def record_dtype(k: int, precision: str) -> np.dtype:
    """One stored prediction (see the module docstring)."""
    values = np.uint16 if precision == "bfloat16" else np.float32
    return np.dtype([("key", np.int64), ("position", np.int16), ("input_id", np.int32),
                     ("label", np.int32), ("top_ids", np.int32, (k,)),
                     ("top_logits", values, (k,)), ("log_z", np.float32)])


def encode_values(values: np.ndarray, precision: str) -> np.ndarray:
    values = np.asarray(values, np.float32)
    return values.astype(ml_dtypes.bfloat16).view(np.uint16) if precision == "bfloat16" else values


def prediction_slots(seq_len: int, mask_prob: float) -> int:
    """Prediction slots of a packed row (static)."""
    return max(1, math.ceil(1.5 * mask_prob * seq_len))


class LogitSplit:
    """One split of a logits cache, read into packed rows."""

    def __init__(self, directory: str, manifest: dict, split: records.Split, seq_len: int):
        entry = manifest["splits"][split.name]
        self.precision, self.k = manifest["precision"], int(manifest["top_k"])
        self.maskings = int(manifest["maskings"])
        self.slots = prediction_slots(seq_len, float(manifest["masking"]["mask_prob"]))
        self.index = teacher_targets.SegmentIndex(split, seq_len)
        self.arrays, self.keys = [], []
        for shard, segments in zip(entry["shards"], self.index.shard_segments.tolist()):
            path = os.path.join(directory, shard["path"])
            array = np.load(path, mmap_mode="r")
            keys = np.asarray(array["key"]) if len(array) else np.zeros([0], np.int64)
            if (shard["segments"] != segments or array.shape != (shard["rows"],) or (
                    len(keys) and (keys[-1] >= self.maskings * segments or keys[0] < 0))):
                raise ValueError(f"teacher.cache: {path} holds predictions of other segments "
                                 f"than the data's {segments} in that unit: it belongs to "
                                 "other data")
            self.arrays.append(array)
            self.keys.append(keys)

    def fill(self, out: dict, segments: "teacher_targets.PackedSegments") -> None:
        """Writes the static masks of `segments` into `out`'s input_ids and adds `FIELDS`."""
        n_rows, slots, k = out["input_ids"].shape[0], self.slots, self.k
        fields = {"mlm_positions": np.zeros([n_rows, slots], np.int32),
                  "mlm_labels": np.zeros([n_rows, slots], np.int32),
                  "mlm_weights": np.zeros([n_rows, slots], np.float32),
                  "teacher_top_ids": np.zeros([n_rows, slots, k], np.int32),
                  "teacher_top_logits": np.zeros([n_rows, slots, k], np.float32),
                  "teacher_log_z": np.zeros([n_rows, slots], np.float32)}
        out.update(fields)
        if not len(segments.record):
            return
        shard, local = self.index.locate(segments.record, segments.offset)
        masking = np.asarray(segments.epoch, np.int64) % self.maskings
        found, rows, columns = [], [], []
        for s in np.unique(shard).tolist():
            where = np.flatnonzero(shard == s)
            wanted = masking[where] * self.index.shard_segments[s] + local[where]
            lo = np.searchsorted(self.keys[s], wanted, side="left")
            counts = np.searchsorted(self.keys[s], wanted, side="right") - lo
            # Every prediction of the wanted segments: lo[i], lo[i] + 1, ... for each segment i.
            first = np.repeat(lo - np.cumsum(counts) + counts, counts)
            predictions = self.arrays[s][first + np.arange(counts.sum())]
            found.append(predictions)
            rows.append(np.repeat(segments.row[where], counts))
            columns.append(np.repeat(segments.start[where], counts) + 1
                           + predictions["position"].astype(np.int64))
        predictions, row, column = (np.concatenate(x) for x in (found, rows, columns))
        out["input_ids"][row, column] = predictions["input_id"]
        order = np.lexsort((column, row))
        predictions, row, column = predictions[order], row[order], column[order]
        slot = np.arange(len(row)) - np.searchsorted(row, row, side="left")
        kept = slot < slots
        predictions, row, column, slot = (x[kept] for x in (predictions, row, column, slot))
        fields["mlm_positions"][row, slot] = column
        fields["mlm_labels"][row, slot] = predictions["label"]
        fields["mlm_weights"][row, slot] = 1.0
        fields["teacher_top_ids"][row, slot] = predictions["top_ids"]
        fields["teacher_top_logits"][row, slot] = teacher_targets.decode(
            predictions["top_logits"], self.precision)
        fields["teacher_log_z"][row, slot] = predictions["log_z"]
