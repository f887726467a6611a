"""One run per workdir: a lock file naming its owner, taken over only from a run that is gone.

`workdir/run.lock` holds the owner's host, pid, process start time and a heartbeat that the owner
rewrites every `heartbeat_s` seconds. A second run pointed at the workdir:
  * same host, owner's process alive → refuses (`WorkdirLockedError`, naming pid and host);
  * same host, owner's process gone (killed, crashed; a reused pid is told apart by its start
    time) → takes the lock over with a warning;
  * another host (or container) → watches the heartbeat for up to 2.5 intervals: if it moves,
    the owner is alive and the run refuses; if not, the owner is gone and the lock is taken over.
    Restarts on another machine after a node failure therefore proceed on their own, and no clock
    needs to agree with another.
If the lock is taken from a run that still lives (it was paused longer than the heartbeat
window), that run notices at its next heartbeat and its loop stops without saving.

On object storage (`gs://`) the lock is best effort: objects offer no exclusive create.
"""

import json
import os
import socket
import threading
import time

from absl import logging
from etils import epath

from distil_flax.training import atomic
from distil_flax.training.processes import process_alive, process_start

LOCK_NAME = "run.lock"


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


class WorkdirLock:
    """Context manager holding `workdir/run.lock` for the duration of a run.

    Only the primary process of a multi-host run takes it (`enabled`); the others share the
    workdir through Orbax's own coordination.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
                 heartbeat_s: float = 30.0):
        self.path = epath.Path(workdir) / LOCK_NAME
        self.enabled = enabled
        self.heartbeat_s = heartbeat_s
        self.lost = threading.Event()  # Set if another run took the lock from this one.
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._local = "://" not in os.fspath(self.path)
        self._me = {"host": socket.gethostname(), "pid": os.getpid(),
                    "start": process_start(os.getpid())}

    # ------------------------------------------------------------------------------ file

    def _record(self) -> str:
        return json.dumps({**self._me, "heartbeat": time.time(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})

    def _read(self) -> tuple[str, dict | None]:
        """(raw text, parsed owner) of the lock; ("", None) if absent, (text, None) if garbled."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return "", None
        try:
            owner = json.loads(text)
        except ValueError:
            return text, None
        valid = isinstance(owner, dict) and isinstance(owner.get("pid"), int)
        return text, owner if valid else None

    def _create(self) -> bool:
        """Creates the lock if absent, whole or not at all; False if it exists."""
        return atomic.write_new(self.path, self._record())

    def _rewrite(self) -> None:
        atomic.write_text(self.path, self._record())  # Readers see the old or the new record.

    def _mine(self, owner: dict | None) -> bool:
        return bool(owner) and all(owner.get(k) == v for k, v in self._me.items())

    # ------------------------------------------------------------------------------ acquire

    def _describe(self, owner: dict | None) -> str:
        if not owner:
            return "an unreadable lock"
        return (f"pid {owner.get('pid')} on host {owner.get('host')} "
                f"(started {owner.get('started')})")

    def _stale(self, text: str, owner: dict | None) -> bool:
        """Whether the lock's owner is gone; waits on another host's heartbeat to find out."""
        if owner and owner.get("host") == self._me["host"]:
            if owner.get("pid") == self._me["pid"] and owner.get("start") == self._me["start"]:
                return False  # This very process holds it (a nested run).
            return not process_alive(int(owner["pid"]), str(owner.get("start", "")))
        # Another host, or garbled: alive while the heartbeat moves.
        deadline = time.time() + 2.5 * self.heartbeat_s
        logging.warning("%s is held by %s; waiting up to %.0f s for its heartbeat.", self.path,
                        self._describe(owner), 2.5 * self.heartbeat_s)
        while time.time() < deadline:
            time.sleep(min(1.0, self.heartbeat_s / 4))
            now, _ = self._read()
            if now != text:
                return not now  # Released: take it; rewritten: alive.
        return True

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirLockedError naming the live owner."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return
            text, owner = self._read()
            if not text and not self.path.exists():
                continue  # Released meanwhile.
            if not self._stale(text, owner):
                raise WorkdirLockedError(
                    f"workdir {self.path.parent} is in use by {self._describe(owner)}: two runs "
                    f"must not write one workdir. Wait for it to finish, stop it, or use another "
                    f"--workdir. If no such run exists, delete {self.path}.")
            logging.warning("Taking over %s from %s, which is no longer running.", self.path,
                            self._describe(owner))
            if self._take_over(text):
                self._start_heartbeat()
                return
        raise WorkdirLockedError(f"could not take {self.path}: other runs keep taking it")

    def _take_over(self, stale_text: str) -> bool:
        """Replaces the stale lock; False if another run replaced it first."""
        if not self._local:
            self._rewrite()
            return True
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open(aside) as f:
            moved = f.read()
        if moved != stale_text:  # A fresh lock of a run that took over first: give it back.
            os.rename(aside, self.path)
            return False
        os.remove(aside)
        return self._create()

    # ------------------------------------------------------------------------------ heartbeat

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                text, owner = self._read()
                if not text:
                    if self._create():  # Deleted by hand, and nobody else claimed it.
                        logging.warning("%s had been deleted; this run holds it again.",
                                        self.path)
                        continue
                    text, owner = self._read()
                if not self._mine(owner):
                    logging.error("%s was taken over by %s: this run stops without saving.",
                                  self.path, self._describe(owner))
                    self.lost.set()
                    return
                self._rewrite()
            except OSError:  # A full disk or a network hiccup: the next beat retries.
                logging.warning("Could not refresh %s.", self.path, exc_info=True)

    def release(self) -> None:
        if not self.enabled or self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._mine(self._read()[1]):
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
