"""From a `PackedSplit` to per-host batches of packed rows: a resumable grain pipeline.

One global stream of packed rows, the same on every host, is planned from piece lengths alone
(`records.Split.lengths`, 4 bytes a piece):

    epoch e: a global permutation of all pieces (grain's index shuffle: O(1) memory, new each
             epoch), cut into windows of `window` pieces
    window:  pieces longer than seq_len − 2 cut; best-fit decreasing into rows (`packing.py`);
             the window's rows in a shuffled order
    stream:  the windows' rows one after another, epoch after epoch, without end
    batch k: stream rows [k·G, (k+1)·G) for a global batch of G; host p of P takes rows
             [p·G/P, (p+1)·G/P) of it and reads only the pieces in those rows

Every host plans every window (a few milliseconds of bisection per window, no I/O), so hosts
agree on all batches without talking, and a run on 1 host or 64 sees the same global batches. A
host reads, decodes and writes only its own rows, in `threads` threads, `prefetch` batches ahead
(ArrayRecord reads and numpy release the GIL).

The position is (window, row): `get_state()` is a small JSON dict for the checkpoint, the same
on every host, and `set_state` continues with exactly the batches that would have followed.

Evaluation (`eval_batches`) reads one unshuffled pass of the eval split the same way; the last
global batch is completed with padding rows, and every host runs the same number of batches.
"""

import collections
import dataclasses
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from distil_flax.data import packing, teacher_targets
from distil_flax.data.loader import PackedSplit, Rows

_STATE_VERSION = 1


