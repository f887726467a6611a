"""A process pool for data preparation whose workers never outlive the preparing process.

A parent killed with SIGKILL shuts no pool down: without care its workers would tokenize on, and
idle ones wait for work, forever. Each worker asks Linux to kill it with its parent (prctl), or
elsewhere watches its parent pid.
"""

import concurrent.futures
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

_PR_SET_PDEATHSIG = 1  # From <linux/prctl.h>.


def _init_worker(parent: int) -> None:
    """Sets up a pool worker; `parent` is the pid of the preparing process."""
    # One process per core: the tokenizer's own thread pool would only oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # A parent killed with SIGKILL shuts no pool down: without this its workers would tokenize
    # on, and idle ones wait for work, forever.
    if not _die_with_parent():
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # It died before the request above took effect.
        os._exit(1)


def _die_with_parent() -> bool:
    """Asks Linux to SIGKILL this process when its parent exits; False where it cannot.

    Strictly, when the thread that started it exits: `run`'s caller, which outlives the pool.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _exit_when_orphaned(parent: int) -> None:
    """Without prctl (macOS): exits once the parent is gone (an orphan's ppid changes)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def run(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> Iterator[Any]:
    """Yields `fn(job)` for every job as it finishes, in a pool of `workers` processes.

    Raises:
      ChildProcessError: a worker died.
    """
    # Spawned, not forked: the parent may hold tokenizer thread pools, which do not survive fork.
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),))
    try:
        futures = [pool.submit(fn, job) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()
    except concurrent.futures.process.BrokenProcessPool:
        raise ChildProcessError(
            "A data preparation worker died (killed, or out of memory: try fewer data.workers or "
            "a smaller data.unit_bytes); finished units are kept, rerun to continue.") from None
    finally:
        # On an error, units not yet started are dropped: the error shows without waiting for
        # the rest of the corpus.
        pool.shutdown(wait=True, cancel_futures=True)
