"""Task readers on the original file formats, bad inputs, and SQuAD windows and span decoding."""

import logging
import os
import shutil

import numpy as np
import pytest

from distil_flax import data
from distil_flax.downstream import config as finetune_config
from distil_flax.downstream.tasks import base, get_task, squad, text, tfds_source
from distil_flax.training.config_files import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def _data_config(directory: str, source: str = "files"):
    c = finetune_config.base_config().data
    c.source, c.dir = source, directory
    return c


# ----------------------------------------------------------------------------------------------
# GLUE TSV files.
# ----------------------------------------------------------------------------------------------

# task, folder, training rows, evaluation rows by split, (text_a, text_b, label) of train row 0.
GLUE_FILES = [
    ("cola", "CoLA", 8, {"dev": 4},
     ("Our friends won't buy this analysis, let alone the next one we propose.", None, 1)),
    ("sst2", "SST-2", 16, {"dev": 8}, ("a good and faithful story", None, 1)),
    ("mrpc", "MRPC", 16, {"dev": 8},
     ("The king went up to the city.", "The king travelled to the city.", 1)),
    ("stsb", "STS-B", 8, {"dev": 4},
     ("A man is playing a flute.", "A man is playing a flute.", 5.0)),
    ("qqp", "QQP", 4, {"dev": 2}, ("How do I learn to pray?", "How can I learn praying?", 1)),
    ("mnli", "MNLI", 6, {"dev_matched": 3, "dev_mismatched": 3},
     ("The king ate bread.", "The king ate.", 0)),
    ("qnli", "QNLI", 4, {"dev": 2},
     ("Who built the ark?", "Noah built the ark of gopher wood.", 0)),
    ("rte", "RTE", 4, {"dev": 2},
     ("The king of Judah built a temple in the city.", "A temple was built.", 0)),
    ("wnli", "WNLI", 4, {"dev": 2}, ("The trophy doesn't fit into the suitcase because it is too "
                                    "large.", "The trophy is too large.", 1)),
]


@pytest.mark.parametrize("name, folder, n_train, n_eval, first", GLUE_FILES,
                         ids=[f[0] for f in GLUE_FILES])
def test_glue_tsv_readers(name, folder, n_train, n_eval, first):
    task = get_task(name)
    assert task.eval_splits == tuple(n_eval)
    config = _data_config(os.path.join(FIXTURES, "glue", folder))
    train = task.read("train", config)
    assert len(train.examples) == n_train and train.skipped == {}
    example = train.examples[0]
    assert (example.text_a, example.text_b, example.label) == first
    for split, n in n_eval.items():
        assert len(task.read(split, config).examples) == n
    labels = {e.label for e in train.examples}
    if task.is_regression:
        assert all(isinstance(x, float) for x in labels) and max(labels) == 5.0
    else:
        assert labels == set(range(task.num_labels))  # Every class present, as indices.


def test_glue_rows_are_encoded_as_bert_pairs(vocab_path):
    tokenizer = data.load_tokenizer(vocab_path)
    task = get_task("mrpc")
    config = _data_config(os.path.join(FIXTURES, "glue", "MRPC"))
    split = task.read("dev", config)
    features = task.featurize(split, tokenizer, config)
    ids, types, mask = (features.arrays[k][0] for k in
                        ("input_ids", "token_type_ids", "attention_mask"))
    a, b = tokenizer.encode_batch([split.examples[0].text_a, split.examples[0].text_b])
    n = len(a) + len(b) + 3
    assert ids[:n].tolist() == [tokenizer.cls_id, *a, tokenizer.sep_id, *b, tokenizer.sep_id]
    assert types[:n].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert mask.tolist() == [1] * n + [0] * (len(mask) - n)
    assert ids.shape[0] % text.LENGTH_MULTIPLE == 0 and features.arrays["labels"][0] == 1
    # Truncation: the longer text loses tokens first, and the row never exceeds max_length.
    config.max_length = 12
    short = task.featurize(split, tokenizer, config)
    assert short.arrays["input_ids"].shape[1] == 12
    assert short.meta["truncated"] == len(split.examples)


