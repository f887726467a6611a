r"""Fine-tunes a pretrained encoder (a distil_flax run, a Hugging Face folder or hf://ORG/NAME)
on a GLUE task, SQuAD or IMDb, optionally distilled from a fine-tuned task teacher, and keeps
its best checkpoint by the task's official score (the one `export_hf` exports).

    python -m distil_flax.finetune --config=configs/glue.py:task=mrpc --workdir=runs/glue/mrpc \
        --config.init.checkpoint=runs/distil6 --config.data.dir=glue_data/MRPC

Flags and exit statuses as `distil_flax.main`: 0 when the run finished or was stopped by SIGTERM
or Ctrl-C after saving the step in flight (rerun to continue), 1 with one `error:` line, 130
after a second Ctrl-C.
"""

from absl import flags
from ml_collections import config_flags

from distil_flax.downstream import train
from distil_flax.training import cli


def _define_flags():
    """Defined only when run as a program, so that this module imports beside `main`."""
    config = config_flags.DEFINE_config_file("config", None, "Fine-tuning configuration file.",
                                             lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
    flags.mark_flags_as_required(["config", "workdir"])
    return config, workdir


def run_command() -> None:
    config_flag, workdir_flag = _define_flags()

    def main(argv):
        cli.start(argv, config_flag.value.distributed)
        cli.run(lambda: train.finetune_and_evaluate(config_flag.value, workdir_flag.value))

    cli.main(main)


if __name__ == "__main__":
    run_command()
