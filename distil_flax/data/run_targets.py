"""A run's cached teacher targets: every cache of `teacher.cache` opened, checked against the run
and read into packed rows beside their ids (`batches.py` calls `SplitTargets.fill`).

Embedding caches (`teacher_targets`) give the sentence terms their targets: one teacher's
embeddings as they are, several teachers' each L2-normalised, scaled by the square root of its
weight and concatenated (as Jasper and Stella concatenate their teachers' vectors). A logits
cache (`teacher_logits`, at most one) gives L_ce and L_mlm their static masks and the teacher's
top-k distribution there.
"""

import dataclasses

import numpy as np

from distil_flax.data import packing, teacher_logits, teacher_targets
from distil_flax.data.teacher_targets import Expected


class Targets:
    """The cached targets of a run, one cache or several, read per packed segment."""

    def __init__(self, directories: list[str], weights: list[float], expected: Expected):
        """Opens, verifies and checks each cache against the run.

        Raises:
          ValueError: naming `teacher.cache` or `teacher.weights`: no finished cache, a damaged
            shard, a cache made for another teacher, tokenizer, data, seq_len, pooling, masking
            or temperature, more than one logits cache, or a logits cache given a weight.
        """
        if len(weights) != len(directories):
            raise ValueError(f"teacher.weights has {len(weights)} entries for "
                             f"{len(directories)} caches in teacher.cache")
        self.seq_len, self.data = expected.seq_len, expected.data
        self.directories, self.weights, self.manifests = [], [], []
        self.logits = self.logits_directory = None
        for directory, weight in zip(directories, weights):
            manifest = teacher_targets.read_manifest(directory)
            # Several teachers: each is checked for the data; the parameter digest only names
            # the teacher the run loaded, which is the first cache's.
            first = not self.manifests and self.logits is None
            teacher_targets.check(directory, manifest, dataclasses.replace(
                expected, teacher_digest=expected.teacher_digest if first else ""))
            teacher_targets.verify(directory, manifest)
            if manifest["kind"] == teacher_targets.LOGITS:
                if self.logits is not None:
                    raise ValueError(f"teacher.cache lists two logits caches ("
                                     f"{self.logits_directory}, {directory}): L_ce distils one "
                                     "teacher's distribution")
                if weight != 1:
                    raise ValueError(f"teacher.weights gives the logits cache {directory} the "
                                     f"weight {weight:g}: its weight is loss.alpha_ce (give 1)")
                self.logits, self.logits_directory = manifest, directory
                continue
            self.directories.append(directory)
            self.weights.append(weight)
            self.manifests.append(manifest)
        # The student pools as the first teacher does (each teacher's targets are its own).
        self.pooling = self.manifests[0]["pooling"] if self.manifests else None
        self.width = sum(m["width"] for m in self.manifests)  # 0 without an embeddings cache.

    def describe(self) -> str:
        parts = [f"{m['teacher']['spec']} ({m['width']} wide, {m['pooling']} pooling, "
                 f"{m['precision']}, weight {w:g}) from {d}"
                 for d, m, w in zip(self.directories, self.manifests, self.weights)]
        if self.logits is not None:
            m = self.logits
            parts.append(f"{m['teacher']['spec']} (top-{m['top_k']} logits at T={m['temperature']}"
                         f", {m['maskings']} static maskings, {m['precision']}) from "
                         f"{self.logits_directory}")
        return "; ".join(parts)

    def split(self, name: str) -> "SplitTargets":
        split = self.data.split(name)
        return SplitTargets(
            [teacher_targets.CacheSplit(d, m, split, self.seq_len)
             for d, m in zip(self.directories, self.manifests)], self.weights, self.seq_len,
            None if self.logits is None else teacher_logits.LogitSplit(
                self.logits_directory, self.logits, split, self.seq_len))


@dataclasses.dataclass(frozen=True)
class SplitTargets:
    """A split's targets from every cache of a run, combined (see the module docstring)."""

    caches: list[teacher_targets.CacheSplit]
    weights: list[float]
    seq_len: int
    logits: teacher_logits.LogitSplit | None = None

    @property
    def width(self) -> int:
        return sum(c.width for c in self.caches)

    def gather(self, record: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """float32 [n, width] of segments (record, first token `offset`)."""
        parts = [c.gather(record, offset) for c in self.caches]
        if len(parts) == 1:
            return parts[0]  # One teacher: its exact embeddings, as a live teacher gives them.
        return np.concatenate([
            p * (np.sqrt(w) / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), 1e-12))
            for p, w in zip(parts, self.weights)], axis=-1)

    def fill(self, out: dict, segments: teacher_targets.PackedSegments) -> None:
        """Adds the targets of packed rows to their batch `out` (its fields [n_rows, ...]).

        Embeddings: `teacher_targets.FIELD` float32 [n_rows, packing.max_segments(seq_len),
        width], slot s of a row holding its segment s + 1's, zeros where it has none (as
        `pooling.pool_segments` lays out). Logits: `teacher_logits.LogitSplit.fill`.
        """
        if self.caches:
            n_rows = out["input_ids"].shape[0]
            rows = np.zeros([n_rows, packing.max_segments(self.seq_len), self.width], np.float32)
            if len(segments.record):
                rows[segments.row, segments.slot] = self.gather(segments.record, segments.offset)
            out[teacher_targets.FIELD] = rows
        if self.logits is not None:
            self.logits.fill(out, segments)
