"""RoBERTa and XLM-R: the one encoder by fields, checked against `transformers` (CPU, fp32).

Every model here is a randomly initialised small transformers model saved to a temporary folder,
and every vocabulary is trained on a few hundred bundled documents: no downloads. Parity is 1e-4
both ways (transformers → `load_hf_checkpoint` → our forward, and `export_hf` → transformers),
packed rows reproduce each of their segments alone, the student `init_from_teacher` makes from a
RoBERTa teacher is the teacher minus its unmapped layers, and `configs/distilroberta.py:tiny`
distils, exports and reloads end to end.
"""

import functools
import itertools
import json
import os

# Nothing may reach a hub: every load below is from a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import sentencepiece as spm  # noqa: E402
from flax import linen as nn  # noqa: E402

torch = pytest.importorskip("torch", reason="HF interop tests need torch: pip install -e '.[test]'")
transformers = pytest.importorskip(
    "transformers", reason="HF interop tests need transformers: pip install -e '.[test]'")

from hf_parity import (  # noqa: E402
    TOL,
    assert_bit_exact,
    deterministic_torch,  # noqa: F401 (autouse: seeds torch for every test here)
    hidden_diff,
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

from distil_flax import data  # noqa: E402
from distil_flax import model as model_lib  # noqa: E402
from distil_flax.distill import config as config_lib  # noqa: E402
from distil_flax.interop import export as export_hf  # noqa: E402
from distil_flax.interop import hf  # noqa: E402
from distil_flax.model import heads as heads_lib  # noqa: E402
from distil_flax.model import student_init  # noqa: E402
from distil_flax.training import config_files  # noqa: E402

# One vocabulary size, hidden size and batch shape throughout: our forward runs op by op, and
# every op compiled for one test's shapes is reused by the next.
VOCAB = 500
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD = 1  # RoBERTa's <pad>: transformers numbers positions from PAD + 1.
CLASSES = {"roberta": ("RobertaConfig", "RobertaForMaskedLM", "RobertaModel"),
           "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForMaskedLM", "XLMRobertaModel")}


# ----------------------------------------------------------------------------------------------
# Vocabularies and models.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return list(itertools.islice(data.read_documents("bundled"), 300))


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory, documents) -> str:
    """Byte-level BPE from `data.train_bpe`: vocab.json, merges.txt and tokenizer.json."""
    folder = str(tmp_path_factory.mktemp("bpe"))
    data.train_bpe(documents, VOCAB, folder)
    assert data.load_tokenizer(folder).vocab_size == VOCAB
    return folder


@pytest.fixture(scope="module")
def xlmr_model(tmp_path_factory, documents) -> str:
    """A SentencePiece unigram model laid out as XLM-R's sentencepiece.bpe.model."""
    folder = tmp_path_factory.mktemp("xlmr_vocab")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(documents), model_prefix=str(folder / "sp"), vocab_size=VOCAB - 2,
        model_type="unigram", minloglevel=2)
    os.rename(folder / "sp.model", folder / "sentencepiece.bpe.model")
    return str(folder / "sentencepiece.bpe.model")


def _hf_config(family: str, **overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=26, type_vocab_size=1,
              layer_norm_eps=1e-5, pad_token_id=PAD, bos_token_id=0, eos_token_id=2,
              attn_implementation="eager")
    return getattr(transformers, CLASSES[family][0])(**(kw | overrides))


def _our_model(size: str, vocab_size: int, seed: int = 0, **fields):
    """A model of ours (fields overridden) with random parameters, LayerNorm scales near 1."""
    cfg = our_config(size, vocab_size, **fields)
    init = model_lib.init_fn(model_lib.make_encoder(cfg))
    return cfg, _random_like(jax.eval_shape(init, jax.random.PRNGKey(0)), seed)


