"""ONNX export (`export_onnx.py`) and the inference benchmark (`bench/inference.py`).

The ONNX graph equals PyTorch and our JAX embeddings to 1e-4 on new batch shapes (dynamic axes),
for BERT (token types) and DistilBERT, from an HF folder, a sentence-transformers folder or a
workdir; the int8 graph runs and stays close; the command prints its differences and ends a bad
input in one `error:` line; the benchmark runs end to end at toy size and reports its ratios (no
timing is asserted).
"""

import importlib.util
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402

torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test]'")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install -e '.[test]'")

from helpers import SPECIALS, WORDS, error_line, save_params_checkpoint, write_vocab  # noqa: E402

from distil_flax import model as model_lib  # noqa: E402
from distil_flax.data import load_tokenizer  # noqa: E402
from distil_flax.distill import config as config_lib  # noqa: E402
from distil_flax.embeddings import embed as embeddings  # noqa: E402
from distil_flax.interop import hf  # noqa: E402
from distil_flax.interop import onnx as export_onnx  # noqa: E402
from distil_flax.interop import sentence_transformers as st_layout  # noqa: E402
from distil_flax.training import (  # noqa: E402
    config_files,
)

TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _tiny(size: str, seed: int = 0, max_positions: int = 32):
    cfg = model_lib.model_config(size)
    cfg.vocab_size = len(SPECIALS) + len(WORDS)
    cfg.max_position_embeddings = max_positions
    cfg.dtype = "float32"
    params = nn.unbox(jax.eval_shape(model_lib.init_fn(model_lib.make_encoder(cfg)),
                                     jax.random.PRNGKey(seed)))
    rng = np.random.default_rng(seed)
    return cfg, jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32), params)