def _copy_task_folder(tmp_path, folder: str) -> str:
    target = tmp_path / folder
    shutil.copytree(os.path.join(FIXTURES, "glue", folder), target)
    return str(target)


def test_malformed_tsv_rows_are_skipped_counted_and_logged(tmp_path, caplog):
    directory = _copy_task_folder(tmp_path, "SST-2")
    with open(os.path.join(directory, "train.tsv"), "a") as f:
        f.write("a row without its label\n")  # Line 18.
        f.write("a good story\t2\n")  # Line 19: a label SST-2 does not have.
        f.write("\n")
    with caplog.at_level(logging.WARNING):
        split = get_task("sst2").read("train", _data_config(directory))
    assert len(split.examples) == 16
    assert split.skipped == {"not 2 tab-separated fields": 1,
                             "label not one of ['0', '1']": 1, "empty line": 1}
    warning = caplog.text
    assert "train.tsv: skipped 3 of 19 record(s)" in warning and "line 18" in warning
    assert "line 19" in warning


def test_missing_column_and_unreadable_files_are_errors(tmp_path):
    directory = _copy_task_folder(tmp_path, "MRPC")
    path = os.path.join(directory, "train.tsv")
    with open(path) as f:
        lines = f.read().splitlines()
    header = lines[0].split("\t")
    with open(path, "w") as f:  # Drop the "#2 String" column everywhere.
        f.write("".join("\t".join(line.split("\t")[:4]) + "\n" for line in lines))
    with pytest.raises(ValueError, match=r"train.tsv: missing column\(s\) \['#2 String'\] for "
                                         r"GLUE mrpc; the header has"):
        get_task("mrpc").read("train", _data_config(directory))
    assert "#2 String" in header
    with open(path, "w") as f:  # A file of another format: every row unusable.
        f.write("\t".join(header) + "\n" + "only one field\n" * 5)
    with pytest.raises(ValueError, match="0 usable record.*5 × not 5 tab-separated fields"):
        get_task("mrpc").read("train", _data_config(directory))
    with pytest.raises(ValueError, match="dev.tsv does not exist"):
        get_task("mrpc").read("dev", _data_config(str(tmp_path)))
    with pytest.raises(ValueError, match="data.dir is empty"):
        get_task("mrpc").read("train", _data_config(""))
    with pytest.raises(ValueError, match="task.name='glue' is unknown"):
        get_task("glue")


# ----------------------------------------------------------------------------------------------
# IMDb and TFDS.
# ----------------------------------------------------------------------------------------------


def test_imdb_folder_reader(tmp_path):
    task = get_task("imdb")
    config = _data_config(os.path.join(FIXTURES, "aclImdb"))
    train, test = task.read("train", config), task.read("test", config)
    assert len(train.examples) == 4 and len(test.examples) == 2
    assert [e.label for e in train.examples] == [0, 0, 1, 1]  # neg/ then pos/.
    assert train.examples[2].guid == "pos/0_9" and "<br />" in train.examples[2].text_a
    (tmp_path / "train" / "pos").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no neg/ folder"):
        task.read("train", _data_config(str(tmp_path)))


class _FakeBuilder:
    """What `tfds.builder` returns for a prepared dataset: splits, label names, a data source."""

    def __init__(self, records, names=()):
        self._records = records
        label = type("Label", (), {"names": list(names)})()
        splits = dict.fromkeys(("train", "validation", "validation_matched", "test"))
        self.info = type("Info", (), {"splits": splits, "features": {"label": label}})()

    def is_prepared(self):
        return True

    def as_data_source(self, split):
        return self._records