def _random_like(abstract, seed: int = 0):
    """float32 numpy parameters of `abstract`'s shapes (drawn here: nothing to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (rng.normal(0, 0.1, x.shape)
                         + (str(path[-1].key) == "scale")).astype(np.float32),
        nn.unbox(abstract))


# <s> … ids, right-padded with <pad> on all but the first row. Real ids avoid <pad>: transformers
# finds RoBERTa's padding (for positions) by its id.
_batch = functools.partial(padded_batch, low=4, pad=PAD, first=0)


def _no_loading_problems(info):
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


# ----------------------------------------------------------------------------------------------
# The encoder by fields.
# ----------------------------------------------------------------------------------------------


def test_old_model_sections_load_with_bert_fields():
    """A config.json saved before layer_norm_eps / position_offset existed means BERT's."""
    old = ml_collections.ConfigDict({k: v for k, v in model_lib.model_config("tiny").items()
                                     if k not in ("layer_norm_eps", "position_offset")})
    old.vocab_size = 40
    model = model_lib.make_encoder(old)
    assert (model.layer_norm_eps, model.position_offset) == (1e-12, 0)
    shapes = jax.eval_shape(model_lib.init_fn(model), jax.random.PRNGKey(0))
    assert nn.unbox(shapes)["position_embeddings"]["embedding"].shape == (512, 32)
    for field, value in (("layer_norm_eps", 0.0), ("position_offset", -1),
                         ("head_style", "gpt2")):
        bad = old.copy_and_resolve_references()
        setattr(bad, field, value)
        with pytest.raises(ValueError, match=f"model.{field}"):
            model_lib.make_encoder(bad)


# ----------------------------------------------------------------------------------------------
# Import: transformers → ours.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
@pytest.mark.parametrize("head", ["mlm", "none"])
def test_import_matches_transformers(family, head, tmp_path):
    config = _hf_config(family)
    cls = CLASSES[family][1 if head == "mlm" else 2]
    module = perturbed(getattr(transformers, cls)(config))
    module.save_pretrained(tmp_path)
    model_cfg, params = hf.load_hf_checkpoint(tmp_path)
    assert model_cfg.head_style == family
    assert (model_cfg.position_offset, model_cfg.max_position_embeddings) == (2, 24)
    assert (model_cfg.type_vocab_size, model_cfg.layer_norm_eps) == (1, 1e-5)
    assert model_cfg.use_pooler == (head == "none")  # RobertaModel keeps its pooler.

    ids, mask = _batch(config.vocab_size)
    logits, out = our_forward(model_cfg, params, ids, mask)
    hf_out = their_forward(module, ids, mask)
    diffs = dict(hidden_max=hidden_diff(out, hf_out, mask))
    if head == "mlm":
        diffs["logits"] = max_diff(logits, hf_out.logits, mask)
    else:
        diffs["pooled"] = pooled_diff(out, hf_out)
    report(f"import {cls}", **diffs)
    assert max(diffs.values()) < TOL, diffs


def test_packed_segments_each_start_at_roberta_row_two(tmp_path):
    """Two sentences packed in one row (positions restart at 0 in each) give the hidden states
    of each alone, which equal RobertaModel's on each sentence alone."""
    module = perturbed(transformers.RobertaModel(_hf_config("roberta")))
    module.save_pretrained(tmp_path)
    model_cfg, params = hf.load_hf_checkpoint(tmp_path)
    rng = np.random.default_rng(1)
    a, b = ([0, *rng.integers(4, VOCAB, n), 2] for n in (2, 3))  # <s> … </s>: 4 and 5 tokens.
    # Row 0: a and b packed; rows 1 and 2: each alone. Padding is segment 0.
    ids = np.array([a + b + [PAD], a + [PAD] * 6, b + [PAD] * 5])
    segments = np.array([[1] * 4 + [2] * 5 + [0], [1] * 4 + [0] * 6, [1] * 5 + [0] * 5])
    positions = np.array([[*range(4), *range(5), 0], [*range(4)] + [0] * 6,
                          [*range(5)] + [0] * 5])
    _, out = our_forward(model_cfg, params, ids, segments > 0, segments=segments,
                         positions=positions)
    hidden = np.asarray(out["hidden"])
    diffs = {}
    for name, sentence, start, alone in (("a", a, 0, 1), ("b", b, 4, 2)):
        packed = hidden[0, start:start + len(sentence)]
        theirs = their_forward(module, np.array([sentence]), np.ones((1, len(sentence)), np.int64))
        diffs[f"{name}_vs_alone"] = float(np.abs(packed - hidden[alone, :len(sentence)]).max())
        diffs[f"{name}_vs_transformers"] = float(
            np.abs(packed - theirs.last_hidden_state.numpy()[0]).max())
    report("packed RoBERTa row", **diffs)
    assert max(diffs.values()) < TOL, diffs


