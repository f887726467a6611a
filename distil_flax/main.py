"""Trains a model as its config file says — a student distilled from a teacher (the DistilBERT,
TinyBERT, MiniLM and sentence-embedding recipes of `configs/`), or a teacher pretrained with
masked-LM — in a workdir that a rerun of the same command resumes.

    python -m distil_flax.main --config=configs/distil6.py --workdir=runs/distil6

Flags `--config.a.b=value` override config fields; `configs/x.py:arg` passes `arg` to the
config's `get_config`.

Exit status: 0 when the run finished, or when SIGTERM (preemption) or Ctrl-C stopped it after
saving the step in flight — rerun the same command to continue. 1 with one line `error: ...`
naming the field, file or step when a flag, the config, the inputs, the workdir (locked by
another run, no intact checkpoint, disk full) or the numbers (too many non-finite steps in a
row) stop it. 130 when a second Ctrl-C aborted without saving (see `training/cli.py`).
"""

from absl import flags
from ml_collections import config_flags

from distil_flax.distill import train
from distil_flax.training import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run configuration file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    cli.start(argv, _CONFIG.value.distributed)
    cli.run(lambda: train.train_and_evaluate(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    cli.main(main)
