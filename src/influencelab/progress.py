"""Progress for long loops (training epochs, curvature passes, score chunks, LiSSA and CG iterations), and a
heartbeat for long steps without a loop of their own (a reference solve, a retraining).

On a terminal: a tqdm bar, as before. Anywhere else (SLURM and joblib logs, pipes, CI): no bar, but a plain line
through the ``influencelab`` logger every :data:`INTERVAL_S` seconds (``INFLUENCELAB_PROGRESS_S`` overrides it;
0 turns the lines off) with the count, total, rate and ETA, and a last line when the loop ends -- only for loops
that ran that long, so short loops stay silent. The lines are made by tqdm itself (a subclass that logs instead of
drawing), so its timing (``mininterval``, ``delay``) and rate arithmetic apply; no extra thread is started.

:func:`heartbeat` (around each stage of a run) guarantees the log is never silent longer than that interval: when
nothing has been logged for :func:`interval_s` seconds, one line says what is running and for how long (the
innermost :func:`activity`, e.g. ``ihvp reference cg at damping 0.001``). On a terminal it stays quiet while a bar
is drawn.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm
from tqdm.std import tqdm as _std_tqdm

log = logging.getLogger("influencelab")

#: Seconds between two progress lines when stderr is not a terminal (default; see :func:`interval_s`).
INTERVAL_S = 30.0
#: Environment variable overriding :data:`INTERVAL_S` (seconds; 0 = no progress lines).
ENV = "INFLUENCELAB_PROGRESS_S"

_warned: set[str] = set()


def interval_s() -> float:
    """Seconds between progress lines off a terminal: ``$INFLUENCELAB_PROGRESS_S`` if set, else
    :data:`INTERVAL_S`; 0 (or less) turns them off. A value that is not a number is ignored with one warning."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return INTERVAL_S
    try:
        return float(raw)
    except ValueError:
        if raw not in _warned:
            _warned.add(raw)
            log.warning("ignoring %s=%r (not a number of seconds); progress lines every %gs", ENV, raw, INTERVAL_S)
        return INTERVAL_S


class _Discard:
    """A file that drops what is written (tqdm still writes a newline on close)."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


class LogProgress(_std_tqdm):
    """A tqdm that logs one plain line per refresh instead of drawing a bar (``display`` is the hook tqdm
    documents for other front ends). Refreshes come at most every ``mininterval`` seconds and not before
    ``delay``; ``close`` logs a final line with the overall rate if a line was logged before (and the last one
    did not already say "done")."""

    monitor_interval = 0  # no TMonitor thread: miniters=1 checks the clock every iteration instead

    def __init__(self, iterable=None, *args, interval: float = INTERVAL_S, **kwargs):
        self._closing = False
        self._logged_n = None
        kwargs = {"miniters": 1, **kwargs, "mininterval": interval, "delay": interval, "leave": True,
                  "file": _Discard(), "dynamic_ncols": False, "disable": False}
        super().__init__(iterable, *args, **kwargs)

    def close(self) -> None:
        self._closing = True
        super().close()

    def display(self, msg=None, pos=None) -> bool:
        if msg == "":  # a request to clear the bar: nothing to clear in a log
            return True
        finished = bool(self.total) and self.n >= self.total
        if self._closing and finished and self._logged_n == self.n:  # the last line already said "done"
            return True
        log.info("%s", self.line())
        self._logged_n = self.n
        return True

    def line(self) -> str:
        """``desc: n/total (p%), rate, elapsed, ETA`` (``n it, rate, elapsed`` without a total)."""
        d = self.format_dict
        n, total, elapsed, unit = d["n"], d["total"], d["elapsed"], d["unit"] or "it"
        rate = d["rate"]
        if rate is None and elapsed:  # no smoothed rate yet, or the final line: overall average
            rate = (n - (d["initial"] or 0)) / elapsed
        parts = [f"{n}/{total} ({100 * n / total:.0f}%)" if total else f"{n} {unit}"]
        if rate:
            parts.append(f"{rate:.2f} {unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{unit}")
        parts.append(f"elapsed {self.format_interval(elapsed)}")
        if total and n >= total:
            parts.append("done")
        elif self._closing:
            parts.append("done" if not total else "stopped")
        elif total:
            parts.append(f"ETA {self.format_interval((total - n) / rate)}" if rate else "ETA ?")
        prefix = f"{d['prefix']}: " if d["prefix"] else ""
        return prefix + ", ".join(parts)


def progress(iterable, **kwargs):
    """A tqdm bar on a terminal; elsewhere a line in the log every :func:`interval_s` seconds (none if 0)."""
    if sys.stderr.isatty():
        return tqdm(iterable, disable=False, leave=False, dynamic_ncols=True, **kwargs)
    every = interval_s()
    if every <= 0:
        return tqdm(iterable, disable=True, leave=False, dynamic_ncols=True, **kwargs)
    return LogProgress(iterable, interval=every, **kwargs)


#: what is running now, innermost last: ``(description, start time)`` (see :func:`activity`)
_activities: list[tuple[str, float]] = []


@contextmanager
def activity(desc: str) -> Iterator[None]:
    """Name what runs inside (``ihvp reference cg at damping 0.001``) for :func:`heartbeat`'s lines."""
    _activities.append((desc, time.monotonic()))
    try:
        yield
    finally:
        _activities.pop()


class _LastRecord(logging.Handler):
    """Remembers when the ``influencelab`` logger (or a child) last logged anything."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.last = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        self.last = time.monotonic()


def _bars_drawn() -> bool:
    """Whether a tqdm bar is being drawn (on a terminal: the user sees progress without log lines)."""
    return any(not isinstance(b, LogProgress) and not b.disable for b in list(getattr(tqdm, "_instances", [])))


def heartbeat_line(desc: str, start: float, now: float) -> str:
    """``desc: running for 01:30[; <activity> for 00:40]``."""
    line = f"{desc}: running for {_std_tqdm.format_interval(now - start)}"
    try:
        what, since = _activities[-1]
    except IndexError:
        return line
    return f"{line}; {what} for {_std_tqdm.format_interval(now - since)}"


@contextmanager
def heartbeat(desc: str, interval: float | None = None) -> Iterator[None]:
    """While inside, a line in the log (:func:`heartbeat_line`) whenever the ``influencelab`` logger has been silent
    for ``interval`` seconds (default :func:`interval_s`; 0 = never), from a daemon thread stopped on exit."""
    every = interval_s() if interval is None else interval
    if every <= 0:
        yield
        return
    logger = logging.getLogger("influencelab")
    watcher = _LastRecord()
    logger.addHandler(watcher)
    stop = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not stop.wait(min(1.0, every / 4)):
            now = time.monotonic()
            if now - watcher.last >= every:
                if sys.stderr.isatty() and _bars_drawn():
                    watcher.last = now
                    continue
                log.info("%s", heartbeat_line(desc, start, now))
                watcher.last = now  # (also when the logger's level drops the line)

    thread = threading.Thread(target=beat, name="influencelab-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        logger.removeHandler(watcher)
