"""TinyBERT's and MiniLM's recipes end to end: narrower students, projections, resume, export."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
import torch
import transformers

from distil_flax.distill import train
from distil_flax.interop import export as export_hf
from distil_flax.model import make_encoder
from distil_flax.training.checkpoint import Checkpointer
from distil_flax.training.config_files import load_config
from distil_flax.training.metric_writers import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(recipe, vocab_path, teacher_workdir, **train_overrides):
    c = load_config(os.path.join(ROOT, f"configs/{recipe}.py:tiny"))
    c.data.tokenizer = vocab_path
    c.teacher.checkpoint = teacher_workdir
    for key, value in train_overrides.items():
        setattr(c.train, key, value)
    return c


def _series(workdir, key):
    return [r[key] for r in read_metrics(workdir) if key in r]


def _restore(workdir, step=None):
    """(step, params, the train item) of a checkpoint, as stored."""
    checkpointer = Checkpointer(workdir, save_every=1, keep=10)
    step = step or checkpointer.latest_step()
    restored = checkpointer.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), train=ocp.args.StandardRestore()))
    checkpointer.close()
    return step, jax.device_get(restored["params"]), jax.device_get(restored["train"])


@pytest.fixture(scope="module")
def tinybert(tmp_path_factory, vocab_path, teacher_workdir):
    """An uninterrupted tiny TinyBERT run: a 1 × 16 student of the 2 × 32 teacher."""
    workdir = str(tmp_path_factory.mktemp("tinybert"))
    final = train.train_and_evaluate(_config("tinybert", vocab_path, teacher_workdir), workdir)
    return workdir, final


def test_tinybert_recipe_trains_hidden_states_and_attention(tinybert):
    workdir, final = tinybert
    for term in ("train/loss_hidden", "train/loss_attention"):
        values = _series(workdir, term)
        assert values[-1] < values[0], (term, values)
    # Held out: what the terms compare, per mapped layer (uniform map: student 0 ↔ teacher 1).
    assert {"hidden_mse/embeddings", "hidden_cos/embeddings", "hidden_mse/s0_t1",
            "hidden_cos/s0_t1", "attention_mse/s0_t1"} <= set(final)
    assert _series(workdir, "eval/hidden_cos/s0_t1")[-1] > _series(
        workdir, "eval/hidden_cos/s0_t1")[0]
    # No loss trains the student's MLM head: no MLM metrics for it; the teacher has its own.
    assert "student_mlm_accuracy" not in final and "teacher_mlm_accuracy" in final


def test_minilm_recipe_distils_relations_into_a_narrower_student(tmp_path, vocab_path,
                                                                 teacher_workdir):
    workdir = str(tmp_path)
    final = train.train_and_evaluate(_config("minilm", vocab_path, teacher_workdir), workdir)
    values = _series(workdir, "train/loss_relations")
    assert values[-1] < values[0], values
    assert {"relation_kl/qq", "relation_kl/kk", "relation_kl/vv", "loss_relations"} <= set(final)
    # The text is not masked (no MLM term): no MLM metrics at all, not a perplexity of 1.
    assert not any("mlm" in name or "perplexity" in name for name in final), final
    _, _, train_item = _restore(workdir)
    assert "projections" not in train_item  # Relations need no projection.


def test_projections_are_trained_resumed_exactly_and_never_exported(tinybert, tmp_path,
                                                                    vocab_path, teacher_workdir):
    straight, _ = tinybert
    resumed = str(tmp_path / "resumed")
    c = _config("tinybert", vocab_path, teacher_workdir)
    assert train.train_and_evaluate(c, resumed, stop_at_step=10) == {}
    train.train_and_evaluate(c, resumed)

    step_a, params_a, train_a = _restore(straight)
    step_b, params_b, train_b = _restore(resumed)
    assert step_a == step_b == 20
    jax.tree.map(np.testing.assert_array_equal, (params_a, train_a), (params_b, train_b))
    kernel = train_a["projections"]["hidden"]["kernel"]
    assert kernel.shape == (16, 32)  # Student width → teacher width.
    # Trained: the optimizer moved it between the checkpoints at steps 10 and 20.
    _, _, train_10 = _restore(straight, step=10)
    assert np.max(np.abs(kernel - train_10["projections"]["hidden"]["kernel"])) > 1e-4

    # A resume without the projection (the hidden-state term switched off) is refused by name,
    # before anything is restored or moved.
    c.loss.hidden_states.weight = 0.0
    with pytest.raises(ValueError, match=r"projections/hidden/kernel is \(16, 32\) there and "
                                         r"None here"):
        train.train_and_evaluate(c, resumed)

    # The export holds the student alone (as BertModel: no loss trained its MLM head), and
    # transformers computes what we compute.
    output = tmp_path / "exported"
    export_hf.export_run(straight, str(output))
    weights = safetensors.numpy.load_file(output / "model.safetensors")
    assert not any("projection" in name for name in weights)
    exported, info = transformers.AutoModel.from_pretrained(output, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(exported).__name__ == "BertModel" and exported.config.hidden_size == 16
    exported.eval()
    model = make_encoder(load_config(os.path.join(ROOT, "configs/tinybert.py:tiny")).model,
                         vocab_size=exported.config.vocab_size)
    ids = np.random.default_rng(0).integers(5, exported.config.vocab_size, (2, 12))
    _, out = model.apply({"params": params_a}, ids, np.ones_like(ids),
                         np.broadcast_to(np.arange(12), ids.shape))
    with torch.no_grad():
        theirs = exported(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(out["hidden"]), theirs, atol=1e-4)


# DistilBERT's triple loss from a narrower pruned student: L_cos on the teacher's kept channels.
_TRIPLE_ON_KEPT_CHANNELS = {"alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0,
                            "kept_channels": True}


@pytest.mark.parametrize("recipe,loss", [
    ("tinybert", {}), ("tinybert", {"kept_channels": True}), ("minilm", {}),
    ("tinybert", dict(_TRIPLE_ON_KEPT_CHANNELS, **{"hidden_states.weight": 0.0,
                                                   "attention_scores.weight": 0.0}))],
    ids=["tinybert", "tinybert-kept-channels", "minilm", "triple-kept-channels"])
def test_every_recipe_distils_a_pruned_student(recipe, loss, tmp_path, vocab_path,
                                               teacher_workdir):
    c = load_config(os.path.join(ROOT, f"configs/{recipe}.py:pruned,tiny"))
    c.data.tokenizer, c.teacher.checkpoint = vocab_path, teacher_workdir
    c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = 8, 0, 8
    for key, value in loss.items():
        section, _, field = key.rpartition(".")
        (c.loss[section] if section else c.loss)[field] = value
    if loss.get("alpha_mlm"):
        c.masking.mask_prob = 0.15
    workdir = str(tmp_path)
    final = train.train_and_evaluate(c, workdir)
    assert final and all(np.isfinite(v) for v in final.values()), final
    values = _series(workdir, "train/loss")
    assert values[-1] < values[0], values
    record = json.loads((tmp_path / "pruning.json").read_text())
    assert len(record["layers"]) == c.model.num_layers
    assert [len(h) for h in record["heads"]] == [1] * c.model.num_layers  # Heads of 16, as the
    assert len(record["channels"]) == 16  # tiny teacher's, in half its width.
    _, _, train_item = _restore(workdir)
    # A projection only where a term compares hidden states across widths (TinyBERT's).
    assert ("projections" in train_item) == (recipe == "tinybert" and not loss)


def test_a_pruned_run_resumes_exactly_on_the_units_it_recorded(tmp_path, vocab_path,
                                                               teacher_workdir):
    def config():
        c = load_config(os.path.join(ROOT, "configs/tinybert.py:pruned,tiny"))
        c.data.tokenizer, c.teacher.checkpoint = vocab_path, teacher_workdir
        c.loss.kept_channels = True
        c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = 6, 0, 3
        return c

    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    train.train_and_evaluate(config(), whole)
    train.train_and_evaluate(config(), parts, stop_at_step=3)
    record = tmp_path / "parts" / "pruning.json"
    kept = record.read_text()
    record.write_text("{")  # Damaged: the resume is refused naming it ...
    with pytest.raises(ValueError, match="pruning.json"):
        train.train_and_evaluate(config(), parts)
    record.write_text(kept)  # ... and, intact, continues as the uninterrupted run.
    c = config()
    c.init.prune.calibration_batches = 1  # Not measured again: the record decides.
    train.train_and_evaluate(c, parts)
    _, want, _ = _restore(whole, 6)
    _, got, _ = _restore(parts, 6)
    jax.tree.map(np.testing.assert_array_equal, got, want)