def test_tfds_records_become_examples(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    records = [{"premise": b"The king ate bread.", "hypothesis": b"The king ate.",
                "label": np.int64(0), "idx": np.int32(7)},
               {"premise": "Rain fell.".encode(), "hypothesis": b"It was dry.",
                "label": np.int64(2), "idx": np.int32(8)}]
    calls = []

    def builder(name, data_dir=None):
        calls.append((name, data_dir))
        return _FakeBuilder(records, ["entailment", "neutral", "contradiction"])

    monkeypatch.setattr(tfds, "builder", builder)
    split = get_task("mnli").read("dev_matched", _data_config("", source="tfds"))
    assert calls == [("glue/mnli", None)]
    assert [(e.guid, e.text_a, e.text_b, e.label) for e in split.examples] == [
        ("7", "The king ate bread.", "The king ate.", 0), ("8", "Rain fell.", "It was dry.", 2)]
    monkeypatch.setattr(tfds, "builder", lambda *a, **k: _FakeBuilder(records, ["a", "b", "c"]))
    with pytest.raises(ValueError, match=r"label names \['a', 'b', 'c'\]"):
        get_task("mnli").read("dev_matched", _data_config("", source="tfds"))

    # squad/v1.1: answers are a dict of arrays; training drops answers not at their offset.
    context = "Moses led the people out of Egypt."
    squad_records = [
        {"id": b"a", "title": b"t", "context": context.encode(), "question": b"Who led?",
         "answers": {"text": np.array([b"Moses"]), "answer_start": np.array([0], np.int32)}},
        {"id": b"b", "title": b"t", "context": context.encode(), "question": b"Where from?",
         "answers": {"text": np.array([b"Egypt"]), "answer_start": np.array([5], np.int32)}}]
    monkeypatch.setattr(tfds, "builder", lambda *a, **k: _FakeBuilder(squad_records))
    train = get_task("squad").read("train", _data_config("", source="tfds"))
    assert [(e.qid, e.answers, e.answer_starts) for e in train.examples] == [
        ("a", ("Moses",), (0,))]
    assert train.skipped == {"answer text not at answer_start in the context": 1}
    assert len(get_task("squad").read("dev", _data_config("", source="tfds")).examples) == 2

    imdb_records = [{"text": b"A fine film.", "label": np.int64(1)},
                    {"text": b"Dreadful.", "label": np.int64(0)}]
    monkeypatch.setattr(tfds, "builder", lambda *a, **k: _FakeBuilder(imdb_records, ["neg", "pos"]))
    test = get_task("imdb").read("test", _data_config("", source="tfds"))
    assert [(e.text_a, e.label) for e in test.examples] == [("A fine film.", 1), ("Dreadful.", 0)]


def test_unprepared_tfds_dataset_is_a_clear_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match=r"TFDS dataset 'squad/v1.1' is not prepared in .*tfds "
                                         r"build squad/v1.1 --file_format=array_record"):
        tfds_source.load_split("squad/v1.1", "validation", str(tmp_path))


# ----------------------------------------------------------------------------------------------
# SQuAD.
# ----------------------------------------------------------------------------------------------


def test_squad_reader_and_bad_answers(tmp_path, caplog):
    task = get_task("squad")
    config = _data_config(os.path.join(FIXTURES, "squad"))
    train, dev = task.read("train", config), task.read("dev", config)
    assert len(train.examples) == 6 and len(dev.examples) == 3
    assert dev.examples[1].answers == ("the Red Sea", "Red Sea")

    document = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{
        "context": "Moses led the people out of Egypt.",
        "qas": [{"id": "ok", "question": "Who led?", "answers": [{"text": "Moses",
                                                                  "answer_start": 0}]},
                {"id": "moved", "question": "From where?",
                 "answers": [{"text": "Egypt", "answer_start": 3}]},
                {"id": "ok2", "question": "Led whom?",
                 "answers": [{"text": "the people", "answer_start": 10}]}]}]}]}
    path = tmp_path / "train-v1.1.json"
    import json
    path.write_text(json.dumps(document))
    with caplog.at_level(logging.WARNING):
        examples, skipped = squad.read_json(str(path), train=True)
    assert [e.qid for e in examples] == ["ok", "ok2"]
    assert skipped == {"answer text not at answer_start in the context": 1}
    assert "skipped 1 of 3" in caplog.text and "id moved" in caplog.text
    # Evaluation keeps every question: its answers are only compared as text.
    assert len(squad.read_json(str(path), train=False)[0]) == 3
    del document["data"][0]["paragraphs"][0]["qas"][1]["question"]
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"data\[0\].paragraphs\[0\].qas\[1\] lacks 'question'"):
        squad.read_json(str(path), train=True)


