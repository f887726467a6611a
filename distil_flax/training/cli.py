"""What every command does with its flags and its failures.

A failure a user can fix (a config field, an input file, a busy workdir, a full disk, a run
whose numbers went non-finite) ends in ONE line `error: ...` on stderr and exit status 1; the
traceback is logged only at `--verbosity=1`. A bad flag (a wrong type, an unknown `:preset`)
is told the same way, instead of absl's "FATAL Flags parsing error" and a traceback.

Interruptions: in a training run the first Ctrl-C or SIGTERM asks the loop to save and stop
(`stop_signals.py`) and a second Ctrl-C aborts. Commands with nothing to save — preparing data,
training a vocabulary, exporting — write their outputs whole or not at all, so Ctrl-C and
SIGTERM abort them at once (`run(..., sigterm_aborts=True)`). Either abort is one `error:` line
saying what was kept, and exit status 130. Anything else is a bug and keeps its traceback.
"""

import contextlib
import logging as py_logging
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

from absl import app, flags, logging

from distil_flax.training.workdir_lock import WorkdirLockedError

# CheckpointWriteError is an OSError, CorruptCheckpointError a ValueError, NonFiniteError a
# FloatingPointError.
RUN_ERRORS = (ValueError, OSError, FloatingPointError, WorkdirLockedError)


class _QuietLibraries(py_logging.Filter):
    """Drops Orbax's and XLA's per-save and start-up INFO chatter; warnings still show."""

    def filter(self, record):
        noisy = "/orbax/" in record.pathname or record.pathname.endswith("xla_bridge.py")
        return record.levelno >= py_logging.WARNING or not noisy


def fail(message: str, status: int = 1):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def _flag_problem(error: flags.Error) -> str:
    """The cause of a flag error in one line (config files' errors carry their traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        return f"{lines[0].rstrip(':')} {lines[-1]}"
    return " ".join(lines)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, with flag errors told in one `error:` line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        fail(_flag_problem(error))


def start(argv: Sequence[str], distributed: bool) -> None:
    """What a run command does first: refuse stray arguments, join the cluster if asked."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import jax  # Here, not at the top: `prepare` and `train_vocab` run without JAX.

    if distributed:
        # Detects the cluster (Cloud TPU, SLURM, Kubernetes ...) from the environment.
        jax.distributed.initialize()
    logging.info("JAX process %d of %d; %d local of %d global devices (%s).",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].platform)


_RUN_INTERRUPTED = ("interrupted by a second Ctrl-C before the step in flight was saved; rerun "
                    "the same command to resume from the newest committed checkpoint")


def _abort_on_sigterm(*_) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_ctrl_c(enabled: bool) -> Iterator[None]:
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _abort_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(job: Callable[[], Any], *, interrupted: str = _RUN_INTERRUPTED,
        sigterm_aborts: bool = False) -> Any:
    """Runs a command's job, turning the failures a user can fix into one `error:` line.

    Args:
      job: the command's work.
      interrupted: the `error:` line of an abort (Ctrl-C): what was kept, and how to go on.
      sigterm_aborts: SIGTERM aborts like Ctrl-C (commands without a run loop, whose own
        handlers would save first; never with several JAX processes, whose SIGTERM JAX owns).
    """
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
        with _sigterm_as_ctrl_c(sigterm_aborts):
            return job()
    except KeyboardInterrupt:
        logging.debug("Interrupted.", exc_info=True)
        fail(interrupted, status=130)
    except RUN_ERRORS as error:
        logging.debug("Stopped.", exc_info=True)  # The traceback, with --verbosity=1.
        fail(str(error))


def main(entry: Callable[[list[str]], Any]) -> None:
    """`app.run(entry)` with one-line flag errors; `entry(argv)` should call `run`."""
    app.run(entry, flags_parser=parse_flags)
