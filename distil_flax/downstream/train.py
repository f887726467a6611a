"""Fine-tunes an encoder on a downstream task and scores it with the task's official metrics.

    python -m distil_flax.finetune --config=configs/glue.py:task=sst2 --workdir=runs/sst2 \
        --config.init.checkpoint=runs/distil6 --config.data.dir=glue_data/SST-2

`finetune_and_evaluate(config, workdir)` is the whole job (the CLI only parses flags): read the
task's splits, tokenise them with the pretrained model's vocabulary, put a fresh head on the
pretrained encoder, train with AdamW (warmup, linear decay) for the configured epochs, evaluate
after every epoch, and keep the best and the last checkpoints. With `distill.teacher` the same
loop runs task-specific distillation from a fine-tuned teacher.

The workdir receives:
  config.json, task_model.json   the run's config; the model's encoder config, head, tokenizer
  checkpoints/<step>             the last state (params, optimizer, RNG, data position): resume
  best/checkpoints/<step>        the parameters of the best evaluation (the task's score)
  predictions/step_<n>/          each evaluation's predictions in the task's official format
  metrics.jsonl, events.out.*    training and evaluation metrics (TensorBoard)
  results.json                   the final summary: best and last metrics, skipped records
A restart on the same workdir resumes from the last checkpoint.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from clu import parameter_overview
from etils import epath
from flax import linen as nn
from jax.sharding import NamedSharding

from distil_flax import config as config_lib
from distil_flax import data, finetune_config, finetune_init, heads, hf, optim, partitioning
from distil_flax.downstream import tasks as tasks_lib
from distil_flax.checkpoint import ITEMS, Checkpointer, checkpoint_dir
from distil_flax.downstream.tasks import batching
from distil_flax.workdir_lock import WorkdirLock, WorkdirLockedError
from distil_flax.downstream.step import INPUTS, LossSpec, finetune_step, predict_step
from distil_flax.metric_writers import MetricWriter
from distil_flax.step import TrainState

RESULTS_FILE = "results.json"
_BEST_RECORD = "best.json"


@dataclasses.dataclass
class Run:
    """What a fine-tuning run is built from (`build`); also handy in notebooks."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: tuple
    task: tasks_lib.Task
    tokenizer: data.Tokenizer
    lowercase: bool  # The tokenizer's normalisation (recorded for export and teachers).
    model_cfg: ml_collections.ConfigDict  # The encoder's, as trained here.
    head: hf.TaskHead
    model: heads.TaskModel
    pretrained: finetune_init.Pretrained
    train_split: tasks_lib.Split
    train_features: tasks_lib.Features
    eval_data: dict[str, tuple[tasks_lib.Split, tasks_lib.Features]]
    teacher: heads.TaskModel | None = None
    teacher_params: Any = None


# ---------------------------------------------------------------------------------------------
# Building a run.
# ---------------------------------------------------------------------------------------------


def _model_config(c: ml_collections.ConfigDict, pretrained: ml_collections.ConfigDict,
                  head: str) -> ml_collections.ConfigDict:
    """The pretrained encoder's config with this run's compute settings."""
    settings = dict(dtype=c.model.dtype, attention_impl=c.model.attention_impl,
                    remat=c.model.remat,
                    # One example per row, padding at the end: attention needs only each row's
                    # length (cuDNN's fastest path), not packed-segment masks.
                    attention_mask="lengths")
    if c.model.dropout_rate >= 0:
        settings["dropout_rate"] = c.model.dropout_rate
    # A fresh ConfigDict: the saved one may hold an older field type (remat was a bool).
    m = ml_collections.ConfigDict({**pretrained.to_dict(), **settings})
    if head in ("seq_cls", "multiple_choice") and hf.task_pooling(m) == "pooler":
        m.use_pooler = True  # BERT classifies the pooled [CLS]; a fresh pooler if none was saved.
    if c.data.max_length > m.max_position_embeddings:
        raise ValueError(f"data.max_length ({c.data.max_length}) exceeds the pretrained model's "
                         f"max_position_embeddings ({m.max_position_embeddings})")
    return m


