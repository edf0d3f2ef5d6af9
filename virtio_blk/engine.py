"""How disk IO is issued: inline on the queue's worker, or on a pool of IO threads.

An :class:`IoOp` is one disk operation of one request.  An engine either runs it before
``submit`` returns (``True``: the result is already in the op) or runs it elsewhere and hands it
back from ``reap`` after making ``completion_fd`` readable.  Engines know the disk, not the
guest: the buffers they get are host memoryviews (guest memory or a bounce buffer).

* ``inline``: the queue worker does the IO itself.  Cheapest per request when the data is in the
  page cache (a 4k ``preadv`` costs ~1.4 us and releases the GIL), but one slow IO holds up the
  whole queue.
* ``threads``: a fixed pool per queue; the worker only queues work, so many requests are in
  flight per queue (what O_DIRECT needs for queue depth).  ``preadv``/``pwritev`` release the GIL,
  so the threads overlap their IO.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import enum
import logging
import os
import queue
import threading
from typing import Any

from .disk import Disk

log = logging.getLogger(__name__)


class OpKind(enum.IntEnum):
    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    WRITE_ZEROES = 4


class IoOp:
    """One disk operation: what to do, and afterwards its result (bytes done or an OSError)."""

    __slots__ = ("buffers", "ctx", "kind", "length", "offset", "result", "segments", "sync")

    def __init__(self, kind: OpKind, offset: int = 0, buffers: list[memoryview] | None = None,
                 length: int = 0, ctx: Any = None) -> None:
        self.kind = kind
        self.offset = offset
        self.buffers = buffers
        self.length = length
        self.ctx = ctx
        self.segments: list[Any] = []
        self.sync = False  # flush after a write (write-through mode)
        self.result: int | OSError | None = None


def execute(disk: Disk, op: IoOp) -> None:
    """Run ``op`` against ``disk`` in the calling thread, storing its result."""
    try:
        kind = op.kind
        if kind == OpKind.READ:
            op.result = disk.readv(op.buffers, op.offset)
        elif kind == OpKind.WRITE:
            op.result = disk.writev(op.buffers, op.offset)
            if op.sync and op.result == op.length:
                disk.flush()
        elif kind == OpKind.FLUSH:
            disk.flush()
            op.result = 0
        elif kind == OpKind.DISCARD:
            for seg in op.segments:
                disk.discard(seg.offset, seg.length)
            op.result = 0
        else:
            for seg in op.segments:
                disk.write_zeroes(seg.offset, seg.length, seg.unmap)
            if op.sync:
                disk.flush()
            op.result = 0
    except OSError as exc:
        op.result = exc


class Engine(abc.ABC):
    """Issues IoOps for one queue."""

    completion_fd: int | None = None
    name = "engine"

    @abc.abstractmethod
    def submit(self, op: IoOp) -> bool:
        """Start ``op``; True if it already finished (its result is set)."""

    def reap(self) -> list[IoOp]:
        """Ops finished since the last call."""
        return []

    def close(self) -> None:
        """Stop; every submitted op has been reaped by then."""


class InlineEngine(Engine):
    name = "inline"

    def __init__(self, disk: Disk) -> None:
        self.disk = disk

    def submit(self, op: IoOp) -> bool:
        execute(self.disk, op)
        return True


_STOP = object()


class ThreadPoolEngine(Engine):
    """``threads`` IO threads fed from a queue; finished ops come back through an eventfd."""

    name = "threads"

    def __init__(self, disk: Disk, threads: int = 16, name: str = "io") -> None:
        self.disk = disk
        self.completion_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._todo: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: collections.deque[IoOp] = collections.deque()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        todo = self._todo
        done = self._done
        disk = self.disk
        fd = self.completion_fd
        while True:
            op = todo.get()
            if op is _STOP:
                return
            execute(disk, op)
            done.append(op)
            os.eventfd_write(fd, 1)

    def submit(self, op: IoOp) -> bool:
        self._todo.put(op)
        return False

    def reap(self) -> list[IoOp]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.completion_fd)
        done = self._done
        out = []
        while done:
            out.append(done.popleft())
        return out

    def close(self) -> None:
        for _ in self._threads:
            self._todo.put(_STOP)
        for t in self._threads:
            t.join(10)
        os.close(self.completion_fd)
        self.completion_fd = None


ENGINES = ("inline", "threads")


def make_engine(kind: str, disk: Disk, queue_index: int, threads: int = 16) -> Engine:
    if kind == "inline":
        return InlineEngine(disk)
    if kind == "threads":
        return ThreadPoolEngine(disk, threads, name=f"io{queue_index}")
    raise ValueError(f"unknown IO engine {kind!r}; choose from {', '.join(ENGINES)}")
