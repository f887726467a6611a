"""RoBERTa-family tokenizers: byte-level BPE and XLM-R's SentencePiece, each checked against
transformers' own tokenizer built from the same files, their framing, and `train_vocab --kind=bpe`.

Every vocabulary is trained here on a few hundred bundled documents: no downloads.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from distil_flax import data
from distil_flax.data import roberta_vocab, train_vocab
from distil_flax.data import units as units_lib
from distil_flax.distill import masking
from distil_flax.downstream.tasks import squad
from distil_flax.downstream.tasks import text as text_lib
from distil_flax.training import cli

transformers = pytest.importorskip("transformers")

# Cased text, accents, CJK, emoji (4-byte UTF-8, a ZWJ sequence, a flag), odd whitespace.
SENTENCES = [
    "In the beginning God created the heavens and the earth.",
    "Hello world",
    " Leading space, and trailing one ",
    "Naïve café owners in Zürich — déjà vu!",
    "北京大学 is in 中国; ÅNGSTRÖM & Ünïcödé.",
    "Emoji 😀👍🏽 and 👩‍👩‍👧 and 🇩🇪 flags ☕️",
    "multiple   spaces\tand\ttabs\nand a newline",
    "e-mail: a.b@c.org (1,234.5%) #hashtag $money",
    "",
]
PAIRS = [(SENTENCES[i], SENTENCES[-2 - i]) for i in range(4)]


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return list(data.read_documents("bundled"))[:200] + SENTENCES[:-1]


@pytest.fixture(scope="module")
def roberta_folder(tmp_path_factory, documents) -> str:
    """vocab.json + merges.txt from tokenizers' own byte-level BPE trainer, as RoBERTa ships."""
    folder = tmp_path_factory.mktemp("roberta")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(documents, vocab_size=700, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    return str(folder)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _hf_ids(reference, a, b=None) -> list[int]:
    return reference(a, b)["input_ids"]


def _our_ids(tokenizer, a, b=None) -> list[int]:
    ids = tokenizer.encode_batch([a] if b is None else [a, b])
    return tokenizer.frame(*ids).input_ids


def _assert_same_as(tokenizer, reference) -> None:
    for sentence in SENTENCES:
        assert _our_ids(tokenizer, sentence) == _hf_ids(reference, sentence), sentence
    for a, b in PAIRS:
        assert _our_ids(tokenizer, a, b) == _hf_ids(reference, a, b), (a, b)
    assert tokenizer.vocab_size == len(reference)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id,
            tokenizer.mask_id) == (reference.bos_token_id, reference.eos_token_id,
                                   reference.pad_token_id, reference.unk_token_id,
                                   reference.mask_token_id)
    assert (tokenizer.cls_id, tokenizer.sep_id) == (reference.cls_token_id,
                                                    reference.sep_token_id)
    assert set(reference.all_special_ids) <= set(tokenizer.special_ids)


def test_vocab_json_and_merges_match_roberta_tokenizer(roberta_folder, tmp_path):
    reference = transformers.RobertaTokenizerFast.from_pretrained(roberta_folder)
    for path in (roberta_folder, os.path.join(roberta_folder, "vocab.json"),
                 os.path.join(roberta_folder, "merges.txt")):
        tokenizer = data.load_tokenizer(path)
        assert tokenizer.family == "roberta" and tokenizer.path == path
        assert [os.path.basename(f) for f in tokenizer.files] == ["vocab.json", "merges.txt"]
        _assert_same_as(tokenizer, reference)
    # The pair fingerprints both files however the tokenizer is named.
    assert len({data.load_tokenizer(p).fingerprint for p in (
        roberta_folder, os.path.join(roberta_folder, "merges.txt"))}) == 1
    # The tokenizer.json transformers writes for it: read as written, same ids.
    reference.save_pretrained(str(tmp_path))
    from_json = data.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert from_json.family == "roberta"
    _assert_same_as(from_json, reference)
    # A folder holding tokenizer.json reads it before vocab.json.
    assert data.load_tokenizer(str(tmp_path)).files == (str(tmp_path / "tokenizer.json"),)
    # Byte-level round trip; character offsets (SQuAD's) as transformers reports them, without
    # the spaces that tokens carry.
    (ids,) = from_json.encode_batch([SENTENCES[5]])
    assert from_json.decode(ids) == SENTENCES[5]
    for tokenizer in (from_json, data.load_tokenizer(roberta_folder)):
        for sentence in SENTENCES[2:6]:
            (_, offsets), = text_lib.encode_with_offsets(tokenizer, [sentence])
            expected = reference(sentence, add_special_tokens=False, return_offsets_mapping=True)
            assert offsets.tolist() == [list(o) for o in expected["offset_mapping"]]


