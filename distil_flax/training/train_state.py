"""The state every trainer carries, how it is laid out on the mesh, and the guarded update.

Distillation and fine-tuning differ in their loss, not in what happens after it: both hand their
gradients to `apply_update`, so a non-finite step is skipped and counted the same way, and both
build their state with `abstract_state` / `fresh_state`, so the optimizer moments always take
their parameter's sharding.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly but the data position (checkpointed beside)."""

    step: Array  # int32 scalar: steps done (applied or skipped updates).
    params: Any
    opt_state: Any
    rng: Array  # uint32[2] raw PRNG key; each step folds in its step number.
    skipped_steps: Array  # int32 scalar: updates skipped because a value was not finite.
    bad_streak: Array  # int32 scalar: consecutive skipped updates up to the last step.
    # Trainable parameters of the loss, not of the model (a narrower student's projections onto
    # the teacher's width): trained and checkpointed with the state, never exported. {}: none.
    projections: Any = flax.struct.field(default_factory=dict)


def _with_sharding(shape, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)


def trainable(params: Any, projections: Any) -> Any:
    """What the optimizer updates: the parameters, paired with the projections when there are any.

    Without projections the optimizer sees the parameters alone, so its state keeps the layout
    it has always had (and older checkpoints restore).
    """
    return (params, projections) if projections else params


def abstract_state(params: Any, optimizer: optax.GradientTransformation,
                   replicated: jax.sharding.Sharding, projections: Any = None) -> TrainState:
    """The TrainState as `jax.ShapeDtypeStruct`s carrying shardings.

    Args:
      params: abstract parameters carrying their shardings (`partitioning.abstract_params`).
      optimizer: the run's optimizer; its moments take their parameter's sharding.
      replicated: the sharding of scalars and of the optimizer's non-parameter leaves.
      projections: the loss's abstract projections, carrying shardings ({} or None: none).
    """
    projections = projections or {}
    both = trainable(params, projections)
    opt_shapes = jax.eval_shape(optimizer.init, both)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, p: p.sharding, opt_shapes, both,
                                          transform_non_params=lambda _: replicated)
    scalar = lambda x: _with_sharding(jax.eval_shape(lambda: x), replicated)  # noqa: E731
    count = scalar(jnp.zeros((), jnp.int32))
    return TrainState(step=count, params=params,
                      opt_state=jax.tree.map(_with_sharding, opt_shapes, opt_shardings),
                      rng=scalar(jax.random.PRNGKey(0)), skipped_steps=count, bad_streak=count,
                      projections=projections)


def shardings_of(abstract: Any) -> Any:
    return jax.tree.map(lambda a: a.sharding, abstract)


def fresh_state(params: Any, optimizer: optax.GradientTransformation, abstract: TrainState,
                rng: Array, projections: Any = None) -> TrainState:
    """Step 0: `params` and `projections` (already in their shardings), a fresh optimizer, zeroed
    counters."""
    shardings = shardings_of(abstract)
    projections = projections or {}
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(
        trainable(params, projections))
    zero = lambda sharding: jax.device_put(jnp.zeros((), jnp.int32), sharding)  # noqa: E731
    return TrainState(step=zero(shardings.step), params=params, opt_state=opt_state,
                      rng=jax.device_put(rng, shardings.rng),
                      skipped_steps=zero(shardings.skipped_steps),
                      bad_streak=zero(shardings.bad_streak), projections=projections)


def step_rng(state: TrainState) -> Array:
    """This step's key: the run's key folded with the step, so a resumed run draws the same."""
    return jax.random.fold_in(state.rng, state.step)


def apply_update(state: TrainState, grads: Any, metrics: dict[str, Array], *,
                 optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                 projection_grads: Any = None) -> tuple[TrainState, dict[str, Array]]:
    """The optimizer update of one step, skipped when anything about it is not finite.

    A non-finite loss, gradient or update (an overflow, a bad batch, a NaN learning rate) must
    never reach the weights: the step keeps the old parameters and optimizer state and counts
    itself, and the host acts on the counters when it next fetches metrics — no device-to-host
    sync here. The update is checked too, not only loss and gradients: finite gradients times a
    non-finite learning rate are a non-finite update.

    Args:
      state: the state before the step.
      grads: gradients of `metrics["loss"]` with respect to `state.params`.
      metrics: the step's scalar metrics, with `loss`.
      projection_grads: its gradients with respect to `state.projections` (when any).

    Returns:
      The new state, and `metrics` with `grad_norm`, `update_norm`, `param_norm`,
      `learning_rate` (the one this update used), `nonfinite` (0/1), `skipped_steps` and
      `bad_streak`.
    """
    current = trainable(state.params, state.projections)
    grads = trainable(grads, projection_grads if state.projections else {})
    updates, opt_state = optimizer.update(grads, state.opt_state, current)
    updated = optax.apply_updates(current, updates)
    grad_norm = optax.tree.norm(grads)
    update_norm = optax.tree.norm(updates)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    updated, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                      (updated, opt_state), (current, state.opt_state))
    params, projections = updated if state.projections else (updated, state.projections)
    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(step=state.step + 1, params=params, projections=projections,
                              opt_state=opt_state,
                              skipped_steps=state.skipped_steps + skipped,
                              bad_streak=jnp.where(finite, 0, state.bad_streak + 1))
    # Skipped updates leave the optimizer's count (and so its schedule) where it was.
    applied = state.step - state.skipped_steps
    return new_state, {
        **metrics, "grad_norm": grad_norm, "update_norm": update_norm,
        "param_norm": optax.tree.norm(params), "learning_rate": schedule(applied),
        "nonfinite": skipped, "skipped_steps": new_state.skipped_steps,
        "bad_streak": new_state.bad_streak}

