"""Fine-tunes an encoder on a downstream task and scores it with the task's official metrics.

Fine-tuning is a trainer of the one run loop (`training/loop.py`): this module says what the state
holds (the encoder with a fresh head), the step (`downstream/step.py`), the evaluation (the task's
official metrics) and what "best" means (the task's score); resuming, signals, the non-finite
policy, checkpoints and logging are the loop's, exactly as for distillation.

    python -m distil_flax.finetune --config=configs/glue.py:task=sst2 --workdir=runs/sst2 \
        --config.init.checkpoint=runs/distil6 --config.data.dir=glue_data/SST-2

`finetune_and_evaluate(config, workdir)` is the whole job (`main.py` only parses flags): read the
task's splits, tokenise them with the pretrained model's vocabulary, put a fresh head on the
pretrained encoder, train with AdamW (warmup, linear decay) for the configured epochs, evaluate
after every epoch, and keep the best and the last checkpoints. With `distill.teacher` the same
loop runs task-specific distillation from a fine-tuned teacher.

The workdir receives:
  config.json, task_model.json   the run's config; the model's encoder config, head, tokenizer
  checkpoints/<step>             the last state (params, optimizer, RNG, data position): resume
  best/checkpoints/<step>        the best evaluation's parameters, committed with its record
  best.json                      that record (step, score, metrics), copied after the commit
  predictions/step_<n>/          each evaluation's predictions in the task's official format
  metrics.jsonl, events.out.*    training and evaluation metrics (TensorBoard)
  results.json                   the final summary: best and last metrics, skipped records
A restart on the same workdir resumes from the last checkpoint.
"""

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from distil_flax import data
from distil_flax.downstream import config as finetune_config
from distil_flax.downstream import tasks as tasks_lib
from distil_flax.downstream.init import merge_pretrained
from distil_flax.downstream.step import INPUTS, LossSpec, finetune_step, predict_step
from distil_flax.downstream.tasks import batching
from distil_flax.interop import hf, sources
from distil_flax.model import heads
from distil_flax.training import atomic, config_files, loop, partitioning, trackers, train_state
from distil_flax.training import optimizer as optim
from distil_flax.training.train_state import TrainState

RESULTS_FILE = "results.json"


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
    head: heads.TaskHead
    model: heads.TaskModel
    pretrained: sources.Source
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
    if head in ("seq_cls", "multiple_choice") and heads.task_pooling(m) == "pooler":
        m.use_pooler = True  # BERT classifies the pooled [CLS]; a fresh pooler if none was saved.
    if c.data.max_length > m.max_position_embeddings:
        raise ValueError(f"data.max_length ({c.data.max_length}) exceeds the pretrained model's "
                         f"max_position_embeddings ({m.max_position_embeddings})")
    return m


def _load_teacher(c: ml_collections.ConfigDict, run_head: heads.TaskHead, task: tasks_lib.Task,
                  vocab_size: int, mesh, rules):
    teacher = sources.open_source(c.distill.teacher, field="distill.teacher")
    if teacher.head is None:
        raise ValueError(f"distill.teacher={c.distill.teacher!r} is not a fine-tuned model: a "
                         "teacher must be fine-tuned on the task (a distil_flax fine-tuning "
                         f"workdir, or one of {sorted(hf.TASK_CLASSES.values())})")
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
    model_cfg = ml_collections.ConfigDict({**teacher.model_cfg.to_dict(), "dtype": c.model.dtype,
                                           "attention_mask": "lengths"})
    model = sources.task_model(model_cfg, teacher.head)
    params, _ = sources.task_params(teacher, mesh, rules, model_cfg=model_cfg)
    params = partitioning.cast(params, jnp.dtype(c.distill.teacher_param_dtype))
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


