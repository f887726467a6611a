"""GLUE in one job: fine-tune a model on each of the nine tasks, then tabulate their scores.

    python -m distil_flax.glue --init=runs/distil6 --data_dir=glue_data --workdir=runs/glue \
        --teacher=runs/glue_bert/glue.json

`run_suite(config, init=..., data_dir=..., workdir=...)` is the whole job: for each GLUE task
(`tasks.metrics.GLUE_TASKS`), the config (`configs/glue.py`: BERT's recipe, as the DistilBERT
paper fine-tuned for its Table 1) with that task, its folder of `data_dir` and the model set,
run by `train.finetune_and_evaluate` in a workdir of its own; then the same for the teacher; then
the table. Each task is a resumable run: a rerun skips the tasks that finished (their
results.json) and resumes the one that was stopped. A task whose files are not in `data_dir`
is skipped and marked missing (the macro-score needs all nine).

The workdir receives:
  student/<task>/    the model's fine-tuning run of each task (see `downstream/train.py`)
  teacher/<task>/    the teacher's, when the teacher is a model
  glue.md            the table: Model | Score | CoLA | MNLI | ... | WNLI, scores × 100 as the
                     paper prints them; with a teacher, its row and a row of retention
  glue.json          the same numbers, as below

glue.json (scores as results.json has them, in [0, 1]; retention in percent):
  {"tasks": the nine task names in GLUE_TASKS order,
   "rows": [{"name": "student" | "teacher", "model": the --init (or --teacher) given,
             "score": the macro-score (`glue_score`), null unless all nine tasks have one,
             "tasks": {task: {"score": the task's score, "metrics": {"split/metric": value},
                              "step": the best evaluation's step, "workdir": its run}},
             "missing": [selected tasks without data]}, ...],
   "retention": {task: 100 · student / teacher, ..., "score": the same of the macro-scores}
                or null without a teacher; a task either row lacks is left out, and a ratio
                whose teacher score is not positive (or a macro-score that is null) is null}

A teacher given as a glue.json (of an earlier run of this job, its first row) is not fine-tuned
again, so that a teacher's GLUE runs are done once.
"""

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import ml_collections
from absl import logging
from etils import epath

from distil_flax.downstream import config as finetune_config
from distil_flax.downstream import train
from distil_flax.downstream.tasks import glue
from distil_flax.downstream.tasks import metrics as glue_metrics
from distil_flax.interop import sources
from distil_flax.training import atomic, config_files, trackers
from distil_flax.training.stop_signals import StopSignals

TABLE_FILE = "glue.md"
REPORT_FILE = "glue.json"
# The columns of the paper's Table 1 (GLUE's folder names, alphabetical).
TABLE_ORDER = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")
FOLDERS = {task: glue.SPECS[task].folder for task in glue_metrics.GLUE_TASKS}


@dataclasses.dataclass(frozen=True)
class Model:
    """A row of the table to fine-tune: its name ("student", "teacher") and model."""

    name: str
    spec: str  # A distil_flax run, a Hugging Face folder or hf://ORG/NAME.


# ---------------------------------------------------------------------------------------------
# Tasks and their data.
# ---------------------------------------------------------------------------------------------


def select_tasks(names: Sequence[str] | None) -> tuple[str, ...]:
    """The tasks `names` picks (ours or GLUE's folder names, any case), in GLUE_TASKS order;
    None or empty: all nine.

    Raises:
      ValueError: a name that is no GLUE task.
    """
    if not names:
        return glue_metrics.GLUE_TASKS
    known = {**{t: t for t in FOLDERS}, **{f.lower(): t for t, f in FOLDERS.items()}}
    unknown = [n for n in names if n.strip().lower() not in known]
    if unknown:
        raise ValueError(f"--tasks: {', '.join(map(repr, unknown))} is no GLUE task; tasks: "
                         f"{', '.join(glue_metrics.GLUE_TASKS)}")
    chosen = {known[n.strip().lower()] for n in names}
    return tuple(t for t in glue_metrics.GLUE_TASKS if t in chosen)


