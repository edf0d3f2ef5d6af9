"""Log lines that a misbehaving guest or a failing disk could otherwise repeat forever.

A disk that fails under guest load fails every request: a line per request would fill the
journal and hide the first, most useful, lines.  :class:`RateLimitedLog` lets the first ``burst``
lines of each interval through and then counts; the count is reported with the next line after
the interval (and by :meth:`RateLimitedLog.close`), so nothing goes unaccounted for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class RateLimitedLog:
    """At most ``burst`` lines per ``interval`` seconds through ``logger``; the rest counted.

    Shared by a device's queue workers, hence the lock (taken only on the error path).
    """

    def __init__(self, logger: logging.Logger, burst: int = 10, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = clock()
        self._emitted = 0
        self._suppressed = 0
        #: Lines asked for in all (emitted or not), for tests and statistics.
        self.total = 0

    def log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        """Log ``msg % args`` at ``level`` unless this interval's burst is spent
        (``exc_info``: with the exception being handled, as ``logging`` does)."""
        with self._lock:
            self.total += 1
            now = self._clock()
            if now - self._window_start >= self.interval:
                self._report_suppressed(level)
                self._window_start = now
                self._emitted = 0
            if self._emitted >= self.burst:
                self._suppressed += 1
                return
            self._emitted += 1
        self.logger.log(level, msg, *args, exc_info=exc_info)

    def _report_suppressed(self, level: int) -> None:
        if self._suppressed:
            self.logger.log(level, "%d similar lines suppressed in the last %.0f s",
                            self._suppressed, self._clock() - self._window_start)
            self._suppressed = 0

    def close(self) -> None:
        """Report what is still counted (at shutdown)."""
        with self._lock:
            self._report_suppressed(logging.WARNING)
