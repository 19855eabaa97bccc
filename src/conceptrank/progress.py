"""Progress of long loops: a tqdm bar on a terminal, otherwise a plain log line at most every ~10 s.

Under ``tee``, ``nohup`` or CI a bar would print nothing until the loop ends; there a line such as
``dissect: forward 480/1200 img (40%), 52.1 img/s, ETA 0:00:14`` goes to stderr instead.
:func:`set_quiet` (the CLI's ``--quiet``) or ``CONCEPTRANK_QUIET=1`` silences both.
This module imports nothing of conceptrank's, so every layer may use it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

__all__ = ["Progress", "track", "set_quiet", "is_quiet", "LOG_INTERVAL_S"]

QUIET_ENV = "CONCEPTRANK_QUIET"
LOG_INTERVAL_S = 10.0
T = TypeVar("T")


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress display of this process and its children."""
    if quiet:
        os.environ[QUIET_ENV] = "1"
    else:
        os.environ.pop(QUIET_ENV, None)


def is_quiet() -> bool:
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Counts done work and shows it; use as a context manager.

    Parameters
    ----------
    total : expected count (None when unknown: no percentage or ETA).
    desc : what is being done, e.g. ``"dissect: forward"``.
    unit : what is counted, e.g. ``"img"`` or ``"batch"``.
    enabled : False shows nothing (as does quiet mode).
    stream : where to write (stderr by default).
    interval : seconds between log lines when ``stream`` is not a terminal.
    clock : time source (``time.monotonic``), replaceable in tests.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "img", *, enabled: bool = True,
                 stream: TextIO | None = None, interval: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.count = 0
        self._stream = stream if stream is not None else sys.stderr
        self._interval, self._clock = float(interval), clock
        self._start = self._last = clock()
        self._bar = None
        self._enabled = enabled and not is_quiet()
        if self._enabled and _isatty(self._stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self._stream, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        """Add ``n`` to the count; log a line when the interval has passed."""
        self.count += int(n)
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self._clock()
        if now - self._last >= self._interval:
            self._last = now
            self._write(self.line(now))

    def line(self, now: float | None = None) -> str:
        """The log line for the current count."""
        elapsed = max((self._clock() if now is None else now) - self._start, 1e-9)
        rate = self.count / elapsed
        text = f"{self.desc} {self.count}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100.0 * self.count / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:.3g} {self.unit}/s"
        if self.total and rate > 0 and self.count < self.total:
            text += f", ETA {_clock((self.total - self.count) / rate)}"
        return text

    def close(self) -> None:
        """Remove the bar; in log mode write a last line when the loop took longer than one interval."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._enabled and self._clock() - self._start >= self._interval:
            self._write(self.line() + f", done in {_clock(self._clock() - self._start)}")
        self._enabled = False

    def _write(self, text: str) -> None:
        print(text, file=self._stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "img", *,
          enabled: bool = True, count: Callable[[T], int] | None = None) -> Iterator[T]:
    """Yield from ``iterable`` while showing progress; ``count(item)`` says how much each item adds (1)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, unit, enabled=enabled) as p:
        for item in iterable:
            yield item
            p.update(count(item) if count else 1)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