def test_roberta_framing_special_ids_and_masking(roberta_folder):
    tokenizer = data.load_tokenizer(roberta_folder)
    s, pad, e = tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id
    assert (s, pad, e, tokenizer.unk_id) == (0, 1, 2, 3)
    assert {s, pad, e, tokenizer.unk_id, tokenizer.mask_id} <= set(tokenizer.special_ids)
    assert tokenizer.frame([7, 8]) == ([s, 7, 8, e], [0] * 4, None)
    assert tokenizer.frame([7], [9, 10]) == ([s, 7, e, e, 9, 10, e], [0] * 7, 4)
    assert (tokenizer.num_special_tokens(), tokenizer.num_special_tokens(pair=True)) == (2, 4)

    # Masking (as train.py builds its spec) never picks <s>, </s> or <pad>.
    spec = masking.MaskingSpec(mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                               special_ids=tuple(tokenizer.special_ids), mask_prob=0.9)
    rows = data.pack_documents(tokenizer.encode_batch(SENTENCES[:6]), 32, tokenizer.cls_id,
                               tokenizer.sep_id, tokenizer.pad_id)
    assert rows["input_ids"][0, 0] == s and (rows["input_ids"][rows["segment_ids"] == 0] == pad
                                             ).all()
    out = masking.mask_tokens(jax.random.key(0), jax.numpy.asarray(rows["input_ids"]),
                              jax.numpy.asarray(rows["segment_ids"]), spec)
    picked = np.take_along_axis(rows["input_ids"], np.asarray(out["mlm_positions"]), 1)
    chosen = picked[np.asarray(out["mlm_weights"]) > 0]
    assert chosen.size and not np.isin(chosen, [s, e, pad]).any()


def test_sentence_ids_concatenate_to_the_document_ids(roberta_folder, documents):
    """Preparation encodes sentence by sentence, cut before whitespace; byte-level tokens carry
    their leading space, so the cut changes no id."""
    tokenizer = data.load_tokenizer(roberta_folder)
    texts = documents[:50] + ["Hello.  World!\n\nNew line?   Yes; ok: fine.\tTab. 😀 Emoji."]
    for text in texts:
        sentences = units_lib.split_sentences(text)
        assert sum(tokenizer.encode_batch(sentences), []) == tokenizer.encode_batch([text])[0]


def test_bert_family_framing_is_unchanged(tmp_path):
    vocab = data.train_wordpiece(SENTENCES * 3, 120, str(tmp_path / "vocab.txt"))
    bert = data.load_tokenizer(vocab)
    c, p = bert.cls_id, bert.sep_id
    assert bert.family == "bert" and (bert.bos_id, bert.eos_id) == (c, p)
    assert bert.frame([7], [9, 10]) == ([c, 7, p, 9, 10, p], [0, 0, 0, 1, 1, 1], 3)
    assert bert.num_special_tokens(pair=True) == 3


def test_fine_tuning_rows_match_transformers(roberta_folder):
    tokenizer = data.load_tokenizer(roberta_folder)
    reference = transformers.RobertaTokenizerFast.from_pretrained(roberta_folder)
    a, b = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    rows, truncated = text_lib.encode_pairs(tokenizer, a, b, max_length=128)
    assert truncated == 0 and not rows["token_type_ids"].any()
    for i, expected in enumerate(reference(a, b)["input_ids"]):
        n = len(expected)
        assert rows["input_ids"][i, :n].tolist() == expected
        assert (rows["input_ids"][i, n:] == tokenizer.pad_id).all()
        assert rows["attention_mask"][i].sum() == n
    # SQuAD: <s> question </s></s> context </s>, and the labelled span reads as the answer.
    context = "Moses led the people out of Egypt and came to Mount Sinai in the third month."
    example = squad.SquadExample("q", "Where did they come?", context, ("Mount Sinai",),
                                 (context.index("Mount Sinai"),))
    features = squad.build_features([example], tokenizer, max_length=64, doc_stride=8,
                                    max_query_length=16, train=True)
    ids = features.arrays["input_ids"][0]
    question = tokenizer.encode_batch([example.question])[0]
    first = len(question) + 3  # The context's first token.
    assert ids[:first].tolist() == [0, *question, 2, 2]
    offsets = features.meta["offsets"][0]
    assert (offsets[:first] == -1).all() and offsets[first, 0] == 0
    start, end = features.arrays["start_positions"][0], features.arrays["end_positions"][0]
    assert context[offsets[start, 0]:offsets[end, 1]] == "Mount Sinai"


