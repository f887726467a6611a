"""The optimizer: AdamW with linear warmup then linear decay, and global-norm clipping."""

from typing import TYPE_CHECKING

import jax
import optax

if TYPE_CHECKING:  # Imported lazily: the benchmark machines lack ml_collections.
    import ml_collections


def learning_rate_schedule(c: "ml_collections.ConfigDict", total_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_fraction` of the run to `learning_rate`, then linear decay."""
    warmup = max(1, int(c.warmup_fraction * total_steps))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, c.learning_rate, warmup),
         optax.linear_schedule(c.learning_rate, 0.0, max(1, total_steps - warmup))],
        boundaries=[warmup])


def _decay_mask(params):
    # Biases and LayerNorm parameters (the 1-D ones) are not decayed, as in BERT.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(c: "ml_collections.ConfigDict", total_steps: int):
    """Returns (optimizer, schedule) for a config's `train` section.

    `c` may be any object with the section's fields (the benchmark passes a namespace).
    """
    schedule = learning_rate_schedule(c, total_steps)
    optimizer = optax.chain(
        optax.clip_by_global_norm(c.clip_norm) if c.clip_norm else optax.identity(),
        optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                    mask=_decay_mask),
    )
    return optimizer, schedule