def build(c: ml_collections.ConfigDict, *, validated: bool = False) -> Run:
    """Loads the task's data, the tokenizer, the model and the teacher.

    Args:
      validated: the caller already ran `config.validate(c)`; False: it runs here.
    """
    if not validated:
        finetune_config.validate(c)
    mesh = partitioning.make_mesh(c.mesh)
    rules = partitioning.rules_from_config(c.mesh.rules)
    task = tasks_lib.get_task(c.task.name)
    if isinstance(task, tasks_lib.SquadTask):
        task.n_best_size, task.max_answer_length = c.data.n_best_size, c.data.max_answer_length

    pretrained = sources.open_source(c.init.checkpoint, field="init.checkpoint")
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
    pooling = heads.task_pooling(model_cfg)
    head_dropout = (c.model.head_dropout if c.model.head_dropout >= 0 else
                    heads.default_head_dropout(task.head, pooling, model_cfg.dropout_rate))
    head = heads.TaskHead(task.head, task.num_labels, tuple(task.label_names),
                       regression=task.is_regression, head_dropout=head_dropout)
    model = sources.task_model(model_cfg, head)

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
    params = sources.abstract_task_params(run.model, run.mesh, run.rules)
    return train_state.abstract_state(params, optimizer, partitioning.replicated(run.mesh))


def _init_state(run: Run, optimizer, abstract: TrainState) -> TrainState:
    """Fresh head, pretrained encoder, fresh optimizer."""
    head_rng, state_rng = jax.random.split(jax.random.PRNGKey(run.config.seed))
    fresh, _ = partitioning.sharded_init(heads.init_fn(run.model), head_rng, run.mesh, run.rules)
    encoder, _ = sources.encoder_params(run.pretrained, run.mesh, run.rules)
    params = merge_pretrained(fresh, encoder, run.config.init.checkpoint)
    return train_state.fresh_state(params, optimizer, abstract, state_rng)


def _compile(run: Run, optimizer, schedule, abstract: TrainState):
    """The jitted training step (state donated) and prediction step, with explicit shardings."""
    shardings = train_state.shardings_of(abstract)
    replicated = partitioning.replicated(run.mesh)
    c = run.config
    loss = LossSpec(head=run.head.head, regression=run.head.regression,
                    alpha=c.distill.alpha if run.teacher is not None else 0.0,
                    temperature=c.distill.temperature)
    train_sh = partitioning.example_shardings(run.train_features.arrays, run.mesh, run.rules)
    step_fn = jax.jit(
        functools.partial(finetune_step, model=run.model, teacher=run.teacher,
                          optimizer=optimizer, schedule=schedule, loss=loss),
        in_shardings=(shardings, train_state.shardings_of(run.teacher_params), train_sh),
        out_shardings=(shardings, replicated), donate_argnums=(0,))
    predict_fn = jax.jit(functools.partial(predict_step, model=run.model),
                         in_shardings=(shardings.params, None), out_shardings=replicated)
    return step_fn, predict_fn, train_sh


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------


def predict(run: Run, params, predict_fn, features: tasks_lib.Features) -> np.ndarray:
    """The head's outputs on every row of `features`, in order (float32 numpy)."""
    inputs = {k: features.arrays[k] for k in INPUTS}
    shardings = partitioning.example_shardings(inputs, run.mesh, run.rules)
    outputs = []
    for local in batching.eval_batches(inputs, run.config.train.eval_batch_size,
                                       pad_id=run.tokenizer.pad_id,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()):
        batch = partitioning.host_to_global(local, shardings)
        outputs.append(np.asarray(jax.device_get(predict_fn(params, batch))))
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


def _evaluation(run: Run, params, predict_fn, step: int, workdir: str) -> loop.Evaluation:
    """Evaluates and writes predictions; the task's score is what "best" means."""
    predictions_dir = (os.path.join(workdir, "predictions", f"step_{step}")
                       if jax.process_index() == 0 else None)
    metrics, score, files = evaluate(run, params, predict_fn, predictions_dir)
    flat = {f"{split}/{k}": v for split, values in metrics.items() for k, v in values.items()}
    return loop.Evaluation({**flat, "score": score}, score,
                           {"metrics": metrics, "predictions": files})


