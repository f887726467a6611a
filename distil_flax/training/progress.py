"""How far a long command has got and when it will finish: the one helper every command shares.

On a terminal, `Progress` draws tqdm's live bar on stderr (and log lines print above it). When
stderr is not a terminal (CI logs, `nohup`, SLURM), it logs a plain line instead, at most every
`DISTIL_FLAX_PROGRESS_SECONDS` (default 30; 0: at every update) and once at the end:

    prepare: 12/40 units (30%) | 0.8 units/s | ETA 35s | documents 1,204, tokens 310,552

The rate, and so the ETA, comes from a moving window of recent intervals (`Rate`), so that a
slow start (compilation) or a pause (evaluation) that the caller leaves out of the window does
not skew it. Only the main process (process 0 in a multi-host run) shows anything.
"""

import collections
import io
import os
import sys
import time
from typing import Any, Iterable, Iterator, TypeVar

from absl import logging

SECONDS_ENV = "DISTIL_FLAX_PROGRESS_SECONDS"
_T = TypeVar("_T")


def line_interval() -> float:
    """Seconds between plain progress lines (`DISTIL_FLAX_PROGRESS_SECONDS`, default 30)."""
    value = os.environ.get(SECONDS_ENV, "")
    try:
        return max(0.0, float(value)) if value else 30.0
    except ValueError:
        logging.warning("%s=%r is not a number of seconds; using 30.", SECONDS_ENV, value)
        return 30.0


def duration(seconds: float) -> str:
    """'45s', '3m12s', '2h05m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


class Rate:
    """Units per second over the last `window` intervals the caller measured."""

    def __init__(self, window: int = 10):
        self._intervals: collections.deque = collections.deque(maxlen=window)

    def add(self, units: float, seconds: float) -> None:
        if units > 0 and seconds > 0:
            self._intervals.append((units, seconds))

    def per_second(self) -> float | None:
        """None until an interval was measured."""
        if not self._intervals:
            return None
        return sum(u for u, _ in self._intervals) / sum(s for _, s in self._intervals)

    def eta(self, remaining: float) -> float | None:
        """Seconds to do `remaining` units at the window's rate; None while it is unknown."""
        rate = self.per_second()
        return None if rate is None else max(0.0, remaining) / rate


class _AboveBar(io.TextIOBase):
    """A stream for the log handler while a bar is drawn: lines print above the bar."""

    def __init__(self, tqdm_class, stream):
        self._tqdm, self._stream = tqdm_class, stream

    def write(self, text: str) -> int:
        self._tqdm.write(text, file=self._stream, end="")
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


class Progress:
    """Counts units of work towards `total` (None: unknown, then no ETA) and shows it.

    Args:
      what: the command or phase, first on the line ("prepare", "train").
      total: units to do, or None.
      unit: what is counted ("units", "sentences", "steps").
      initial: units done before (a resumed run).
      lines: log plain lines when not on a terminal; False where the caller logs its own (the
        training loop's console line).
      enabled: False in every process but the main one.
    """

    def __init__(self, what: str, total: int | None = None, unit: str = "", *,
                 initial: int = 0, lines: bool = True, enabled: bool = True):
        self.what, self.total, self.unit = what, total, unit
        self.count = initial
        self.info: dict[str, Any] = {}
        self.rate = Rate()
        self._enabled, self._lines = enabled, lines
        self._every = line_interval()
        self._last = self._last_line = time.perf_counter()
        self._last_count = initial
        self._started = self._last
        self._bar = self._handler = self._stream = None
        if enabled and sys.stderr.isatty():
            self._open_bar(initial)

    def _open_bar(self, initial: int) -> None:
        from tqdm import tqdm  # Only on a terminal.
        self._bar = tqdm(total=self.total, initial=initial, desc=self.what, unit=f" {self.unit}",
                         file=sys.stderr, dynamic_ncols=True, leave=True)
        self._handler = logging.get_absl_handler().python_handler
        self._stream = self._handler.stream
        self._handler.setStream(_AboveBar(tqdm, self._stream))

    def update(self, units: int = 1, **info: Any) -> None:
        """`units` more are done; `info` (documents=..., tokens=...) is shown after the ETA."""
        self.set(self.count + units, **info)

    def set(self, count: int, *, measure: bool = True, **info: Any) -> None:
        """`count` units are done. measure=False leaves the interval since the last update
        out of the rate (it held compilation or an evaluation)."""
        now = time.perf_counter()
        if measure:
            self.rate.add(count - self._last_count, now - self._last)
        self._last, self._last_count = now, count
        self.count = count
        self.info.update(info)
        if self._bar is not None:
            self._bar.update(count - self._bar.n)
            if info:
                self._bar.set_postfix_str(self._info_text(), refresh=False)
        elif self._enabled and self._lines and now - self._last_line >= self._every:
            self._last_line = now
            logging.info("%s", self.line())

    def tick(self, count: int) -> None:
        """Moves the bar only (cheap enough for every step); the rate waits for `set`."""
        if self._bar is not None and count > self._bar.n:
            self._bar.update(count - self._bar.n)

    def eta(self) -> float | None:
        """Seconds left, from the window's rate; None without a total or a rate."""
        return None if self.total is None else self.rate.eta(self.total - self.count)

    def line(self) -> str:
        """The plain progress line."""
        done = f"{self.count:,}" + (f"/{self.total:,}" if self.total is not None else "")
        parts = [f"{self.what}: {done} {self.unit}".rstrip()
                 + (f" ({100 * self.count / self.total:.0f}%)" if self.total else "")]
        rate = self.rate.per_second()
        if rate is not None:
            shown = f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"
            parts.append(f"{shown} {self.unit}/s".replace(" /s", "/s"))
        eta = self.eta()
        if eta is not None and self.count < (self.total or 0):
            parts.append(f"ETA {duration(eta)}")
        if self.info:
            parts.append(self._info_text())
        return " | ".join(parts)

    def _info_text(self) -> str:
        return ", ".join(f"{k} {_count(v)}" for k, v in self.info.items())

    def close(self, finished: bool = True) -> None:
        """Ends the bar, or logs the last line (with the time taken, when `finished`)."""
        if self._bar is not None:
            self._bar.close()
            self._handler.setStream(self._stream)
            self._bar = None
        elif self._enabled and self._lines:
            took = duration(time.perf_counter() - self._started)
            logging.info("%s | %s %s", self.line(), "done in" if finished else "stopped after",
                         took)
            self._lines = False  # Once.

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(finished=kind is None)


def track(items: Iterable[_T], progress: Progress) -> Iterator[_T]:
    """Yields `items`, counting each in `progress`, and closes it after the last one."""
    for item in items:
        yield item
        progress.update(1)
    progress.close()