def test_import_sharded_legacy_and_bad_configs(tmp_path):
    module = perturbed(transformers.RobertaForMaskedLM(_hf_config("roberta")))
    (_, legacy), reference = save_sharded_and_legacy(module, tmp_path)
    for folder in (tmp_path / "sharded", legacy):
        _, params = hf.load_hf_checkpoint(folder)
        np.testing.assert_array_equal(
            params["layers_1"]["mlp_in"]["kernel"],
            reference["roberta.encoder.layer.1.intermediate.dense.weight"].T)
        np.testing.assert_array_equal(params["mlm_bias"], reference["lm_head.bias"])
        np.testing.assert_array_equal(params["position_embeddings"]["embedding"],
                                      reference["roberta.embeddings.position_embeddings.weight"])

    config_file = legacy / "config.json"
    original = json.loads(config_file.read_text())
    for changes, message in (({"max_position_embeddings": 2}, "leaves no position"),
                             ({"pad_token_id": None}, "pad_token_id None"),
                             ({"layer_norm_eps": 0}, "layer_norm_eps 0"),
                             ({"hidden_act": "gelu_new"}, "activation 'gelu_new'")):
        config_file.write_text(json.dumps(original | changes))
        with pytest.raises(ValueError, match=message) as error:
            hf.load_hf_checkpoint(legacy)
        assert str(config_file) in str(error.value)


def test_bert_with_another_layer_norm_eps_imports(tmp_path):
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=24, layer_norm_eps=1e-5,
        attn_implementation="eager")
    module = perturbed(transformers.BertForMaskedLM(config))
    module.save_pretrained(tmp_path)
    model_cfg, params = hf.load_hf_checkpoint(tmp_path)
    assert (model_cfg.layer_norm_eps, model_cfg.position_offset) == (1e-5, 0)
    ids, mask = _batch(VOCAB)
    logits, out = our_forward(model_cfg, params, ids, mask)
    hf_out = their_forward(module, ids, mask)
    assert max_diff(logits, hf_out.logits, mask) < TOL
    # It exports as a BERT with that epsilon (DistilBERT's is fixed at 1e-12).
    assert hf.hf_config(model_cfg)["layer_norm_eps"] == 1e-5


# ----------------------------------------------------------------------------------------------
# Export: ours → transformers, with the tokenizer.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,vocabulary", [("roberta", "vocab.json"),
                                               ("roberta", "folder"),
                                               ("xlm-roberta", "sentencepiece.bpe.model")])