def _host_slice(global_batch: int, process_index: int, process_count: int) -> slice:
    """This host's contiguous rows of a global batch."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {global_batch}.")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    if global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} does not divide among {process_count} "
                         "processes.")
    per_host = global_batch // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)


@dataclasses.dataclass(frozen=True)
class _Window:
    """The packing plan of one window: its segments, sorted by (row, start).

    Attributes:
      n_rows: rows the window packs into.
      record, offset, length: each segment's piece (global record index), first token within the
        piece and number of tokens (without [CLS]/[SEP]) [segments].
      row, start: each segment's row in the window and start column [segments].
      row_bounds: segments of row r are [row_bounds[r], row_bounds[r + 1]) [n_rows + 1].
    """

    n_rows: int
    record: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    row: np.ndarray
    start: np.ndarray
    row_bounds: np.ndarray


class _RowStream:
    """The global stream of packed rows of a split, planned window by window from lengths."""

    _CACHED_WINDOWS = 16  # Plans kept; prefetching touches a few windows at a time.

    def __init__(self, rows: PackedSplit, seed: int, shuffle: bool, epochs: int | None = None):
        import grain  # Here, not at the top: preparation workers start faster without it.

        self.rows = rows
        self._lengths = rows.split.lengths()
        self.num_records = len(self._lengths)
        self.per_epoch = -(-self.num_records // rows.window)
        self.num_windows = None if epochs is None else epochs * self.per_epoch
        self._seed, self._shuffle = seed, shuffle
        # Record order of epoch e is order[e * num_records + j]: a new permutation every epoch.
        self._order = grain.MapDataset.range(self.num_records).shuffle(seed=seed % 2**32).repeat()
        self._cache: collections.OrderedDict[int, _Window] = collections.OrderedDict()
        self._lock = threading.Lock()

    def window(self, index: int) -> _Window:
        """The plan of window `index` (counted from the first window of epoch 0)."""
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
            plan = self._plan(index)
            self._cache[index] = plan
            if len(self._cache) > self._CACHED_WINDOWS:
                self._cache.popitem(last=False)
            return plan

    def _plan(self, index: int) -> _Window:
        epoch, window = divmod(index, self.per_epoch)
        size = self.rows.window
        positions = range(window * size, min((window + 1) * size, self.num_records))
        if self._shuffle:
            base = epoch * self.num_records
            record_ids = np.array([self._order[base + p] for p in positions], np.int64)
        else:
            record_ids = np.arange(positions.start, positions.stop, dtype=np.int64)
        max_piece = self.rows.seq_len - 2
        lengths = self._lengths[record_ids]
        length = packing.cut_lengths(lengths, max_piece)
        counts = -(-lengths // max_piece)
        record = np.repeat(record_ids, counts)
        # A segment's index among its piece's segments, times the segment length.
        first_segment = np.repeat(np.cumsum(counts) - counts, counts)
        offset = (np.arange(len(record)) - first_segment) * max_piece
        row, start = packing.assign_rows(length + 2, self.rows.seq_len)
        n_rows = int(row.max()) + 1
        if self._shuffle:
            # Best-fit opens rows longest segment first; batches should not follow that order.
            row = np.random.default_rng([self._seed, epoch, window]).permutation(n_rows)[row]
        order = np.lexsort((start, row))
        row = row[order]
        return _Window(n_rows, record[order], offset[order], length[order], row, start[order],
                       np.searchsorted(row, np.arange(n_rows + 1)))


class _Batches:
    """Per-host batch k of a stream, counted from an anchor position (a grain random-access
    source: grain's prefetch threads call `__getitem__` for the batches ahead)."""

    def __init__(self, stream: _RowStream, anchor: tuple[int, int], global_batch: int,
                 host: slice):
        self._stream = stream
        self._anchor_window, self._anchor_row = anchor
        self._global_batch, self._host = global_batch, host
        self._source = stream.rows.split.data_source()
        # _starts[i]: stream row (counted from the anchor window's first row) where window
        # anchor + i starts; extended as batches further ahead are asked for.
        self._starts = [0]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sys.maxsize  # Training streams are endless: a run stops at a step count.

    def _locate(self, q: int) -> tuple[int, int] | None:
        """(window, row in window) of stream row q after the anchor window start; None past
        the end of a bounded stream."""
        with self._lock:
            limit = self._stream.num_windows
            while self._starts[-1] <= q:
                index = self._anchor_window + len(self._starts) - 1
                if limit is not None and index >= limit:
                    return None
                self._starts.append(self._starts[-1] + self._stream.window(index).n_rows)
            i = int(np.searchsorted(self._starts, q, side="right")) - 1
            return self._anchor_window + i, q - self._starts[i]

    def position(self, k: int) -> tuple[int, int] | None:
        """(window, row) where batch k starts."""
        return self._locate(self._anchor_row + k * self._global_batch)

    def __getitem__(self, k: int) -> Rows:
        """This host's rows of batch k: int32 [global_batch / process_count, seq_len] per field,
        and with cached teacher targets theirs (`run_targets.SplitTargets.fill`)."""
        rows = self._stream.rows
        first = self._anchor_row + k * self._global_batch + self._host.start
        n_rows = self._host.stop - self._host.start
        parts = []  # (window plan, first row, last row, first local row)
        done = 0
        while done < n_rows:
            located = self._locate(first + done)
            if located is None:
                break  # Past the end of a bounded stream: the rest is padding.
            index, row = located
            plan = self._stream.window(index)
            take = min(n_rows - done, plan.n_rows - row)
            parts.append((plan, row, row + take, done, index // self._stream.per_epoch))
            done += take
        segments = [(plan, slice(plan.row_bounds[r0], plan.row_bounds[r1]), plan.row[
            plan.row_bounds[r0]:plan.row_bounds[r1]] - r0 + base, epoch)
            for plan, r0, r1, base, epoch in parts]
        wanted = np.unique(np.concatenate([p.record[s] for p, s, _, _ in segments] or
                                          [np.zeros([0], np.int64)]))
        pieces = dict(zip(wanted.tolist(), rows.split.read(self._source, wanted.tolist()))
                      ) if len(wanted) else {}
        tokens, lengths, local_rows, starts, keys, slots, epochs = [], [], [], [], [], [], []
        for plan, sl, local, epoch in segments:
            for record, offset, length in zip(plan.record[sl].tolist(), plan.offset[sl].tolist(),
                                              plan.length[sl].tolist()):
                tokens.append(pieces[record][offset:offset + length])
            lengths.append(plan.length[sl])
            local_rows.append(local)
            starts.append(plan.start[sl])
            keys.append((plan.record[sl], plan.offset[sl]))
            # Segments are sorted by (row, start): a segment's slot is its rank in its row.
            index = np.arange(sl.start, sl.stop)
            slots.append(index - plan.row_bounds[plan.row[index]])
            epochs.append(np.full([len(index)], epoch, np.int64))
        empty = np.zeros([0], np.int64)
        concatenated = lambda parts: np.concatenate(parts) if parts else empty  # noqa: E731
        out = packing.write_rows(
            concatenated(tokens).astype(np.int32), concatenated(lengths),
            concatenated(local_rows), concatenated(starts), n_rows, rows.seq_len, rows.cls_id,
            rows.sep_id, rows.pad_id)
        if rows.targets is not None:
            rows.targets.fill(out, teacher_targets.PackedSegments(
                record=concatenated([k[0] for k in keys]),
                offset=concatenated([k[1] for k in keys]), row=concatenated(local_rows),
                slot=concatenated(slots), start=concatenated(starts),
                epoch=concatenated(epochs)))
        return out


def epoch_packing(rows: PackedSplit, seed: int = 0) -> dict[str, float]:
    """How well one epoch of a split packs: rows, real tokens (with [CLS]/[SEP]) and the padding
    fraction, from lengths alone (for reports and benchmarks; it plans every window)."""
    stream = _RowStream(rows, seed, shuffle=True)
    plans = [stream.window(i) for i in range(stream.per_epoch)]
    n_rows = sum(p.n_rows for p in plans)
    real = sum(int(np.sum(p.length + 2)) for p in plans)
    return {"rows": n_rows, "real_tokens": real,
            "padding_fraction": 1 - real / (n_rows * rows.seq_len)}


class BatchIterator:
    """Endless, resumable per-host batches of packed rows, reshuffled every epoch.

    See the module docstring: every host plans the same global rows and reads only its slice
    [p·b, (p+1)·b) of each global batch, with b = global_batch / process_count.
    """

    def __init__(
        self,
        rows: PackedSplit,
        global_batch: int,
        *,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
    ):
        """Raises ValueError if the batch does not divide among processes or the split is empty."""
        self._host = _host_slice(global_batch, process_index, process_count)
        if not rows.split.num_records:
            raise ValueError(f"The {rows.split.name} split in {rows.split.directory} is empty.")
        self._rows, self._global_batch = rows, global_batch
        self._stream = _RowStream(rows, seed, shuffle)
        # What a state must match to be resumed here. Not the host layout: the stream is the
        # same for any number of hosts, so a run may resume on another one.
        self._identity = {
            "version": _STATE_VERSION, "data": rows.split.fingerprint,
            "split": rows.split.name, "records": rows.split.num_records, "seed": int(seed),
            "shuffle": shuffle, "seq_len": rows.seq_len, "window_size": rows.window,
            "global_batch": global_batch}
        self._start((0, 0))

    def _start(self, anchor: tuple[int, int]) -> None:
        import grain

        self._batches = _Batches(self._stream, anchor, self._global_batch, self._host)
        options = grain.ReadOptions(num_threads=self._rows.threads,
                                    prefetch_buffer_size=self._rows.prefetch)
        self._iterator = iter(grain.MapDataset.source(self._batches).to_iter_dataset(options))

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Rows:
        """The next local batch: int32 [global_batch // process_count, seq_len] per field."""
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """The position after the batches returned so far (JSON; equal on every host)."""
        window, row = self._batches.position(self._iterator.get_state()["next_index"])
        return {**self._identity, "epoch": window // self._stream.per_epoch, "window": window,
                "row": row}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a `get_state` dict.

        Raises:
          ValueError: if the state belongs to other data or settings (another preparation,
            split, seed, seq_len, window or global batch), where its position would mean other
            batches, or is malformed.
        """
        for key, mine in self._identity.items():
            if state.get(key) != mine:
                raise ValueError(
                    f"The data iterator state has {key}={state.get(key)!r}, but this run has "
                    f"{mine!r}: it was saved with other data or settings and cannot resume its "
                    "data position.")
        window, row = state.get("window"), state.get("row")
        if not (isinstance(window, int) and isinstance(row, int) and window >= 0
                and 0 <= row < self._stream.window(window).n_rows):
            raise ValueError(f"Data iterator position window={window!r}, row={row!r} is not a row "
                             "of this data.")
        self.close()
        self._start((window, row))

    def close(self) -> None:
        """Stops the reading threads."""
        self._iterator.close()


def eval_batches(
    rows: PackedSplit,
    global_batch: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    max_batches: int | None = None,
) -> Iterator[Rows]:
    """One in-order pass over a split as per-host batches of a fixed shape.

    The last global batch is completed with all-padding rows (segment_ids 0, positions 0,
    input_ids the pad id), so every batch has one shape and compiles once; their segment ids
    keep them out of every loss and metric. Every host yields the same number of batches.

    Args:
      rows: the split.
      global_batch: rows per global batch (divisible by process_count).
      process_index, process_count: this host's slice of each global batch.
      max_batches: stop after this many batches (None: the whole split).

    Yields:
      Dicts of int32 [global_batch // process_count, seq_len].
    """
    # Validated here, not in the generator, so a bad argument fails at the call.
    host = _host_slice(global_batch, process_index, process_count)
    return _eval_batches(rows, global_batch, host, max_batches)


def _eval_batches(rows: PackedSplit, global_batch: int, host: slice,
                  max_batches: int | None) -> Iterator[Rows]:
    if not rows.split.num_records:
        return
    batches = _Batches(_RowStream(rows, seed=0, shuffle=False, epochs=1), (0, 0), global_batch,
                       host)
    k = 0
    while (max_batches is None or k < max_batches) and batches.position(k) is not None:
        yield batches[k]
        k += 1
