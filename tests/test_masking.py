"""Dynamic masking: how many, which, and what they become."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distil_flax.distill.masking import MaskingSpec, mask_tokens, smoothing_weights

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
VOCAB = 200
SPEC = MaskingSpec(mask_id=MASK, vocab_size=VOCAB, special_ids=(PAD, UNK, CLS, SEP, MASK))


def _rows(rng, batch=64, length=128):
    """Packed-looking rows: two segments, [CLS] … [SEP], padding at the end of half the rows."""
    ids = rng.integers(5, VOCAB, size=(batch, length))
    seg = np.ones((batch, length), np.int32)
    seg[:, length // 2:] = 2
    ids[:, 0] = CLS
    ids[:, length // 2 - 1] = SEP
    ids[:, length // 2] = CLS
    ids[:, -1] = SEP
    pad_from = np.where(np.arange(batch) % 2 == 0, length - 20, length)
    for row, start in enumerate(pad_from):
        ids[row, start:] = PAD
        seg[row, start:] = 0
    return jnp.asarray(ids, jnp.int32), jnp.asarray(seg)


def _chosen(out):
    w = np.asarray(out["mlm_weights"]) > 0
    return np.asarray(out["mlm_positions"]), w


def test_count_is_fifteen_percent_of_real_tokens_per_row():
    ids, seg = _rows(np.random.default_rng(0))
    out = mask_tokens(jax.random.PRNGKey(0), ids, seg, SPEC)
    ids, seg = np.asarray(ids), np.asarray(seg)
    candidates = ((seg > 0) & (ids > MASK)).sum(-1)
    np.testing.assert_array_equal(np.asarray(out["mlm_weights"]).sum(-1),
                                  np.ceil(0.15 * candidates))
    assert out["mlm_positions"].shape == (64, math.ceil(0.15 * 128))


def test_never_special_never_padding_no_duplicates_labels_are_originals():
    ids, seg = _rows(np.random.default_rng(1))
    out = mask_tokens(jax.random.PRNGKey(1), ids, seg, SPEC)
    positions, chosen = _chosen(out)
    ids, seg = np.asarray(ids), np.asarray(seg)
    for row in range(ids.shape[0]):
        picked = positions[row][chosen[row]]
        assert len(set(picked)) == len(picked)
        assert (seg[row, picked] > 0).all()
        assert (ids[row, picked] > MASK).all()
        np.testing.assert_array_equal(np.asarray(out["mlm_labels"])[row][chosen[row]],
                                      ids[row, picked])
    # Only chosen positions change.
    changed = np.asarray(out["input_ids"]) != ids
    for row in range(ids.shape[0]):
        assert set(np.flatnonzero(changed[row])) <= set(positions[row][chosen[row]])


def test_eighty_ten_ten():
    ids, seg = _rows(np.random.default_rng(2), batch=256)
    out = mask_tokens(jax.random.PRNGKey(2), ids, seg, SPEC)
    positions, chosen = _chosen(out)
    new = np.take_along_axis(np.asarray(out["input_ids"]), positions, 1)[chosen]
    old = np.asarray(out["mlm_labels"])[chosen]
    n = len(new)
    assert n > 4000
    as_mask = (new == MASK).mean()
    kept = (new == old).mean()
    random = 1 - as_mask - kept
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / (VOCAB - 5), abs=0.015)
    assert random == pytest.approx(0.1, abs=0.015)
    # Random replacements are ordinary tokens, never special ones.
    replaced = new[(new != MASK) & (new != old)]
    assert (replaced > MASK).all() and (replaced < VOCAB).all()


def test_masks_differ_between_steps():
    ids, seg = _rows(np.random.default_rng(3))
    a = mask_tokens(jax.random.PRNGKey(3), ids, seg, SPEC)["mlm_positions"]
    b = mask_tokens(jax.random.PRNGKey(4), ids, seg, SPEC)["mlm_positions"]
    assert (np.asarray(a) != np.asarray(b)).any()


def test_smoothing_shifts_picks_toward_rare_tokens():
    rng = np.random.default_rng(4)
    # Token 5 is very frequent, the rest rare.
    ids = np.where(rng.random((128, 128)) < 0.5, 5, rng.integers(6, VOCAB, size=(128, 128)))
    seg = np.ones_like(ids)
    counts = np.bincount(ids.ravel(), minlength=VOCAB)
    ids, seg = jnp.asarray(ids, jnp.int32), jnp.asarray(seg, jnp.int32)

    def frequent_share(weights):
        out = mask_tokens(jax.random.PRNGKey(5), ids, seg, SPEC, weights)
        return (np.asarray(out["mlm_labels"])[np.asarray(out["mlm_weights"]) > 0] == 5).mean()

    uniform = frequent_share(None)
    smoothed = frequent_share(jnp.asarray(smoothing_weights(counts, 0.7, SPEC.special_ids)))
    assert uniform == pytest.approx(0.5, abs=0.03)
    assert smoothed < 0.25  # count^-0.7 strongly down-weights the frequent token.


def test_smoothing_weights_exclude_specials_and_handle_unseen_tokens():
    counts = np.array([100, 0, 5, 5, 5, 1000, 0])
    w = smoothing_weights(counts, 0.7, (0, 1, 2, 3, 4))
    assert (w[:5] == 0).all()
    assert w[6] == pytest.approx(1.0)  # Unseen tokens count as 1, not infinite weight.
    assert w[5] == pytest.approx(1000**-0.7, rel=1e-5)