CONTEXT = ("Moses led the people out of Egypt. They crossed the Red Sea, and came to Mount "
           "Sinai in the third month; there Moses received the Law.")


def _squad_features(tokenizer, answer: str, *, train: bool, max_length=24, stride=4):
    example = squad.SquadExample("q", "Where did they come?", CONTEXT, (answer,),
                                 (CONTEXT.index(answer),))
    features = squad.build_features([example], tokenizer, max_length=max_length, doc_stride=stride,
                                    max_query_length=8, train=train)
    return example, features


def test_squad_windows_label_the_answer_characters(vocab_path):
    tokenizer = data.load_tokenizer(vocab_path)
    _, features = _squad_features(tokenizer, "Mount Sinai", train=True)
    offsets = features.meta["offsets"]
    starts, ends = features.arrays["start_positions"], features.arrays["end_positions"]
    assert len(starts) > 3  # A long context in short windows.
    inside = starts > 0
    assert inside.any() and (~inside).any()  # Windows without the whole answer point at [CLS].
    assert (ends[~inside] == 0).all()
    for row in np.nonzero(inside)[0]:
        span = CONTEXT[offsets[row, starts[row], 0]:offsets[row, ends[row], 1]]
        assert span == "Mount Sinai"
        # The labelled tokens are context tokens (type 1), never the question.
        assert features.arrays["token_type_ids"][row, starts[row]] == 1
    # Every context token is "max context" in exactly one window.
    is_max = features.meta["max_context"]
    per_char = {}
    for row in range(len(offsets)):
        for pos in np.nonzero(offsets[row, :, 0] >= 0)[0]:
            per_char.setdefault(tuple(offsets[row, pos]), []).append(bool(is_max[row, pos]))
    assert all(sum(flags) == 1 for flags in per_char.values())
    assert len(per_char) == len(text.encode_with_offsets(tokenizer, [CONTEXT])[0][0])


def test_squad_decoding_maps_back_to_original_characters(vocab_path):
    tokenizer = data.load_tokenizer(vocab_path)
    example, features = _squad_features(tokenizer, "the Red Sea,", train=True)
    starts, ends = features.arrays["start_positions"], features.arrays["end_positions"]
    rows = len(starts)
    length = features.arrays["input_ids"].shape[1]
    start_logits = np.full((rows, length), -5.0, np.float32)
    end_logits = np.full((rows, length), -5.0, np.float32)
    # The question tokens score highest everywhere: decoding must still answer from the context.
    question = features.arrays["token_type_ids"] == 0
    start_logits[question] = end_logits[question] = 50.0
    labelled = [r for r in range(rows) if starts[r] > 0 and features.meta["max_context"][
        r, starts[r]]]
    row = labelled[0]
    start_logits[row, starts[row]] = 10.0
    end_logits[row, ends[row]] = 10.0
    predictions, nbest = squad.decode([example], features, start_logits, end_logits,
                                      n_best_size=5, max_answer_length=30)
    # Case and punctuation as in the context (the tokenizer lowercases; offsets undo it).
    assert predictions["q"] == "the Red Sea,"
    assert nbest["q"][0]["text"] == "the Red Sea," and len(nbest["q"]) <= 5
    assert sum(c["probability"] for c in nbest["q"]) == pytest.approx(1.0)
    # Too long for max_answer_length: the best valid span is a shorter one.
    n_tokens = ends[row] - starts[row] + 1
    short, _ = squad.decode([example], features, start_logits, end_logits, n_best_size=5,
                            max_answer_length=n_tokens - 1)
    assert short["q"] != "the Red Sea," and short["q"] in CONTEXT
    # An example without windows (empty context) gets the empty answer, scored 0.
    empty = squad.SquadExample("e", "Who?", "", ("Moses",), (0,))
    none, _ = squad.decode([empty], base.Features({"input_ids": np.zeros((0, 8), np.int32)},
                                                  {"example_index": np.zeros(0, np.int32),
                                                   "offsets": np.zeros((0, 8, 2), np.int32),
                                                   "max_context": np.zeros((0, 8), bool)}),
                           np.zeros((0, 8)), np.zeros((0, 8)), n_best_size=5,
                           max_answer_length=30)
    assert none == {"e": ""}


