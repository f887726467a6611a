"""The training loop: set up mesh, data, teacher and student, then run the jitted step.

`train_and_evaluate(config, workdir)` is the whole job; `main.py` only parses flags. The host
stays at most two steps ahead of the device and copies metrics back only every
`train.log_every` steps, at evaluations and checkpoints.
"""

import dataclasses
import functools
import json
import math
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from etils import epath
import optax
from flax import linen as nn

from distil_flax import config as config_lib
from distil_flax import data, flops, hf, partitioning, student_init
from distil_flax.checkpoint import (CheckpointWriteError, Checkpointer, checkpoint_dir,
                                    restore_params)
from distil_flax.workdir_lock import WorkdirLock, WorkdirLockedError
from distil_flax.losses import LossSpec
from distil_flax.masking import MaskingSpec, smoothing_weights
from distil_flax.metric_writers import MetricWriter
from distil_flax.model import Encoder, make_encoder
from distil_flax.optim import make_optimizer
from distil_flax.step import TrainState, distil_step, eval_step


@dataclasses.dataclass
class Setup:
    """What a run is built from; `build` makes it from a config (also used by notebooks)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: tuple
    tokenizer: "data.Tokenizer"
    train_rows: dict[str, np.ndarray]
    eval_rows: dict[str, np.ndarray]
    student: Encoder
    teacher: Encoder | None
    teacher_params: Any
    teacher_init: Any  # Student parameters taken from teacher layers, before the teacher's cast.


def _context(mesh, rules):
    """Mesh and logical rules in effect while a step is traced (for activation constraints)."""
    return _Both(jax.set_mesh(mesh), nn.logical_axis_rules(rules))


class _Both:
    def __init__(self, *managers):
        self.managers = managers

    def __enter__(self):
        for m in self.managers:
            m.__enter__()

    def __exit__(self, *exc):
        for m in reversed(self.managers):
            m.__exit__(*exc)


def _abstract_params(model: Encoder, seq_len: int):
    """`init` of `model` on a dummy row (returns logically-boxed params) and its rng argument."""
    def init(rng):
        ids = jnp.zeros((1, seq_len), jnp.int32)
        return model.init(rng, ids, jnp.ones_like(ids), ids, logits_at="all")["params"]
    return init


def abstract_params(model: Encoder, mesh, rules, seq_len: int = 8) -> Any:
    """`model`'s parameters as `jax.ShapeDtypeStruct`s carrying their shardings on `mesh`."""
    abstract = jax.eval_shape(_abstract_params(model, seq_len), jax.random.PRNGKey(0))
    shardings = partitioning.logical_to_shardings(nn.get_partition_spec(abstract), mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.unbox(abstract), shardings)


def load_teacher(c: ml_collections.ConfigDict, vocab_size: int, mesh, rules):
    """Loads the teacher named by `teacher.checkpoint`, once, into its shardings.

    The checkpoint is either a distil_flax workdir (its config.json and latest params) or a
    Hugging Face BERT/DistilBERT folder (config.json + safetensors), converted by `hf.py`.

    Returns:
      (teacher model, float32 params in their shardings).
    """
    path = epath.Path(c.teacher.checkpoint)
    if hf.is_hf_checkpoint(str(path)):
        if c.loss.alpha_ce and not hf.has_mlm_head(str(path)):
            raise ValueError(
                f"teacher.checkpoint={c.teacher.checkpoint!r} has no MLM head, but loss.alpha_ce "
                "distils the teacher's MLM distribution: use a *ForMaskedLM checkpoint or set "
                "loss.alpha_ce=0")
        teacher_model_config, host_params = hf.load_hf_checkpoint(str(path), seed=c.seed)
        teacher = make_encoder(teacher_model_config)
        params = jax.device_put(host_params,
                                shardings_of(abstract_params(teacher, mesh, rules)))
        source = "Hugging Face checkpoint"
    else:
        config_file = path / "config.json"
        if not config_file.exists():
            raise ValueError(
                f"teacher.checkpoint={c.teacher.checkpoint!r} is neither a distil_flax workdir "
                f"nor a Hugging Face model folder ({config_file} is missing)")
        teacher = make_encoder(config_lib.load_json(str(config_file)).model)
        params, step = restore_params(str(path), abstract_params(teacher, mesh, rules))
        source = f"step {step}"
    if teacher.vocab_size != vocab_size:
        raise ValueError(
            f"the teacher's vocab_size {teacher.vocab_size} (teacher.checkpoint="
            f"{c.teacher.checkpoint!r}) differs from data.tokenizer's {vocab_size}: distil with "
            "the teacher's tokenizer")
    logging.info("Teacher: %s (%s), %d layers × %d.", path, source, teacher.num_layers,
                 teacher.hidden_size)
    return teacher, params


