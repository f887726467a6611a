"""Distillation (and MLM pretraining of a teacher) on the one run loop (`training/loop.py`).

`train_and_evaluate(config, workdir)` is the whole job; `main.py` only parses flags. This module
says what distillation adds: the teacher, the student's state (from teacher layers, pruned from
the teacher, or random),
the jitted step (`step.py`), held-out MLM metrics, and the workdir's config.json. Checkpoints,
signals, the non-finite policy, logging and the cadence are the loop's.
"""

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from distil_flax import data
from distil_flax import model as model_lib
from distil_flax.data import run_targets
from distil_flax.distill import config as config_lib
from distil_flax.distill import pruning as pruning_lib
from distil_flax.distill import teachers
from distil_flax.distill.masking import MaskingSpec, smoothing_weights
from distil_flax.distill.step import jit_steps
from distil_flax.losses import TERMS, LossSpec, projection_init
from distil_flax.model import Encoder, make_encoder, student_init
from distil_flax.training import (
    atomic,
    config_files,
    flops,
    loop,
    partitioning,
    trackers,
    train_state,
)
from distil_flax.training.optimizer import make_optimizer
from distil_flax.training.train_state import TrainState


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
    loss: LossSpec  # The config's loss, its layers resolved against both models.
    teacher_mlm: bool = True  # Whether the teacher has a trained MLM head (for its metrics).
    pruning: student_init.Pruning | None = None  # What a pruned student keeps of the teacher.
    # Cached teacher targets (teacher.cache): the batches carry them, and `teacher` is None
    # unless it runs live for the terms they do not serve.
    targets: run_targets.Targets | None = None

    @property
    def teacher_width(self) -> int:
        """The width of what the student is compared with: the teacher's hidden size, or the
        cached targets' (several teachers': their concatenation)."""
        if self.targets is not None and self.targets.width:
            return self.targets.width
        return (self.teacher or self.student).hidden_size


def build(c: ml_collections.ConfigDict, tokenizer: "data.Tokenizer | None" = None,
          workdir: str | None = None) -> Setup:
    """Loads data, teacher and models.

    Args:
      tokenizer: what `config.validate(c)` returned; None: the config is validated here.
      workdir: the run's, when it may resume: a pruned student that has checkpoints there keeps
        the units its pruning.json records.
    """
    if tokenizer is None:
        tokenizer = config_lib.validate(c)
    mesh = partitioning.make_mesh(c.mesh)
    rules = partitioning.rules_from_config(c.mesh.rules)
    train_rows, eval_rows = data.build_datasets(c.data, tokenizer,
                                                process_count=jax.process_count())
    with c.unlocked():
        c.model.vocab_size = c.model.vocab_size or tokenizer.vocab_size
    student = make_encoder(c.model)
    if student.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size ({student.vocab_size}) differs from data.tokenizer's "
                         f"({tokenizer.vocab_size})")
    teacher = teacher_params = teacher_init = teacher_pooling = pruning = targets = None
    teacher_mlm = False
    caches = config_lib.cache_directories(c)
    live = config_lib.live_terms(c, config_lib.cache_kinds(c))
    if live:  # The terms no cache serves (all of them without a cache) run the teacher.
        teacher, teacher_params, teacher_mlm, teacher_pooling = teachers.load_teacher(
            c, tokenizer.vocab_size, mesh, rules, needs_mlm_head="loss.alpha_ce" in live)
        if not teacher_mlm:
            logging.info("The teacher has no MLM head: no MLM metrics for it.")
    if caches:
        targets, teacher, teacher_params = teachers.open_targets(
            c, caches, train_rows, mesh, rules,
            loaded=(teacher, teacher_params) if live else None)
        teacher_pooling = targets.pooling or teacher_pooling
        # The teacher's top-1 at the cached masks.
        teacher_mlm = teacher_mlm or targets.logits is not None
        train_rows, eval_rows = (dataclasses.replace(rows, targets=targets.split(name))
                                 for rows, name in ((train_rows, "train"), (eval_rows, "eval")))
    if teacher_params is not None:
        if c.init.from_teacher:
            pruning = pruning_lib.student_pruning(c, teacher, teacher_params, student,
                                                  train_rows, mesh, rules, workdir)
            abstract = jax.eval_shape(model_lib.init_fn(student), jax.random.PRNGKey(0))
            teacher_init = student_init.init_from_teacher(
                teacher_params, abstract, c.init.layer_map,
                num_heads=(teacher.num_heads, student.num_heads),
                position_offset=(teacher.position_offset, student.position_offset),
                pruning=pruning)
        teacher_params = partitioning.cast(teacher_params, jnp.dtype(c.teacher.param_dtype))
    loss = loss_spec(c, student, teacher, teacher_pooling, pruning, cached=targets is not None)
    if not live:
        teacher = teacher_params = None  # Never run: the batches carry its outputs.
    return Setup(c, mesh, rules, tokenizer, train_rows, eval_rows, student, teacher,
                 teacher_params, teacher_init, loss, teacher_mlm, pruning, targets)