def test_offsets_of_sentencepiece_tokens(tmp_path):
    documents = ["Moses led the people out of Egypt, and they crossed the Red Sea."] * 20 + [
        "The café is open; naïve résumé."] * 20
    tokenizer = data.load_tokenizer(data.train_sentencepiece(documents, 60, str(tmp_path / "sp")))
    sentence = "They crossed the  Red Sea — at the café!"
    ids, offsets = text.encode_with_offsets(tokenizer, [sentence])[0]
    assert ids.tolist() == tokenizer.encode_batch([sentence])[0]
    # Pieces tile the sentence: each span starts where the previous ended.
    assert offsets[0, 0] == 0 and offsets[-1, 1] == len(sentence)
    assert (offsets[1:, 0] == offsets[:-1, 1]).all()
    cafe = sentence.index("café")
    assert any(a <= cafe + 3 < b for a, b in offsets)  # "é" (two UTF-8 bytes) is one character.


# ----------------------------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------------------------


def test_task_configs_load_and_validate(tmp_path):
    c = load_config(os.path.join(ROOT, "configs/glue.py:task=mnli,preset=tiny"))
    assert c.task.name == "mnli" and c.model.dtype == "float32"
    assert load_config(os.path.join(ROOT, "configs/squad.py")).data.max_length == 384
    assert load_config(os.path.join(ROOT, "configs/imdb.py")).data.max_length == 512
    with pytest.raises(ValueError, match="expected task=NAME or preset=tiny"):
        load_config(os.path.join(ROOT, "configs/glue.py:mnli"))
    with pytest.raises(ValueError, match="init.checkpoint is empty"):
        finetune_config.validate(c)
    c.init.checkpoint = str(tmp_path)
    c.distill.alpha = 1.5
    with pytest.raises(ValueError, match=r"distill.alpha must be in \[0, 1\]"):
        finetune_config.validate(c)
    with pytest.raises(AttributeError, match="batchsize"):
        c.train.batchsize = 3


# ----------------------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------------------


def test_epoch_batches_shuffle_split_among_hosts_and_resume():
    from distil_flax.downstream.tasks import batching

    rows = {"input_ids": np.arange(10)[:, None] * np.ones((1, 3), np.int32),
            "labels": np.arange(10)}
    straight = batching.EpochBatches(rows, 4, seed=1)
    assert straight.batches_per_epoch == 2  # 10 rows: the remainder of 2 is dropped.
    batches = [next(straight)["labels"] for _ in range(6)]
    epoch0 = np.concatenate(batches[:2])
    assert len(set(epoch0)) == 8 and not np.array_equal(epoch0, np.concatenate(batches[2:4]))
    # Two hosts take the two halves of each global batch.
    hosts = [batching.EpochBatches(rows, 4, seed=1, process_index=p, process_count=2)
             for p in range(2)]
    first = [next(h)["labels"] for h in hosts]
    np.testing.assert_array_equal(np.concatenate(first), batches[0])
    # A fresh iterator given the state after 3 batches continues with batches 4, 5, 6.
    resumed = batching.EpochBatches(rows, 4, seed=1)
    replay = batching.EpochBatches(rows, 4, seed=1)
    for _ in range(3):
        next(replay)
    resumed.set_state(replay.get_state())
    for expected in batches[3:]:
        np.testing.assert_array_equal(next(resumed)["labels"], expected)
    with pytest.raises(ValueError, match="seed=1, this run 2"):
        batching.EpochBatches(rows, 4, seed=2).set_state(replay.get_state())
    with pytest.raises(ValueError, match="fewer than one batch of 16"):
        batching.EpochBatches(rows, 16, seed=1)

    padded = list(batching.eval_batches(rows, 4, pad_id=7))
    assert len(padded) == 3 and padded[-1]["labels"].tolist() == [8, 9, 0, 0]
    assert padded[-1]["input_ids"][2:].tolist() == [[7, 7, 7]] * 2
