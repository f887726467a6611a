"""Opens prepared data for training: each split as a `PackedSplit` of packed rows.

`build_datasets` finds (or first prepares, `prepare.py`) a config's data and returns its train and
eval splits; `token_counts` gives the train split's id counts for masking. `batches.py` turns a
`PackedSplit` into per-host batches: the resumable `BatchIterator` and `eval_batches`.
"""

import dataclasses
import os

import numpy as np
from absl import logging

from distil_flax.data import packing, records, run_targets
from distil_flax.data import prepare as prepare_lib
from distil_flax.data import tokenizer as tokenizer_lib

# packing.FIELDS → int32 [rows, seq_len]; with cached targets also theirs (`run_targets`).
Rows = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PackedSplit:
    """A prepared split read as packed rows of `seq_len` (what `build_datasets` returns).

    Attributes:
      split: the prepared split (`records.Split`).
      seq_len: row length.
      cls_id, sep_id, pad_id: special ids framing and padding segments.
      window: pieces packed together; more means less padding.
      threads: threads reading and writing batches ahead of the training loop.
      prefetch: batches made ahead.
      targets: cached teacher targets read with each row's segments (`run_targets`), or
        None: batches then hold token ids only.
    """

    split: records.Split
    seq_len: int
    cls_id: int
    sep_id: int
    pad_id: int
    window: int = 4096
    threads: int = 2
    prefetch: int = 4
    targets: "run_targets.SplitTargets | None" = None

    def __post_init__(self):
        if self.seq_len < 3:
            raise ValueError(f"data.seq_len must be at least 3 ([CLS] token [SEP]), got "
                             f"{self.seq_len}.")
        if self.window < 1 or self.threads < 0 or self.prefetch < 0:
            raise ValueError(f"data.window ({self.window}) must be positive and data.threads "
                             f"({self.threads}), data.prefetch ({self.prefetch}) non-negative.")

    @property
    def num_rows(self) -> int:
        """Rows in one epoch over all hosts: an estimate (as if packed without padding)."""
        return self.split.rows_per_epoch(self.seq_len)

    def pack(self, pieces: list[np.ndarray]) -> Rows:
        return packing.pack_documents(pieces, self.seq_len, self.cls_id, self.sep_id,
                                      self.pad_id)


def build_datasets(data_config, tokenizer: tokenizer_lib.Tokenizer, *,
                   process_count: int = 1) -> tuple[PackedSplit, PackedSplit]:
    """Opens a config's prepared data as train and eval splits, preparing it first if needed.

    Preparing is deterministic and every file lands by atomic rename, so hosts that find no
    data each prepare the same bytes, into a shared directory or their own; for a large corpus,
    prepare once beforehand (`python -m distil_flax.data.prepare`) instead.

    Args:
      data_config: a run config's `data` section.
      tokenizer: the loaded `data.tokenizer`; the shards must have been made with it.
      process_count: hosts in the run (only to warn when each would prepare the data).

    Raises:
      ValueError: shards made by another tokenizer, or bad preparation or loader options.
    """
    directory = prepare_lib.default_directory(data_config, tokenizer)
    if not os.path.isfile(os.path.join(directory, records.MANIFEST)):
        if process_count > 1:
            logging.warning("No prepared data in %s: each of the %d hosts prepares it now. For a "
                            "large corpus run `python -m distil_flax.data.prepare` beforehand.",
                            directory, process_count)
        else:
            logging.info("No prepared data in %s yet: preparing it now.", directory)
        prepare_lib.prepare(data_config, tokenizer=tokenizer, directory=directory)
    dataset = records.PreparedDataset(directory)
    dataset.check_tokenizer(tokenizer)

    def packed(name):
        return PackedSplit(dataset.split(name), data_config.seq_len, tokenizer.cls_id,
                           tokenizer.sep_id, tokenizer.pad_id, window=data_config.window,
                           threads=data_config.threads, prefetch=data_config.prefetch)

    train, eval_ = packed("train"), packed("eval")
    for split in (train, eval_):
        logging.info("%s split: %d pieces, %d tokens in %s; ~%d rows of %d per epoch.",
                     split.split.name, split.split.num_records, split.split.num_tokens,
                     directory, split.num_rows, split.seq_len)
    return train, eval_


def token_counts(rows: PackedSplit, vocab_size: int) -> np.ndarray:
    """How often each id occurs in the training pieces, for masking's frequency smoothing.

    Counted at preparation over the train split ([CLS]/[SEP] excluded: masking zeroes the
    special ids' weights anyway).

    Returns:
      int64 [vocab_size].
    """
    counts = records.PreparedDataset(rows.split.directory).token_counts()
    if counts.shape != (vocab_size,):
        raise ValueError(f"Token counts of {rows.split.directory} cover {counts.shape[0]} ids, "
                         f"but the vocabulary has {vocab_size}: data and tokenizer do not match.")
    return counts
