"""A deterministic WordPiece vocabulary learner (BPE-style merges with `##` continuations).

Why not `tokenizers.trainers.WordPieceTrainer`: it assigns symbol ids while iterating a Rust
HashMap with a per-process random seed, and breaks ties between equally frequent merges by those
ids, so the same corpus gives a different vocab.txt on every run (measured: ~500 differing lines
out of 8000 on the bundled corpus). A vocabulary is an artifact that runs and checkpoints depend
on, so we learn it here with every tie broken by the token strings.

The algorithm is what the HF trainer does: start from the characters (a word's first character
as is, later ones as `##c`), then repeatedly merge the most frequent adjacent pair, adding the
merged token, until the vocabulary is full. Encoding then uses greedy longest-match WordPiece.
Pair counts are updated incrementally, touching only the words that contain the merged pair.
"""

import collections
import heapq
from collections.abc import Mapping, Sequence

PREFIX = "##"


def learn_vocab(
    word_counts: Mapping[str, int],
    vocab_size: int,
    special_tokens: Sequence[str],
    *,
    limit_alphabet: int = 1000,
    min_frequency: int = 2,
    max_word_chars: int = 100,
) -> list[str]:
    """Learns a WordPiece vocabulary from pre-tokenised word counts.

    Args:
      word_counts: word → number of occurrences (words already normalised and pre-tokenised).
      vocab_size: target size, special tokens included. The full alphabet is always kept, and
        fewer tokens come out when no pair occurs `min_frequency` times any more.
      special_tokens: tokens placed first, in order (ids 0, 1, ...).
      limit_alphabet: keep at most this many characters (the most frequent); words lose the
        others, which encode as [UNK] anyway.
      min_frequency: a pair must occur at least this often to be merged.
      max_word_chars: longer words are ignored (the WordPiece encoder maps them to [UNK]).

    Returns:
      The tokens, in id order: specials, characters, `##` characters, then merges in the order
      learned.
    """
    items = sorted((w, c) for w, c in word_counts.items() if 0 < len(w) <= max_word_chars)
    alphabet = _alphabet(items, limit_alphabet)
    words, freqs = [], []
    for word, count in items:
        symbols = [ch if i == 0 else PREFIX + ch for i, ch in enumerate(word) if ch in alphabet]
        if symbols:
            words.append(symbols)
            freqs.append(count)

    vocab = list(dict.fromkeys(special_tokens))
    vocab += sorted(set(alphabet) - set(vocab))
    vocab += sorted({s for w in words for s in w[1:]} - set(vocab))
    known = set(vocab)
    for token in _merges(words, freqs, min_frequency):
        if len(vocab) >= vocab_size:
            break
        if token not in known:  # Different merges can spell the same token.
            known.add(token)
            vocab.append(token)
    return vocab


def _alphabet(items: Sequence[tuple[str, int]], limit: int) -> set[str]:
    """The `limit` most frequent characters (ties by character)."""
    counts: collections.Counter[str] = collections.Counter()
    for word, count in items:
        for ch in word:
            counts[ch] += count
    return set(sorted(counts, key=lambda ch: (-counts[ch], ch))[:limit])


def _merge_word(symbols: list[str], a: str, b: str, new: str) -> list[str]:
    """`symbols` with each adjacent (a, b), scanned left to right, replaced by `new`."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _merges(words: list[list[str]], freqs: list[int], min_frequency: int):
    """Yields merged tokens, most frequent pair first (ties: smallest pair of strings).

    Mutates `words`. The heap holds (-count, a, b) and may hold stale entries; an entry is
    current only if its count still equals the pair's count.
    """
    counts: collections.defaultdict[tuple[str, str], int] = collections.defaultdict(int)
    where: collections.defaultdict[tuple[str, str], set[int]] = collections.defaultdict(set)
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, a, b) for (a, b), c in counts.items()]
    heapq.heapify(heap)
    while heap:
        negative, a, b = heapq.heappop(heap)
        if counts.get((a, b), 0) != -negative:
            continue  # Stale entry.
        if -negative < max(min_frequency, 1):
            return
        new = a + b[len(PREFIX):]
        delta: collections.defaultdict[tuple[str, str], int] = collections.defaultdict(int)
        # `where` may list words that no longer hold the pair; merging those changes nothing.
        for i in where.pop((a, b)):
            old = words[i]
            merged = _merge_word(old, a, b, new)
            if len(merged) == len(old):
                continue
            for pair in zip(old, old[1:]):
                delta[pair] -= freqs[i]
            for pair in zip(merged, merged[1:]):
                delta[pair] += freqs[i]
                where[pair].add(i)
            words[i] = merged
        for pair, d in delta.items():
            if d:
                counts[pair] += d
                if counts[pair] > 0:
                    heapq.heappush(heap, (-counts[pair], *pair))
        counts.pop((a, b), None)
        yield new
