"""Dynamic MLM masking, on device, inside the step: a fresh mask for every batch and every epoch.

Each row gets ceil(mask_prob × its real tokens) predictions, never on padding or special tokens.
Positions are drawn without replacement by Gumbel-top-k: adding Gumbel noise to log-weights and
taking the top k is an exact weighted sample without replacement, with static shapes, so it jits.
With frequency smoothing (DistilBERT's `mlm_smoothing`, exponent 0.7), a token's weight is
count^-0.7, which shifts predictions toward rarer tokens.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
    """What to mask and how. Hashable, so it can be bound into a jitted step."""

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    mask_prob: float = 0.15
    replace_with_mask: float = 0.8  # Of the chosen positions: fraction set to [MASK],
    replace_with_random: float = 0.1  # fraction set to a random token; the rest keep theirs.

    def max_predictions(self, length: int) -> int:
        """Static number of prediction slots per row of `length` tokens."""
        return max(1, math.ceil(self.mask_prob * length))


def smoothing_weights(counts: np.ndarray, exponent: float, special_ids) -> np.ndarray:
    """Per-token selection weights count^-exponent (all ones when exponent is 0).

    Args:
      counts: [vocab] token frequencies of the training data.
    """
    weights = np.maximum(counts.astype(np.float64), 1.0) ** -exponent
    weights[list(special_ids)] = 0.0
    return weights.astype(np.float32)


def _random_ordinary_tokens(rng: Array, shape, spec: MaskingSpec) -> Array:
    """Uniform samples from the vocabulary minus the special tokens."""
    specials = sorted(set(spec.special_ids))
    ids = jax.random.randint(rng, shape, 0, spec.vocab_size - len(specials))
    # Shift past each special id in increasing order: a bijection onto the ordinary ids.
    for s in specials:
        ids = ids + (ids >= s)
    return ids


def mask_tokens(
    rng: Array,
    input_ids: Array,
    segment_ids: Array,
    spec: MaskingSpec,
    token_weights: Array | None = None,
) -> dict[str, Array]:
    """Chooses prediction positions and corrupts them 80/10/10.

    Args:
      rng: PRNG key.
      input_ids: [batch, length] int token ids.
      segment_ids: [batch, length], 0 on padding.
      spec: masking parameters.
      token_weights: optional [vocab] selection weights (frequency smoothing); uniform if None.

    Returns:
      A dict with `input_ids` [batch, length] (corrupted), `mlm_positions` [batch, k],
      `mlm_labels` [batch, k] (original ids) and `mlm_weights` [batch, k] (1.0 for real
      predictions, 0.0 for unused slots), where k = spec.max_predictions(length).
    """
    select_rng, kind_rng, random_rng = jax.random.split(rng, 3)
    batch, length = input_ids.shape
    k = spec.max_predictions(length)
    candidate = (segment_ids > 0) & ~jnp.isin(input_ids, jnp.asarray(spec.special_ids))
    if token_weights is None:
        log_w = jnp.zeros(input_ids.shape, jnp.float32)
    else:
        log_w = jnp.log(token_weights[input_ids])
    gumbel = jax.random.gumbel(select_rng, input_ids.shape, jnp.float32)
    scores = jnp.where(candidate, log_w + gumbel, -jnp.inf)
    top_scores, positions = jax.lax.top_k(scores, k)
    n_real = candidate.sum(axis=-1, keepdims=True)
    n_predict = jnp.ceil(spec.mask_prob * n_real).astype(jnp.int32)
    chosen = (jnp.arange(k)[None, :] < n_predict) & jnp.isfinite(top_scores)

    labels = jnp.take_along_axis(input_ids, positions, axis=1)
    u = jax.random.uniform(kind_rng, positions.shape)
    random_ids = _random_ordinary_tokens(random_rng, positions.shape, spec)
    corrupted = jnp.where(
        u < spec.replace_with_mask, spec.mask_id,
        jnp.where(u < spec.replace_with_mask + spec.replace_with_random, random_ids, labels))
    corrupted = jnp.where(chosen, corrupted, labels).astype(input_ids.dtype)
    rows = jnp.arange(batch)[:, None]
    masked_ids = input_ids.at[rows, positions].set(corrupted, unique_indices=True)
    return {
        "input_ids": masked_ids,
        "mlm_positions": positions,
        "mlm_labels": labels,
        "mlm_weights": chosen.astype(jnp.float32),
    }


def static_mask(ids: np.ndarray, rng: np.random.Generator, spec: MaskingSpec,
                token_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One segment's static mask, drawn once on the host (a teacher cache's, `cache_teacher`).

    As `mask_tokens` draws per row, but per segment and in numpy: the count is the segment's
    share p·n stochastically rounded (floor(p·n + u), so p·n on average, where a row's ceil
    would over-mask short segments), the positions a weighted sample without replacement
    (Gumbel-top-k), the 80/10/10 corruption the same.

    Args:
      ids: [n] the segment's token ids (without [CLS]/[SEP]).
      rng: the generator for this segment's masking, advanced in place.
      token_weights: [vocab] selection weights (frequency smoothing), or None (uniform).

    Returns:
      (positions int64 [m] ascending, the ids read there int32 [m]).
    """
    ids = np.asarray(ids, np.int64)
    candidate = ~np.isin(ids, spec.special_ids)
    count = int(np.floor(spec.mask_prob * candidate.sum() + rng.random()))
    log_w = np.zeros(len(ids)) if token_weights is None else np.log(token_weights[ids])
    scores = np.where(candidate, log_w + rng.gumbel(size=len(ids)), -np.inf)
    positions = np.sort(np.argsort(-scores, kind="stable")[:count])
    specials = sorted(set(spec.special_ids))
    ordinary = rng.integers(0, spec.vocab_size - len(specials), size=count)
    for s in specials:  # The same bijection onto the ordinary ids as `_random_ordinary_tokens`.
        ordinary = ordinary + (ordinary >= s)
    u = rng.random(count)
    labels = ids[positions]
    inputs = np.where(u < spec.replace_with_mask, spec.mask_id, np.where(
        u < spec.replace_with_mask + spec.replace_with_random, ordinary, labels))
    return positions, inputs.astype(np.int32)