def loss_spec(c: ml_collections.ConfigDict, student: Encoder, teacher: Encoder | None,
              teacher_pooling: str | None = None,
              pruning: student_init.Pruning | None = None, cached: bool = False) -> LossSpec:
    """The config's loss with each weighted feature term resolved against the two models
    (`Term.resolve`: layer maps, negative layers, pooling).

    Args:
      teacher_pooling: the teacher folder's own sentence-embedding pooling (`loss.embeddings.
        pooling=auto` takes it), None when it has none.
      pruning: what a pruned student kept (`loss.kept_channels` compares on its channels).
      cached: the teacher's outputs come from teacher.cache (the sentence terms only).

    Raises:
      ValueError: naming the field, when a layer map or layer is outside a model, or the models'
        heads or widths do not fit a term.
    """
    loss = c.loss
    channels = ()
    if loss.kept_channels:
        if pruning is None:
            raise ValueError("loss.kept_channels compares with the teacher's channels that a "
                             "pruned student kept, but this student is not pruned (init.prune "
                             "applies to a student narrower than its teacher)")
        channels = pruning.channels
    # Without a teacher or a cache, validation leaves no feature term a weight.
    terms = {} if teacher is None and not cached else {
        term.name: term.resolve(loss[term.name], c, student, teacher, teacher_pooling, pruning)
        for term in TERMS if term.weighted(loss[term.name])}
    if loss.alpha_cos and teacher is not None and not channels and (
            teacher.hidden_size != student.hidden_size):
        raise ValueError(
            f"loss.alpha_cos compares hidden states, but the teacher's hidden size "
            f"({teacher.hidden_size}) differs from model.hidden_size ({student.hidden_size}): a "
            "narrower student distils through loss.hidden_states or loss.relations, or, pruned, "
            "compares the channels it kept (loss.kept_channels)")
    return LossSpec(alpha_ce=loss.alpha_ce, alpha_mlm=loss.alpha_mlm, alpha_cos=loss.alpha_cos,
                    temperature=loss.temperature, restrict_ce_to_mask=loss.restrict_ce_to_mask,
                    head_chunk=loss.head_chunk, relation_chunk=loss.relation_chunk,
                    teacher_channels=channels, **terms)


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


def _projection_init(setup: Setup):
    return projection_init(setup.loss, setup.student.hidden_size, setup.teacher_width)


def abstract_state(setup: Setup, optimizer) -> TrainState:
    """The student's TrainState (with the loss's projections) as `jax.ShapeDtypeStruct`s carrying
    shardings."""
    params = partitioning.abstract_params(model_lib.init_fn(setup.student), setup.mesh,
                                          setup.rules)
    projections = partitioning.abstract_params(_projection_init(setup), setup.mesh, setup.rules)
    return train_state.abstract_state(params, optimizer, partitioning.replicated(setup.mesh),
                                      projections)


def init_state(setup: Setup, optimizer, abstract: TrainState) -> TrainState:
    """A fresh state: student params from teacher layers when configured, else random."""
    c = setup.config
    param_rng, state_rng, projection_rng = jax.random.split(jax.random.PRNGKey(c.seed), 3)
    shardings = train_state.shardings_of(abstract)
    if setup.teacher_init is not None:
        dtype = jnp.dtype(c.model.param_dtype)
        # A jitted copy: the step donates these buffers, which must not be the teacher's.
        params = jax.jit(lambda p: jax.tree.map(lambda x: jnp.array(x, dtype), p),
                         out_shardings=shardings.params)(setup.teacher_init)
        setup.teacher_init = None  # Only needed once; free it.
        if setup.pruning is None:
            logging.info("Student initialised from teacher layers %s.", list(c.init.layer_map))
        else:
            logging.info("Student initialised as the pruned teacher (%s in the workdir).",
                         student_init.PRUNING_FILE)
    else:
        params, _ = partitioning.sharded_init(
            model_lib.init_fn(setup.student), param_rng, setup.mesh, setup.rules)
        logging.info("Student initialised randomly.")
    projections, _ = partitioning.sharded_init(
        _projection_init(setup), projection_rng, setup.mesh, setup.rules)
    if projections:
        logging.info("Projections onto the teacher's width: %s (trained, never exported).",
                     jax.tree.map(jnp.shape, projections))
    return train_state.fresh_state(params, optimizer, abstract, state_rng, projections)


