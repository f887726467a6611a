"""Ctrl-C and SIGTERM while a command starts: noted, never lost, honoured at the first safe point.

Importing JAX and compiling take seconds, in which Python's own Ctrl-C (a KeyboardInterrupt
raised wherever the interpreter happens to be) ends in a traceback, or is lost when it lands in
a callback that swallows exceptions (XLA's garbage-collection hook prints "Exception ignored ...
KeyboardInterrupt" and carries on, and the run trains to the end). So when the program is a
distil_flax command (`python -m distil_flax.…`), importing the package installs, before
anything slow, handlers that only note the signal (`install`). A command takes the request over
at its first safe point (`take`): `cli.run` aborts a command without a run loop before it writes
anything; a training run's `StopSignals` exits before it locks the workdir. A second Ctrl-C
before then ends the process at once: nothing has been written yet.

Standard library only: this runs before anything else is imported.
"""

import os
import signal
import sys
import threading

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StoppedBeforeStart(Exception):
    """A training run stopped on request before it locked its workdir: nothing was written."""


_noted = ""  # "SIGINT" or "SIGTERM" once one arrived; "" also after `take`.
_installed = False


def runs_a_command(argv: list[str]) -> bool:
    """Whether the interpreter's command line `argv` runs a module of this package."""
    return any(flag == "-m" and module.startswith("distil_flax.")
               for flag, module in zip(argv, argv[1:]))


def install() -> None:
    """Notes SIGINT and SIGTERM from now on, when the program is a distil_flax command."""
    global _installed
    if (_installed or threading.current_thread() is not threading.main_thread()
            or not runs_a_command(getattr(sys, "orig_argv", []))):
        return
    for number in _SIGNALS:
        signal.signal(number, _note)
    _installed = True


def _note(number: int, _frame) -> None:
    global _noted
    if _noted == "SIGINT" and number == signal.SIGINT:
        os.write(2, b"error: interrupted by a second Ctrl-C while starting, before anything "
                    b"was written\n")
        os._exit(130)
    _noted = _noted or signal.Signals(number).name


def take(*, sigterm: bool = True) -> str:
    """Ends the noting and returns the signal noted so far ("" if none), which the caller now
    handles. Python's own handlers are back (SIGTERM only with `sigterm`: with several JAX
    processes, JAX's preemption notifier has replaced it)."""
    global _noted, _installed
    if _installed:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _installed = False
    noted, _noted = _noted, ""
    return noted
