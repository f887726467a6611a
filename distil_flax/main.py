"""Runs a training job: `python -m distil_flax.main --config=configs/distil6.py --workdir=DIR`.

Flags `--config.a.b=value` override config fields; `configs/x.py:arg` passes `arg` to the
config's `get_config`.

Exit status: 0 when the run finished, or when SIGTERM (preemption) stopped it after saving a
checkpoint — rerun the same command to continue. 1 with one line `error: ...` naming the field,
file or step when the config, the inputs, the workdir (locked by another run, no intact
checkpoint, disk full) or the numbers (too many non-finite steps in a row) stop it.
"""

import logging as py_logging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from distil_flax import train
from distil_flax.workdir_lock import WorkdirLockedError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run configuration file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])

# What a user can fix (a config, an input file, the disk, the learning rate) is told in one line;
# anything else is a bug and keeps its traceback. CheckpointWriteError is an OSError,
# CorruptCheckpointError a ValueError, NonFiniteError a FloatingPointError.
_RUN_ERRORS = (ValueError, OSError, FloatingPointError, WorkdirLockedError)


class _QuietLibraries(py_logging.Filter):
    """Drops Orbax's and XLA's per-save and start-up INFO chatter; warnings still show."""

    def filter(self, record):
        noisy = "/orbax/" in record.pathname or record.pathname.endswith("xla_bridge.py")
        return record.levelno >= py_logging.WARNING or not noisy


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    config = _CONFIG.value
    if config.distributed:
        # Detects the cluster (Cloud TPU, SLURM, Kubernetes ...) from the environment.
        jax.distributed.initialize()
    logging.info("JAX process %d of %d; %d local of %d global devices (%s).",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].platform)
    try:
        train.train_and_evaluate(config, _WORKDIR.value)
    except _RUN_ERRORS as error:
        logging.debug("Run stopped.", exc_info=True)  # The traceback, with --verbosity=1.
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
