"""From a document source to per-host batches of packed ids: build once, then iterate.

The whole corpus is tokenised and packed up front into a few int32 arrays held in host memory
(the bundled corpus: ~7.5k rows of 128, under 12 MB), then served by index. Batches carry only
ids; masking happens on device, so the host never limits step time.

Multi-host: every host builds the same rows and draws the same permutation (seeded by
`[seed, epoch]`), then takes its own contiguous slice of each global batch, so hosts agree on
the global batch without talking to each other and the iterator's state is one small dict.
"""

from collections.abc import Iterator, Sequence
import itertools

from absl import logging
import numpy as np

from distil_flax.data import corpus
from distil_flax.data import packing
from distil_flax.data import tokenizer as tokenizer_lib

Rows = dict[str, np.ndarray]  # packing.FIELDS → int32 [rows, seq_len].

# Documents per tokeniser call: enough to keep every backend thread busy, few enough that the
# Python lists of ids for one batch stay small before they become int32 arrays.
_TOKENIZE_BATCH = 512


def build_datasets(
    *,
    source: str,
    paths: str | Sequence[str],
    jsonl_field: str,
    tokenizer: tokenizer_lib.Tokenizer,
    seq_len: int,
    eval_every: int,
) -> tuple[Rows, Rows]:
    """Reads, tokenises and packs a source into train and eval rows.

    Document i goes to the eval split when `i % eval_every == 0` (so document 0 is held out),
    to train otherwise. Splitting by document, before packing, keeps held-out text out of the
    training rows entirely.

    Args:
      source, paths, jsonl_field: see `corpus.read_documents`.
      tokenizer: turns documents into ids; its [CLS]/[SEP]/[PAD] ids frame the segments.
      seq_len: packed row length.
      eval_every: hold out every n-th document; 0 disables the eval split (eval rows are then
        empty, shape [0, seq_len]).

    Returns:
      (train_rows, eval_rows), each as `packing.pack_documents` returns.

    Raises:
      ValueError: negative `eval_every`, or a train split that packs to no rows.
    """
    if eval_every < 0:
        raise ValueError(f"eval_every must be >= 0 (0: no eval split), got {eval_every}.")
    train_docs: list[np.ndarray] = []
    eval_docs: list[np.ndarray] = []
    documents = corpus.read_documents(source, paths, jsonl_field)
    index = 0
    for batch in _batched(documents, _TOKENIZE_BATCH):
        for ids in tokenizer.encode_batch(batch):
            held_out = eval_every > 0 and index % eval_every == 0
            (eval_docs if held_out else train_docs).append(np.asarray(ids, dtype=np.int32))
            index += 1

    def pack(docs):
        return packing.pack_documents(docs, seq_len, tokenizer.cls_id, tokenizer.sep_id,
                                      tokenizer.pad_id)

    train_rows, eval_rows = pack(train_docs), pack(eval_docs)
    for name, docs, rows in (("train", train_docs, train_rows), ("eval", eval_docs, eval_rows)):
        logging.info("%s split: %d documents, %d tokens → %d rows of %d (%.1f%% padding).",
                     name, len(docs), sum(len(d) for d in docs), len(rows["input_ids"]),
                     seq_len, 100 * packing.padding_fraction(rows))
    if not len(train_rows["input_ids"]):
        raise ValueError(
            f"The train split is empty: source {source!r} gave {index} document(s), "
            f"{len(eval_docs)} held out for eval (eval_every={eval_every}) and no tokens left to "
            "train on. Add data or raise eval_every (0 disables the eval split).")
    return train_rows, eval_rows


def _batched(items, n: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, n)):
        yield batch


def token_counts(rows: Rows, vocab_size: int) -> np.ndarray:
    """How often each id occurs on non-padding positions ([CLS]/[SEP] included).

    Used for masking's frequency smoothing, which zeroes the special ids' weights itself.

    Returns:
      int64 [vocab_size].
    """
    ids = rows["input_ids"][rows["segment_ids"] > 0]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"Token ids span [{ids.min()}, {ids.max()}], outside a vocabulary of "
                         f"{vocab_size}: rows and tokenizer do not match.")
    return np.bincount(ids, minlength=vocab_size).astype(np.int64)


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


