"""The MLM teacher's top-k logits cached at static masks (`cache_teacher --targets=logits`): the
truncated KL against float64 and its bound, the static masks, targets aligned with the inputs
the student is given in every epoch, cached MLM distillation, its refusals, and a build done in
parts that writes the same bytes as one done at once.

The teacher is conftest's tiny MLM teacher (2 × 32, the bundled corpus's WordPiece vocabulary).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import error_line, set_fields

from distil_flax import data
from distil_flax.data import records, run_targets, teacher_logits, teacher_targets
from distil_flax.data.batches import epoch_packing
from distil_flax.distill import logit_cache, train
from distil_flax.distill.config import base_config, shrink_for_tests
from distil_flax.distill.masking import MaskingSpec, static_mask
from distil_flax.interop import sources
from distil_flax.losses import soft_target_kl, top_k_gap_bound, top_k_kl
from distil_flax.model import make_encoder
from distil_flax.training import partitioning
from distil_flax.training.metric_writers import read_metrics

TOP_K, MASKINGS = 16, 2


def _reference(student, teacher, k, temperature):
    """float64 numpy: (the full KL, the KL over the top k and the tail) per row, times T²."""
    def log_softmax(x):
        x = x / temperature
        return x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)
                          ) - x.max(-1, keepdims=True)

    log_p, log_q = log_softmax(teacher), log_softmax(student)
    full = np.sum(np.exp(log_p) * (log_p - log_q), -1)
    top = np.argsort(-teacher, -1)[:, :k]
    p, q = np.exp(np.take_along_axis(log_p, top, -1)), np.exp(np.take_along_axis(log_q, top, -1))
    p_tail, q_tail = 1 - p.sum(-1), 1 - q.sum(-1)
    coarse = np.sum(p * np.log(p / q), -1) + np.where(
        p_tail > 0, p_tail * np.log(np.maximum(p_tail, 1e-300) / q_tail), 0)
    return temperature**2 * full, temperature**2 * coarse, top


@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])
def test_top_k_kl_is_the_coarse_kl_and_its_gap_is_within_the_bound(x64, scale):
    rng = np.random.default_rng(int(scale * 10))
    vocab, temperature = 300, 2.0
    teacher, student = (rng.normal(size=(7, vocab)) * scale for _ in range(2))
    log_z = np.log(np.sum(np.exp(teacher / temperature), -1))
    for k in (1, 8, 64):
        full, coarse, top = _reference(student, teacher, k, temperature)
        top_k = (jnp.asarray(top), jnp.asarray(np.take_along_axis(teacher, top, -1)),
                 jnp.asarray(log_z))
        for i, row in enumerate(np.eye(7)):  # Row i alone, by its weight.
            got, tail = top_k_kl(student, top_k, row, temperature)
            np.testing.assert_allclose(float(got), coarse[i], rtol=1e-9, atol=1e-12)
            assert 0 < float(tail) < 1
        gap = full - coarse
        bound = np.asarray(top_k_gap_bound(student, top_k, temperature))
        assert np.all(gap >= -1e-12) and np.all(gap <= bound + 1e-9), (k, gap, bound)
    # The whole vocabulary: no tail, exactly the full KL (`soft_target_kl`).
    top = np.argsort(-teacher, -1)
    got, tail = top_k_kl(student, (top, np.take_along_axis(teacher, top, -1), log_z),
                         np.ones(7), temperature)
    np.testing.assert_allclose(float(got), float(soft_target_kl(student, teacher, np.ones(7),
                                                                temperature)), rtol=1e-9)
    assert abs(float(tail)) < 1e-12


def test_static_masks_draw_p_of_the_tokens_never_specials_and_repeat_by_seed():
    spec = MaskingSpec(mask_id=4, vocab_size=50, special_ids=(0, 1, 2, 3, 4), mask_prob=0.15)
    ids = np.random.default_rng(0).integers(5, 50, size=(4000, 23))
    ids[:, 0] = 2  # A special token inside the piece: never chosen.
    rng = np.random.default_rng([7, 0])
    draws = [static_mask(row, rng, spec) for row in ids]
    again = [static_mask(row, np.random.default_rng([7, 0]), spec) for row in ids[:1]]
    np.testing.assert_array_equal(draws[0][0], again[0][0])
    positions = np.concatenate([p for p, _ in draws])
    assert 0 not in positions
    # Stochastic rounding: 0.15 · 22 = 3.3 predictions a segment on average, 3 or 4 each.
    counts = np.array([len(p) for p, _ in draws])
    assert set(counts.tolist()) == {3, 4} and abs(counts.mean() - 3.3) < 0.05
    read = np.concatenate([r for _, r in draws])
    labels = np.concatenate([row[p] for row, (p, _) in zip(ids, draws)])
    masked, kept = np.mean(read == 4), np.mean(read == labels)
    assert abs(masked - 0.8) < 0.02 and 0.1 < kept < 0.12  # 10 % kept, and random hits.
    assert not np.isin(read[(read != 4)], spec.special_ids).any()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    documents = [d for _, d in zip(range(40), data.read_documents("bundled"))]
    path.write_text("\n\n".join(documents) + "\n")
    return str(path)


def _config(root, corpus, vocab_path, teacher_workdir, **changes):
    c = base_config()
    shrink_for_tests(c, "tiny_student")
    settings = {"teacher.checkpoint": teacher_workdir, "teacher.param_dtype": "float32",
                "init.layer_map": (1,), "loss.alpha_ce": 5.0, "loss.alpha_mlm": 2.0,
                "loss.alpha_cos": 0.0, "loss.restrict_ce_to_mask": True,
                "data.source": "text", "data.paths": corpus, "data.tokenizer": vocab_path,
                "data.dir": os.path.join(root, "prepared"), "data.unit_bytes": 32768,
                "data.workers": 1, "train.batch_size": 8, "train.micro_batch_size": 0,
                "train.num_steps": 4, "train.log_every": 1, "train.eval_every": 2,
                "train.eval_batches": 2, "train.checkpoint_every": 4}
    set_fields(c, {**settings, **{k.replace("__", "."): v for k, v in changes.items()}})
    return c


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus, vocab_path, teacher_workdir):
    root = str(tmp_path_factory.mktemp("logits"))
    config = lambda **changes: _config(root, corpus, vocab_path, teacher_workdir,  # noqa: E731
                                       **changes)
    cache = os.path.join(root, "cache")
    manifest = logit_cache.build(config(), cache, top_k=TOP_K, maskings=MASKINGS)
    return config, cache, manifest, root


def test_cached_logits_are_the_teachers_at_the_masks_the_student_is_given(built,
                                                                           teacher_workdir):
    config, cache, manifest, _ = built
    c = config(teacher__cache=cache)
    assert manifest["kind"] == "logits" and manifest["top_k"] == TOP_K
    assert manifest["build"]["tokens_per_second"] > 0 and manifest["bytes_per_million_tokens"]
    setup = train.build(c)
    assert setup.teacher is None and setup.targets.logits is not None
    plain = data.build_datasets(c.data, setup.tokenizer)[0]
    source = sources.open_source(teacher_workdir)
    teacher = make_encoder(source.model_cfg)
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    params = jax.device_get(sources.encoder_params(source, mesh, partitioning.DEFAULT_RULES)[0])
    cached_iter = data.BatchIterator(setup.train_rows, 8, seed=c.seed)
    plain_iter = data.BatchIterator(plain, 8, seed=c.seed)
    rows_per_epoch = epoch_packing(setup.train_rows)["rows"]
    seen_epochs = set()
    for index in range(rows_per_epoch // 8 + 2):  # Into the second epoch: masking 1.
        batch, clean = next(cached_iter), next(plain_iter)
        weights = batch["mlm_weights"] > 0
        if index not in (0, 1, rows_per_epoch // 8, rows_per_epoch // 8 + 1):
            continue
        seen_epochs.add(index >= rows_per_epoch // 8 + 1)
        np.testing.assert_array_equal(batch["segment_ids"], clean["segment_ids"])
        rows = np.nonzero(weights)[0]
        positions = batch["mlm_positions"][weights]
        # The labels are the clean tokens; only masked positions differ from them.
        np.testing.assert_array_equal(clean["input_ids"][rows, positions],
                                      batch["mlm_labels"][weights])
        changed = np.argwhere(batch["input_ids"] != clean["input_ids"])
        masked = set(zip(rows.tolist(), positions.tolist()))
        assert all((r, p) in masked for r, p in changed.tolist())
        assert 0.05 < weights.sum() / (clean["segment_ids"] > 0).sum() < 0.2
        # The teacher on the batch's own inputs gives the cached top k at every slot.
        logits, _ = teacher.apply({"params": params}, batch["input_ids"], batch["segment_ids"],
                                  batch["positions"], logits_at=batch["mlm_positions"])
        logits = np.asarray(logits, np.float64)
        top = np.argsort(-logits, -1)[..., :TOP_K]
        values = np.take_along_axis(logits, top, -1)
        np.testing.assert_allclose(batch["teacher_top_logits"][weights], values[weights],
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(batch["teacher_top_ids"][weights][:, 0],
                                      top[weights][:, 0])
        log_z = np.log(np.sum(np.exp(logits / c.loss.temperature), -1))
        np.testing.assert_allclose(batch["teacher_log_z"][weights], log_z[weights], rtol=1e-5)
    assert seen_epochs == {False, True}
    cached_iter.close()
    plain_iter.close()


def _losses(workdir):
    return [r for r in read_metrics(workdir) if "train/loss" in r]


def test_cached_mlm_distillation_with_no_teacher_or_one_beside_it_and_its_refusals(
        built, tmp_path, capsys):
    config, cache, _, root = built
    workdir = str(tmp_path / "run")
    final = train.train_and_evaluate(config(
        teacher__cache=cache, teacher__checkpoint=str(tmp_path / "nowhere"),
        init__from_teacher=False), workdir)
    records_ = _losses(workdir)
    assert len(records_) == 4 and all(np.isfinite(r["train/loss"]) for r in records_)
    assert all(0 < r["train/teacher_tail_mass"] < 1 for r in records_)
    assert final["kl_top_k"] > 0 and 0 <= final["teacher_mlm_accuracy"] <= 1
    assert "agreement" in final and "teacher_mlm_loss" not in final

    def refused(**changes):
        return error_line(capsys, lambda: train.train_and_evaluate(
            config(**{"teacher__cache": cache, **changes}), str(tmp_path / "refused")))

    line = refused(masking__mask_prob=0.2)
    assert "teacher.cache" in line and "masking.mask_prob=0.15" in line, line
    assert "loss.temperature=2.0" in refused(loss__temperature=1.0)
    assert "loss.restrict_ce_to_mask" in refused(loss__restrict_ce_to_mask=False)
    line = refused(loss__alpha_cos=1.0, teacher__checkpoint="")
    assert "loss.alpha_cos" in line and "teacher.checkpoint" in line, line
    assert "two logits caches" in refused(teacher__cache=f"{cache},{cache}")
    assert "loss.alpha_ce" in refused(teacher__weights="2")
    # DistilBERT's triple loss: L_ce from the cache, L_cos from the teacher run live beside it
    # on the same static masks.
    mixed = str(tmp_path / "mixed")
    train.train_and_evaluate(config(teacher__cache=cache, loss__alpha_cos=1.0,
                                    train__num_steps=2, train__eval_every=0), mixed)
    assert all(r["train/loss_cos"] > 0 and 0 < r["train/teacher_tail_mass"] < 1
               for r in _losses(mixed))


def test_a_build_done_in_parts_writes_the_same_bytes(built, tmp_path):
    config, _, manifest, _ = built
    output = str(tmp_path / "parts")
    assert logit_cache.build(config(), output, top_k=TOP_K, maskings=MASKINGS,
                             units=(1, 2)) is None
    assert not os.path.exists(os.path.join(output, teacher_targets.MANIFEST))
    resumed = logit_cache.build(config(), output, top_k=TOP_K, maskings=MASKINGS)
    for name in records.SPLITS:
        assert [(s["bytes"], s["crc32"]) for s in resumed["splits"][name]["shards"]] == [
            (s["bytes"], s["crc32"]) for s in manifest["splits"][name]["shards"]]
    with pytest.raises(ValueError, match="another request"):
        logit_cache.build(config(), output, top_k=8, maskings=MASKINGS)
    # Several caches open together: the stored predictions read back in key order.
    split = run_targets.Targets([output], [1.0], teacher_targets.Expected(
        records.PreparedDataset(config().data.dir), 32, "")).split("train")
    for keys in split.logits.keys:
        assert np.all(np.diff(keys) >= 0)
    assert teacher_logits.prediction_slots(32, 0.15) == 8