def build(c: ml_collections.ConfigDict) -> Setup:
    """Validates the config and loads tokenizer, data, teacher and models."""
    config_lib.validate(c)
    mesh = partitioning.make_mesh(c.mesh)
    rules = partitioning.rules_from_config(c.mesh.rules)
    tokenizer = data.load_tokenizer(c.data.tokenizer, lowercase=c.data.lowercase)
    train_rows, eval_rows = data.build_datasets(c.data, tokenizer,
                                                process_count=jax.process_count())
    with c.unlocked():
        c.model.vocab_size = c.model.vocab_size or tokenizer.vocab_size
    student = make_encoder(c.model)
    if student.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size ({student.vocab_size}) differs from data.tokenizer's "
                         f"({tokenizer.vocab_size})")
    loss = loss_spec(c)
    teacher = teacher_params = teacher_init = None
    if loss.needs_teacher:
        teacher, teacher_params = load_teacher(c, tokenizer.vocab_size, mesh, rules)
        if loss.alpha_cos and teacher.hidden_size != student.hidden_size:
            raise ValueError(
                f"loss.alpha_cos compares hidden states, but the teacher's hidden size "
                f"({teacher.hidden_size}) differs from model.hidden_size ({student.hidden_size})")
        if c.init.from_teacher:
            abstract = jax.eval_shape(_abstract_params(student, 8), jax.random.PRNGKey(0))
            teacher_init = student_init.init_from_teacher(
                teacher_params, nn.unbox(abstract), c.init.layer_map)
        dtype = jnp.dtype(c.teacher.param_dtype)
        teacher_params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p))(
            teacher_params)
    return Setup(c, mesh, rules, tokenizer, train_rows, eval_rows, student, teacher,
                 teacher_params, teacher_init)


def loss_spec(c: ml_collections.ConfigDict) -> LossSpec:
    return LossSpec(alpha_ce=c.loss.alpha_ce, alpha_mlm=c.loss.alpha_mlm,
                    alpha_cos=c.loss.alpha_cos, temperature=c.loss.temperature,
                    restrict_ce_to_mask=c.loss.restrict_ce_to_mask,
                    head_chunk=c.loss.head_chunk)


def masking_spec(c: ml_collections.ConfigDict, tokenizer: "data.Tokenizer") -> MaskingSpec:
    return MaskingSpec(
        mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
        special_ids=tuple(tokenizer.special_ids), mask_prob=c.masking.mask_prob,
        replace_with_mask=c.masking.replace_with_mask,
        replace_with_random=c.masking.replace_with_random)


def total_steps(c: ml_collections.ConfigDict, num_rows: int) -> int:
    if c.train.num_steps > 0:
        return c.train.num_steps
    return max(1, math.ceil(c.train.num_epochs * num_rows / c.train.batch_size))


def _with_sharding(shape, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)


def abstract_state(setup: Setup, optimizer) -> TrainState:
    """The student's TrainState as `jax.ShapeDtypeStruct`s carrying shardings.

    Optimizer moments take their parameter's sharding; scalars are replicated.
    """
    params = abstract_params(setup.student, setup.mesh, setup.rules)
    replicated = partitioning.replicated(setup.mesh)
    opt_shapes = jax.eval_shape(optimizer.init, params)
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, p: p.sharding, opt_shapes, params,
        transform_non_params=lambda _: replicated)
    scalar = lambda x: _with_sharding(jax.eval_shape(lambda: x), replicated)  # noqa: E731
    return TrainState(
        step=scalar(jnp.zeros((), jnp.int32)), params=params,
        opt_state=jax.tree.map(_with_sharding, opt_shapes, opt_shardings),
        rng=scalar(jax.random.PRNGKey(0)), skipped_steps=scalar(jnp.zeros((), jnp.int32)),
        bad_streak=scalar(jnp.zeros((), jnp.int32)))


