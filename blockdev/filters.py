"""nbdkit-style filters: a :class:`~.storage.Storage` over another one, wrapping its engines.

A filter changes what happens to requests on their way to the storage below (its *child*: a
file, qcow2, RBD, NBD or a plugin node) and is stacked in the ``--blockdev`` syntax with
``file=CHILD``.  Each queue's engine is the child's engine for that queue wrapped: the queue's
worker still submits and reaps on its own thread, and the child's engine still sees only one
thread, so no engine needs to know it is filtered.

* ``delay``: ``delay-read``, ``delay-write``, ``delay-flush``, ``delay-trim``, ``delay-zero``
  (milliseconds; nbdkit's names) hold each request of that kind that long before it goes down.
  The worker never sleeps: held requests wait in a heap, a timerfd says when the first is due,
  and the engine's completion fd is an epoll of that timerfd and the child's completion fd.
* ``error``: fail requests with ``error=ERRNO`` (EIO by default; nbdkit's spelling) -- a fraction
  ``error-rate`` (0..1) of each kind (``error-read-rate``, ``error-write-rate``,
  ``error-flush-rate``, ``error-trim-rate``, ``error-zero-rate`` override it per kind), or every
  read/write/trim/zero touching ``error-start``/``error-length`` (whose default rate is then 1;
  flushes, which have no range, then fail only if ``error-rate``/``error-flush-rate`` says so).
  ``error-file=PATH``: only while PATH exists (switch errors on and off from outside, as
  nbdkit's ``error-file``).  ``seed``: the random choices repeat.  A failed request never
  reaches the child.
* ``log``: ``logfile=PATH`` gets one line per request as it completes: time, queue, kind,
  offset, length, result (``ok`` or the errno name) and the microseconds since it was submitted.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import os
import random
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from blockdev.engine import Engine, IoOp
from blockdev.libc import timerfd_arm, timerfd_create
from blockdev.ops import OpKind, by_kind
from blockdev.storage import Storage, StorageError

#: The kinds as the filters' option names call them (nbdkit's words).
KIND_NAMES: dict[OpKind, str] = {OpKind.READ: "read", OpKind.WRITE: "write",
                                 OpKind.FLUSH: "flush", OpKind.DISCARD: "trim",
                                 OpKind.WRITE_ZEROES: "zero"}
by_kind(KIND_NAMES, "filter option names")  # a kind added to the table must be named here
#: Longest delay accepted (a typo of a few zeros should not park requests for days).
MAX_DELAY_MS = 3_600_000


class FilterError(ValueError):
    """A filter option is wrong; the message is one line for the user."""


class FilterStorage(Storage):
    """A filter over ``child``: its geometry and capabilities, its engines wrapped."""

    def __init__(self, child: Storage, name: str) -> None:
        self.child = child
        self.name = name
        self.info = child.info
        self.caps = child.caps

    def open_engine(self, queue_index: int) -> Engine:
        return self.wrap(self.child.open_engine(queue_index), queue_index)

    def wrap(self, engine: Engine, queue_index: int) -> Engine:
        return FilterEngine(engine)

    def make_durable(self) -> None:
        self.child.make_durable()

    def grow(self, size: int) -> None:
        self.child.grow(size)
        self.info = self.child.info

    def close(self) -> None:
        self.child.close()


class FilterEngine(Engine):
    """Passes everything to the child's engine; filters override what they change."""

    def __init__(self, child: Engine) -> None:
        self.child = child
        self.completion_fd = child.completion_fd
        self.batched = child.batched
        self.name = f"{child.name}+filter"

    def submit(self, op: IoOp) -> bool:
        return self.child.submit(op)

    def submit_batch(self) -> None:
        self.child.submit_batch()

    def reap(self) -> list[IoOp]:
        return self.child.reap()

    def close(self, timeout: float | None = None) -> bool:
        self.completion_fd = None
        return self.child.close(timeout)