def _json(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------


def make_trainer(run: Run, workdir: str) -> loop.Trainer:
    """Fine-tuning as the loop runs it: the task model's state, its step, the task's metrics."""
    c = run.config
    batches = batching.EpochBatches(
        run.train_features.arrays, c.train.batch_size, seed=c.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    steps_per_epoch = batches.batches_per_epoch
    num_steps = c.train.num_steps or max(1, math.ceil(c.train.num_epochs * steps_per_epoch))
    eval_every = c.train.eval_every or steps_per_epoch
    optimizer, schedule = optim.make_optimizer(c.train, num_steps)
    abstract = _abstract_state(run, optimizer)
    step_fn, predict_fn, train_sh = _compile(run, optimizer, schedule, abstract)
    logging.info("%d steps: %.2f epochs of %d steps (batch %d); evaluating every %d steps.",
                 num_steps, num_steps / steps_per_epoch, steps_per_epoch, c.train.batch_size,
                 eval_every)

    def step(state, local):
        return step_fn(state, run.teacher_params, partitioning.host_to_global(local, train_sh))

    def throughput(step: int, steps: int, seconds: float) -> dict[str, float]:
        return {"epoch": step / steps_per_epoch, "step_time_s": seconds / steps,
                "examples_per_s": c.train.batch_size * steps / seconds}

    def on_start(state) -> None:
        if jax.process_index() == 0:
            config_files.save_json(c, str(epath.Path(workdir) / "config.json"))
            sources.write_task_model(workdir, model_cfg=run.model_cfg, head=run.head,
                                   tokenizer=run.tokenizer.path, lowercase=run.lowercase,
                                   task=run.task.name)

    return loop.Trainer(
        mesh=run.mesh, rules=run.rules, abstract=abstract,
        init_state=lambda: _init_state(run, optimizer, abstract), step=step, batches=batches,
        num_steps=num_steps, cadence=loop.Cadence(
            log_every=c.train.log_every, eval_every=eval_every,
            checkpoint_every=c.train.checkpoint_every or eval_every, keep_checkpoints=1,
            async_checkpoints=c.train.async_checkpoints, strict_restore=c.train.strict_restore,
            max_consecutive_nonfinite=c.train.max_consecutive_nonfinite),
        evaluate=lambda state, step: _evaluation(run, state.params, predict_fn, step, workdir),
        throughput=throughput, on_start=on_start, keep_best=True,
        tracking=trackers.Settings.of(c))


def finetune_and_evaluate(c: ml_collections.ConfigDict, workdir: str, *,
                          stop_at_step: int | None = None) -> dict[str, Any]:
    """Fine-tunes (or resumes) the run in `workdir`; returns the summary written to results.json.

    Args:
      c: the run's config (`downstream.config.base_config` and a task config).
      workdir: where checkpoints, metrics, predictions and results go.
      stop_at_step: save and return {} at this step, as a run stopped by SIGTERM or Ctrl-C.

    Raises:
      ValueError: a config or input that cannot run, naming the field or file.
      WorkdirLockedError: another live run holds `workdir`.
      CorruptCheckpointError, CheckpointWriteError, NonFiniteError: as `loop.run`.
    """
    finetune_config.validate(c)  # A bad config fails before anything touches the workdir.
    with loop.exclusive(workdir) as session:
        run = build(c, validated=True)
        logging.info("Config:\n%s", c)
        trainer = make_trainer(run, workdir)
        outcome = loop.run(trainer, workdir, session, stop_at_step=stop_at_step)
    if not outcome.finished:
        return {}
    evaluation = outcome.evaluation
    last = {"step": outcome.step, "score": evaluation.score, **evaluation.record}
    steps_per_epoch = trainer.batches.batches_per_epoch
    results = _results(run, trainer.num_steps, steps_per_epoch, outcome.best, last)
    if jax.process_index() == 0:
        atomic.write_text(epath.Path(workdir) / RESULTS_FILE, _json(results))
    _log_summary(results)
    return results


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