def _load_teacher(c: ml_collections.ConfigDict, run_head: hf.TaskHead, task: tasks_lib.Task,
                  vocab_size: int, mesh, rules):
    teacher = finetune_init.load_finetuned(c.distill.teacher, mesh, rules, dtype=c.model.dtype)
    problems = []
    if teacher.task and teacher.task != task.name:
        problems.append(f"it was fine-tuned on {teacher.task!r}, not {task.name!r}")
    if (teacher.head.head, teacher.head.num_labels, teacher.head.regression) != (
            run_head.head, run_head.num_labels, run_head.regression):
        problems.append(f"its head is {teacher.head.head} with {teacher.head.num_labels} "
                        f"output(s), the task needs {run_head.head} with {run_head.num_labels}")
    if teacher.model_cfg.vocab_size != vocab_size:
        problems.append(f"its vocabulary has {teacher.model_cfg.vocab_size} ids, the student's "
                        f"tokenizer {vocab_size}")
    if c.data.max_length > teacher.model_cfg.max_position_embeddings:
        problems.append(f"data.max_length {c.data.max_length} exceeds its "
                        f"max_position_embeddings {teacher.model_cfg.max_position_embeddings}")
    if problems:
        raise ValueError(f"distill.teacher={c.distill.teacher!r} cannot teach this run: "
                         + "; ".join(problems))
    model = finetune_init.task_model(teacher.model_cfg, teacher.head)
    dtype = jnp.dtype(c.distill.teacher_param_dtype)
    params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p))(teacher.params)
    logging.info("Teacher: %s (%d layers × %d).", c.distill.teacher, teacher.model_cfg.num_layers,
                 teacher.model_cfg.hidden_size)
    return model, params


def _read(task: tasks_lib.Task, split: str, c: ml_collections.ConfigDict,
          tokenizer: data.Tokenizer, limit: int):
    read = task.read(split, c.data)
    if limit:
        read.examples = read.examples[:limit]
    features = task.featurize(read, tokenizer, c.data)
    logging.info("%s split (%s): %d examples → %d rows of %d tokens.", split, read.source,
                 len(read.examples), features.num_rows, features.arrays["input_ids"].shape[-1])
    return read, features


def build(c: ml_collections.ConfigDict) -> Run:
    """Validates the config; loads the task's data, the tokenizer, the model and the teacher."""
    finetune_config.validate(c)
    mesh = partitioning.make_mesh(c.mesh)
    rules = partitioning.rules_from_config(c.mesh.rules)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    for field in ("batch_size", "eval_batch_size"):
        if c.train[field] % data_parallel or c.train[field] % jax.process_count():
            raise ValueError(f"train.{field} ({c.train[field]}) must divide among the "
                             f"{data_parallel} data-parallel devices and "
                             f"{jax.process_count()} process(es)")
    task = tasks_lib.get_task(c.task.name)
    if isinstance(task, tasks_lib.SquadTask):
        task.n_best_size, task.max_answer_length = c.data.n_best_size, c.data.max_answer_length

    pretrained = finetune_init.load_pretrained(c.init.checkpoint)
    tokenizer_path = c.data.tokenizer or pretrained.tokenizer
    if not tokenizer_path:
        raise ValueError(f"init.checkpoint={c.init.checkpoint!r} names no tokenizer: set "
                         "data.tokenizer to the vocabulary the model was trained with")
    lowercase = c.data.lowercase if c.data.tokenizer else pretrained.lowercase
    tokenizer = data.load_tokenizer(tokenizer_path, lowercase=lowercase)
    if tokenizer.vocab_size != pretrained.model_cfg.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer_path} has {tokenizer.vocab_size} ids but the "
                         f"model at init.checkpoint has vocab_size "
                         f"{pretrained.model_cfg.vocab_size}: use the model's own vocabulary")
    model_cfg = _model_config(c, pretrained.model_cfg, task.head)
    pooling = hf.task_pooling(model_cfg)
    head_dropout = (c.model.head_dropout if c.model.head_dropout >= 0 else
                    heads.default_head_dropout(task.head, pooling, model_cfg.dropout_rate))
    head = hf.TaskHead(task.head, task.num_labels, tuple(task.label_names),
                       regression=task.is_regression, head_dropout=head_dropout)
    model = finetune_init.task_model(model_cfg, head)

    train_split, train_features = _read(task, "train", c, tokenizer, c.data.max_train_examples)
    eval_data = {name: _read(task, name, c, tokenizer, c.data.max_eval_examples)
                 for name in task.eval_splits}
    run = Run(c, mesh, rules, task, tokenizer, lowercase, model_cfg, head, model, pretrained,
              train_split, train_features, eval_data)
    if c.distill.teacher:
        if c.distill.alpha == 0:
            logging.warning("distill.teacher is set but distill.alpha is 0: the teacher is unused.")
        else:
            run.teacher, run.teacher_params = _load_teacher(c, head, task, tokenizer.vocab_size,
                                                            mesh, rules)
    return run


