"""What every command does with its flags and its failures.

A failure a user can fix (a config field, an input file, a busy workdir, a full disk, a run
whose numbers went non-finite) ends in ONE line `error: ...` on stderr and exit status 1; the
traceback is logged only at `--verbosity=1`. A bad flag (a wrong type, an unknown `:preset`, a
misspelt config field, a config file that does not load) is told the same way, instead of
absl's "FATAL Flags parsing error" or ml_collections' tracebacks.

Interruptions, at any moment: a signal while the command starts (imports, flag parsing,
joining the cluster) is noted (`early_signals.py`) and honoured at the first safe point below.
In a training run the first Ctrl-C or SIGTERM asks the loop to save and stop
(`stop_signals.py`; before the workdir is locked: stop without touching it, exit status 0) and
a second Ctrl-C aborts. Commands with nothing to save — preparing data, training a vocabulary,
exporting — write their outputs whole or not at all, so Ctrl-C and SIGTERM abort them at once
(`run(..., sigterm_aborts=True)`). Either abort is one `error:` line saying what was kept, and
exit status 130. Anything else is a bug and keeps its traceback.
"""

import contextlib
import logging as py_logging
import re
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

from absl import app, flags, logging

from distil_flax.training import early_signals
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


def _config_argument(argv: Sequence[str]) -> str:
    """The `--flag=FILE.py[:arg]` of a config file among `argv` (for naming it in an error)."""
    return next((a for a in argv if re.match(r"--\w+=[^:]*\.py(:|$)", a)), "--config")


def _config_problem(argv: Sequence[str], error: Exception) -> str:
    """What config_flags raised, in one line: an override naming no field
    (`--config.train.num_stepz=3`: an AttributeError or KeyError whose text holds the key and
    maybe `Did you mean "x"`), or a config file that is missing, not Python, or lacks
    `get_config`."""
    text = str(error)
    if isinstance(error, SyntaxError):
        line = f", line {error.lineno}" if error.lineno else ""
        return f"{_config_argument(argv)}: not a Python config file ({error.msg}{line})"
    if isinstance(error, OSError):  # Not found: its last line is the reason.
        return f"{_config_argument(argv)}: {text.strip().splitlines()[-1].strip()}"
    key = re.search(r"(\w+)", text).group(1)
    override = next((a.split("=", 1)[0] for a in argv
                     if a.startswith("--") and key in a.split("=", 1)[0].split(".")[1:]), None)
    if override is None:
        if "get_config" in text:
            return f"{_config_argument(argv)}: the file defines no get_config()"
        return f"{_config_argument(argv)}: {text}"
    suggestion = re.search(r'Did you mean "(\w+)"', text)
    return f"{override}: the config has no field {key!r}" + (
        f" (did you mean {suggestion.group(1)!r}?)" if suggestion else "")


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, with flag errors told in one `error:` line."""
    try:
        remaining = flags.FLAGS(argv)
        for name in flags.FLAGS:
            # A config file that failed to load raises on first use (an OSError): now.
            hasattr(flags.FLAGS[name].value, "keys")
        return remaining
    except flags.Error as error:
        fail(_flag_problem(error))
    except (AttributeError, KeyError, OSError, SyntaxError) as error:  # From config_flags.
        logging.debug("Flag parsing failed.", exc_info=True)
        fail(_config_problem(argv, error))


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
        if sigterm_aborts and early_signals.take():
            raise KeyboardInterrupt  # While starting: nothing was written yet.
        with _sigterm_as_ctrl_c(sigterm_aborts):
            return job()
    except early_signals.StoppedBeforeStart as stopped:
        logging.warning("%s.", stopped)
        return None
    except KeyboardInterrupt:
        logging.debug("Interrupted.", exc_info=True)
        fail(interrupted, status=130)
    except RUN_ERRORS as error:
        logging.debug("Stopped.", exc_info=True)  # The traceback, with --verbosity=1.
        fail(str(error))


def main(entry: Callable[[list[str]], Any]) -> None:
    """`app.run(entry)` with one-line flag errors; `entry(argv)` should call `run`."""
    app.run(entry, flags_parser=parse_flags)
