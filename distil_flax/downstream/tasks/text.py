"""Text → model rows for fine-tuning, one example per row, no packing, framed by the tokenizer:
`[CLS] a [SEP] (b [SEP])` for BERT, `<s> a </s> (</s> b </s>)` for RoBERTa (`Tokenizer.frame`).

A row is `input_ids`, `token_type_ids` (BERT: 0 for the first text and its specials, 1 for the
second; RoBERTa: all 0) and `attention_mask` (1 on tokens, 0 on padding), int32 [rows, length].
The encoder reads the attention mask as its segment ids, so padding never mixes with tokens, and
positions restart at 0 in every row. Rows are as long as the longest one needs, rounded up to a
multiple of 8 and capped at `max_length`, so short-sentence tasks do not pay for 128 or 512
positions.
"""

from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

from distil_flax.data.tokenizer import Tokenizer

# Rows are padded to a multiple of this (tensor-core friendly tiles, few distinct shapes).
LENGTH_MULTIPLE = 8


def row_length(longest: int, max_length: int) -> int:
    """The padded row length for rows of at most `longest` tokens."""
    return min(max_length, -(-max(longest, 1) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE)


def encode_with_offsets(tokenizer: Tokenizer, texts: Sequence[str]
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids of each text and the character span of each token in that text.

    SQuAD answers are character spans of the context, so predicted token spans must map back to
    characters of the original string, through lowercasing, accent stripping and `##` pieces.
    The backends track that alignment themselves; `Tokenizer.encode_batch` drops it (the packer
    never needs it), so this reads it from the same backend object.

    Returns:
      For each text: (ids int32 [tokens], offsets int32 [tokens, 2] of [start, end) characters).
    """
    texts = list(texts)
    backend = tokenizer._backend  # The one backend the run's tokenizer wraps; see the docstring.
    if isinstance(backend, spm.SentencePieceProcessor):
        out = []
        for text, proto in zip(texts, backend.encode(texts, out_type="proto")):
            # SentencePiece reports byte offsets into the UTF-8 input; turn them into characters.
            char_at_byte = np.zeros(len(text.encode("utf-8")) + 1, np.int32)
            position = 0
            for index, ch in enumerate(text):
                width = len(ch.encode("utf-8"))
                char_at_byte[position:position + width] = index
                position += width
            char_at_byte[position] = len(text)
            # Every piece, as `encode_batch` gives them; a "▁" piece the normaliser inserted
            # covers no character (begin == end).
            pieces = list(proto.pieces)
            ids = np.array([p.id for p in pieces], np.int32)
            offsets = np.array([[char_at_byte[p.begin], char_at_byte[p.end]] for p in pieces],
                               np.int32).reshape(-1, 2)
            out.append((ids, offsets))
        return out
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    return [(np.asarray(e.ids, np.int32), np.asarray(e.offsets, np.int32).reshape(-1, 2))
            for e in encodings]


def truncate_pair(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int]]:
    """Drops tokens from the end of the longer text until both fit in `budget` (BERT's rule)."""
    b = list(b or [])
    a = list(a)
    while len(a) + len(b) > budget:
        if len(a) >= len(b):
            a.pop()
        else:
            b.pop()
    return a, b


def encode_pairs(tokenizer: Tokenizer, texts_a: Sequence[str], texts_b: Sequence[str] | None,
                 max_length: int) -> tuple[dict[str, np.ndarray], int]:
    """Encodes single texts or text pairs into padded rows.

    Args:
      tokenizer: the model's tokenizer.
      texts_a: first texts [n].
      texts_b: second texts [n], or None for single-text tasks.
      max_length: the longest row, specials included; longer inputs are truncated.

    Returns:
      (rows, truncated): `input_ids`, `token_type_ids`, `attention_mask` int32 [n, length], and
      how many examples lost tokens to truncation.
    """
    specials = tokenizer.num_special_tokens(pair=texts_b is not None)
    least = max(4, specials + 1)  # Room for at least one token of the texts.
    if max_length < least:
        raise ValueError(f"max_length must be at least {least}, got {max_length}")
    ids_a = tokenizer.encode_batch(list(texts_a))
    ids_b = tokenizer.encode_batch(list(texts_b)) if texts_b is not None else [None] * len(ids_a)
    rows = []
    truncated = 0
    for a, b in zip(ids_a, ids_b):
        ta, tb = truncate_pair(a, b, max_length - specials)
        truncated += len(ta) + len(tb) < len(a) + len(b or [])
        framed = tokenizer.frame(ta, tb if b is not None else None)
        rows.append((framed.input_ids, framed.token_type_ids))
    length = row_length(max((len(ids) for ids, _ in rows), default=1), max_length)
    out = {name: np.zeros((len(rows), length), np.int32)
           for name in ("input_ids", "token_type_ids", "attention_mask")}
    out["input_ids"][:] = tokenizer.pad_id
    for i, (ids, types) in enumerate(rows):
        out["input_ids"][i, :len(ids)] = ids
        out["token_type_ids"][i, :len(ids)] = types
        out["attention_mask"][i, :len(ids)] = 1
    return out, truncated