# ---------------------------------------------------------------------------------------------
# State, batches and compiled steps.
# ---------------------------------------------------------------------------------------------


def _abstract_state(run: Run, optimizer) -> TrainState:
    """The TrainState as ShapeDtypeStructs with shardings (moments follow their parameter)."""
    params = finetune_init.abstract_params(run.model, run.mesh, run.rules)
    replicated = partitioning.replicated(run.mesh)
    opt_shapes = jax.eval_shape(optimizer.init, params)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, p: p.sharding, opt_shapes, params,
                                          transform_non_params=lambda _: replicated)
    with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    scalar = lambda x: with_sharding(jax.eval_shape(lambda: x), replicated)  # noqa: E731
    count = scalar(jnp.zeros((), jnp.int32))
    return TrainState(step=count, params=params,
                      opt_state=jax.tree.map(with_sharding, opt_shapes, opt_shardings),
                      rng=scalar(jax.random.PRNGKey(0)), skipped_steps=count, bad_streak=count)


def _init_state(run: Run, optimizer, abstract: TrainState) -> TrainState:
    """Fresh head, pretrained encoder, fresh optimizer."""
    head_rng, state_rng = jax.random.split(jax.random.PRNGKey(run.config.seed))
    fresh, _ = partitioning.sharded_init(heads.init_fn(run.model), head_rng, run.mesh, run.rules)
    encoder = finetune_init.encoder_params(run.pretrained, run.mesh, run.rules)
    params = finetune_init.merge_pretrained(fresh, encoder, run.config.init.checkpoint)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    zero = lambda sharding: jax.device_put(jnp.zeros((), jnp.int32), sharding)  # noqa: E731
    return TrainState(step=zero(shardings.step), params=params, opt_state=opt_state,
                      rng=jax.device_put(state_rng, shardings.rng),
                      skipped_steps=zero(shardings.skipped_steps),
                      bad_streak=zero(shardings.bad_streak))


def _batch_shardings(arrays: dict[str, np.ndarray], mesh, rules) -> dict[str, NamedSharding]:
    """Each array split over the data-parallel axes along its first (example) dimension."""
    return {k: NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",) + (None,) * (v.ndim - 1),
                                                           rules))
            for k, v in arrays.items()}


def _to_global(local: dict[str, np.ndarray], shardings: dict[str, NamedSharding]):
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