def test_export_loads_in_transformers_and_matches(family, vocabulary, bpe_folder, xlmr_model,
                                                  tmp_path):
    tokenizer_path = {"vocab.json": os.path.join(bpe_folder, "vocab.json"),
                      "folder": bpe_folder}.get(vocabulary, xlmr_model)
    ours = data.load_tokenizer(tokenizer_path)
    cfg, params = _our_model("tiny_roberta", ours.vocab_size, head_style=family)
    output = tmp_path / "export"
    written = hf.export_hf(params, cfg, output, tokenizer_path=tokenizer_path)
    config = json.loads((output / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "pad_token_id", "bos_token_id", "eos_token_id",
                                   "max_position_embeddings", "type_vocab_size",
                                   "layer_norm_eps")} == {
        "model_type": family, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "max_position_embeddings": 26, "type_vocab_size": 1, "layer_norm_eps": 1e-5}
    assert "README.md" in written and "tokenizer.json" in written
    assert {"vocab.json", "merges.txt"} <= set(written) if family == "roberta" else (
        "sentencepiece.bpe.model" in written)

    module, info = transformers.AutoModelForMaskedLM.from_pretrained(
        output, output_loading_info=True, attn_implementation="eager")
    assert type(module).__name__ == CLASSES[family][1]
    _no_loading_problems(info)
    ids, mask = _batch(cfg.vocab_size)
    logits, out = our_forward(cfg, params, ids, mask)
    hf_out = their_forward(module.eval(), ids, mask)
    diffs = dict(hidden_max=hidden_diff(out, hf_out, mask),
                 logits=max_diff(logits, hf_out.logits, mask))
    report(f"export {type(module).__name__} ({vocabulary})", **diffs)
    assert max(diffs.values()) < TOL, diffs

    # Import(export(x)) is exact, fields included.
    back_cfg, back = hf.load_hf_checkpoint(output)
    assert_bit_exact(params, back, dtype=None)
    for key in ("num_layers", "hidden_size", "vocab_size", "type_vocab_size", "head_style",
                "max_position_embeddings", "position_offset", "layer_norm_eps"):
        assert back_cfg[key] == cfg[key], key

    # The family's own tokenizer class loads the files and encodes as ours does.
    fast = (transformers.RobertaTokenizerFast if family == "roberta"
            else transformers.XLMRobertaTokenizerFast)
    text = "In the beginning God created"
    expected = [ours.bos_id, *ours.encode_batch([text])[0], ours.eos_id]
    for cls in (transformers.AutoTokenizer, fast):
        tokenizer = cls.from_pretrained(output)
        assert tokenizer(text)["input_ids"] == expected, cls
        assert (tokenizer.pad_token_id, tokenizer.mask_token_id) == (1, ours.mask_id)