def test_xlmr_unigram_tokenizer_json_matches_transformers(documents, tmp_path):
    """An XLM-R-style tokenizer.json: Unigram, Metaspace, <s> <pad> </s> <unk> first, <mask>
    last, XLM-R's pair template."""
    unigram = tokenizers.Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.Sequence([normalizers.NFKC(),
                                               normalizers.Replace(" {2,}", " ")])
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    unigram.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    unigram.train_from_iterator(documents, trainers.UnigramTrainer(
        vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>",
        show_progress=False))
    unigram.add_special_tokens([tokenizers.AddedToken("<mask>", lstrip=True, special=True)])
    unigram.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)])
    path = str(tmp_path / "tokenizer.json")
    unigram.save(path)
    tokenizer = data.load_tokenizer(path)
    assert tokenizer.family == "roberta" and tokenizer.mask_id == tokenizer.vocab_size - 1
    _assert_same_as(tokenizer, transformers.XLMRobertaTokenizerFast(tokenizer_file=path))


def test_xlmr_sentencepiece_model_has_fairseq_ids(documents, tmp_path):
    """XLM-R's sentencepiece.bpe.model: SentencePiece's default layout (<unk> <s> </s>), read
    with fairseq's ids: XLMRobertaTokenizer's id of piece i is i + 1, <unk> 3, <mask> last."""
    folder = tmp_path / "xlmr"
    folder.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(documents), model_prefix=str(folder / "sp"), vocab_size=600,
        model_type="unigram", character_coverage=0.9995, minloglevel=2)
    os.rename(folder / "sp.model", folder / "sentencepiece.bpe.model")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "sentencepiece.bpe.model"))
    tokenizer = data.load_tokenizer(str(folder))
    assert tokenizer.family == "roberta" and tokenizer.vocab_size == sp.get_piece_size() + 2
    assert (tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id,
            tokenizer.mask_id) == (0, 1, 2, 3, sp.get_piece_size() + 1)
    texts = SENTENCES + ["  spaces  around  ", "▁already escaped", "rare: ꙮ ᚠ ⸘"]
    expected = [[i + 1 if i else 3 for i in ids] for ids in sp.encode(texts)]
    assert tokenizer.encode_batch(texts) == expected
    assert tokenizer.decode(tokenizer.encode_batch([SENTENCES[0]])[0]) == SENTENCES[0]
    _assert_same_as(tokenizer, transformers.XLMRobertaTokenizer.from_pretrained(str(folder)))
    # An ALBERT-style .model under XLM-R's name is refused, not read with shifted ids.
    albert = data.train_sentencepiece(documents[:50], 100, str(tmp_path / "albert"))
    shutil.copy(albert, tmp_path / "sentencepiece.bpe.model")
    with pytest.raises(ValueError, match="not laid out as XLM-R's"):
        data.load_tokenizer(str(tmp_path / "sentencepiece.bpe.model"))


def test_train_vocab_bpe_round_trip(documents, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(documents))
    output = str(tmp_path / "bpe")
    message = train_vocab.train_or_reuse("bpe", output, 500, source="text", paths=[str(corpus)])
    assert message.startswith(f"Wrote {output}/tokenizer.json: vocab size 500 (bpe")
    assert sorted(os.listdir(output)) == ["merges.txt", "tokenizer.json", "vocab.json"]
    with open(os.path.join(output, "vocab.json")) as f:
        vocab = json.load(f)
    # roberta-base's ids: <s> <pad> </s> <unk> first, <mask> the last id.
    assert [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 499]
    tokenizer = data.load_tokenizer(output)
    assert tokenizer.family == "roberta" and tokenizer.mask_id == 499
    for path in (output, os.path.join(output, "vocab.json")):  # tokenizer.json; vocab + merges.
        _assert_same_as(data.load_tokenizer(path),
                        transformers.RobertaTokenizerFast.from_pretrained(output))
    # A whole folder is reused; the same documents give the same bytes.
    assert train_vocab.train_or_reuse("bpe", output, 500).startswith("Reusing")
    first, second = (roberta_vocab.train_bpe(documents, 500, str(tmp_path / name))
                     for name in ("first", "second"))
    for name in roberta_vocab.BPE_FILES:
        assert _read(os.path.join(os.path.dirname(first), name)) == _read(
            os.path.join(os.path.dirname(second), name)), name
    # Errors are one `error:` line through the CLI's path.
    for bad, message in ((str(tmp_path / "bpe.json"), "names a file"),
                         (str(corpus / "sub"), "Not a directory")):
        with pytest.raises(SystemExit) as exit_:
            cli.run(lambda: train_vocab.train_or_reuse("bpe", bad, 500))
        assert exit_.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_load_errors_name_what_is_missing(roberta_folder, tmp_path):
    with pytest.raises(ValueError, match="holds no tokenizer: expected one of tokenizer.json"):
        data.load_tokenizer(str(tmp_path))
    shutil.copy(os.path.join(roberta_folder, "vocab.json"), tmp_path / "vocab.json")
    with pytest.raises(ValueError, match="needs vocab.json and merges.txt.*merges.txt' does"):
        data.load_tokenizer(str(tmp_path))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nnot_in_vocab x\n")
    with pytest.raises(ValueError, match="are not a byte-level BPE vocabulary"):
        data.load_tokenizer(str(tmp_path / "merges.txt"))
