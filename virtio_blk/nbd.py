"""NBD exports as storage: one libnbd connection and one IO thread per queue.

Why a thread per connection: libnbd's state machine needs the socket polled for reading *and*
for writing (a full socket buffer), and after a dropped connection someone must reconnect with
backoff while requests wait.  The queue worker only sleeps on readable fds, so the connection
gets a thread of its own that owns the handle: the worker queues ops and wakes it once per batch
(``flush``), the thread issues them as NBD commands straight from guest memory, retires them and
wakes the worker through the engine's completion eventfd.

Requests map onto the commands the server offers: READ/WRITE → NBD_CMD_READ/WRITE (split at the
server's maximum block size; a write in write-through mode carries FUA, or is followed by a
flush), FLUSH → NBD_CMD_FLUSH, DISCARD → NBD_CMD_TRIM, WRITE_ZEROES → NBD_CMD_WRITE_ZEROES with
NO_HOLE unless the guest allowed unmapping.  Structured replies are negotiated by libnbd.

A connection that drops (server killed, restarted) is retried with backoff; the requests in
flight on it wait and are reissued on the new connection (reads and writes of whole ranges are
idempotent).  After ``reconnect_delay`` seconds without a connection they fail with EIO, and
new requests fail at once until the server is back -- QEMU's ``reconnect-delay``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import threading
import time
from typing import Any

from . import libnbd
from .engine import Engine, IoOp, OpKind
from .libnbd import CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, NO_CALLBACK, Handle
from .storage import Capabilities, Storage, StorageError, remote_info

log = logging.getLogger(__name__)

#: Largest command a client may send when the server does not say (the NBD spec's 32 MiB).
DEFAULT_MAX_PAYLOAD = 32 << 20
#: Longest trim/zero command issued (the protocol's length field is 32 bits).
MAX_RANGE_COMMAND = 1 << 30
#: How long opening the export may take (connect + handshake).
CONNECT_TIMEOUT = 20.0
#: Reconnect backoff: first retry after BACKOFF_MIN, doubling up to BACKOFF_MAX.
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0


class NbdStorage(Storage):
    """An NBD export named by a URI (``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=``).

    Opening connects once (within :data:`CONNECT_TIMEOUT`) to learn the size and what the
    server offers; that connection becomes queue 0's, so a server that takes one client at a time
    (``qemu-nbd`` without ``--shared``) serves a one-queue device.
    """

    def __init__(self, uri: str, *, read_only: bool = False, logical_block_size: int = 512,
                 reconnect_delay: float = 30.0) -> None:
        self.uri = self.name = uri
        self.reconnect_delay = reconnect_delay
        try:
            handle = Handle(uri, CONNECT_TIMEOUT)
        except OSError as exc:
            raise StorageError(f"{uri}: {exc.strerror or exc}") from None
        try:
            lib = handle.lib
            size = lib.nbd_get_size(handle.h)
            if size < 0:
                raise StorageError(f"{uri}: {libnbd.last_error('size').strerror}")
            min_block = max(1, lib.nbd_get_block_size(handle.h, libnbd.SIZE_MINIMUM))
            if min_block > logical_block_size:
                raise StorageError(f"{uri}: the server's minimum block size is {min_block}; "
                                   f"use --logical-block-size {min_block}")
            max_block = lib.nbd_get_block_size(handle.h, libnbd.SIZE_MAXIMUM)
            self.max_payload = min(max_block, DEFAULT_MAX_PAYLOAD) if max_block > 0 \
                else DEFAULT_MAX_PAYLOAD
            server_ro = handle.flag("nbd_is_read_only")
            if server_ro and not read_only:
                log.info("%s: the server exports read-only; so does the device", uri)
            self.info = remote_info(size, read_only or server_ro, logical_block_size)
            self.can_fua = handle.flag("nbd_can_fua")
            self.caps = Capabilities(
                flush=handle.flag("nbd_can_flush"),
                discard=handle.flag("nbd_can_trim"),
                write_zeroes=handle.flag("nbd_can_zero"),
            )
            self.structured = handle.flag("nbd_get_structured_replies_negotiated")
        except BaseException:
            handle.close()
            raise
        self._spare: Handle | None = handle
        self._lock = threading.Lock()

    def open_engine(self, queue_index: int) -> Engine:
        with self._lock:
            handle, self._spare = self._spare, None
        return NbdEngine(self, queue_index, handle)

    def connect(self) -> Handle:
        """A new connection to the export (for a queue, or a reconnect)."""
        handle = Handle(self.uri, CONNECT_TIMEOUT)
        size = handle.lib.nbd_get_size(handle.h)
        if size - size % self.info.logical_block_size != self.info.size:
            handle.close()
            raise OSError(errno.EIO, f"the export's size changed to {size} bytes")
        return handle

    def flush(self) -> None:
        """Queues flush their connection when they close; a connection no queue took yet is
        flushed here."""
        with self._lock:
            handle = self._spare
            if handle is not None and self.caps.flush and not self.info.read_only:
                _sync_flush(handle)

    def close(self) -> None:
        with self._lock:
            if self._spare is not None:
                _shutdown(self._spare)
                self._spare = None


def _sync_flush(handle: Handle, timeout: float = 30.0) -> None:
    """Flush one connection and wait for it (shutdown and the last queue's close)."""
    lib = handle.lib
    cookie = lib.nbd_aio_flush(handle.h, NO_CALLBACK, 0)
    if cookie < 0:
        raise libnbd.last_error("flush")
    deadline = time.monotonic() + timeout
    while True:
        r = lib.nbd_aio_command_completed(handle.h, cookie)
        if r == 1:
            return
        if r == -1:
            raise libnbd.last_error("flush")
        left = deadline - time.monotonic()
        if left <= 0 or handle.dead:
            raise OSError(errno.EIO, "flush did not complete")
        handle.wait(left)


def _shutdown(handle: Handle) -> None:
    if not handle.dead:
        handle.lib.nbd_shutdown(handle.h, 0)
        deadline = time.monotonic() + 5
        while not handle.dead and time.monotonic() < deadline:
            handle.wait(0.1)
    handle.close()


class _Pending:
    """An op being carried out: commands outstanding, the first error, a flush still owed."""

    __slots__ = ("error", "flush_after", "left", "op")

    def __init__(self, op: IoOp, flush_after: bool) -> None:
        self.op = op
        self.left = 0
        self.error: OSError | None = None
        self.flush_after = flush_after


class NbdEngine(Engine):
    """One queue's NBD connection, driven by its own thread."""

    name = "nbd"
    batched = True

    def __init__(self, storage: NbdStorage, queue_index: int, handle: Handle | None) -> None:
        self.storage = storage
        self.index = queue_index
        self._completion = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.completion_fd = self._completion
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._incoming: collections.deque[IoOp] = collections.deque()
        self._done: collections.deque[IoOp] = collections.deque()
        self._stop = False
        self._queued = False
        self.handle = handle
        if handle is None:
            try:
                self.handle = storage.connect()
            except OSError as exc:  # the queue starts and waits for the server like a reconnect
                log.warning("queue %d: %s: %s; retrying", queue_index, storage.uri, exc)
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name=f"nbd{queue_index}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ worker side
    def submit(self, op: IoOp) -> bool:
        self._incoming.append(op)
        self._queued = True
        return False

    def flush(self) -> None:
        if self._queued:
            self._queued = False
            os.eventfd_write(self._wake, 1)

    def reap(self) -> list[IoOp]:
        done = self._done
        out = []
        while done:
            out.append(done.popleft())
        return out

    def close(self) -> None:
        self._stop = True
        os.eventfd_write(self._wake, 1)
        self._thread.join(60)
        if self._thread.is_alive():
            log.error("queue %d: NBD thread did not stop", self.index)
            return
        os.close(self._wake)
        os.close(self._completion)
        self.completion_fd = None

    # ------------------------------------------------------------------ the connection thread
    def _run(self) -> None:
        st = self.storage
        cmds: dict[int, _Pending] = {}  # cookie -> op
        active: dict[int, _Pending] = {}  # id(op) -> op state, everything not yet completed
        waiting: collections.deque[_Pending] = collections.deque()  # to (re)issue
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        registered = -1
        outage_since: float | None = None if self.handle is not None else time.monotonic()
        gave_up = False
        next_try = 0.0
        backoff = BACKOFF_MIN

        finished = [0]  # completions since the worker was last woken

        def complete(p: _Pending) -> None:
            finished[0] += 1
            op = p.op
            active.pop(id(op), None)
            if p.error is not None:
                op.result = p.error
            elif op.kind in (OpKind.READ, OpKind.WRITE):
                op.result = op.length
            else:
                op.result = 0
            self._done.append(op)

        try:
            while True:
                incoming = self._incoming
                while incoming:
                    op = incoming.popleft()
                    p = _Pending(op, op.sync and op.kind in (OpKind.WRITE, OpKind.WRITE_ZEROES)
                                 and not st.can_fua and st.caps.flush)
                    if self.handle is None and gave_up:
                        p.error = OSError(errno.EIO, "NBD server unreachable")
                        complete(p)
                        continue
                    active[id(op)] = p
                    waiting.append(p)
                h = self.handle
                if h is not None:
                    while waiting:
                        p = waiting.popleft()
                        self._issue(h, p, cmds, complete)
                if finished[0]:  # wake the worker before this thread may sleep
                    finished[0] = 0
                    os.eventfd_write(self._completion, 1)
                if self._stop and not active:
                    break
                # ---- wait
                timeout = -1
                if h is not None:
                    fd = h.fd
                    if fd != registered:
                        if registered >= 0:
                            poller.unregister(registered)
                        registered = fd
                    if fd >= 0:
                        poller.register(fd, h.poll_events())
                else:
                    wake_at = next_try
                    if not gave_up and outage_since is not None:
                        wake_at = min(wake_at, outage_since + st.reconnect_delay)
                    timeout = max(0, int((wake_at - time.monotonic()) * 1000) + 1)
                    if self._stop:
                        timeout = 0
                for fd, rev in poller.poll(timeout):
                    if fd == self._wake:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wake)
                    elif h is not None and fd == registered:
                        h.notify(rev)
                # ---- retire
                if h is not None:
                    self._retire(h, cmds, complete)
                    if h.dead:
                        log.warning("queue %d: NBD connection to %s lost; %d requests wait, "
                                    "reconnecting for up to %.0f s", self.index, st.uri,
                                    len(active), st.reconnect_delay)
                        if registered >= 0:
                            poller.unregister(registered)
                            registered = -1
                        h.close()
                        self.handle = None
                        cmds.clear()
                        waiting.clear()
                        for p in active.values():
                            p.left = 0
                            p.error = None
                            waiting.append(p)
                        outage_since = time.monotonic()
                        next_try = 0.0
                        backoff = BACKOFF_MIN
                else:
                    now = time.monotonic()
                    assert outage_since is not None
                    if not gave_up and now - outage_since >= st.reconnect_delay:
                        gave_up = True
                        log.error("queue %d: %s unreachable for %.0f s: failing %d requests",
                                  self.index, st.uri, now - outage_since, len(waiting))
                        while waiting:
                            p = waiting.popleft()
                            p.error = OSError(errno.EIO, "NBD server unreachable")
                            complete(p)
                    if self._stop:
                        while waiting:
                            p = waiting.popleft()
                            p.error = OSError(errno.EIO, "NBD connection closed")
                            complete(p)
                    elif now >= next_try:
                        try:
                            self.handle = st.connect()
                        except OSError as exc:
                            log.debug("queue %d: reconnect failed: %s", self.index, exc)
                            next_try = time.monotonic() + backoff
                            backoff = min(backoff * 2, BACKOFF_MAX)
                        else:
                            self.reconnects += 1
                            gave_up = False
                            log.info("queue %d: reconnected to %s after %.1f s; reissuing %d "
                                     "requests", self.index, st.uri,
                                     time.monotonic() - outage_since, len(waiting))
                            outage_since = None
        except Exception:
            log.exception("queue %d: NBD thread failed", self.index)
            for p in list(active.values()):
                p.error = OSError(errno.EIO, "NBD client failed")
                complete(p)
            os.eventfd_write(self._completion, 1)
        finally:
            h = self.handle
            self.handle = None
            if h is not None:
                try:
                    if st.caps.flush and not st.info.read_only and not h.dead:
                        _sync_flush(h)
                except OSError as exc:
                    log.error("queue %d: flush at close failed: %s", self.index, exc)
                _shutdown(h)

    def _issue(self, h: Handle, p: _Pending, cmds: dict[int, _Pending], complete: Any) -> None:
        """Send ``p``'s commands; an op with nothing to send completes at once."""
        st = self.storage
        lib = h.lib
        op = p.op
        kind = op.kind
        hh = h.h
        cookies: list[int] = []
        try:
            if kind == OpKind.READ or kind == OpKind.WRITE:
                call = lib.nbd_aio_pread if kind == OpKind.READ else lib.nbd_aio_pwrite
                flags = CMD_FLAG_FUA if kind == OpKind.WRITE and op.sync and st.can_fua else 0
                offset = op.offset
                chunk = st.max_payload
                for buf in op.buffers or ():
                    n = buf.view.nbytes
                    addr = buf.address
                    while n:
                        take = min(n, chunk)
                        cookies.append(call(hh, addr, take, offset, NO_CALLBACK, flags))
                        addr += take
                        offset += take
                        n -= take
            elif kind == OpKind.FLUSH:
                if st.caps.flush:
                    cookies.append(lib.nbd_aio_flush(hh, NO_CALLBACK, 0))
            else:
                zero = kind == OpKind.WRITE_ZEROES
                if zero or st.caps.discard:
                    for seg in op.segments:
                        flags = 0
                        if zero:
                            flags = 0 if seg.unmap else CMD_FLAG_NO_HOLE
                            if op.sync and st.can_fua:
                                flags |= CMD_FLAG_FUA
                        call = lib.nbd_aio_zero if zero else lib.nbd_aio_trim
                        off, n = seg.offset, seg.length
                        while n:
                            take = min(n, MAX_RANGE_COMMAND)
                            cookies.append(call(hh, take, off, NO_CALLBACK, flags))
                            off += take
                            n -= take
        finally:
            for c in cookies:
                if c < 0:
                    if p.error is None:
                        p.error = libnbd.last_error(kind.name.lower())
                else:
                    cmds[c] = p
                    p.left += 1
        if not p.left:
            if p.error is not None and h.dead:
                return  # the connection went: the op is requeued with the others
            complete(p)

    def _retire(self, h: Handle, cmds: dict[int, _Pending], complete: Any) -> None:
        lib = h.lib
        hh = h.h
        while True:
            cookie = lib.nbd_aio_peek_command_completed(hh)
            if cookie <= 0:
                return
            r = lib.nbd_aio_command_completed(hh, cookie)
            p = cmds.pop(cookie, None)
            if p is None:
                continue
            if r == -1:
                err = libnbd.last_error()
                if h.dead:
                    continue  # requeued when the thread sees the dead connection
                if p.error is None:
                    p.error = err
            p.left -= 1
            if p.left:
                continue
            if p.flush_after and p.error is None:
                p.flush_after = False
                c = lib.nbd_aio_flush(hh, NO_CALLBACK, 0)
                if c >= 0:
                    cmds[c] = p
                    p.left = 1
                    continue
                p.error = libnbd.last_error("flush")
            complete(p)