class BatchIterator:
    """Endless, resumable, per-host batches of rows, reshuffled every epoch.

    Epoch e visits rows in the order `np.random.default_rng([seed, e]).permutation(n_rows)`
    (identity when `shuffle=False`); global batch k of the epoch is positions
    [k·global_batch, (k+1)·global_batch) of that order, and the remainder smaller than a global
    batch is dropped. This host gets rows [p·b, (p+1)·b) of each global batch, with
    b = global_batch / process_count and p = process_index.

    The position (`get_state`) is a small JSON dict saved with checkpoints; `set_state` on a
    fresh iterator over the same rows and seed continues with exactly the batches that followed.
    """

    def __init__(
        self,
        rows: Rows,
        global_batch: int,
        *,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
    ):
        """Raises ValueError if the batch does not divide among processes or exceeds the rows."""
        self._rows = rows
        self._n_rows = len(rows["input_ids"])
        self._global_batch = global_batch
        self._host = _host_slice(global_batch, process_index, process_count)
        if self._n_rows < global_batch:
            raise ValueError(
                f"The dataset has {self._n_rows} rows, fewer than one global batch of "
                f"{global_batch}: lower the batch size or seq_len, or add data.")
        self._seed = int(seed)
        self._shuffle = shuffle
        self._epoch = 0
        self._batch = 0  # Index of the next global batch within the epoch.
        self._order_epoch, self._order = -1, np.arange(0)

    @property
    def batches_per_epoch(self) -> int:
        return self._n_rows // self._global_batch

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Rows:
        """The next local batch: int32 [global_batch // process_count, seq_len] per field."""
        if self._batch >= self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        start = self._batch * self._global_batch
        window = self._epoch_order()[start:start + self._global_batch]
        local = window[self._host]
        self._batch += 1
        return {k: v[local] for k, v in self._rows.items()}

    def _epoch_order(self) -> np.ndarray:
        """Row order of the current epoch, computed once per epoch."""
        if self._order_epoch != self._epoch:
            if self._shuffle:
                rng = np.random.default_rng([self._seed, self._epoch])
                self._order = rng.permutation(self._n_rows)
            else:
                self._order = np.arange(self._n_rows)
            self._order_epoch = self._epoch
        return self._order

    def get_state(self) -> dict[str, int]:
        """The position after the batches returned so far (JSON-serialisable)."""
        return {"epoch": self._epoch, "batch_in_epoch": self._batch, "seed": self._seed,
                "n_rows": self._n_rows}

    def set_state(self, state: dict) -> None:
        """Continues from a `get_state` dict.

        Raises:
          ValueError: if the state was saved with another seed or another number of rows (a
            different corpus, tokenizer or seq_len), where the position would mean other data.
        """
        for key, mine in (("seed", self._seed), ("n_rows", self._n_rows)):
            if int(state[key]) != mine:
                raise ValueError(
                    f"Data iterator state has {key}={state[key]}, but this iterator has {mine}: "
                    "the run was saved with a different seed or dataset (source, tokenizer, "
                    "seq_len) and cannot resume its data position.")
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"Data iterator state epoch={epoch}, batch_in_epoch={batch} is out of "
                             f"range ({self.batches_per_epoch} batches per epoch).")
        self._epoch, self._batch = epoch, batch


def eval_batches(
    rows: Rows,
    global_batch: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    max_batches: int | None = None,
    pad_id: int = 0,
) -> Iterator[Rows]:
    """One in-order pass over `rows` as per-host batches of a fixed shape.

    The last global batch is completed with all-padding rows (segment_ids 0, positions 0,
    input_ids `pad_id`) so every batch has the same shape and compiles once; their segment ids
    keep them out of every loss and metric.

    Args:
      rows: as `packing.pack_documents` returns.
      global_batch: rows per global batch (divisible by process_count).
      process_index, process_count: this host's slice of each global batch.
      max_batches: stop after this many batches (None: the whole split).
      pad_id: input id of the filler rows.

    Yields:
      Dicts of int32 [global_batch // process_count, seq_len].
    """
    # Validated here, not in the generator, so a bad argument fails at the call.
    host = _host_slice(global_batch, process_index, process_count)
    n_batches = -(-len(rows["input_ids"]) // global_batch)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    return _padded_batches(rows, global_batch, host, n_batches, pad_id)


def _padded_batches(
    rows: Rows, global_batch: int, host: slice, n_batches: int, pad_id: int
) -> Iterator[Rows]:
    n_rows = len(rows["input_ids"])
    for k in range(n_batches):
        # This host's row indices in the global window; those past the end are filler.
        index = np.arange(k * global_batch, (k + 1) * global_batch)[host]
        real = index < n_rows
        batch = {}
        for name, values in rows.items():
            filler = pad_id if name == "input_ids" else 0
            out = np.full((len(index),) + values.shape[1:], filler, dtype=values.dtype)
            out[real] = values[index[real]]
            batch[name] = out
        yield batch
