"""Tests for distil_flax.data: sources, tokenizers, packing, datasets and batch iteration."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tokenizers

from distil_flax import data
from distil_flax.data import packing
from distil_flax.data import tokenizer as tokenizer_lib

CLS, SEP, PAD = 2, 3, 0
FIELDS = ("input_ids", "segment_ids", "positions")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step!",
    "Packing rows beats padding them; every token counts.",
    "Brown dogs and quick foxes are jumping over lazy rivers.",
    "Single steps, thousand journeys, and many miles later: home.",
]


def _documents(n: int = 60) -> list[str]:
    """Small deterministic corpus: each document a few of the sentences above."""
    return [" ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(1 + i % 4))
            for i in range(n)]


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vocab") / "sub" / "vocab.txt"
    return tokenizer_lib.train_wordpiece(_documents(), 200, str(path))


@pytest.fixture(scope="module")
def wordpiece(vocab_path) -> data.Tokenizer:
    return data.load_tokenizer(vocab_path)


# ------------------------------------------------------------------------------ corpus


def test_bundled_corpus_is_chapters_without_footnotes():
    docs = list(data.read_documents("bundled"))
    assert 1100 < len(docs) < 1300  # 1189 chapters.
    assert docs[0].startswith("In the beginning God created the heavens and the earth.")
    assert not any("{" in d or "}" in d for d in docs)
    assert not any("  " in d or d != d.strip() for d in docs)
    assert sum(map(len, docs)) > 3_500_000


def test_text_source_splits_on_blank_lines_and_expands_globs(tmp_path):
    (tmp_path / "b.txt").write_text("first line\nsecond line\n\n\n  third doc  \n")
    (tmp_path / "a.txt").write_bytes(b"alpha\n\nbad byte \xff here\n")
    docs = list(data.read_documents("text", [str(tmp_path / "*.txt")]))
    # Glob matches come sorted: a.txt before b.txt.
    assert docs == ["alpha", "bad byte \ufffd here", "first line second line", "third doc"]
    assert list(data.read_documents("text", str(tmp_path / "b.txt")))[0] == (
        "first line second line")


def test_jsonl_source_and_its_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n')
    assert list(data.read_documents("jsonl", str(good))) == ["one", "two"]
    assert list(data.read_documents("jsonl", str(good), jsonl_field="text")) == ["one", "two"]

    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"missing\.jsonl:2.*'text'"):
        list(data.read_documents("jsonl", str(missing)))

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: invalid JSON"):
        list(data.read_documents("jsonl", str(broken)))


def test_source_errors_are_clear(tmp_path):
    pattern = str(tmp_path / "nothing-*.txt")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        data.read_documents("text", pattern)
    with pytest.raises(ValueError, match="bundled, text, jsonl"):
        data.read_documents("parquet")
    with pytest.raises(ValueError, match="paths"):
        data.read_documents("jsonl", [])


# ------------------------------------------------------------------------------ tokenizers


def test_wordpiece_vocab_specials_and_determinism(vocab_path, wordpiece, tmp_path):
    lines = open(vocab_path, encoding="utf-8").read().splitlines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(lines) == len(set(lines)) == wordpiece.vocab_size <= 200
    assert (wordpiece.pad_id, wordpiece.unk_id, wordpiece.cls_id, wordpiece.sep_id,
            wordpiece.mask_id) == (0, 1, 2, 3, 4)
    assert wordpiece.special_ids == (0, 1, 2, 3, 4)
    again = tokenizer_lib.train_wordpiece(_documents(), 200, str(tmp_path / "again.txt"))
    assert open(again, "rb").read() == open(vocab_path, "rb").read()


def test_wordpiece_round_trip(wordpiece):
    text = "The Quick brownfox, jumping over LAZY rivers!"  # "brownfox" is not a word of the corpus.
    (ids,) = wordpiece.encode_batch([text])
    assert ids and wordpiece.cls_id not in ids and wordpiece.sep_id not in ids
    assert wordpiece.unk_id not in ids
    assert wordpiece.decode(ids) == text.lower()
    # An unseen word splits into pieces that carry the ## continuation mark.
    tokens = [wordpiece.id_to_token(i) for i in ids]
    assert tokens[:2] == ["the", "quick"] and tokens[-1] == "!"
    assert len(tokens) > 9 and any(t.startswith("##") for t in tokens[2:5])


def test_tokenizer_json_matches_vocab_txt(vocab_path, wordpiece, tmp_path):
    model = tokenizers.models.WordPiece.from_file(vocab_path, unk_token="[UNK]")
    hf = tokenizers.Tokenizer(model)
    hf.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    hf.enable_truncation(4)  # Must be switched off by load_tokenizer.
    hf.save(str(tmp_path / "tokenizer.json"))
    from_json = data.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert from_json.encode_batch(SENTENCES) == wordpiece.encode_batch(SENTENCES)
    assert (from_json.mask_id, from_json.pad_id, from_json.vocab_size) == (
        4, 0, wordpiece.vocab_size)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope/vocab.txt"):
        data.load_tokenizer(str(tmp_path / "nope" / "vocab.txt"))
    partial = tmp_path / "vocab.txt"
    partial.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(ValueError, match=r"\[MASK\]") as error:
        data.load_tokenizer(str(partial))
    assert "[CLS]," not in str(error.value).split("lacks")[1].split(";")[0]
    (tmp_path / "vocab.bin").write_text("x")
    with pytest.raises(ValueError, match=r"\.txt, \.json, \.model"):
        data.load_tokenizer(str(tmp_path / "vocab.bin"))


def test_sentencepiece_train_and_load(tmp_path):
    model = data.train_sentencepiece(_documents(), 120, str(tmp_path / "deep" / "spm"))
    assert model.endswith("spm.model") and os.path.exists(model)
    sp = data.load_tokenizer(model)
    assert (sp.pad_id, sp.unk_id, sp.cls_id, sp.sep_id, sp.mask_id) == (0, 1, 2, 3, 4)
    assert [sp.id_to_token(i) for i in range(5)] == ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    assert set(sp.special_ids) >= {0, 1, 2, 3, 4}
    text = "The quick brown fox jumps over the lazy dog."
    (ids,) = sp.encode_batch([text])
    assert sp.decode(ids) == text and sp.cls_id not in ids
    (masked,) = sp.encode_batch(["quick [MASK] fox"])
    assert sp.mask_id in masked


# ------------------------------------------------------------------------------ packing


def _segments(rows: dict[str, np.ndarray]):
    """Parses rows back into segments, checking the layout invariants on the way.

    Yields (row, segment ids as a list) for each segment in order.
    """
    ids, seg, pos = (rows[k] for k in FIELDS)
    for r in range(len(ids)):
        real = seg[r] > 0
        n_real = int(real.sum())
        assert n_real > 0, "empty row"
        # Real positions are a prefix; padding has pad id and zero position.
        assert real[:n_real].all() and not real[n_real:].any()
        assert (ids[r, n_real:] == PAD).all() and (pos[r, n_real:] == 0).all()
        assert seg[r, 0] == 1 and ids[r, 0] == CLS and pos[r, 0] == 0
        starts = np.flatnonzero(np.diff(seg[r, :n_real])) + 1
        bounds = [0, *starts.tolist(), n_real]
        for number, (a, b) in enumerate(zip(bounds, bounds[1:]), start=1):
            assert (seg[r, a:b] == number).all()  # 1, 2, 3, ... within a row.
            assert (pos[r, a:b] == np.arange(b - a)).all()  # Restart at 0 per segment.
            assert ids[r, a] == CLS and ids[r, b - 1] == SEP
            inner = ids[r, a + 1:b - 1]
            assert not np.isin(inner, [CLS, SEP, PAD]).any()
            yield r, inner.tolist()


def test_pack_documents_small_example():
    rows = data.pack_documents([[10, 11, 12], [20, 21], [], [30] * 12], 12, CLS, SEP, PAD)
    np.testing.assert_array_equal(rows["input_ids"], [
        [2, 10, 11, 12, 3, 2, 20, 21, 3, 0, 0, 0],
        [2, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 3],
        [2, 30, 30, 3, 0, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0])
    assert all(v.dtype == np.int32 and v.shape == (3, 12) for v in rows.values())
    assert packing.padding_fraction(rows) == pytest.approx(11 / 36)


@pytest.mark.parametrize("seq_len", [3, 8, 32])
def test_pack_documents_invariants(seq_len):
    rng = np.random.default_rng(seq_len)
    lengths = [0, 1, seq_len - 2, seq_len - 1, 3 * seq_len + 5, *rng.integers(0, 2 * seq_len, 60)]
    docs = [rng.integers(5, 1000, n).tolist() for n in lengths]
    rows = data.pack_documents(docs, seq_len, CLS, SEP, PAD)
    segments = list(_segments(rows))
    pieces = [p for _, p in segments]
    # Non-special tokens, in order, reproduce the input stream exactly.
    assert sum(pieces, []) == sum(docs, [])
    assert all(1 <= len(p) <= seq_len - 2 for p in pieces)
    # Each document becomes ceil(len / (seq_len - 2)) segments: long ones are split.
    assert len(pieces) == sum(-(-len(d) // (seq_len - 2)) for d in docs)
    # Greedy: a row's next segment would not have fit into the previous row.
    row_fill = np.sum(rows["segment_ids"] > 0, axis=1)
    first_len = {}
    for r, piece in segments:
        first_len.setdefault(r, len(piece) + 2)
    assert all(row_fill[r - 1] + first_len[r] > seq_len for r in range(1, len(row_fill)))


def test_pack_documents_edge_cases():
    empty = data.pack_documents([[], []], 16, CLS, SEP, PAD)
    assert all(v.shape == (0, 16) and v.dtype == np.int32 for v in empty.values())
    with pytest.raises(ValueError, match="seq_len"):
        data.pack_documents([[5]], 2, CLS, SEP, PAD)
    arrays = data.pack_documents([np.array([7, 8], np.int64)], 4, CLS, SEP, PAD)
    np.testing.assert_array_equal(arrays["input_ids"], [[2, 7, 8, 3]])


# ------------------------------------------------------------------------------ datasets


def test_build_datasets_splits_by_document(tmp_path, wordpiece):
    docs = _documents(40)
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs))
    train, eval_ = data.build_datasets(
        source="text", paths=[str(tmp_path / "corpus.txt")], jsonl_field="text",
        tokenizer=wordpiece, seq_len=32, eval_every=5)
    encoded = wordpiece.encode_batch(docs)
    stream = lambda rows: sum((p for _, p in _segments(rows)), [])
    assert stream(eval_) == sum((encoded[i] for i in range(0, 40, 5)), [])
    assert stream(train) == sum((encoded[i] for i in range(40) if i % 5), [])

    counts = data.token_counts(train, wordpiece.vocab_size)
    assert counts.dtype == np.int64 and counts.shape == (wordpiece.vocab_size,)
    assert counts.sum() == (train["segment_ids"] > 0).sum()
    assert counts[wordpiece.pad_id] == 0 and counts[wordpiece.cls_id] == counts[SEP] > 0
    assert counts[encoded[1][0]] == np.sum(train["input_ids"] == encoded[1][0])

    no_eval, empty_eval = data.build_datasets(
        source="text", paths=str(tmp_path / "corpus.txt"), jsonl_field="text",
        tokenizer=wordpiece, seq_len=32, eval_every=0)
    assert empty_eval["input_ids"].shape == (0, 32)
    assert stream(no_eval) == sum(encoded, [])

    with pytest.raises(ValueError, match="train split is empty"):
        data.build_datasets(source="text", paths=str(tmp_path / "corpus.txt"),
                            jsonl_field="text", tokenizer=wordpiece, seq_len=32, eval_every=1)


# ------------------------------------------------------------------------------ iteration


def _indexed_rows(n: int, seq_len: int = 4) -> dict[str, np.ndarray]:
    """Rows whose ids all equal the row number, so batches show which rows they hold."""
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)
    return {"input_ids": ids, "segment_ids": np.ones_like(ids), "positions": np.zeros_like(ids)}


def _row_numbers(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_batch_iterator_epochs_and_determinism():
    rows = _indexed_rows(23)
    it = data.BatchIterator(rows, 4, seed=7)
    epochs = [[_row_numbers(next(it)) for _ in range(5)] for _ in range(3)]  # 23 // 4 = 5.
    for e, batches in enumerate(epochs):
        flat = sum(batches, [])
        assert flat == np.random.default_rng([7, e]).permutation(23)[:20].tolist()
        assert len(set(flat)) == 20  # No row twice within an epoch.
    assert epochs[0] != epochs[1]  # Reshuffled every epoch.
    batch = next(data.BatchIterator(rows, 4, seed=7))
    assert set(batch) == set(FIELDS) and all(
        v.shape == (4, 4) and v.dtype == np.int32 for v in batch.values())
    assert _row_numbers(batch) == epochs[0][0]
    assert _row_numbers(next(data.BatchIterator(rows, 4, seed=8))) != epochs[0][0]
    ordered = data.BatchIterator(rows, 4, seed=7, shuffle=False)
    assert [_row_numbers(next(ordered)) for _ in range(6)][-2:] == [[16, 17, 18, 19], [0, 1, 2, 3]]


@pytest.mark.parametrize("consumed", [0, 3, 5, 9])  # 5 batches per epoch: 5 is the boundary.
def test_batch_iterator_resume_is_exact(consumed):
    rows = _indexed_rows(22)
    it = data.BatchIterator(rows, 4, seed=3)
    for _ in range(consumed):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["seed"] == 3 and state["n_rows"] == 22
    expected = [_row_numbers(next(it)) for _ in range(7)]  # Crosses an epoch boundary.
    resumed = data.BatchIterator(rows, 4, seed=3)
    resumed.set_state(state)
    assert [_row_numbers(next(resumed)) for _ in range(7)] == expected


def test_batch_iterator_state_mismatch():
    it = data.BatchIterator(_indexed_rows(22), 4, seed=3)
    with pytest.raises(ValueError, match="seed"):
        it.set_state({**it.get_state(), "seed": 4})
    with pytest.raises(ValueError, match="n_rows"):
        data.BatchIterator(_indexed_rows(21), 4, seed=3).set_state(it.get_state())


def test_two_hosts_split_the_global_batch():
    rows = _indexed_rows(30)
    single = data.BatchIterator(rows, 8, seed=1)
    hosts = [data.BatchIterator(rows, 8, seed=1, process_index=p, process_count=2)
             for p in range(2)]
    for _ in range(7):  # 3 batches per epoch: crosses two epoch boundaries.
        parts = [_row_numbers(next(h)) for h in hosts]
        assert len(parts[0]) == len(parts[1]) == 4
        assert not set(parts[0]) & set(parts[1])
        assert parts[0] + parts[1] == _row_numbers(next(single))


def test_batch_iterator_errors():
    with pytest.raises(ValueError, match="5 rows.*global batch of 8"):
        data.BatchIterator(_indexed_rows(5), 8, seed=0)
    with pytest.raises(ValueError, match="divide"):
        data.BatchIterator(_indexed_rows(20), 6, seed=0, process_count=4)


def test_eval_batches_pad_the_last_batch():
    rows = _indexed_rows(10)
    rows["input_ids"] += 5  # Distinguish real rows from padding (pad id 0).
    batches = list(data.eval_batches(rows, 4))
    assert len(batches) == 3 and all(b["input_ids"].shape == (4, 4) for b in batches)
    assert sum((_row_numbers(b) for b in batches), []) == [*range(5, 15), 0, 0]
    last = batches[-1]
    assert (last["segment_ids"][2:] == 0).all() and (last["segment_ids"][:2] == 1).all()
    assert (last["input_ids"][2:] == 0).all() and (last["positions"][2:] == 0).all()

    hosts = [list(data.eval_batches(rows, 4, process_index=p, process_count=2)) for p in range(2)]
    for k in range(3):
        joined = np.concatenate([hosts[0][k]["input_ids"], hosts[1][k]["input_ids"]])
        np.testing.assert_array_equal(joined, batches[k]["input_ids"])
    assert len(list(data.eval_batches(rows, 4, max_batches=2))) == 2
    assert list(data.eval_batches(_indexed_rows(0), 4)) == []
    with pytest.raises(ValueError, match="divide"):
        data.eval_batches(rows, 5, process_count=2)


# ------------------------------------------------------------------------------ CLI


def test_train_vocab_cli_trains_then_reuses(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n\n".join(_documents(20)))
    output = tmp_path / "out" / "vocab.txt"
    command = [sys.executable, "-m", "distil_flax.data.train_vocab", "--source=text",
               f"--paths={tmp_path / 'corpus.txt'}", "--vocab_size=150", f"--output={output}"]
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "vocab size" in first.stdout and output.exists()
    second = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "Reusing" in second.stdout
