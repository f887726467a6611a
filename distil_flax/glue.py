r"""Fine-tunes a model — and its teacher, if given — on each of the nine GLUE tasks with the
DistilBERT paper's recipe, and writes their dev scores as the paper's Table 1: the macro-score,
each task's score, and how much of its teacher's the student retains.

    python -m distil_flax.glue --init=runs/distil6 --data_dir=glue_data --workdir=runs/glue \
        --teacher=runs/glue_bert/glue.json

Each task of --data_dir (GLUE's folders CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI;
one that is missing is named and skipped) is fine-tuned with --config (default configs/glue.py;
any field can be overridden with --config.x=y) in DIR/student/<task>, the teacher's in
DIR/teacher/<task> — or its row is read from the glue.json of its own earlier run — and the
table goes to stdout, DIR/glue.md and DIR/glue.json. A rerun skips finished tasks and resumes a
stopped one; SIGTERM or Ctrl-C saves the task in flight and exits with status 0 (rerun to
continue); a bad flag, model or input is one `error:` line and exit status 1.
"""

from absl import flags
from ml_collections import config_flags

from distil_flax.downstream import glue_suite
from distil_flax.training import cli


def _define_flags() -> dict[str, flags.FlagHolder]:
    """Defined only when run as a program, so that this module imports beside the others."""
    return {
        "config": config_flags.DEFINE_config_file(
            "config", "configs/glue.py", "Fine-tuning configuration of every task.",
            lock_config=True),
        "init": flags.DEFINE_string(
            "init", None, "The model to fine-tune: a distil_flax run, a Hugging Face folder or "
            "hf://ORG/NAME.", required=True),
        "data_dir": flags.DEFINE_string(
            "data_dir", None, "GLUE's task folders (download_glue_data.py's layout).",
            required=True),
        "workdir": flags.DEFINE_string(
            "workdir", None, "The suite's folder: a run per task, glue.md and glue.json.",
            required=True),
        "teacher": flags.DEFINE_string(
            "teacher", "", "A model fine-tuned the same way for a teacher row, or the glue.json "
            "of its earlier run."),
        "tasks": flags.DEFINE_list("tasks", None, "Tasks to run (cola,mrpc,...); default: all."),
    }


def run_command() -> None:
    f = _define_flags()

    def main(argv):
        cli.start(argv, f["config"].value.distributed)
        report = cli.run(lambda: glue_suite.run_suite(
            f["config"].value, init=f["init"].value, data_dir=f["data_dir"].value,
            workdir=f["workdir"].value, teacher=f["teacher"].value, tasks=f["tasks"].value))
        if report is not None:
            print(glue_suite.format_table(report), end="")

    cli.main(main)


if __name__ == "__main__":
    run_command()