def shardings_of(abstract: Any) -> Any:
    return jax.tree.map(lambda a: a.sharding, abstract)


def init_state(setup: Setup, optimizer, abstract: TrainState) -> TrainState:
    """A fresh state: student params from teacher layers when configured, else random."""
    c = setup.config
    param_rng, state_rng = jax.random.split(jax.random.PRNGKey(c.seed))
    shardings = shardings_of(abstract)
    if setup.teacher_init is not None:
        dtype = jnp.dtype(c.model.param_dtype)
        # A jitted copy: the step donates these buffers, which must not be the teacher's.
        params = jax.jit(lambda p: jax.tree.map(lambda x: jnp.array(x, dtype), p),
                         out_shardings=shardings.params)(setup.teacher_init)
        logging.info("Student initialised from teacher layers %s.", list(c.init.layer_map))
    else:
        params, _ = partitioning.sharded_init(
            _abstract_params(setup.student, 8), param_rng, setup.mesh, setup.rules)
        logging.info("Student initialised randomly.")
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    zero = lambda sharding: jax.device_put(jnp.zeros((), jnp.int32), sharding)  # noqa: E731
    return TrainState(step=zero(shardings.step), params=params, opt_state=opt_state,
                      rng=jax.device_put(state_rng, shardings.rng),
                      skipped_steps=zero(shardings.skipped_steps),
                      bad_streak=zero(shardings.bad_streak))


class _PreemptionFlag:
    """Set by SIGTERM (what schedulers send before preempting) so the loop saves and exits."""

    def __init__(self):
        self.event = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def __bool__(self):
        return self.event.is_set()


class NonFiniteError(FloatingPointError):
    """`train.max_consecutive_nonfinite` steps in a row had a non-finite loss or gradient."""


# Metrics that say which part of a step went non-finite, in the order a report names them.
_FINITE_WATCH = ("loss_ce", "loss_mlm", "loss_cos", "loss", "grad_norm")
_COUNTERS = ("nonfinite", "skipped_steps", "bad_streak")