class HoldingEngine(FilterEngine):
    """A filter that holds requests back and sends them down later, from :meth:`reap` (the
    delay and throttle filters): its completion fd is an epoll over a timer of its own and the
    child's completion fd.  An epoll fd polls readable while any fd in it is, so the worker
    sleeps on it like on any completion fd, and each completion or timer expiry is a fresh
    edge for it.  Subclasses keep what they hold and say when to look again (:meth:`_arm`)."""

    def __init__(self, child: Engine) -> None:
        super().__init__(child)
        self._timer = timerfd_create()
        self._ep = select.epoll()
        self._ep.register(self._timer, select.EPOLLIN)
        if child.completion_fd is not None:
            self._ep.register(child.completion_fd, select.EPOLLIN)
        self.completion_fd = self._ep.fileno()
        self.batched = True  # held requests go down from reap(), which ends its own batch

    def _arm(self, seconds: float) -> None:
        """Wake the worker (a reap) in ``seconds``."""
        timerfd_arm(self._timer, seconds)

    def _timer_seen(self) -> None:
        """Consume the timer's expiry, if any, so it stops polling readable."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._timer, 8)

    def _send_down(self, ops: list[IoOp]) -> list[IoOp]:
        """Submit ``ops`` (released from hold, in order) to the child as one batch; what
        finished at once, then what the child has finished since."""
        out: list[IoOp] = []
        sent = False
        for op in ops:
            if self.child.submit(op):
                out.append(op)
            else:
                sent = True
        if sent:
            self.child.submit_batch()
        out.extend(self.child.reap())
        return out

    def _drop_held(self) -> None:
        """Forget every request still held (at close: they never reached the child)."""

    def close(self, timeout: float | None = None) -> bool:
        """Requests still held never reached the child: dropped (the worker reports none of
        them); then the child closes, and the timer and epoll with it."""
        self._drop_held()
        done = super().close(timeout)
        self._ep.close()
        os.close(self._timer)
        return done


# ---------------------------------------------------------------------- options
def _number(options: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = options.pop(key, None)
    if value is None:
        return default
    text = str(value).strip()
    if isinstance(value, str) and text.endswith("ms"):
        text = text[:-2]
    try:
        number = float(text)
    except ValueError:
        raise FilterError(f"Parameter '{key}' expects a number") from None
    if not low <= number <= high:  # (NaN fails this too)
        raise FilterError(f"Parameter '{key}' expects a value from {low:g} to {high:g}")
    return number


def _errno(options: dict[str, Any], key: str, default: int) -> int:
    value = options.pop(key, None)
    if value is None:
        return default
    code = getattr(errno, str(value).upper(), None)
    if not isinstance(code, int) or str(value).upper() not in errno.errorcode.values():
        raise FilterError(f"Parameter '{key}': unknown errno name '{value}' (e.g. EIO, "
                          "ENOSPC)")
    return code


def _reject_rest(options: dict[str, Any], driver: str) -> None:
    if options:
        raise FilterError(f"Invalid parameter '{sorted(options)[0]}' for driver '{driver}'")


# ---------------------------------------------------------------------- delay
class DelayStorage(FilterStorage):
    """``driver=delay``: requests of a kind held for a fixed time before they go down."""

    def __init__(self, child: Storage, name: str, options: dict[str, Any]) -> None:
        super().__init__(child, name)
        opts = dict(options)
        self.delays: dict[OpKind, float] = {}
        for kind, word in KIND_NAMES.items():
            ms = _number(opts, f"delay-{word}", 0.0, 0.0, MAX_DELAY_MS)
            if ms:
                self.delays[kind] = ms / 1000.0
        _reject_rest(opts, "delay")

    def wrap(self, engine: Engine, queue_index: int) -> Engine:
        return DelayEngine(engine, self.delays)


class DelayEngine(HoldingEngine):
    def __init__(self, child: Engine, delays: dict[OpKind, float]) -> None:
        super().__init__(child)
        self.delays = delays
        self.name = f"{child.name}+delay"
        self._held: list[tuple[float, int, IoOp]] = []
        self._seq = itertools.count()

    def submit(self, op: IoOp) -> bool:
        delay = self.delays.get(op.kind)
        if not delay:
            return self.child.submit(op)
        due = time.monotonic() + delay
        if not self._held or due < self._held[0][0]:
            self._arm(delay)
        heapq.heappush(self._held, (due, next(self._seq), op))
        return False

    def reap(self) -> list[IoOp]:
        self._timer_seen()
        held = self._held
        now = time.monotonic()
        due: list[IoOp] = []
        while held and held[0][0] <= now:
            due.append(heapq.heappop(held)[2])
        out = self._send_down(due)
        if held:
            self._arm(held[0][0] - time.monotonic())
        return out

    def _drop_held(self) -> None:
        self._held.clear()


# ---------------------------------------------------------------------- error
@dataclass(frozen=True)
class ErrorRule:
    """When a request of one kind fails, and with which errno."""

    code: int
    rate: float


class ErrorStorage(FilterStorage):
    """``driver=error``: fail chosen requests with a chosen errno before they reach the child."""

    def __init__(self, child: Storage, name: str, options: dict[str, Any]) -> None:
        super().__init__(child, name)
        opts = dict(options)
        code = _errno(opts, "error", errno.EIO)
        start = _number(opts, "error-start", -1, 0, child.info.size - 1)
        length = _number(opts, "error-length", -1, 1, child.info.size)
        if (start < 0) != (length < 0):
            raise FilterError("Parameters 'error-start' and 'error-length' go together")
        self.range = None if start < 0 else (int(start), int(start) + int(length))
        rate = _number(opts, "error-rate", 0.0 if self.range is None else 1.0, 0.0, 1.0)
        self.rules: dict[OpKind, ErrorRule] = {}
        for kind, word in KIND_NAMES.items():
            # A flush has no byte range: a range alone leaves flushes alone.
            default = 0.0 if kind == OpKind.FLUSH and self.range is not None and \
                "error-rate" not in options else rate
            self.rules[kind] = ErrorRule(_errno(opts, f"error-{word}", code),
                                         _number(opts, f"error-{word}-rate", default, 0.0, 1.0))
        self.trigger = opts.pop("error-file", None)
        seed = opts.pop("seed", None)
        _reject_rest(opts, "error")
        self._random = random.Random(None if seed is None else str(seed))
        self._lock = threading.Lock()

    def failure(self, op: IoOp) -> OSError | None:
        """The error ``op`` fails with, or None if it goes down."""
        rule = self.rules[op.kind]
        if rule.rate <= 0.0:
            return None
        span = self.range
        if span is not None and op.kind != OpKind.FLUSH and not any(  # (a flush: its rate)
                a < span[1] and span[0] < b for a, b in _extents(op)):
            return None
        if self.trigger is not None and not os.path.exists(self.trigger):
            return None
        if rule.rate < 1.0:
            with self._lock:
                if self._random.random() >= rule.rate:
                    return None
        return OSError(rule.code, f"{os.strerror(rule.code)} (error filter)")

    def wrap(self, engine: Engine, queue_index: int) -> Engine:
        return ErrorEngine(engine, self.failure)


def _extents(op: IoOp) -> list[tuple[int, int]]:
    if op.kind in (OpKind.READ, OpKind.WRITE):
        return [(op.offset, op.offset + op.length)]
    return [(seg.offset, seg.offset + seg.length) for seg in op.segments]


class ErrorEngine(FilterEngine):
    def __init__(self, child: Engine, failure: Callable[[IoOp], OSError | None]) -> None:
        super().__init__(child)
        self.failure = failure
        self.name = f"{child.name}+error"

    def submit(self, op: IoOp) -> bool:
        exc = self.failure(op)
        if exc is None:
            return self.child.submit(op)
        op.result = exc
        return True


# ---------------------------------------------------------------------- log
class LogStorage(FilterStorage):
    """``driver=log``: one line per request to ``logfile`` (appended; shared by the queues)."""

    def __init__(self, child: Storage, name: str, options: dict[str, Any]) -> None:
        super().__init__(child, name)
        opts = dict(options)
        path = opts.pop("logfile", None)
        _reject_rest(opts, "log")
        if not path:
            raise FilterError("Parameter 'logfile' is missing")
        try:
            self.file: TextIO = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise StorageError(f"{name}: cannot open logfile {path}: {exc.strerror}") from None
        self._lock = threading.Lock()

    def record(self, queue_index: int, op: IoOp, took_ns: int) -> None:
        result = op.result
        if isinstance(result, OSError):
            what = errno.errorcode.get(result.errno or 0, "error")
        elif op.kind in (OpKind.READ, OpKind.WRITE) and result != op.length:
            what = f"short:{result}"
        else:
            what = "ok"
        if op.kind in (OpKind.READ, OpKind.WRITE):
            where = f"offset={op.offset} length={op.length}"
        elif op.segments:
            where = " ".join(f"offset={s.offset} length={s.length}" for s in op.segments)
        else:
            where = "offset=0 length=0"
        line = (f"{time.time():.6f} queue={queue_index} {KIND_NAMES[op.kind]} {where} "
                f"result={what} us={took_ns // 1000}\n")
        with self._lock, contextlib.suppress(OSError, ValueError):  # a full disk: no IO error
            self.file.write(line)

    def wrap(self, engine: Engine, queue_index: int) -> Engine:
        return LogEngine(engine, queue_index, self.record)

    def close(self) -> None:
        try:
            super().close()
        finally:
            with self._lock:
                self.file.close()


class LogEngine(FilterEngine):
    def __init__(self, child: Engine, queue_index: int,
                 record: Callable[[int, IoOp, int], None]) -> None:
        super().__init__(child)
        self.index = queue_index
        self.record = record
        self.name = f"{child.name}+log"
        self._started: dict[int, int] = {}  # id(op) -> submit time (ns) while in flight

    def submit(self, op: IoOp) -> bool:
        t0 = time.monotonic_ns()
        if self.child.submit(op):
            self.record(self.index, op, time.monotonic_ns() - t0)
            return True
        self._started[id(op)] = t0
        return False

    def reap(self) -> list[IoOp]:
        done = self.child.reap()
        now = time.monotonic_ns()
        for op in done:
            self.record(self.index, op, now - self._started.pop(id(op), now))
        return done


FILTERS: dict[str, type[DelayStorage] | type[ErrorStorage] | type[LogStorage]] = {
    "delay": DelayStorage, "error": ErrorStorage, "log": LogStorage}


def open_filter(driver: str, child: Storage, name: str, options: dict[str, Any]) -> Storage:
    """The filter ``driver`` over ``child``; FilterError for a wrong option."""
    return FILTERS[driver](child, name, options)