def missing_files(data_dir: str, task: str) -> str:
    """What of `task`'s files `data_dir` lacks, as a short phrase; "" when it has them all."""
    folder = epath.Path(data_dir) / FOLDERS[task]
    if not folder.is_dir():
        return f"no folder {FOLDERS[task]}/"
    files = ("train", *glue.SPECS[task].eval_splits)
    absent = [f"{f}.tsv" for f in files if not (folder / f"{f}.tsv").exists()]
    return f"{FOLDERS[task]}/ has no {', '.join(absent)}" if absent else ""


def task_config(config: ml_collections.ConfigDict, task: str, data_dir: str, init: str,
                row: str = "student") -> ml_collections.ConfigDict:
    """`config` for one task: its name, its folder of `data_dir`, the model to fine-tune, and
    a tracker run name that tells the rows' runs of a task apart ("student/mrpc")."""
    c = config.copy_and_resolve_references()
    c.task.name = task
    c.data.dir = os.path.join(data_dir, FOLDERS[task])
    c.init.checkpoint = init
    c.train.run_name = "/".join(filter(None, (config.train.run_name, row, task)))
    return c


def _check_suite_config(config: ml_collections.ConfigDict) -> None:
    """Refuses the fields the driver sets itself, or that cannot hold for nine tasks."""
    set_here = {"init.checkpoint": "--init", "data.dir": "--data_dir"}
    for field, flag in set_here.items():
        section, name = field.split(".")
        if config[section][name]:
            raise ValueError(f"{field} is set per task from {flag}: leave --config.{field} out")
    if config.distill.teacher:
        raise ValueError("distill.teacher names one fine-tuned teacher, and the suite runs nine "
                         "tasks: use distil_flax.finetune per task for task-specific distillation")
    if config.data.source != "files":
        raise ValueError(f"data.source={config.data.source!r}: the GLUE suite reads GLUE's "
                         "files from --data_dir (data.source=files)")


# ---------------------------------------------------------------------------------------------
# One task.
# ---------------------------------------------------------------------------------------------


def _same_model(a: str, b: str) -> bool:
    return a == b or ("://" not in a + b and os.path.realpath(a) == os.path.realpath(b))


def _check_earlier_config(c: ml_collections.ConfigDict, workdir: str, done: bool) -> None:
    """Compares a task run's saved config.json with the one it is asked to run with now.

    Raises:
      ValueError: the run is of another model (a table would mix two models).
    """
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        return
    saved = trackers.flatten(config_files.read_json(path))
    ours = trackers.flatten(json.loads(c.to_json_best_effort()))
    if not _same_model(str(saved.get("init.checkpoint", "")), c.init.checkpoint):
        raise ValueError(f"{workdir} fine-tuned init.checkpoint={saved.get('init.checkpoint')!r}"
                         f", not {c.init.checkpoint!r}: use another --workdir")
    differ = [f"{k}={saved.get(k)!r} (now {ours.get(k)!r})" for k in sorted(set(saved) | set(ours))
              if k != "init.checkpoint" and saved.get(k) != ours.get(k)]
    if differ:
        logging.warning("%s ran with %s%s: %s.", workdir, ", ".join(differ[:5]),
                        " …" if len(differ) > 5 else "",
                        "its results are kept (delete the folder to fine-tune it again)" if done
                        else "it resumes with this run's settings")


def finetune_task(c: ml_collections.ConfigDict, workdir: str, *,
                  stop_at_step: int | None = None) -> dict[str, Any] | None:
    """A task's results: read when its run finished before, else fine-tuned (or resumed) now.

    Returns:
      results.json's content; None when the run was stopped (a signal, `stop_at_step`).
    """
    results_file = epath.Path(workdir) / train.RESULTS_FILE
    _check_earlier_config(c, workdir, done=results_file.exists())
    if results_file.exists():
        logging.info("%s: done (%s), not fine-tuned again.", workdir, train.RESULTS_FILE)
        return config_files.read_json(results_file)
    return train.finetune_and_evaluate(c, workdir, stop_at_step=stop_at_step) or None


def task_entry(results: dict[str, Any], workdir: str) -> dict[str, Any]:
    """glue.json's record of one task: its best evaluation (the last if it kept none)."""
    best = results.get("best") or results["last"]
    metrics = {f"{split}/{name}": value for split, values in best["metrics"].items()
               for name, value in values.items()}
    return {"score": best["score"], "metrics": metrics, "step": best["step"],
            "workdir": workdir}


# ---------------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------------