class _NonFiniteMonitor:
    """Reads the step's non-finite counters when metrics are fetched, and applies the policy.

    The step itself skips every non-finite update (see `step.distil_step`); this only reports
    them, averages the interval's metrics over the finite steps, and stops the run after
    `max_consecutive` bad steps in a row (0: never).
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.first_bad = ""  # What went non-finite first in the current streak.

    def scalars(self, history: list[dict], last_step: int) -> dict[str, float]:
        """Fetches an interval's metrics (steps `last_step - len(history) + 1` ...) and means them.

        Raises:
          NonFiniteError: the streak of skipped steps reached `max_consecutive`.
        """
        fetched = jax.device_get(history)
        first_step = last_step - len(fetched) + 1
        bad = [(first_step + i, m) for i, m in enumerate(fetched) if m["nonfinite"]]
        good = [m for m in fetched if not m["nonfinite"]] or fetched
        scalars = {k: float(np.mean([m[k] for m in good])) for k in fetched[0]
                   if k not in _COUNTERS}
        scalars["skipped_steps"] = float(fetched[-1]["skipped_steps"])
        streak = int(fetched[-1]["bad_streak"])
        if bad:
            logging.warning("Skipped the update of %d step(s) with non-finite values: %s. %d "
                            "skipped in total.", len(bad),
                            "; ".join(self._describe(step, m) for step, m in bad[:5]),
                            int(scalars["skipped_steps"]))
        start = last_step - streak + 1  # First step of the current streak.
        if not streak:
            self.first_bad = ""
        elif start >= first_step:
            self.first_bad = self._describe(start, fetched[start - first_step])
        elif not self.first_bad:  # The streak began before this process resumed the run.
            self.first_bad = self._describe(*bad[0])
        if self.max_consecutive and streak >= self.max_consecutive:
            raise NonFiniteError(
                f"{streak} consecutive steps had non-finite values (steps "
                f"{last_step - streak + 1}-{last_step}; first: {self.first_bad}), reaching "
                f"train.max_consecutive_nonfinite={self.max_consecutive}. Their updates were "
                f"skipped, so the parameters and every checkpoint are those of step "
                f"{last_step - streak} or earlier. Lower train.learning_rate, check the data at "
                "those steps, or raise the limit (0: skip and continue).")
        return scalars

    @staticmethod
    def _describe(step: int, metrics: dict) -> str:
        terms = [f"{k}={float(metrics[k])}" for k in _FINITE_WATCH
                 if k in metrics and not np.isfinite(metrics[k])]
        return f"step {step}: " + ", ".join(terms or ["non-finite gradients"])


def evaluate(setup: Setup, params, eval_fn, num_batches: int) -> dict[str, float]:
    """Held-out MLM loss, accuracy and perplexity of student (and teacher), with agreement."""
    c = setup.config
    batch_size = c.train.micro_batch_size or c.train.batch_size
    sharding = partitioning.batch_sharding(setup.mesh, setup.rules)
    totals: dict[str, float] = {}
    batches = data.eval_batches(
        setup.eval_rows, batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), max_batches=num_batches or None)
    for index, local in enumerate(batches):
        batch = partitioning.host_to_global(local, sharding)
        rng = jax.random.fold_in(jax.random.PRNGKey(c.seed + 1), index)
        sums = jax.device_get(eval_fn(params, setup.teacher_params, batch, rng))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    if not totals:
        return {}
    n = max(totals["predictions"], 1.0)
    metrics = {"student_mlm_loss": totals["student_nll"] / n,
               "student_mlm_accuracy": totals["student_correct"] / n}
    metrics["student_perplexity"] = math.exp(min(metrics["student_mlm_loss"], 50.0))
    if "teacher_nll" in totals:
        metrics["teacher_mlm_loss"] = totals["teacher_nll"] / n
        metrics["teacher_mlm_accuracy"] = totals["teacher_correct"] / n
        metrics["teacher_perplexity"] = math.exp(min(metrics["teacher_mlm_loss"], 50.0))
        metrics["agreement"] = totals["agreement"] / n
    return metrics


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir` and returns the final held-out metrics.

    Args:
      c: the run's config.
      workdir: checkpoints, config.json, TensorBoard events and metrics.jsonl go here.
      stop_at_step: save and return at this step, as a preempted run would (the schedule still
        spans the whole run; a later call resumes). Returns {} then.

    Raises:
      ValueError: a config or input that cannot run, naming the field or file.
      WorkdirLockedError: another live run holds `workdir`.
      CorruptCheckpointError: no intact checkpoint to resume from (or, with
        `train.strict_restore`, the latest one is bad).
      CheckpointWriteError: a checkpoint could not be written (disk full, permissions).
      NonFiniteError: `train.max_consecutive_nonfinite` steps in a row had non-finite values.
    """
    config_lib.validate(c)  # A bad config fails before anything touches the workdir.
    with WorkdirLock(workdir, enabled=jax.process_index() == 0) as lock:
        return _train_and_evaluate(c, workdir, lock, stop_at_step)


