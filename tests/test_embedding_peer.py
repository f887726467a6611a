"""sentence-transformers' distillation recipe as our peer (`bench/peer_sentence_transformers.py`)
on a tiny random BERT built here, and the embeddings notebook at tiny size.

The peer runs in-process for three steps and saves a folder that `SentenceTransformer` loads;
its init-only student is exactly the teacher's kept layers; training moved the weights.
"""

import importlib.util
import json
import math
import os
import string

# Nothing may reach a hub: every load below is from a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

st = pytest.importorskip("sentence_transformers",
                         reason="needs sentence-transformers: pip install -e '.[test]'")
torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN = 16


def _load_bench(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}",
                                                  os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peer = _load_bench("peer_sentence_transformers")


def _tiny_sentence_transformer(folder) -> str:
    """A random 2-layer BERT (16 wide) with a letter-level WordPiece vocab, saved as a
    sentence-transformers folder: Transformer, mean Pooling, Normalize."""
    import transformers
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *(f"##{c}" for c in string.ascii_lowercase), *string.punctuation]
    hf_dir = folder / "hf"
    hf_dir.mkdir()
    (hf_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(hf_dir / "vocab.txt"),
                                   do_lower_case=True).save_pretrained(hf_dir)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=HIDDEN,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=128)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(hf_dir)
    model = st.SentenceTransformer(
        modules=[Transformer(str(hf_dir), max_seq_length=64), Pooling(HIDDEN, "mean"),
                 Normalize()], device="cpu")
    output = str(folder / "teacher")
    model.save(output, create_model_card=False)
    return output


def _load(folder) -> "st.SentenceTransformer":
    return st.SentenceTransformer(str(folder), device="cpu", local_files_only=True)


def test_peer_trains_and_saves_a_sentence_transformers_student(tmp_path):
    teacher_dir = _tiny_sentence_transformer(tmp_path)
    output, init = tmp_path / "student", tmp_path / "init"
    report = peer.main([f"--teacher={teacher_dir}", f"--output={output}", f"--init_output={init}",
                        "--layers=1", "--minutes=5", "--max_steps=3", "--batch=4",
                        "--threads=0", "--max_len=0"])

    assert report["steps"] == 3 and report["texts_seen"] == 12 and report["max_len"] == 0
    assert report["layers"] == [1] and report["corpus_texts"] > 30_000
    assert 0 < report["tokens_seen"] <= report["padded_tokens"]
    assert math.isfinite(report["first_loss"]) and math.isfinite(report["last_loss_mean50"])
    with open(tmp_path / "student.json") as f:
        assert json.load(f)["steps"] == 3  # --report defaults to OUTPUT.json.

    teacher, student, started = _load(teacher_dir), _load(output), _load(init)
    assert [type(m).__name__ for m in student] == ["Transformer", "Pooling", "Normalize"]
    for model in (student, started):
        assert len(model.transformers_model.encoder.layer) == 1
        assert model.transformers_model.config.num_hidden_layers == 1
    # The init-only student is the teacher's layer 1 (and its embeddings), unchanged.
    kept = teacher.transformers_model.encoder.layer[1].state_dict()
    for name, value in started.transformers_model.encoder.layer[0].state_dict().items():
        torch.testing.assert_close(value, kept[name], rtol=0, atol=0)
    # Three AdamW steps at a warm-up learning rate moved every kept layer's weights.
    trained = student.transformers_model.encoder.layer[0].state_dict()
    assert any(not torch.equal(trained[name], value) for name, value in kept.items())

    embedded = student.encode(["in the beginning", "god created the heavens"])
    assert embedded.shape == (2, HIDDEN)
    assert abs(float((embedded ** 2).sum(-1).max()) - 1) < 1e-5  # Normalize kept.


def test_peer_refuses_layers_the_teacher_lacks_and_an_occupied_output(tmp_path):
    teacher_dir = _tiny_sentence_transformer(tmp_path)
    with pytest.raises(ValueError, match="--layers=1,5"):
        peer.drop_layers(_load(teacher_dir), (1, 5))
    with pytest.raises(ValueError, match="increasing"):
        peer.drop_layers(_load(teacher_dir), (1, 0))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="--overwrite"):
        peer.main([f"--teacher={teacher_dir}", f"--output={occupied}", "--layers=0",
                   "--max_steps=1", "--threads=0"])
    assert (occupied / "keep.txt").read_text() == "mine"


def test_learning_rate_warms_up_then_decays_to_zero():
    schedule = [peer.learning_rate(1e-4, p) for p in (0.0, 0.05, 0.1, 0.55, 1.0)]
    assert schedule == pytest.approx([0.0, 5e-5, 1e-4, 5e-5, 0.0])


def test_training_sentences_skip_held_out_chapters():
    every = peer.training_sentences(held_out_every=0)
    kept = peer.training_sentences(held_out_every=50)
    assert len(kept) < len(every) and all(s == s.strip() and s for s in kept)
    assert every[0] == "In the beginning God created the heavens and the earth."


