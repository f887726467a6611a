"""Per-host batches of a task's rows, held in host memory (GLUE's largest task is 400k rows).

Training: epoch e visits the rows in the order `np.random.default_rng([seed, e]).permutation(n)`;
global batch k of the epoch is positions [k·B, (k+1)·B) of that order (the remainder smaller than
a batch is dropped, a different one each epoch), and host p of P takes rows [p·B/P, (p+1)·B/P)
of it. Every host computes the same order, so hosts agree without talking, and the position is a
small JSON dict saved with checkpoints.

Evaluation: one in-order pass; the last global batch is completed with padding rows (every field
0, `input_ids` the pad id) so that every batch has one shape; outputs past the real rows are
dropped by the caller.
"""

from collections.abc import Iterator
from typing import Any

import numpy as np

Rows = dict[str, np.ndarray]  # Every array has the rows on its first axis.


def _host_slice(global_batch: int, process_index: int, process_count: int) -> slice:
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f"the global batch ({global_batch}) must be positive and divide among "
                         f"{process_count} process(es)")
    per_host = global_batch // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)


class EpochBatches:
    """Endless, resumable, per-host training batches of `rows`, reshuffled every epoch."""

    def __init__(self, rows: Rows, global_batch: int, *, seed: int, process_index: int = 0,
                 process_count: int = 1):
        """Raises ValueError if there are fewer rows than one global batch."""
        self._rows = rows
        self._n = len(next(iter(rows.values())))
        self._global_batch = global_batch
        self._host = _host_slice(global_batch, process_index, process_count)
        if self._n < global_batch:
            raise ValueError(f"{self._n} training rows are fewer than one batch of "
                             f"{global_batch}: lower train.batch_size or add data")
        self._seed = int(seed)
        self._epoch = self._batch = 0
        self._order_epoch, self._order = -1, np.arange(0)

    @property
    def batches_per_epoch(self) -> int:
        return self._n // self._global_batch

    def __iter__(self) -> "EpochBatches":
        return self

    def __next__(self) -> Rows:
        """The next local batch: [global_batch // process_count, ...] per field."""
        if self._batch >= self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        if self._order_epoch != self._epoch:
            self._order = np.random.default_rng([self._seed, self._epoch]).permutation(self._n)
            self._order_epoch = self._epoch
        start = self._batch * self._global_batch
        local = self._order[start:start + self._global_batch][self._host]
        self._batch += 1
        return {k: v[local] for k, v in self._rows.items()}

    def get_state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batch_in_epoch": self._batch, "seed": self._seed,
                "rows": self._n, "global_batch": self._global_batch}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from `get_state()`.

        Raises:
          ValueError: the state was saved with another seed, data or batch size.
        """
        for key, mine in (("seed", self._seed), ("rows", self._n),
                          ("global_batch", self._global_batch)):
            if state.get(key) != mine:
                raise ValueError(f"the saved data position has {key}={state.get(key)!r}, this run "
                                 f"{mine!r}: it was saved with another seed, data or batch size")
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"saved data position epoch={epoch}, batch={batch} is out of range")
        self._epoch, self._batch = epoch, batch


def eval_batches(rows: Rows, global_batch: int, *, pad_id: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Rows]:
    """One in-order pass over `rows` as per-host batches of one shape (see the module docstring).

    Yields:
      Dicts of [global_batch // process_count, ...] arrays.
    """
    host = _host_slice(global_batch, process_index, process_count)
    n = len(next(iter(rows.values())))
    return _padded(rows, n, global_batch, host, pad_id)


def _padded(rows: Rows, n: int, global_batch: int, host: slice, pad_id: int) -> Iterator[Rows]:
    for start in range(0, n, global_batch):
        index = np.arange(start, start + global_batch)[host]
        real = index < n
        batch = {}
        for name, values in rows.items():
            out = np.full((len(index),) + values.shape[1:], pad_id if name == "input_ids" else 0,
                          values.dtype)
            out[real] = values[index[real]]
            batch[name] = out
        yield batch