def _train_and_evaluate(c: ml_collections.ConfigDict, workdir: str, lock: WorkdirLock,
                        stop_at_step: int | None) -> dict[str, float]:
    setup = build(c)
    workdir_path = epath.Path(workdir)
    is_main = jax.process_index() == 0
    _check_resumable(c, workdir_path, setup.student)
    logging.info("Config:\n%s", c)
    logging.info("Devices: %d (%d local, process %d of %d); mesh %s.", jax.device_count(),
                 jax.local_device_count(), jax.process_index(), jax.process_count(),
                 dict(setup.mesh.shape))

    num_steps = total_steps(c, setup.train_rows.num_rows)
    optimizer, schedule = make_optimizer(c.train, num_steps)
    loss = loss_spec(c)
    masking = masking_spec(c, setup.tokenizer)
    abstract = abstract_state(setup, optimizer)
    shardings = shardings_of(abstract)
    replicated = partitioning.replicated(setup.mesh)
    token_weights = None
    if c.masking.smoothing:
        counts = data.token_counts(setup.train_rows, setup.tokenizer.vocab_size)
        token_weights = jax.device_put(
            smoothing_weights(counts, c.masking.smoothing, masking.special_ids), replicated)

    # ------------------------------------------------------------------ state: resume or init
    checkpointer = Checkpointer(workdir, save_every=c.train.checkpoint_every,
                                keep=c.train.keep_checkpoints, async_save=c.train.async_checkpoints)
    iterator = data.BatchIterator(
        setup.train_rows, c.train.batch_size, seed=c.seed, process_index=jax.process_index(),
        process_count=jax.process_count())
    restored = checkpointer.restore_latest(abstract, strict=c.train.strict_restore)
    if restored is not None:
        state, data_state, latest = restored
        iterator.set_state(data_state)  # Refuses a position of other data or another tokenizer.
        logging.info("Resuming from step %d (checkpoint in %s).", latest, workdir)
    else:
        state = init_state(setup, optimizer, abstract)
    setup.teacher_init = None  # Only needed once; free it.
    if is_main:  # Only now: a run that cannot start leaves the workdir's config.json as it was.
        config_lib.save_json(c, str(workdir_path / "config.json"))
    if is_main:
        logging.info("Student parameters:\n%s", parameter_overview.get_parameter_overview(
            state.params, include_stats=False))

    # ------------------------------------------------------------------ compiled programs
    micro = c.train.micro_batch_size or c.train.batch_size
    accum = c.train.batch_size // micro
    step_fn, eval_fn = compile_steps(setup, optimizer, schedule, shardings)
    batch_sh = partitioning.batch_sharding(setup.mesh, setup.rules, leading_dims=1)

    ce_fraction = 1.0 if (loss.alpha_ce and not loss.restrict_ce_to_mask) else c.masking.mask_prob
    flops_per_token = flops.step_flops_per_token(
        setup.student, setup.teacher, c.data.seq_len, ce_fraction,
        ce_fraction if loss.alpha_ce else 0.0)
    peak = flops.peak_flops(override_tflops=c.train.peak_tflops)
    tokens_per_step = c.train.batch_size * c.data.seq_len

    # ------------------------------------------------------------------ loop
    writer = MetricWriter(workdir, enabled=is_main, total_steps=num_steps)
    preempted = _PreemptionFlag()
    monitor = _NonFiniteMonitor(c.train.max_consecutive_nonfinite)
    history: list[dict] = []
    step = int(jax.device_get(state.step))
    last_time, last_step = time.time(), step
    eval_metrics: dict[str, float] = {}
    try:
        with _context(setup.mesh, setup.rules):
            while step < num_steps:
                if lock.lost.is_set():
                    raise WorkdirLockedError(
                        f"another run took over {lock.path} (this one was unresponsive for "
                        "longer than the lock's heartbeat window); stopping without saving")
                local = next(iterator)
                # Micro-batch i is rows i, i + accum, … of the global batch: the same rows (and
                # masks) whatever the number of hosts, each holding a contiguous slice.
                local = {k: v.reshape(-1, accum, v.shape[-1]).swapaxes(0, 1)
                         for k, v in local.items()}
                batch = partitioning.host_to_global(local, batch_sh)
                state, metrics = step_fn(state, setup.teacher_params, batch, token_weights)
                step += 1
                if history:
                    # Keep at most two steps in flight: the host still runs ahead of the device,
                    # but a preemption notice or a checkpoint never waits on a long queue.
                    history[-1]["loss"].block_until_ready()
                history.append(metrics)
                if step % c.train.log_every == 0 or step == num_steps:
                    scalars = monitor.scalars(history, step)  # Fetches the interval's metrics.
                    history = []
                    elapsed = time.time() - last_time
                    scalars["step_time_s"] = elapsed / (step - last_step)
                    scalars["tokens_per_s"] = tokens_per_step * (step - last_step) / elapsed
                    if peak:
                        scalars["mfu"] = (scalars["tokens_per_s"] * flops_per_token
                                          / (peak * jax.device_count()))
                    writer.write_scalars(step, scalars, prefix="train/")
                    last_time, last_step = time.time(), step
                if c.train.eval_every and step % c.train.eval_every == 0 and step < num_steps:
                    eval_metrics = evaluate(setup, state.params, eval_fn, c.train.eval_batches)
                    writer.write_scalars(step, eval_metrics, prefix="eval/")
                    last_time = time.time()  # Evaluation time is not training throughput.
                checkpointer.save(step, state, iterator.get_state())
                if preempted or step == stop_at_step:
                    logging.warning("Stopping at step %d (%s): saving a checkpoint.", step,
                                    "SIGTERM" if preempted else "stop_at_step")
                    checkpointer.save(step, state, iterator.get_state(), force=True)
                    eval_metrics = {}  # Stopped, not finished: no mid-run evaluation as final.
                    break
        if step >= num_steps:
            checkpointer.save(step, state, iterator.get_state(), force=True)
            with _context(setup.mesh, setup.rules):
                eval_metrics = evaluate(setup, state.params, eval_fn, c.train.eval_batches)
            writer.write_scalars(step, eval_metrics, prefix="eval/")
            _log_summary(eval_metrics)
    finally:
        preempted.restore()
        writer.close()
        try:
            checkpointer.close()  # Waits for the last save to commit.
        except CheckpointWriteError:
            if sys.exc_info()[0] is None:
                raise
            logging.exception("The last checkpoint save failed too.")  # Don't mask the first error.
    return eval_metrics


