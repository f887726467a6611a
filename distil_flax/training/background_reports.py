"""What background threads print while a checkpoint is saved, held until the save's outcome.

A failed write (a full disk) makes Orbax's and TensorStore's threads print dozens of tracebacks
before the main thread learns of it; the main thread then raises the one failure the command
reports as its `error:` line. `Checkpointer` brackets each save with `REPORTS.begin()` and
`REPORTS.end(failed)`, so that those tracebacks go to DEBUG instead.
"""

import logging as py_logging
import sys
import threading
from typing import Any, Callable

from absl import logging


class BackgroundReports(py_logging.Filter):
    """Holds what background threads print during a save until the save's outcome is known.

    What they print: Orbax's ERROR records (with exc_info), asyncio's "Task exception was never
    retrieved" for the writes the failure abandoned, and unraisable "Event loop is closed"
    errors of TensorStore callbacks aimed at the closed loops of Orbax's threads. After a failed
    save these go to DEBUG (shown with `--verbosity=1`), as do the stragglers that arrive until
    the next save starts; after a successful one, what was held prints as it would have, so no
    report is hidden unless a failure the caller sees explains it.

    One for the process: logging's filters and `sys.unraisablehook` are global.
    """

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self._in_flight = 0  # Saves begun and not yet waited for, over all checkpointers.
        self._failed = False  # A save failed and no save began since.
        self._held: list[tuple[str, Any, Callable[[], None]]] = []  # (what, exc_info, print)
        self._next_hook = sys.unraisablehook

    def begin(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._failed = False
        # Orbax logs through absl's logger and the root logger, asyncio through its own; a
        # logger's filters see only its own records, not those propagated from below.
        for name in ("", "absl", "asyncio"):
            py_logging.getLogger(name).addFilter(self)  # Once: no-op when already there.
        if sys.unraisablehook != self._on_unraisable:  # Installed now, or replaced since.
            self._next_hook, sys.unraisablehook = sys.unraisablehook, self._on_unraisable

    def end(self, failed: bool) -> None:
        with self._lock:
            self._in_flight -= 1
            self._failed = self._failed or failed
            released = self._failed or not self._in_flight
            held, self._held = (self._held, []) if released else ([], self._held)
            demote = self._failed
        for what, exc_info, print_it in held:
            if demote:
                self._demote(what, exc_info)
            else:
                print_it()

    @staticmethod
    def _demote(what: str, exc_info: Any) -> None:
        logging.debug("Background error of a failed checkpoint save: %s", what, exc_info=exc_info)

    def _intercepted(self, what: str, exc_info: Any, print_it: Callable[[], None]) -> bool:
        """Holds or demotes one report; False when no save is in flight or failed."""
        with self._lock:
            if not self._failed:
                if not self._in_flight:
                    return False
                self._held.append((what, exc_info, print_it))
                return True
        self._demote(what, exc_info)  # Outside the lock: it logs, and logging calls filter().
        return True

    def filter(self, record: py_logging.LogRecord) -> bool:
        background = record.levelno >= py_logging.ERROR and (
            "/orbax/" in record.pathname or record.name == "asyncio")
        return not (background and self._intercepted(
            record.getMessage(), record.exc_info,
            lambda: py_logging.getLogger(record.name).callHandlers(record)))

    def _on_unraisable(self, unraisable: Any) -> None:
        # The main thread's own unraisable errors are never a background save's.
        if threading.current_thread() is threading.main_thread() or not self._intercepted(
                unraisable.err_msg or f"unraisable in {threading.current_thread().name}",
                (unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
                lambda: self._next_hook(unraisable)):
            self._next_hook(unraisable)


REPORTS = BackgroundReports()  # What `Checkpointer` calls `begin` and `end` on.