def test_export_bare_model_and_errors(bpe_folder, tmp_path, caplog):
    vocab = data.load_tokenizer(bpe_folder).vocab_size
    cfg, params = _our_model("tiny_roberta", vocab, use_pooler=True)
    hf.export_hf(params, cfg, tmp_path / "base", head="none")
    module, info = transformers.AutoModel.from_pretrained(
        tmp_path / "base", output_loading_info=True, attn_implementation="eager")
    assert type(module).__name__ == "RobertaModel"
    _no_loading_problems(info)
    ids, mask = _batch(vocab)
    _, out = our_forward(cfg, params, ids, mask)
    hf_out = their_forward(module.eval(), ids, mask)
    pooled = pooled_diff(out, hf_out)
    assert max(hidden_diff(out, hf_out, mask), pooled) < TOL

    # A student without token types exports RoBERTa's one row, as zeros.
    cfg, params = _our_model("tiny_roberta", vocab, type_vocab_size=0)
    hf.export_hf(params, cfg, tmp_path / "no_types")
    module = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "no_types")
    assert not module.roberta.embeddings.token_type_embeddings.weight.detach().numpy().any()

    # A BERT vocabulary (pad 0) cannot hold RoBERTa's positions (pad_token_id + 1).
    vocab_txt = tmp_path / "vocab.txt"
    vocab_txt.write_text("".join(t + "\n" for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                    "the", "cat")))
    with pytest.raises(ValueError, match=f"tokenizer {vocab_txt}: its pad id is 0"):
        hf.export_hf(params, cfg, tmp_path / "bad", tokenizer_path=str(vocab_txt))
    # A BERT-named model whose positions start past row 0 has no BERT layout.
    cfg, params = _our_model("tiny", vocab, position_offset=2)
    with pytest.raises(ValueError, match="model.position_offset is 2"):
        hf.export_hf(params, cfg, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("family,head", [("roberta", "seq_cls"), ("roberta", "multiple_choice"),
                                         ("roberta", "qa"), ("roberta", "token_cls"),
                                         ("xlm-roberta", "seq_cls")])
def test_task_heads_export_and_import(family, head, tmp_path):
    """RoBERTa's classifier (dense → tanh → out_proj on <s>) is our pooler + classifier."""
    cfg = model_lib.model_config("tiny_roberta")
    cfg.vocab_size, cfg.max_position_embeddings, cfg.dtype = VOCAB, 24, "float32"
    cfg.head_style = family
    pooling = heads_lib.task_pooling(cfg)
    cfg.use_pooler = pooling == "pooler" and head in ("seq_cls", "multiple_choice")
    num_labels = {"multiple_choice": 1, "qa": 2}.get(head, 3)
    task = heads_lib.TaskHead(head, num_labels, head_dropout=0.1)
    model = heads_lib.make_task_model(cfg, head=head, num_labels=num_labels, pooling=pooling,
                                      head_dropout=0.1)
    params = _random_like(jax.eval_shape(heads_lib.init_fn(model), jax.random.PRNGKey(0)))
    hf.export_task_hf(params, cfg, task, tmp_path / "task")
    config = json.loads((tmp_path / "task" / "config.json").read_text())
    cls_name = hf.TASK_CLASSES[(family, head)]
    assert config["architectures"] == [cls_name] and config["pad_token_id"] == 1
    module, info = getattr(transformers, cls_name).from_pretrained(
        tmp_path / "task", output_loading_info=True, attn_implementation="eager")
    _no_loading_problems(info)

    ids, mask = _task_inputs(head)
    ours, _ = model.apply({"params": params}, ids, mask)
    with torch.no_grad():
        theirs = module.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    theirs = (np.stack([theirs.start_logits, theirs.end_logits], -1) if head == "qa"
              else theirs.logits.numpy())
    # Per-position heads are compared where there are tokens: padding attends differently.
    diff = (max_diff(ours, torch.tensor(theirs), mask) if head in ("qa", "token_cls")
            else float(np.abs(np.asarray(ours) - theirs).max()))
    report(f"export {cls_name}", logits=diff)
    assert diff < TOL

    back_cfg, back_task, back = hf.load_hf_task_checkpoint(tmp_path / "task")
    assert (back_task.head, back_task.num_labels) == (head, num_labels)
    assert back_cfg.use_pooler == cfg.use_pooler and back_cfg.head_style == family
    assert_bit_exact(params, back, dtype=None)


def _task_inputs(head: str):
    """[3, 10] rows; multiple choice: one question with them as its 3 choices, [1, 3, 10]."""
    ids, mask = _batch(VOCAB)
    return (ids[None], mask[None]) if head == "multiple_choice" else (ids, mask)


# ----------------------------------------------------------------------------------------------
# Student initialisation from a RoBERTa teacher.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("student_types", [1, 0])
def test_student_from_roberta_teacher_is_teacher_minus_layers(student_types, tmp_path):
    """The released map [0, 2, 4, 7, 9, 11] on a 12-layer teacher: the student computes the
    teacher with layers 1, 3, 5, 6, 8, 10 skipped (one token-type row kept, or folded)."""
    module = perturbed(transformers.RobertaForMaskedLM(_hf_config("roberta",
                                                                   num_hidden_layers=12)))
    module.save_pretrained(tmp_path)
    teacher_cfg, teacher = hf.load_hf_checkpoint(tmp_path)
    layer_map = list(config_lib.RELEASED_LAYER_MAP)
    student_cfg = model_lib.model_config("tiny_roberta_student")
    student_cfg.update(vocab_size=VOCAB, max_position_embeddings=24, dtype="float32",
                       num_layers=6, type_vocab_size=student_types)
    student_model = model_lib.make_encoder(student_cfg)
    abstract = nn.unbox(jax.eval_shape(model_lib.init_fn(student_model), jax.random.PRNGKey(0)))
    student = student_init.init_from_teacher(teacher, abstract, layer_map, num_heads=(2, 2),
                                             position_offset=(2, 2))
    assert ("token_type_embeddings" in student) == bool(student_types)

    skipping_cfg = teacher_cfg.copy_and_resolve_references()
    skipping_cfg.num_layers = len(layer_map)
    skipping = {k: v for k, v in teacher.items() if not k.startswith("layers_")}
    skipping.update({f"layers_{i}": teacher[f"layers_{t}"] for i, t in enumerate(layer_map)})
    ids, mask = _batch(VOCAB)
    want_logits, want = our_forward(skipping_cfg, skipping, ids, mask)
    got_logits, got = our_forward(student_cfg, student, ids, mask)
    diffs = dict(hidden=max_diff(got["hidden"], torch.tensor(np.asarray(want["hidden"])), mask),
                 logits=max_diff(got_logits, torch.tensor(np.asarray(want_logits)), mask))
    report(f"init from RoBERTa teacher (student token types {student_types})", **diffs)
    assert max(diffs.values()) < 1e-5, diffs

    with pytest.raises(ValueError, match="model.position_offset is 0"):
        student_init.init_from_teacher(teacher, abstract, layer_map, position_offset=(2, 0))
    bert_positions = dict(abstract, position_embeddings={"embedding": jax.ShapeDtypeStruct(
        (24, 32), np.float32)})
    with pytest.raises(ValueError, match="max_position_embeddings \\+ model.position_offset"):
        student_init.init_from_teacher(teacher, bert_positions, layer_map)


# ----------------------------------------------------------------------------------------------
# configs/distilroberta.py end to end.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
def test_distilroberta_tiny_distils_exports_and_reloads(family, bpe_folder, xlmr_model,
                                                         documents, tmp_path):
    """configs/distilroberta.py:tiny from a tiny RobertaForMaskedLM (byte-level BPE), and the
    same recipe from an XLMRobertaForMaskedLM (XLM-R's SentencePiece): train, export, reload."""
    tokenizer = os.path.join(bpe_folder, "vocab.json") if family == "roberta" else xlmr_model
    teacher_dir = tmp_path / "teacher"
    perturbed(getattr(transformers, CLASSES[family][1])(_hf_config(
        family, max_position_embeddings=34))).save_pretrained(teacher_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(documents[:40]))
    c = config_files.load_config(os.path.join(ROOT, "configs/distilroberta.py:tiny"))
    c.model.head_style = family
    c.teacher.checkpoint = str(teacher_dir)
    c.data.tokenizer = tokenizer
    c.data.source, c.data.paths = "text", str(corpus)
    c.data.cache_dir = str(tmp_path / "prepared")
    c.train.num_steps = 4
    c.train.checkpoint_every = 4
    workdir = tmp_path / "student"
    from distil_flax.distill import train

    final = train.train_and_evaluate(c, str(workdir))
    assert 0 <= final["teacher_mlm_accuracy"] <= 1

    output = tmp_path / "exported"
    written = export_hf.export_run(str(workdir), str(output))
    assert {"README.md", "tokenizer.json", "tokenizer_config.json"} <= set(written)
    assert CLASSES[family][1] in (output / "README.md").read_text()
    module, info = transformers.AutoModelForMaskedLM.from_pretrained(
        output, output_loading_info=True, attn_implementation="eager")
    assert type(module).__name__ == CLASSES[family][1]
    _no_loading_problems(info)
    model_cfg, params = hf.load_hf_checkpoint(output)
    ids, mask = _batch(VOCAB)
    logits, _ = our_forward(model_cfg, params, ids, mask)
    diff = max_diff(logits, their_forward(module.eval(), ids, mask).logits, mask)
    report(f"configs/distilroberta.py:tiny ({family}) export", logits=diff)
    assert diff < TOL

    fill = transformers.pipeline("fill-mask", model=str(output), device="cpu")
    predictions = fill("In the beginning God created the <mask> and the earth.")
    # A random student's top pieces may decode to "" (SentencePiece's bare "▁"), so only their
    # ids and sentences are checked.
    assert len(predictions) == 5
    assert all(0 <= p["token"] < VOCAB and p["sequence"].startswith("In the beginning")
               for p in predictions)