def _check_resumable(c: ml_collections.ConfigDict, workdir: epath.Path, student: Encoder) -> None:
    """Refuses to resume a workdir's checkpoints with a model of other parameter shapes.

    Other model changes (compute dtype, dropout, attention kernel, remat) are allowed.

    Raises:
      ValueError: naming the `model.*` fields that differ from the workdir's config.json.
    """
    config_file = workdir / "config.json"
    steps = checkpoint_dir(workdir)
    if not (config_file.exists() and steps.exists()
            and any(p.name.isdigit() for p in steps.iterdir())):
        return  # Nothing to resume.
    try:
        theirs = config_lib.load_json(config_file).model
        saved_model = make_encoder(theirs)
    except (ValueError, AttributeError, TypeError, KeyError) as error:
        logging.warning("Cannot read the model of %s (%s): not checking its checkpoints' shapes.",
                        config_file, error)
        return

    def shapes(model):
        boxed = jax.eval_shape(_abstract_params(model, 8), jax.random.PRNGKey(0))
        return jax.tree.map(lambda x: x.shape, nn.unbox(boxed))

    if shapes(saved_model) == shapes(student):
        return
    ours, theirs = json.loads(c.model.to_json_best_effort()), theirs.to_dict()
    differ = [f"model.{k} is {theirs.get(k)!r} there and {ours.get(k)!r} here"
              for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    raise ValueError(
        f"{workdir} holds checkpoints of a model with other parameter shapes (its config.json: "
        + "; ".join(differ) + "). A run resumes only with the model it started with: use a new "
        "--workdir, or the original model settings.")


def compile_steps(setup: Setup, optimizer, schedule, shardings: TrainState):
    """The jitted training step (state donated) and evaluation step, with explicit shardings.

    Call them inside `_context(setup.mesh, setup.rules)` so activation constraints apply.
    """
    replicated = partitioning.replicated(setup.mesh)
    loss = loss_spec(setup.config)
    masking = masking_spec(setup.config, setup.tokenizer)
    teacher_sh = jax.tree.map(lambda x: x.sharding, setup.teacher_params)
    step_fn = jax.jit(
        functools.partial(distil_step, student=setup.student, teacher=setup.teacher,
                          optimizer=optimizer, schedule=schedule, masking=masking, loss=loss),
        in_shardings=(shardings, teacher_sh,
                      partitioning.batch_sharding(setup.mesh, setup.rules, leading_dims=1),
                      replicated),
        out_shardings=(shardings, replicated), donate_argnums=(0,))
    eval_fn = jax.jit(
        functools.partial(eval_step, student=setup.student, teacher=setup.teacher,
                          masking=masking),
        in_shardings=(shardings.params, teacher_sh,
                      partitioning.batch_sharding(setup.mesh, setup.rules), replicated),
        out_shardings=replicated)
    return step_fn, eval_fn


def _log_summary(metrics: dict[str, float]) -> None:
    if not metrics:
        return
    line = f"Held-out MLM accuracy: student {metrics['student_mlm_accuracy']:.4f}"
    if "teacher_mlm_accuracy" in metrics:
        line += (f", teacher {metrics['teacher_mlm_accuracy']:.4f}; top-1 agreement "
                 f"{metrics['agreement']:.4f}")
    logging.info("%s.", line)