def evaluate(setup: Setup, state: TrainState, eval_fn, num_batches: int) -> dict[str, float]:
    """Held-out metrics: what each configured term compares (hidden-state MSE and cosine per
    mapped layer, attention-score MSE, relation KL), and MLM loss, accuracy and perplexity of the
    student and teacher that have a trained MLM head, with their top-1 agreement."""
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
        sums = jax.device_get(eval_fn(state.params, state.projections, setup.teacher_params,
                                      batch, rng))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    if not totals:
        return {}
    tokens = max(totals.get("tokens", 0.0), 1.0)
    metrics = {name.removeprefix("feature/"): total / tokens for name, total in totals.items()
               if name.startswith("feature/")}
    n = max(totals.get("predictions", 0.0), 1.0)
    if "student_nll" in totals:
        metrics["student_mlm_loss"] = totals["student_nll"] / n
        metrics["student_mlm_accuracy"] = totals["student_correct"] / n
        metrics["student_perplexity"] = math.exp(min(metrics["student_mlm_loss"], 50.0))
    if "teacher_correct" in totals:
        metrics["teacher_mlm_accuracy"] = totals["teacher_correct"] / n
    if "teacher_nll" in totals:
        metrics["teacher_mlm_loss"] = totals["teacher_nll"] / n
        metrics["teacher_perplexity"] = math.exp(min(metrics["teacher_mlm_loss"], 50.0))
    for name in ("kl_top_k", "tail_mass"):  # Against a logits cache (`step.eval_step`).
        if name in totals:
            metrics[name] = totals[name] / n
    if "agreement" in totals:
        metrics["agreement"] = totals["agreement"] / n
    return metrics


def compile_steps(setup: Setup, optimizer, schedule, shardings: TrainState):
    """The jitted training and evaluation steps (`step.jit_steps`) of this setup."""
    masked = setup.config.masking.mask_prob > 0
    return jit_steps(
        student=setup.student, teacher=setup.teacher, optimizer=optimizer, schedule=schedule,
        masking=masking_spec(setup.config, setup.tokenizer), loss=setup.loss,
        mesh=setup.mesh, rules=setup.rules, state_shardings=shardings,
        teacher_shardings=train_state.shardings_of(setup.teacher_params),
        # MLM metrics only for heads that mean something (one a loss trains, a teacher's own)
        # and where something is masked.
        student_mlm=bool(setup.loss.alpha_mlm or setup.loss.alpha_ce) and masked,
        teacher_mlm=setup.teacher_mlm and masked)


