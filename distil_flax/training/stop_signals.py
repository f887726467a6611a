"""Stopping a run on request: SIGTERM (a scheduler's preemption notice) and SIGINT (Ctrl-C).

Either signal asks the loop to finish the step it is in, save it and return (exit status 0:
rerun the same command to continue). A second Ctrl-C aborts at once. The handlers are in place
from before the workdir is locked until the run has closed everything, so a signal during
start-up also ends in a clean exit that leaves no `run.lock` behind. A signal that came earlier
still, while the command imported and validated (`early_signals` noted it), stops the run
before it locks the workdir (`early_signals.StoppedBeforeStart`), and the workdir is not touched.

With several processes, every host must stop after the same step, or they would enter the
collective checkpoint save at different steps. A signal reaches one host; JAX's preemption
service (started by `jax.distributed.initialize`) spreads the notice and
`multihost_utils.reached_preemption_sync_point` names one step at which every host agrees to
stop. So with several processes SIGTERM is left to JAX's own notifier, and Ctrl-C is forwarded
to it as a SIGTERM of this process.
"""

import os
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

from distil_flax.training import early_signals

_NAMES = {"SIGINT": "Ctrl-C", "SIGTERM": "SIGTERM"}


class StopSignals:
    """Context manager: installs the handlers; `reason(step)` says whether to stop after `step`."""

    def __init__(self):
        self.requested = ""  # "SIGTERM" or "SIGINT" once one arrived in this process.
        self._previous: dict[int, object] = {}
        self._multihost = False

    def __enter__(self) -> "StopSignals":
        self._multihost = jax.process_count() > 1
        if threading.current_thread() is threading.main_thread():
            early = early_signals.take(sigterm=not self._multihost)
            if not self._multihost:  # Else JAX's preemption notifier owns SIGTERM.
                self._install(signal.SIGTERM, self._on_sigterm)
            self._install(signal.SIGINT, self._on_sigint)
            if early and not self._multihost:
                self.__exit__()
                raise early_signals.StoppedBeforeStart(
                    f"{_NAMES[early]} while starting: stopped before the run touched its "
                    "workdir; rerun the same command to start")
            if early:  # Every host must stop, at a step they agree on: tell JAX's notifier.
                self.requested = early
                os.kill(os.getpid(), signal.SIGTERM)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _install(self, number: int, handler) -> None:
        self._previous[number] = signal.signal(number, handler)

    def _on_sigterm(self, *_) -> None:
        self.requested = self.requested or "SIGTERM"

    def _on_sigint(self, *_) -> None:
        if self.requested == "SIGINT":
            raise KeyboardInterrupt  # The second Ctrl-C: the person means it.
        self.requested = "SIGINT"
        logging.warning("Ctrl-C: saving after the step in flight, then stopping (press Ctrl-C "
                        "again to abort without saving).")
        if self._multihost:
            os.kill(os.getpid(), signal.SIGTERM)  # To JAX's notifier, which tells every host.

    def reason(self, step: int) -> str:
        """Why the run should stop after `step` ("" to go on). Call it at every step.

        With several processes this is JAX's sync point: every host gets the same answer at
        the same step.
        """
        if not self._multihost:
            return self.requested
        if multihost_utils.reached_preemption_sync_point(step):
            return self.requested or "SIGTERM"
        return ""