def _compile(run: Run, optimizer, schedule, abstract: TrainState):
    """The jitted training step (state donated) and prediction step, with explicit shardings."""
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    replicated = partitioning.replicated(run.mesh)
    c = run.config
    loss = LossSpec(head=run.head.head, regression=run.head.regression,
                    alpha=c.distill.alpha if run.teacher is not None else 0.0,
                    temperature=c.distill.temperature)
    teacher_sh = jax.tree.map(lambda x: x.sharding, run.teacher_params)
    train_sh = _batch_shardings(run.train_features.arrays, run.mesh, run.rules)
    step_fn = jax.jit(
        functools.partial(finetune_step, model=run.model, teacher=run.teacher,
                          optimizer=optimizer, schedule=schedule, loss=loss),
        in_shardings=(shardings, teacher_sh, train_sh), out_shardings=(shardings, replicated),
        donate_argnums=(0,))
    predict_fn = jax.jit(functools.partial(predict_step, model=run.model),
                         in_shardings=(shardings.params, None), out_shardings=replicated)
    return step_fn, predict_fn, train_sh


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------


def predict(run: Run, params, predict_fn, features: tasks_lib.Features) -> np.ndarray:
    """The head's outputs on every row of `features`, in order (float32 numpy)."""
    inputs = {k: features.arrays[k] for k in INPUTS}
    shardings = _batch_shardings(inputs, run.mesh, run.rules)
    outputs = []
    for local in batching.eval_batches(inputs, run.config.train.eval_batch_size,
                                       pad_id=run.tokenizer.pad_id,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()):
        outputs.append(np.asarray(jax.device_get(predict_fn(params, _to_global(local, shardings)))))
    return np.concatenate(outputs)[:features.num_rows]


def evaluate(run: Run, params, predict_fn, predictions_dir: str | None
             ) -> tuple[dict[str, dict[str, float]], float, dict[str, str]]:
    """Scores every evaluation split; writes predictions under `predictions_dir` (if given).

    Returns:
      (metrics by split, the task's score, prediction files by split).
    """
    metrics, files = {}, {}
    for name, (split, features) in run.eval_data.items():
        outputs = predict(run, params, predict_fn, features)
        metrics[name], predictions = run.task.evaluate(split, features, outputs)
        if predictions_dir:
            files[name] = run.task.write_predictions(predictions_dir, split, predictions)
    return metrics, run.task.score(metrics), files