def _explain_shapes(c: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """The `model.*` fields in which the workdir's config.json differs from `c`."""
    try:
        theirs = config_files.load_json(epath.Path(workdir) / "config.json").model.to_dict()
    except (OSError, ValueError, AttributeError, KeyError):
        return []
    ours = json.loads(c.model.to_json_best_effort())
    return [f"model.{k} is {theirs.get(k)!r} there and {ours.get(k)!r} here"
            for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]


def make_trainer(setup: Setup, workdir: str) -> loop.Trainer:
    """Distillation as the loop runs it: the student's state, the step, held-out MLM metrics."""
    c = setup.config
    num_steps = total_steps(c, setup.train_rows.num_rows)
    optimizer, schedule = make_optimizer(c.train, num_steps)
    abstract = abstract_state(setup, optimizer)
    step_fn, eval_fn = compile_steps(setup, optimizer, schedule,
                                     train_state.shardings_of(abstract))
    token_weights = None
    if c.masking.smoothing:
        masking = masking_spec(c, setup.tokenizer)
        counts = data.token_counts(setup.train_rows, setup.tokenizer.vocab_size)
        token_weights = jax.device_put(
            smoothing_weights(counts, c.masking.smoothing, masking.special_ids),
            partitioning.replicated(setup.mesh))
    batch_sharding = partitioning.batch_sharding(setup.mesh, setup.rules, leading_dims=1)
    accum = c.train.batch_size // (c.train.micro_batch_size or c.train.batch_size)

    def step(state, local):
        # Micro-batch i is rows i, i + accum, … of the global batch: the same rows (and masks)
        # whatever the number of hosts, each holding a contiguous slice.
        local = {k: v.reshape(-1, accum, *v.shape[1:]).swapaxes(0, 1) for k, v in local.items()}
        batch = partitioning.host_to_global(local, batch_sharding)
        return step_fn(state, setup.teacher_params, batch, token_weights)

    loss = setup.loss
    ce_fraction = 1.0 if (loss.alpha_ce and not loss.restrict_ce_to_mask) else c.masking.mask_prob
    flops_per_token = flops.step_flops_per_token(
        setup.student, setup.teacher, c.data.seq_len, ce_fraction if loss.uses_heads else 0.0,
        ce_fraction if loss.alpha_ce else 0.0)
    peak = flops.peak_flops(override_tflops=c.train.peak_tflops)

    def throughput(step: int, steps: int, seconds: float) -> dict[str, float]:
        tokens_per_s = c.train.batch_size * c.data.seq_len * steps / seconds
        scalars = {"step_time_s": seconds / steps, "tokens_per_s": tokens_per_s}
        if peak:
            scalars["mfu"] = tokens_per_s * flops_per_token / (peak * jax.device_count())
        return scalars

    def on_start(state) -> None:
        if jax.process_index() == 0:
            config_files.save_json(c, str(epath.Path(workdir) / "config.json"))
            if setup.pruning is not None:
                teacher = {name: getattr(setup.teacher, name) for name in (
                    "num_layers", "hidden_size", "num_heads", "intermediate_size")}
                atomic.write_json(epath.Path(workdir) / student_init.PRUNING_FILE,
                                  {**setup.pruning.to_json(), "teacher": teacher}, indent=None)

    return loop.Trainer(
        mesh=setup.mesh, rules=setup.rules, abstract=abstract,
        init_state=lambda: init_state(setup, optimizer, abstract), step=step,
        batches=data.BatchIterator(setup.train_rows, c.train.batch_size, seed=c.seed,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count()),
        num_steps=num_steps, cadence=loop.Cadence(
            log_every=c.train.log_every, eval_every=c.train.eval_every,
            checkpoint_every=c.train.checkpoint_every, keep_checkpoints=c.train.keep_checkpoints,
            async_checkpoints=c.train.async_checkpoints, strict_restore=c.train.strict_restore,
            max_consecutive_nonfinite=c.train.max_consecutive_nonfinite),
        evaluate=lambda state, step: loop.Evaluation(
            evaluate(setup, state, eval_fn, c.train.eval_batches)),
        throughput=throughput, on_start=on_start, tracking=trackers.Settings.of(c),
        explain_shapes=lambda: _explain_shapes(c, workdir))


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir` and returns the final held-out metrics.

    Args:
      c: the run's config.
      workdir: checkpoints, config.json, TensorBoard events and metrics.jsonl go here.
      stop_at_step: save and return at this step, as a preempted run would (the schedule still
        spans the whole run; a later call resumes). Returns {} then, as after SIGTERM or Ctrl-C.

    Raises:
      ValueError: a config or input that cannot run, naming the field or file.
      WorkdirLockedError: another live run holds `workdir`.
      CorruptCheckpointError: no intact checkpoint to resume from (or, with
        `train.strict_restore`, the latest one is bad).
      CheckpointWriteError: a checkpoint could not be written (disk full, permissions).
      NonFiniteError: `train.max_consecutive_nonfinite` steps in a row had non-finite values.
    """
    tokenizer = config_lib.validate(c)  # A bad config fails before anything touches the workdir.
    with loop.exclusive(workdir) as session:
        setup = build(c, tokenizer, workdir)
        logging.info("Config:\n%s", c)
        logging.info("Devices: %d (%d local, process %d of %d); mesh %s.", jax.device_count(),
                     jax.local_device_count(), jax.process_index(), jax.process_count(),
                     dict(setup.mesh.shape))
        outcome = loop.run(make_trainer(setup, workdir), workdir, session,
                           stop_at_step=stop_at_step)
    if not outcome.finished:
        return {}
    _log_summary(outcome.evaluation.scalars)
    return outcome.evaluation.scalars


def _log_summary(metrics: dict[str, float]) -> None:
    if "student_mlm_accuracy" not in metrics:
        return
    line = f"Held-out MLM accuracy: student {metrics['student_mlm_accuracy']:.4f}"
    if "teacher_mlm_accuracy" in metrics:
        line += (f", teacher {metrics['teacher_mlm_accuracy']:.4f}; top-1 agreement "
                 f"{metrics['agreement']:.4f}")
    logging.info("%s.", line)