def make_row(name: str, model: str, entries: dict[str, dict[str, Any]],
             missing: Sequence[str] = ()) -> dict[str, Any]:
    """A row of glue.json from its tasks' entries (`task_entry`); the macro-score when all nine
    tasks have one."""
    scores = {t: e["score"] for t, e in entries.items()}
    complete = set(scores) == set(glue_metrics.GLUE_TASKS)
    return {"name": name, "model": model,
            "score": glue_metrics.glue_score(scores) if complete else None,
            "tasks": {t: entries[t] for t in glue_metrics.GLUE_TASKS if t in entries},
            "missing": [t for t in glue_metrics.GLUE_TASKS if t in missing]}


def _percent(student: float | None, teacher: float | None) -> float | None:
    if student is None or teacher is None or teacher <= 0:
        return None
    return 100.0 * student / teacher


def retention(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float | None]:
    """100 · student / teacher for each task both rows have, and for the macro-score."""
    both = [t for t in glue_metrics.GLUE_TASKS if t in student["tasks"] and t in teacher["tasks"]]
    return {**{t: _percent(student["tasks"][t]["score"], teacher["tasks"][t]["score"])
               for t in both},
            "score": _percent(student["score"], teacher["score"])}


def make_report(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """glue.json's content: the rows (student first), and retention when there is a teacher."""
    return {"tasks": list(glue_metrics.GLUE_TASKS), "rows": list(rows),
            "retention": retention(rows[0], rows[1]) if len(rows) > 1 else None}


def read_report_row(path: str) -> dict[str, Any]:
    """The first row of a glue.json this job wrote (a teacher's GLUE run, done once).

    Raises:
      ValueError: not such a file (naming it).
    """
    if not epath.Path(path).exists():
        raise ValueError(f"--teacher={path!r} does not exist")
    report = config_files.read_json(path)
    rows = report.get("rows") if isinstance(report, dict) else None
    row = rows[0] if isinstance(rows, list) and rows else None
    if not (isinstance(row, dict) and isinstance(row.get("tasks"), dict) and "score" in row
            and all(isinstance(e, dict) and "score" in e for e in row["tasks"].values())):
        raise ValueError(f"--teacher={path!r} is not a {REPORT_FILE} of distil_flax.glue (its "
                         "first row needs a score and tasks with scores)")
    return row


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def format_table(report: dict[str, Any]) -> str:
    """The report as a markdown table in the DistilBERT paper's layout, with notes under it."""
    header = ["Model", "Score", *(FOLDERS[t] for t in TABLE_ORDER)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    notes = []
    for row in report["rows"]:
        cells = []
        for task in TABLE_ORDER:
            entry = row["tasks"].get(task)
            cells.append(_cell(entry["score"]) if entry else
                         "missing" if task in row["missing"] else "–")
        model = row["model"].replace("|", "\\|")
        lines.append(f"| {row['name']} ({model}) | {_cell(row['score'])} | "
                     + " | ".join(cells) + " |")
        absent = [FOLDERS[t] for t in TABLE_ORDER if t not in row["tasks"]]
        if row["score"] is None and absent:
            missing = [FOLDERS[t] for t in TABLE_ORDER if t in row["missing"]]
            notes.append(f"{row['name']}: Score not computed, the macro-score needs all nine "
                         f"tasks; no result for {', '.join(absent)}"
                         + (f" (missing data: {', '.join(missing)})" if missing else "") + ".")
    kept = report["retention"]
    if kept is not None:
        shown = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| retention (%) | {shown(kept['score'])} | "
                     + " | ".join(shown(kept[t]) if t in kept else "–" for t in TABLE_ORDER)
                     + " |")
        notes.append("retention: student / teacher × 100.")
    notes.insert(0, "GLUE dev, × 100: CoLA Matthews corr., MRPC and QQP mean of F1 and accuracy, "
                    "STS-B mean of Pearson and Spearman, MNLI mean of matched and mismatched "
                    "accuracy, accuracy elsewhere; Score: the mean of the nine.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


# ---------------------------------------------------------------------------------------------
# The suite.
# ---------------------------------------------------------------------------------------------


def run_suite(config: ml_collections.ConfigDict, *, init: str, data_dir: str, workdir: str,
              teacher: str = "", tasks: Sequence[str] | None = None,
              stop_at_step: int | None = None) -> dict[str, Any] | None:
    """Fine-tunes (or resumes, or reads) each task for the model and the teacher; writes the table.

    Args:
      config: the fine-tuning config (`configs/glue.py`); task, data.dir and init.checkpoint
        are set per task.
      init: the model to fine-tune (the "student" row).
      data_dir: GLUE's folders (CoLA/, SST-2/, ...) as `download_glue_data.py` lays them out.
      workdir: the suite's folder: a run per row and task, glue.md and glue.json.
      teacher: "" (no teacher row), a model to fine-tune the same way, or a glue.json of an
        earlier run whose first row becomes the teacher row.
      tasks: the tasks to run (names as `select_tasks`); None: all nine.
      stop_at_step: passed to every task's run: the first task that reaches it stops the suite,
        as a signal would.

    Returns:
      glue.json's content; None when a task was stopped (rerun to continue).

    Raises:
      ValueError: a bad config, model, --tasks or teacher file; no data for any task.
    """
    _check_suite_config(config)
    selected = select_tasks(tasks)
    if not epath.Path(data_dir).is_dir():
        raise ValueError(f"--data_dir={data_dir!r} does not exist")
    models = [Model("student", init)]
    teacher_row = None
    if teacher.endswith(".json"):
        teacher_row = {**read_report_row(teacher), "name": "teacher"}
    elif teacher:
        models.append(Model("teacher", teacher))

    def run_dir(model: Model, task: str) -> str:
        return os.path.join(workdir, model.name, task)

    def done(model: Model, task: str) -> bool:
        return (epath.Path(run_dir(model, task)) / train.RESULTS_FILE).exists()

    absent = {t: missing_files(data_dir, t) for t in selected}
    # A task a model finished before is read even when its data is gone.
    missing = {m: [t for t in selected if absent[t] and not done(m, t)] for m in models}
    if len(missing[models[0]]) == len(selected):
        raise ValueError(f"--data_dir={data_dir!r} holds none of the tasks' files: "
                         + "; ".join(absent[t] for t in selected))
    skipped = [t for t in selected if any(t in m for m in missing.values())]
    if skipped:
        logging.warning("No data for %s in %s (%s): skipped, and the GLUE score is not computed.",
                        ", ".join(skipped), data_dir, "; ".join(absent[t] for t in skipped))
    # Every model and config is checked before the first task trains.
    for model in models:
        flag = "--init" if model.name == "student" else "--teacher"
        sources.open_source(model.spec, field=flag)
        finetune_config.validate(task_config(config, selected[0], data_dir, model.spec,
                                             model.name))

    rows = []
    with StopSignals() as signals:  # Between tasks; each task's run has its own handlers.
        stop_requested = lambda: jax.process_count() == 1 and signals.requested  # noqa: E731
        for model in models:
            runnable = [t for t in selected if t not in missing[model]]
            entries = {}
            for n, task in enumerate(runnable, 1):
                where = run_dir(model, task)
                if stop_requested():
                    return _stopped(f"before {where}")
                logging.info("GLUE %s: %s (%d of %d) in %s.", model.name, task, n,
                             len(runnable), where)
                c = task_config(config, task, data_dir, model.spec, model.name)
                try:
                    results = finetune_task(c, where, stop_at_step=stop_at_step)
                except ValueError as error:  # The one error line names the task's run.
                    raise ValueError(f"{model.name} {task} ({where}): {error}") from None
                if results is None:
                    return _stopped(f"in {where}")
                entries[task] = task_entry(results, where)
            rows.append(make_row(model.name, model.spec, entries, missing[model]))
    if teacher_row is not None:
        rows.append(teacher_row)
    report = make_report(rows)
    if jax.process_index() == 0:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        atomic.write_text(epath.Path(workdir) / TABLE_FILE, format_table(report))
        atomic.write_json(epath.Path(workdir) / REPORT_FILE, report)
    logging.info("Wrote %s and %s.", os.path.join(workdir, TABLE_FILE),
                 os.path.join(workdir, REPORT_FILE))
    return report


def _stopped(where: str) -> None:
    logging.warning("GLUE stopped %s: rerun the same command to continue (finished tasks are "
                    "kept, a stopped one resumes from its checkpoint).", where)
    return None