class _BestCheckpoint:
    """The parameters of the best evaluation so far, under `workdir/best` (params item only)."""

    def __init__(self, workdir: str, async_save: bool):
        self.directory = os.path.join(workdir, finetune_init.BEST_DIR)
        self.manager = ocp.CheckpointManager(
            checkpoint_dir(self.directory), item_names=ITEMS,
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                                 enable_async_checkpointing=async_save))
        record = epath.Path(workdir) / _BEST_RECORD
        self.record_path = record
        self.record = json.loads(record.read_text()) if record.exists() else None

    @property
    def score(self) -> float:
        return -math.inf if self.record is None else self.record["score"]

    def offer(self, step: int, score: float, params, record: dict) -> bool:
        """Saves `params` if `score` beats the best so far; returns whether it did."""
        if not score > self.score:
            return False
        self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                          force=True)
        self.record = {"step": step, "score": score, **record}
        if jax.process_index() == 0:
            self.record_path.write_text(_json(self.record))
        return True

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _json(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


def finetune_and_evaluate(c: ml_collections.ConfigDict, workdir: str, *,
                          stop_at_step: int | None = None) -> dict[str, Any]:
    """Fine-tunes (or resumes) the run in `workdir`; returns the summary written to results.json.

    Args:
      c: the run's config (`finetune_config.base_config` and a task config).
      workdir: where checkpoints, metrics, predictions and results go.
      stop_at_step: save and return {} at this step, as a preempted run would.

    Raises:
      ValueError: a config or input that cannot run, naming the field or file.
      WorkdirLockedError: another live run holds `workdir`.
    """
    finetune_config.validate(c)  # A bad config fails before anything touches the workdir.
    with WorkdirLock(workdir, enabled=jax.process_index() == 0) as lock:
        return _finetune_and_evaluate(c, workdir, lock, stop_at_step)


def _finetune_and_evaluate(c: ml_collections.ConfigDict, workdir: str, lock: WorkdirLock,
                           stop_at_step: int | None) -> dict[str, Any]:
    run = build(c)
    workdir_path = epath.Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir_path.mkdir(parents=True, exist_ok=True)
        config_lib.save_json(c, str(workdir_path / "config.json"))
        finetune_init.describe(workdir, model_cfg=run.model_cfg, head=run.head,
                               tokenizer=run.tokenizer.path, lowercase=run.lowercase,
                               task=run.task.name)
    logging.info("Config:\n%s", c)

    iterator = batching.EpochBatches(
        run.train_features.arrays, c.train.batch_size, seed=c.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    steps_per_epoch = iterator.batches_per_epoch
    num_steps = c.train.num_steps or max(1, math.ceil(c.train.num_epochs * steps_per_epoch))
    eval_every = c.train.eval_every or steps_per_epoch
    checkpoint_every = c.train.checkpoint_every or eval_every
    optimizer, schedule = optim.make_optimizer(c.train, num_steps)
    abstract = _abstract_state(run, optimizer)

    # ------------------------------------------------------------------ state: resume or init
    checkpointer = Checkpointer(workdir, save_every=checkpoint_every, keep=1,
                                async_save=c.train.async_checkpoints)
    best = _BestCheckpoint(workdir, c.train.async_checkpoints)
    restored = checkpointer.restore_latest(abstract)
    if restored is not None:
        state, data_state, latest = restored
        iterator.set_state(data_state)
        logging.info("Resuming from step %d (checkpoint in %s).", latest, workdir)
    else:
        state = _init_state(run, optimizer, abstract)
    if is_main:
        logging.info("Parameters:\n%s", parameter_overview.get_parameter_overview(
            state.params, include_stats=False))
    step_fn, predict_fn, train_sh = _compile(run, optimizer, schedule, abstract)

    # ------------------------------------------------------------------ loop
    writer = MetricWriter(workdir, enabled=is_main, total_steps=num_steps)
    step = int(jax.device_get(state.step))
    logging.info("%d steps: %.2f epochs of %d steps (batch %d); evaluating every %d steps.",
                 num_steps, num_steps / steps_per_epoch, steps_per_epoch, c.train.batch_size,
                 eval_every)
    history: list[dict] = []
    last_time, last_step = time.time(), step
    skipped = int(jax.device_get(state.skipped_steps))
    last_eval: dict[str, Any] = {}
    try:
        with _in_mesh(run):
            while step < num_steps:
                if lock.lost.is_set():
                    raise WorkdirLockedError(f"another run took over {lock.path}; stopping "
                                             "without saving")
                batch = _to_global(next(iterator), train_sh)
                state, metrics = step_fn(state, run.teacher_params, batch)
                step += 1
                if history:
                    history[-1]["loss"].block_until_ready()  # At most two steps in flight.
                history.append(metrics)
                if step % c.train.log_every == 0 or step == num_steps:
                    fetched = jax.device_get(history)
                    history = []
                    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                    scalars["skipped_steps"] = float(fetched[-1]["skipped_steps"])
                    if scalars["skipped_steps"] > skipped:
                        logging.warning("%d update(s) skipped for non-finite loss or gradients "
                                        "by step %d.", scalars["skipped_steps"] - skipped, step)
                        skipped = int(scalars["skipped_steps"])
                    elapsed = time.time() - last_time
                    scalars["epoch"] = step / steps_per_epoch
                    scalars["step_time_s"] = elapsed / (step - last_step)
                    scalars["examples_per_s"] = c.train.batch_size * (step - last_step) / elapsed
                    writer.write_scalars(step, scalars, prefix="train/")
                    last_time, last_step = time.time(), step
                if step % eval_every == 0 or step == num_steps:
                    last_eval = _evaluate_and_keep(run, state, predict_fn, step, writer, best,
                                                   workdir)
                    last_time = time.time()  # Evaluation is not training throughput.
                checkpointer.save(step, state, iterator.get_state(), force=step == num_steps)
                if step == stop_at_step:
                    logging.warning("Stopping at step %d (stop_at_step): saving a checkpoint.",
                                    step)
                    checkpointer.save(step, state, iterator.get_state(), force=True)
                    return {}
            if not last_eval:  # Resumed after the last step: evaluate the final state again.
                last_eval = _evaluate_and_keep(run, state, predict_fn, step, writer, best,
                                               workdir)
    finally:
        checkpointer.close()
        best.close()
        writer.close()
    results = _results(run, num_steps, steps_per_epoch, best.record, last_eval)
    if is_main:
        (workdir_path / RESULTS_FILE).write_text(_json(results))
    _log_summary(results)
    return results


@contextlib.contextmanager
def _in_mesh(run: Run):
    """The mesh and logical rules in effect while steps are traced (activation constraints)."""
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
        yield


def _evaluate_and_keep(run: Run, state: TrainState, predict_fn, step: int, writer: MetricWriter,
                       best: _BestCheckpoint, workdir: str) -> dict[str, Any]:
    """Evaluates, logs, writes predictions, and saves the parameters if they are the best."""
    predictions_dir = (os.path.join(workdir, "predictions", f"step_{step}")
                       if jax.process_index() == 0 else None)
    metrics, score, files = evaluate(run, state.params, predict_fn, predictions_dir)
    flat = {f"{split}/{k}": v for split, values in metrics.items() for k, v in values.items()}
    writer.write_scalars(step, {**flat, "score": score}, prefix="eval/")
    record = {"metrics": metrics, "predictions": files}
    if best.offer(step, score, state.params, record):
        logging.info("New best %s score %.4f at step %d.", run.task.name, score, step)
    return {"step": step, "score": score, **record}


def _results(run: Run, num_steps: int, steps_per_epoch: int, best: dict | None,
             last: dict) -> dict[str, Any]:
    c = run.config
    return {
        "task": run.task.name,
        "init": c.init.checkpoint,
        "teacher": c.distill.teacher or None,
        "model": {"layers": run.model_cfg.num_layers, "hidden": run.model_cfg.hidden_size,
                  "head": hf.TASK_CLASSES[(hf.export_architecture(run.model_cfg).model_type,
                                           run.head.head)]},
        "steps": num_steps,
        "epochs": num_steps / steps_per_epoch,
        "train_examples": len(run.train_split.examples),
        "train_rows": run.train_features.num_rows,
        "eval_examples": {n: len(s.examples) for n, (s, _) in run.eval_data.items()},
        "skipped": {run.train_split.name: run.train_split.skipped,
                    **{n: s.skipped for n, (s, _) in run.eval_data.items()}},
        "best": best,
        "last": last,
    }


def _log_summary(results: dict[str, Any]) -> None:
    best, last = results["best"], results["last"]
    shown = lambda r: "; ".join(  # noqa: E731
        f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(values.items()))
        for split, values in r["metrics"].items())
    logging.info("%s: last (step %d) %s.", results["task"], last["step"], shown(last))
    if best:
        logging.info("%s: best (step %d, score %.4f) %s.", results["task"], best["step"],
                     best["score"], shown(best))


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def _define_flags():
    """Defined only when run as a program, so that this module imports beside `main.py`."""
    from ml_collections import config_flags
    config = config_flags.DEFINE_config_file("config", None, "Fine-tuning configuration file.",
                                             lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
    flags.mark_flags_as_required(["config", "workdir"])
    return config, workdir


def main(argv, config_flag, workdir_flag):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    c = config_flag.value
    if c.distributed:
        jax.distributed.initialize()
    try:
        finetune_and_evaluate(c, workdir_flag.value)
    except (ValueError, OSError, FloatingPointError, WorkdirLockedError) as error:
        # A bad config or input, an unreadable checkpoint, a full disk, a busy workdir: one
        # line naming the field or file; anything else is a bug and keeps its traceback.
        logging.debug("Run stopped.", exc_info=True)  # The traceback, with --verbosity=1.
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _flags = _define_flags()
    app.run(functools.partial(main, config_flag=_flags[0], workdir_flag=_flags[1]))
