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
* ``io_uring``: a ring per queue (:mod:`.uring`); a whole drained batch of requests goes to the
  kernel with one ``io_uring_enter``, page-cached IO completes inside that call and is reaped at
  once, the rest wakes the worker through the ring's fd (pollable while completions wait).
  Many requests in flight, no thread hand-offs.  On a raw image without O_DIRECT two cases skip
  the ring, because the ring is slower there: a write is a plain ``pwritev`` (io_uring hands
  buffered writes to a kernel worker thread: ~20 us against ~13 us), and a batch of a single
  read first tries ``preadv(RWF_NOWAIT)``, going to the ring only if the data is not all in the
  page cache.  Errors are the same either way (an ``OSError`` in the op's result).

Engines with ``batched = True`` only queue in ``submit``; the caller ends a batch with
``submit_batch()`` and then collects with ``reap()`` whatever already finished.

Each engine dispatches on the op's kind through a tuple built by :func:`blockdev.ops.by_kind`
(a kind of :mod:`blockdev.ops` without a handler fails when the module is imported).
"""

from __future__ import annotations

import abc
import collections
import ctypes
import errno
import logging
import os
import queue
import select
import threading
import time
from typing import Any

from blockdev.disk import BlockDisk, Disk
from blockdev.ops import DATA_KINDS, WRITE_THROUGH_KINDS, OpKind, by_kind
from blockdev.uring import (
    IORING_FSYNC_DATASYNC,
    OP_ASYNC_CANCEL,
    OP_FSYNC,
    OP_READ,
    OP_READV,
    OP_WRITE,
    OP_WRITEV,
    Uring,
)
from guestmem import IoBuffer, iovec_array

log = logging.getLogger(__name__)


class IoOp:
    """One disk operation: what to do, and afterwards its result (bytes done or an OSError).

    ``buffers`` are IoBuffers (a memoryview and its host address): thread engines hand the views
    to ``preadv``, io_uring puts the addresses in its entries.
    """

    __slots__ = ("buffers", "ctx", "iov", "kind", "length", "offset", "result", "segments",
                 "sync")

    def __init__(self, kind: OpKind, offset: int = 0, buffers: list[IoBuffer] | None = None,
                 length: int = 0, ctx: Any = None) -> None:
        self.kind = kind
        self.offset = offset
        self.buffers: list[IoBuffer] = [] if buffers is None else buffers
        self.length = length
        self.ctx = ctx
        self.segments: list[Any] = []
        self.sync = False  # made durable before it is reported (write-through mode)
        self.result: int | OSError | None = None
        self.iov: Any = None  # keeps an iovec array alive while the kernel uses it


def sync_if_write_through(disk: BlockDisk, op: IoOp) -> None:
    """The one place write-through is kept: an op of a write-through kind (write,
    write-zeroes) made in write-through mode (``op.sync``) is complete only once durable, so a
    successful one is made durable before it is reported; a failure to do so becomes the op's
    result."""
    if not op.sync or isinstance(op.result, BaseException):
        return
    if op.kind not in WRITE_THROUGH_KINDS:
        return  # reads, flushes and discards change nothing that must be made durable
    if op.kind in DATA_KINDS and op.result != op.length:
        return  # short: reported as a failure anyway
    try:
        disk.make_durable()
    except OSError as exc:
        op.result = exc


def _read(disk: BlockDisk, op: IoOp) -> None:
    op.result = disk.readv([b.view for b in op.buffers], op.offset)


def _write(disk: BlockDisk, op: IoOp) -> None:
    op.result = disk.writev([b.view for b in op.buffers], op.offset)


def _make_durable(disk: BlockDisk, op: IoOp) -> None:
    disk.make_durable()
    op.result = 0


def _discard(disk: BlockDisk, op: IoOp) -> None:
    for seg in op.segments:
        disk.discard(seg.offset, seg.length)
    op.result = 0


def _write_zeroes(disk: BlockDisk, op: IoOp) -> None:
    for seg in op.segments:
        disk.write_zeroes(seg.offset, seg.length, seg.unmap)
    op.result = 0


#: How :func:`execute` carries out each kind on a :class:`BlockDisk`.
_EXECUTE = by_kind({
    OpKind.READ: _read,
    OpKind.WRITE: _write,
    OpKind.FLUSH: _make_durable,
    OpKind.DISCARD: _discard,
    OpKind.WRITE_ZEROES: _write_zeroes,
}, "execute")


def execute(disk: BlockDisk, op: IoOp) -> None:
    """Run ``op`` against ``disk`` in the calling thread, storing its result."""
    try:
        _EXECUTE[op.kind](disk, op)
    except OSError as exc:
        op.result = exc
    sync_if_write_through(disk, op)


class Engine(abc.ABC):
    """Issues IoOps for one queue."""

    completion_fd: int | None = None
    name = "engine"
    batched = False

    @abc.abstractmethod
    def submit(self, op: IoOp) -> bool:
        """Start ``op``; True if it already finished (its result is set)."""

    def submit_batch(self) -> None:
        """End of a batch of submissions: hand them to the kernel (batched engines)."""

    def reap(self) -> list[IoOp]:
        """Ops finished since the last call."""
        return []

    def close(self, timeout: float | None = None) -> bool:
        """Stop.  The queue's worker has reaped what finished; ops it abandoned (a drain that
        timed out) may still be running.  True once nothing this engine started can still
        write guest memory or signal the completion fd; False if something still may after
        ``timeout`` (None: the engine's own bound): the engine then keeps its fds open and
        its ops (and their buffers) referenced, and the caller must leave guest memory
        mapped.  Never returns True early: a queue reported stopped has no IO left."""
        return True


#: How long closing an engine waits for ops the worker abandoned (a stuck disk).
CLOSE_TIMEOUT = 30.0
#: Engines that could not finish their ops when closed: kept (with their fds, rings and the
#: ops' buffers, which keep guest memory mapped) for the life of the process.
UNFINISHED: list[Engine] = []


class InlineEngine(Engine):
    name = "inline"

    def __init__(self, disk: BlockDisk) -> None:
        self.disk = disk

    def submit(self, op: IoOp) -> bool:
        execute(self.disk, op)
        return True


_STOP = object()


class ThreadPoolEngine(Engine):
    """``threads`` IO threads fed from a queue; finished ops come back through an eventfd.

    The eventfd is closed by whoever is last: :meth:`close` if every IO thread has ended, else
    the last IO thread as it ends -- never while a thread could still write to it (a closed
    fd's number may name another file by then)."""

    name = "threads"

    def __init__(self, disk: BlockDisk, threads: int = 16, name: str = "io") -> None:
        self.disk = disk
        self._event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.completion_fd = self._event_fd
        self._todo: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: collections.deque[IoOp] = collections.deque()
        self._lock = threading.Lock()
        self._live = threads  # IO threads not yet past their last eventfd write
        self._closing = False
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
        fd = self._event_fd
        try:
            while True:
                op = todo.get()
                if op is _STOP:
                    return
                execute(disk, op)
                done.append(op)
                os.eventfd_write(fd, 1)
        finally:
            with self._lock:
                self._live -= 1
                last = self._closing and not self._live
            if last:
                os.close(fd)
                log.info("%s: the last busy IO thread ended; its eventfd is closed",
                         threading.current_thread().name)

    def submit(self, op: IoOp) -> bool:
        self._todo.put(op)
        return False

    def reap(self) -> list[IoOp]:
        done = self._done
        out = []
        while done:
            out.append(done.popleft())
        return out

    def close(self, timeout: float | None = None) -> bool:
        for _ in self._threads:
            self._todo.put(_STOP)
        deadline = time.monotonic() + (CLOSE_TIMEOUT if timeout is None else timeout)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.completion_fd = None
        with self._lock:
            self._closing = True
            busy = self._live
        if not busy:
            os.close(self._event_fd)
            return True
        log.error("%d IO threads still busy after %.0f s (a stuck disk): their ops may still "
                  "write guest memory, which stays mapped; the eventfd closes when the last "
                  "one ends", busy, CLOSE_TIMEOUT if timeout is None else timeout)
        UNFINISHED.append(self)
        return False


class UringEngine(Engine):
    """Reads, writes and flushes through an io_uring; discard and write-zeroes run inline.

    Reads and writes are queued by :meth:`submit` and prepared as one batch of submission
    entries by :meth:`submit_batch`, which enters the kernel once.  ``bypass`` (a raw image without
    O_DIRECT) lets writes and lone reads skip the ring (see the module docstring).
    """

    name = "io_uring"
    batched = True

    def __init__(self, disk: BlockDisk, entries: int = 256) -> None:
        self.disk = disk
        self.ring = Uring(entries)
        # The ring's own fd polls readable while completions wait in it: the worker sleeps on
        # it directly, and nothing has to be read back to re-arm it.
        self.completion_fd = self.ring.fd
        self._ops: dict[int, IoOp] = {}
        self._next = 0
        self._queued: list[IoOp] = []  # reads and writes for the next submit_batch
        self._done: list[IoOp] = []  # finished without the ring, handed back by reap
        #: Buffered writes as plain pwritev, a lone read tried with preadv(RWF_NOWAIT) first:
        #: only for a raw image in the page cache (a format translates offsets in its own
        #: engine, and O_DIRECT IO is the ring's best case).
        self.bypass = isinstance(disk, Disk) and not disk.info.direct
        #: A lone read tries preadv(RWF_NOWAIT) first (off once the file refuses it).
        self.nowait = self.bypass


    def submit(self, op: IoOp) -> bool:
        return self._SUBMIT[op.kind](self, op)

    def _queue(self, op: IoOp) -> bool:
        """A read or write: one entry of the next :meth:`submit_batch`."""
        self._queued.append(op)
        return False

    def _submit_write(self, op: IoOp) -> bool:
        if self.bypass:
            execute(self.disk, op)  # pwritev, then the write-through flush if asked
            return True
        self._queued.append(op)
        return False

    def _submit_fsync(self, op: IoOp) -> bool:
        """Rare: one entry of its own, ahead of the batch's reads/writes."""
        self._next = ud = (self._next + 1) & 0xFFFFFFFFFFFF
        self._ops[ud] = op
        self.ring.prep(OP_FSYNC, self.disk.fd, 0, 0, 0, ud, IORING_FSYNC_DATASYNC)
        return False

    def _submit_inline(self, op: IoOp) -> bool:
        execute(self.disk, op)
        return True

    #: How each kind of op is submitted (a kind without an entry fails at import).
    _SUBMIT = by_kind({
        OpKind.READ: _queue,
        OpKind.WRITE: _submit_write,
        OpKind.FLUSH: _submit_fsync,
        # discard / write-zeroes: rare, and fallocate is quick
        OpKind.DISCARD: _submit_inline,
        OpKind.WRITE_ZEROES: _submit_inline,
    }, "UringEngine")

    def submit_batch(self) -> None:
        queued = self._queued
        if queued:
            if (len(queued) == 1 and self.nowait and queued[0].kind == OpKind.READ
                    and self._read_nowait(queued[0])):
                queued.clear()
            else:
                self._prepare(queued)
        self.ring.submit()

    def _read_nowait(self, op: IoOp) -> bool:
        """Try ``op`` (a read) from the page cache without waiting; True if it is finished."""
        disk = self.disk
        assert isinstance(disk, Disk)  # bypass is only ever on for a raw image
        try:
            if not disk.try_readv_nowait([b.view for b in op.buffers], op.offset, op.length):
                return False  # not all cached, or short: the ring reads it
            op.result = op.length
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # no RWF_NOWAIT on this file
                log.info("%s: preadv(RWF_NOWAIT) unsupported (%s); reads go to io_uring",
                         getattr(disk, "path", "disk"), exc.strerror)
                self.nowait = False
                return False
            op.result = exc  # a disk error, as the ring would have reported it
        self._done.append(op)
        return True

    def _prepare(self, queued: list[IoOp]) -> None:
        """One submission entry per queued read or write, all prepared in one ring call."""
        fd = self.disk.fd
        ops = self._ops
        ud = self._next
        entries = []
        for op in queued:
            ud = (ud + 1) & 0xFFFFFFFFFFFF
            ops[ud] = op
            bufs = op.buffers
            read = op.kind == OpKind.READ
            if len(bufs) == 1:
                entries.append((OP_READ if read else OP_WRITE, fd, bufs[0].address, op.length,
                                op.offset, ud, 0))
            else:
                op.iov = iov = iovec_array(bufs)
                entries.append((OP_READV if read else OP_WRITEV, fd, ctypes.addressof(iov),
                                len(bufs), op.offset, ud, 0))
        self._next = ud
        queued.clear()
        self.ring.prep_many(entries)

    def reap(self) -> list[IoOp]:
        out = self._done
        if out:
            self._done = []
        else:
            out = []
        ops = self._ops
        set_result = self.set_result
        for ud, res in self.ring.reap():
            op = ops.pop(ud)
            set_result(op, res)
            op.iov = None
            out.append(op)
        return out

    def set_result(self, op: IoOp, res: int) -> None:
        """``op``'s result from its completion's ``res`` (bytes done, or -errno): the one
        statement of what a ring completion means -- an error, a short transfer finished the
        plain way, the write-through flush.  Also used by the compiled fast path
        (:mod:`virtio_blk._fastpath_core`) for the requests it hands back to Python."""
        if res < 0:
            op.result = OSError(-res, os.strerror(-res))
        elif 0 < res < op.length and op.kind in DATA_KINDS:
            # Short: finish it the plain way.
            try:
                op.result = self.disk.resume(op.kind == OpKind.WRITE,
                                             [b.view for b in op.buffers], op.offset, res)
            except OSError as exc:
                op.result = exc
        else:
            op.result = res
        if op.sync:  # (sync_if_write_through looks again; most ops are not write-through)
            sync_if_write_through(self.disk, op)

    def close(self, timeout: float | None = None) -> bool:
        """Cancel what is still in the ring and wait for every one of its completions (the
        kernel may write guest memory until an op's completion is posted); the ring is closed
        only then.  Ops never submitted are simply dropped."""
        for op in self._queued:
            self._dropped(op)
        self._queued.clear()
        self.completion_fd = None
        ring = self.ring
        if self._ops or self._external_in_kernel():
            limit = CLOSE_TIMEOUT if timeout is None else timeout
            log.warning("io_uring closing with %d ops and %d compiled fast path requests in "
                        "flight; cancelling the ops and waiting up to %.0f s", len(self._ops),
                        self._external_in_kernel(), limit)
            deadline = time.monotonic() + limit
            try:
                ring.prep_many([(OP_ASYNC_CANCEL, -1, ud, 0, 0, _CANCEL_TAG | ud, 0)
                                for ud in self._ops])
                while True:
                    ring.submit()
                    # (The ring keeps the compiled fast path's completions in external_stash.)
                    for ud, _res in ring.reap():
                        if not ud & _CANCEL_TAG:
                            gone = self._ops.pop(ud, None)
                            if gone is not None:
                                gone.iov = None
                                self._dropped(gone)
                    left = deadline - time.monotonic()
                    if not (self._ops or self._external_in_kernel()) or left <= 0:
                        break
                    select.select([ring.fd], [], [], min(left, 0.1))
            except OSError as exc:
                log.error("io_uring: cancelling at close failed: %s", exc)
            if self._ops or self._external_in_kernel():
                log.error("io_uring: %d ops and %d compiled fast path requests still in the "
                          "kernel at close: the ring stays open and guest memory mapped",
                          len(self._ops), self._external_in_kernel())
                UNFINISHED.append(self)
                return False
        ring.close()
        return True

    def _external_in_kernel(self) -> int:
        """Entries a compiled fast path submitted to this ring whose completion has not come:
        the kernel may write guest memory until it does, so :meth:`close` waits for them too
        (only a queue torn down with requests in flight has any; the worker waits first)."""
        ring = self.ring
        return ring.external_in_flight - len(ring.external_stash)

    def _dropped(self, op: IoOp) -> None:
        """``op`` will not be reported: close finished it (its completion came) or dropped it
        (never submitted).  A format engine releases what it holds for the op here."""


#: Marks a cancel entry's user data (op user data is 48 bits).
_CANCEL_TAG = 1 << 63

ENGINES = ("io_uring", "threads", "inline")


class EngineUnavailable(Exception):
    """The engine asked for by name cannot run here; the message is one line for the user."""


def uring_problem() -> str | None:
    """Why this process cannot make an io_uring (disabled by sysctl or seccomp, no kernel
    support, no memory it may lock...), or None if it can."""
    try:
        Uring(2).close()
    except OSError as exc:  # UringError is one
        return exc.strerror or str(exc)
    return None


def choose_engine(requested: str | None) -> str:
    """The engine to run: ``requested`` (one of :data:`ENGINES`), or by default io_uring where
    this process can make a ring, else the thread pool -- with a WARNING that says why, so a
    server (or a test) never runs the thread pool believing it runs io_uring.

    Raises EngineUnavailable for io_uring asked for by name and not available: the user
    chose it, so it is an error, not a fallback.
    """
    if requested not in (None, "io_uring"):
        return requested
    problem = uring_problem()
    if problem is None:
        return "io_uring"
    if requested == "io_uring":
        raise EngineUnavailable(f"--aio io_uring: io_uring is unavailable here ({problem})")
    log.warning("io_uring is unavailable here (%s): using the thread pool (--aio threads)",
                problem)
    return "threads"


def make_engine(kind: str, disk: BlockDisk, queue_index: int, threads: int = 16) -> Engine:
    """The engine ``kind`` for one queue.  The command line checked at start that io_uring
    works (:func:`choose_engine`); a ring that still cannot be made for this queue (a limit
    reached since) falls back to the thread pool with a WARNING naming the queue and the
    reason, and the engine's ``name`` says which one runs."""
    if kind == "inline":
        return InlineEngine(disk)
    if kind == "threads":
        return ThreadPoolEngine(disk, threads, name=f"io{queue_index}")
    if kind == "io_uring":
        try:
            # A format (qcow2) brings its own ring engine, which translates guest offsets.
            return getattr(disk, "uring_engine", UringEngine)(disk)
        except OSError as exc:  # e.g. RLIMIT_MEMLOCK on older kernels, or a seccomp policy
            log.warning("queue %d: io_uring unavailable (%s); using the thread pool",
                        queue_index, exc.strerror or exc)
            return ThreadPoolEngine(disk, threads, name=f"io{queue_index}")
    raise ValueError(f"unknown IO engine {kind!r}; choose from {', '.join(ENGINES)}")