@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A BERT-shaped sentence-transformers export (cls pooling, Normalize) and a DistilBERT-
    shaped plain HF export (no tokenizer), with their configs and params."""
    tmp = tmp_path_factory.mktemp("onnx_models")
    vocab = write_vocab(tmp)
    bert_cfg, bert = _tiny("tiny")
    st_layout.export_sentence_transformers(bert, bert_cfg, tmp / "bert_st", pooling="cls",
                                           normalize=True, tokenizer_path=vocab)
    distil_cfg, distil = _tiny("tiny_student", seed=1)
    hf.export_hf(distil, distil_cfg, tmp / "distil_hf", head="none")
    return {"vocab": vocab, "bert_st": (tmp / "bert_st", bert_cfg, bert),
            "distil_hf": (tmp / "distil_hf", distil_cfg, distil)}


# ----------------------------------------------------------------------------------------------
# ONNX.
# ----------------------------------------------------------------------------------------------


def test_onnx_matches_pytorch_and_jax_on_new_shapes(folders, tmp_path):
    folder, cfg, params = folders["bert_st"]
    result = export_onnx.export_onnx(str(folder), str(tmp_path / "bert.onnx"), quantize="int8")
    assert result.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert (result.pooling, result.normalize) == ("cls", True)  # From the folder's modules.
    assert max(result.max_abs_diff_hidden, result.max_abs_diff_embedding) <= TOL
    assert result.int8_output == str(tmp_path / "bert_int8.onnx")
    assert 0.9 < result.int8_cosine_min <= result.int8_cosine_mean <= 1 + 1e-6

    # Shapes the trace never saw: one unpadded row, and three rows of another length.
    tokenizer = load_tokenizer(folders["vocab"])
    session = export_onnx.session(result.output)
    module, _ = export_onnx.sentence_module(str(folder), "cls", True)
    for sentences in (["the cat sat on the mat ."],
                      ["a dog", "she ran out of the big red house and it was small", "it"]):
        ids = [[tokenizer.cls_id, *t, tokenizer.sep_id]
               for t in tokenizer.encode_batch(sentences)]
        length = max(map(len, ids))
        mask = np.array([[1] * len(t) + [0] * (length - len(t)) for t in ids], np.int64)
        ids = np.array([t + [0] * (length - len(t)) for t in ids], np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden, embedding = session.run(None, feeds)
        with torch.inference_mode():
            expected = module(*(torch.from_numpy(feeds[k]) for k in feeds))
        keep = mask.astype(bool)
        assert np.abs(hidden[keep] - expected[0].numpy()[keep]).max() <= TOL
        ours = embeddings.embed(embeddings.embedding_encoder(cfg, "float32"),
                                embeddings.encoder_only(params), tokenizer, sentences,
                                pooling="cls", max_len=32)
        ours /= np.linalg.norm(ours, axis=-1, keepdims=True)
        assert np.abs(embedding - ours).max() <= TOL
        quantized = export_onnx.session(result.int8_output).run(["sentence_embedding"], feeds)[0]
        assert quantized.shape == embedding.shape and np.isfinite(quantized).all()


def test_onnx_distilbert_without_tokenizer(folders, tmp_path):
    folder, _, _ = folders["distil_hf"]
    result = export_onnx.export_onnx(str(folder), str(tmp_path / "d.onnx"), pooling="mean")
    assert result.inputs == ["input_ids", "attention_mask"]  # DistilBERT takes no token types.
    assert (result.pooling, result.normalize, result.int8_output) == ("mean", False, None)
    assert max(result.max_abs_diff_hidden, result.max_abs_diff_embedding) <= TOL
    assert sorted(os.listdir(tmp_path)) == ["d.onnx"]  # No temporary file left.


def test_an_onnx_export_removes_what_a_killed_one_left(folders, tmp_path):
    """A killed export leaves its temporary graph (and, from a run, its staged model folder)
    beside the output; the next export to that output removes them, but not a live one's."""
    from distil_flax.training import atomic

    folder, _, _ = folders["distil_hf"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # A pid that no longer runs: the export that was killed.
    output = tmp_path / "d.onnx"
    litter = [f"d.onnx.{dead.pid}-0123abcd.tmp",  # An earlier version's name.
              f"d.onnx.tmp{dead.pid}-{atomic.HOST}.onnx",
              f"d.onnx.tmp{dead.pid}-{atomic.HOST}.model"]
    for name in litter:
        (tmp_path / name).write_bytes(b"partial")
    live = f"d.onnx.tmp{os.getpid()}-{atomic.HOST}.model"  # Another export, still running.
    (tmp_path / live).mkdir()
    export_onnx.export_onnx(str(folder), str(output), pooling="mean")
    assert sorted(os.listdir(tmp_path)) == ["d.onnx", live]


def test_onnx_from_a_workdir(folders, tmp_path):
    folder, cfg, params = folders["distil_hf"]
    c = config_lib.base_config()
    c.model = cfg
    c.data.tokenizer = folders["vocab"]
    workdir = tmp_path / "run"
    workdir.mkdir()
    config_files.save_json(c, str(workdir / "config.json"))
    save_params_checkpoint(workdir, 3, params)
    result = export_onnx.export_onnx(str(workdir), str(tmp_path / "run.onnx"))
    assert max(result.max_abs_diff_hidden, result.max_abs_diff_embedding) <= TOL
    # The same weights as the DistilBERT folder: the same graph outputs.
    feeds = {"input_ids": np.array([[2, 7, 8, 9, 3]]), "attention_mask": np.ones((1, 5), int)}
    ours = export_onnx.session(result.output).run(None, feeds)[1]
    reference = export_onnx.export_onnx(str(folder), str(tmp_path / "ref.onnx"))
    np.testing.assert_allclose(ours, export_onnx.session(reference.output).run(None, feeds)[1],
                               atol=1e-6)


def test_evaluation_scores_onnx_exports_beside_the_student(folders, tmp_path):
    from distil_flax.embeddings import evaluate as evaluate_embeddings
    from distil_flax.interop import onnx_runtime

    folder, cfg, _ = folders["bert_st"]
    teacher, _, _ = folders["distil_hf"]
    exported = export_onnx.export_onnx(str(folder), str(tmp_path / "s.onnx"), quantize="int8")
    rng = np.random.default_rng(0)
    text = tmp_path / "text.txt"
    text.write_text("".join(" ".join(rng.choice(WORDS, rng.integers(3, 12))) + "\n"
                            for _ in range(60)))
    report = evaluate_embeddings.evaluate(
        str(folder), str(teacher), text=str(text), pooling="cls", neighbours=5, max_len=32,
        tokenizer=folders["vocab"], onnx=f"{exported.output},{exported.int8_output}")
    metrics = report["metrics"]
    assert list(metrics) == ["teacher", "student", "onnx:s.onnx", "onnx:s_int8.onnx"]
    # The fp32 graph is the student: the same agreement with the teacher, to rounding.
    for key in ("text_cosine_spearman", "text_recall@5"):
        assert abs(metrics["onnx:s.onnx"][key] - metrics["student"][key]) < 1e-3, key
        assert -1 <= metrics["onnx:s_int8.onnx"][key] <= 1
    table = evaluate_embeddings.format_table(report)
    assert f"onnx:s_int8.onnx  onnx×{cfg.hidden_size}" in table, table
    with pytest.raises(FileNotFoundError, match="--onnx=.*nope.onnx: no such file"):
        evaluate_embeddings.evaluate(str(folder), str(teacher), text=str(text),
                                     tokenizer=folders["vocab"], onnx=str(tmp_path / "nope.onnx"))
    garbled = tmp_path / "garbled.onnx"
    garbled.write_bytes(b"\x08\x07not a model")
    with pytest.raises(ValueError, match="garbled.onnx: ONNX Runtime cannot load it"):
        onnx_runtime.embed(str(garbled), [[2, 5, 3]], 0, 32)


def test_onnx_command_prints_its_differences(folders, tmp_path):
    folder, _, _ = folders["bert_st"]
    text = tmp_path / "sentences.txt"
    text.write_text("the cat sat .\n\na dog ran to the house\n")
    result = subprocess.run(
        [sys.executable, "-m", "distil_flax.export_onnx", f"--model={folder}",
         f"--output={tmp_path / 'm.onnx'}", "--quantize=int8", f"--text={text}"],
        capture_output=True, text=True, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ONNX vs PyTorch (fp32, 2 sentences): max |diff|" in result.stdout
    assert "int8 vs fp32 sentence embeddings: cosine mean" in result.stdout
    # PyTorch, ONNX and int8 each run the 2 sentences; the last progress line says so.
    assert "parity: 6/6 sentences (100%)" in result.stderr and " | done in " in result.stderr
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "m_int8.onnx").is_file()


def test_onnx_bad_inputs_are_oneerror_line(folders, tmp_path, capsys):
    folder, _, _ = folders["bert_st"]
    out = str(tmp_path / "x.onnx")
    assert "no such directory" in error_line(
        capsys, lambda: export_onnx.export_onnx(str(tmp_path / "nope"), out))
    (tmp_path / "empty").mkdir()
    assert "is not a Hugging Face model folder" in error_line(
        capsys, lambda: export_onnx.export_onnx(str(tmp_path / "empty"), out))
    assert "--quantize must be one of" in error_line(
        capsys, lambda: export_onnx.export_onnx(str(folder), out, quantize="int4"))
    assert "must end in .onnx" in error_line(
        capsys, lambda: export_onnx.export_onnx(str(folder), str(tmp_path / "x.bin")))
    assert "its folder does not exist" in error_line(
        capsys, lambda: export_onnx.export_onnx(str(folder), str(tmp_path / "a" / "x.onnx")))
    (tmp_path / "x.onnx").write_text("keep")
    assert "exists (--overwrite replaces it)" in error_line(
        capsys, lambda: export_onnx.export_onnx(str(folder), out))
    assert "differs from PyTorch" in error_line(  # A tolerance no graph can meet.
        capsys, lambda: export_onnx.export_onnx(str(folder), str(tmp_path / "y.onnx"),
                                                tolerance=-1.0))
    assert sorted(os.listdir(tmp_path)) == ["empty", "x.onnx"]
    assert (tmp_path / "x.onnx").read_text() == "keep"


# ----------------------------------------------------------------------------------------------
# bench/inference.py at toy size.
# ----------------------------------------------------------------------------------------------


def _bench():
    spec = importlib.util.spec_from_file_location(
        "_bench_inference", os.path.join(ROOT, "bench", "inference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_and_reports_student_teacher_ratios(folders, tmp_path, capsys):
    teacher, _, _ = folders["bert_st"]  # 2 layers, cls pooling, a tokenizer.
    output = tmp_path / "inference.jsonl"
    threads = torch.get_num_threads()
    try:
        records = _bench().main([
            f"--teacher={teacher}", "--layer_map=1", "--sentences=10", "--batch=4",
            "--max_len=32", "--runs=2", "--latency_sentences=2", "--threads=1",
            "--no-isolate", f"--output={output}"])
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    backends = ("jax", "torch", "onnx", "onnx_int8")
    for backend in backends:
        assert f"| {backend} | **student / teacher** |" in stdout
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert lines == json.loads(json.dumps(records))
    ratios = {r["backend"]: r for r in lines if "throughput_ratio" in r}
    assert sorted(ratios) == sorted(backends)
    assert all(r["throughput_ratio"] > 0 and r["latency_ratio"] > 0 for r in ratios.values())
    measured = [r for r in lines if "role" in r]
    assert {(r["backend"], r["role"], r["layers"]) for r in measured} == {
        (b, role, layers) for b in backends for role, layers in (("teacher", 2), ("student", 1))}
    for r in measured:
        assert r["pooling"] == "cls" and r["order"] == "length" and r["sentences"] == 10
        assert r["passes"] == 2 and r["latency_calls"] == 2
        assert r["sentences_per_s_p10"] <= r["sentences_per_s"] <= r["sentences_per_s_p90"]
        # Every backend embeds what JAX embeds (ONNX normalises: cosine, not values).
        assert r["min_cosine_vs_jax"] > (0.9 if r["backend"] == "onnx_int8" else 0.99999)
