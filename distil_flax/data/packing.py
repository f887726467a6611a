"""Packs tokenised documents into fixed-length rows of several `[CLS] … [SEP]` segments.

Packing instead of padding: a row holds as many whole segments as fit, so almost every position
is a real token. The encoder keeps segments apart with `segment_ids` (attention only within a
segment) and restarts `positions` in each, so a packed segment is seen exactly as if it were alone.

Layout of one row (seq_len 12, two segments and padding):

    input_ids    [CLS] a b c [SEP] [CLS] d e [SEP] [PAD] [PAD] [PAD]
    segment_ids    1   1 1 1   1     2   2 2   2     0     0     0
    positions      0   1 2 3   4     0   1 2   3     0     0     0
"""

from collections.abc import Iterable, Sequence

import numpy as np

FIELDS = ("input_ids", "segment_ids", "positions")


def pack_documents(
    docs: Iterable[Sequence[int]], seq_len: int, cls_id: int, sep_id: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Splits documents into segments and packs them greedily, in order, into rows.

    A document longer than `seq_len - 2` tokens is cut into consecutive pieces of `seq_len - 2`
    tokens (the last may be shorter); each piece becomes a segment `[CLS] piece [SEP]`. Segments
    fill rows in order; one that does not fit in what is left of a row starts the next row, so a
    segment never crosses a row. Empty documents are skipped.

    Args:
      docs: token ids of each document, without special tokens.
      seq_len: row length (≥ 3).
      cls_id, sep_id, pad_id: special token ids.

    Returns:
      `input_ids`, `segment_ids`, `positions`: int32 [rows, seq_len]. segment_ids count 1, 2, …
      per row and are 0 on padding; positions restart at 0 in each segment and are 0 on padding.
    """
    if seq_len < 3:
        raise ValueError(f"seq_len must be at least 3 ([CLS] token [SEP]), got {seq_len}.")
    tokens, doc_lens = _concatenate(docs)
    piece_lens = _piece_lengths(doc_lens, seq_len - 2)
    seg_lens = piece_lens + 2
    seg_rows, seg_starts = _assign_rows(seg_lens, seq_len)
    return _scatter(tokens, piece_lens, seg_rows, seg_starts, seq_len, cls_id, sep_id, pad_id)


def padding_fraction(rows: dict[str, np.ndarray]) -> float:
    """Fraction of positions that are padding (segment id 0); 0.0 for no rows."""
    segment_ids = rows["segment_ids"]
    return float(np.mean(segment_ids == 0)) if segment_ids.size else 0.0


def _concatenate(docs: Iterable[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """All tokens in one int32 array [total], and each document's length [docs]."""
    arrays = [np.asarray(d, dtype=np.int32).reshape(-1) for d in docs]
    lens = np.array([len(a) for a in arrays], dtype=np.int64)
    tokens = np.concatenate(arrays) if arrays else np.zeros([0], np.int32)
    return tokens, lens


def _piece_lengths(doc_lens: np.ndarray, max_piece: int) -> np.ndarray:
    """Lengths of the pieces each document is cut into, in order [pieces]; none for empty docs."""
    counts = -(-doc_lens // max_piece)  # ceil; 0 for empty documents.
    lens = np.full(int(counts.sum()), max_piece, dtype=np.int64)
    last = np.cumsum(counts)[counts > 0] - 1
    nonempty = doc_lens[counts > 0]
    lens[last] = nonempty - (counts[counts > 0] - 1) * max_piece
    return lens


def _assign_rows(seg_lens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy in-order packing: each segment's row and start column, both [segments].

    Inherently sequential (each decision depends on the fill so far), so it is a plain loop over
    segments, not tokens: ~10k segments for the bundled corpus, a few milliseconds.
    """
    rows = np.empty(len(seg_lens), dtype=np.int64)
    starts = np.empty(len(seg_lens), dtype=np.int64)
    row, fill = 0, 0
    for i, length in enumerate(seg_lens.tolist()):
        if fill + length > seq_len:
            row, fill = row + 1, 0
        rows[i], starts[i] = row, fill
        fill += length
    return rows, starts


def _scatter(
    tokens: np.ndarray,
    piece_lens: np.ndarray,
    seg_rows: np.ndarray,
    seg_starts: np.ndarray,
    seq_len: int,
    cls_id: int,
    sep_id: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Writes the segments into row arrays, vectorised over tokens."""
    if not len(seg_rows):
        return {k: np.zeros([0, seq_len], np.int32) for k in FIELDS}
    n_rows = int(seg_rows[-1]) + 1
    input_ids = np.full(n_rows * seq_len, pad_id, dtype=np.int32)
    segment_ids = np.zeros(n_rows * seq_len, dtype=np.int32)
    positions = np.zeros(n_rows * seq_len, dtype=np.int32)

    seg_lens = piece_lens + 2
    begin = seg_rows * seq_len + seg_starts  # Flat index of each segment's [CLS].
    # 1, 2, … within each row: a segment's rank minus the rank of its row's first segment.
    rank = np.arange(len(seg_rows))
    first_in_row = np.r_[True, seg_rows[1:] != seg_rows[:-1]]
    seg_number = rank - np.maximum.accumulate(np.where(first_in_row, rank, 0)) + 1

    # Every position a segment covers, [CLS] to [SEP]: offsets 0..len-1 from its begin.
    offset = np.arange(int(seg_lens.sum())) - np.repeat(np.cumsum(seg_lens) - seg_lens, seg_lens)
    covered = np.repeat(begin, seg_lens) + offset
    segment_ids[covered] = np.repeat(seg_number, seg_lens)
    positions[covered] = offset

    input_ids[begin] = cls_id
    input_ids[begin + seg_lens - 1] = sep_id
    # Token j of the stream lands one after its piece's [CLS], at its offset within the piece.
    piece_first = np.cumsum(piece_lens) - piece_lens  # Stream index of each piece's first token.
    piece_offset = np.arange(len(tokens)) - np.repeat(piece_first, piece_lens)
    input_ids[np.repeat(begin + 1, piece_lens) + piece_offset] = tokens

    return {k: v.reshape(n_rows, seq_len) for k, v in
            zip(FIELDS, (input_ids, segment_ids, positions))}