def test_training_texts_are_the_pieces_our_preparation_cuts():
    """Whole sentences grouped while they fit --max_len tokens (`units.document_pieces`), a
    longer one alone, or a drawn length with --min_len; held-out documents skipped; --max_len 0:
    the sentences."""
    from distil_flax.data import units
    from distil_flax.data.units import is_held_out

    def words(sentences):
        return [len(s.split()) for s in sentences]

    doc = "One two three. Four five. Six seven eight nine ten eleven twelve. Last one."
    assert peer.training_texts(words, 5, 0, [doc]) == [
        "One two three. Four five.", "Six seven eight nine ten eleven twelve.", "Last one."]
    assert peer.training_texts(words, 100, 0, [doc]) == [doc]
    docs = [f"Document {i} here. It has two sentences." for i in range(100)]
    kept = peer.training_texts(words, 100, 50, docs)
    assert kept == [d for d in docs if not is_held_out(d, 50)] and len(kept) < len(docs)
    # --min_len (data.min_len): each text's most drawn as preparation draws it for the document.
    long_doc = " ".join(f"Sentence {i} has five words." for i in range(300))
    mixed = peer.training_texts(words, 60, 0, [long_doc], min_len=5)
    assert " ".join(mixed) == long_doc
    cut = units.document_pieces([[0] * n for n in words(units.split_sentences(long_doc))], 60, 5,
                                units.text_hash(long_doc))
    assert [len(t.split()) for t in mixed] == [len(p) for p in cut]
    assert len({len(t.split()) for t in mixed}) > 5  # Lengths from 5 to 60 words.
    from distil_flax.training.config_files import load_config

    recipe = load_config(os.path.join(ROOT, "configs", "embed_minilm.py"))
    assert peer.default_max_len() == recipe.data.max_len > 0
    assert peer.default_min_len() == recipe.data.min_len


def test_side_by_side_table_has_the_probe_and_the_teacher_row():
    side_by_side = _load_bench("embedding_peer")
    scores = {"quotes": {"text_cosine_spearman": 0.81234, "text_recall@10": 0.5}}
    table = side_by_side.format_table([
        {"system": "ours", "minutes": 9.96, "load": 1.04, "steps": 250, "texts_seen": "≈ 9",
         "tokens_seen": 1234, "probe": 0.5123, "scores": scores},
        {"system": "teacher", "probe": 0.53}]).splitlines()
    assert table[0] == ("| system | minutes | load | steps | texts seen | tokens seen | probe | "
                        "quotes: Spearman / recall@10 |")
    assert table[2] == "| ours | 10.0 | 1.0 | 250 | ≈ 9 | 1,234 | 0.512 | 0.812 / 0.500 |"
    assert table[3] == "| teacher | — | — | — | — | — | 0.530 | 1 / 1 |"


def test_side_by_side_checks_its_held_out_files_before_training(tmp_path):
    side_by_side = _load_bench("embedding_peer")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "quotes.txt").write_text("One.\n")
    (b / "quotes.txt").write_text("Two.\n")
    workdir = tmp_path / "work"
    with pytest.raises(SystemExit, match="--more_text: .*missing.txt is not a file"):
        side_by_side.main([f"--workdir={workdir}", f"--more_text={tmp_path / 'missing.txt'}",
                           "--ours=none", "--layers=0"])
    with pytest.raises(SystemExit, match="distinct names"):
        side_by_side.main([f"--workdir={workdir}", "--ours=none", "--layers=0",
                           f"--more_text={a / 'quotes.txt'},{b / 'quotes.txt'}"])
    with pytest.raises(SystemExit, match="--labelled: .*topics.tsv is not a file"):
        side_by_side.main([f"--workdir={workdir}", "--ours=none", "--layers=0",
                           f"--labelled={tmp_path / 'topics.tsv'}"])
    assert not workdir.exists()  # Nothing ran.


# ----------------------------------------------------------------------------------------------
# notebooks/embeddings.ipynb, executed as tests/test_notebooks.py executes the others.
# ----------------------------------------------------------------------------------------------


def test_embeddings_notebook_distils_evaluates_and_plots(tmp_path, monkeypatch):
    from test_notebooks import _execute, _images

    # The kernel inherits this: one CPU device, not the tests' eight (and conftest's cache dir).
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    workdir = tmp_path / "embeddings"
    notebook = _execute("embeddings", tmp_path, SIZE="tiny", REPO_DIR=ROOT, WORKDIR=str(workdir),
                        HELD_OUT=64, TIMING_REPEATS=1)
    with open(workdir / "student" / "config.json") as f:
        config = json.load(f)
    assert config["model"]["num_layers"] == 1 and config["init"]["from_teacher"]
    with open(workdir / "evaluation.json") as f:
        report = json.load(f)
    assert report["data"]["text"]["sentences"] == 64
    assert set(report["metrics"]) == {"teacher", "init_only", "student"}
    for role in ("init_only", "student"):
        assert -1 <= report["metrics"][role]["text_cosine_spearman"] <= 1
        assert 0 <= report["metrics"][role]["text_recall@10"] <= 1
    assert _images(notebook) == 2  # The similarity scatter and the speed/quality plot.
