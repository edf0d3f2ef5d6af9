"""NBD exports as storage: one libnbd connection per queue, driven by the queue's worker.

No extra thread: the engine's completion fd is an epoll fd holding the connection's socket
(readable; writable only while libnbd has bytes it could not send yet) and a timerfd (reconnect
backoff, the reconnect deadline, the handshake timeout).  The worker sleeps on it like on any
completion fd; ``reap`` asks it which of the two fired and moves libnbd's state machine on.  The
worker issues NBD commands straight from guest memory in ``submit`` (libnbd sends at once when
the socket takes it) -- no hand-off, no second thread contending for the GIL.

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
import ctypes
import errno
import logging
import os
import select
import threading
import time
from typing import Any

from blockdev.engine import Engine, IoOp
from blockdev.libc import timerfd_arm, timerfd_create
from blockdev.nbd import libnbd
from blockdev.nbd.libnbd import CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, NO_CALLBACK, Handle
from blockdev.ops import DATA_KINDS, WRITE_THROUGH_KINDS, OpKind, by_kind
from blockdev.storage import Capabilities, Storage, StorageError, remote_info

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
#: Most socket notifications handled per reap (the timer wakes the worker again for the rest:
#: the socket may hold more replies and will not make a new edge for them).
_MAX_NOTIFY_ROUNDS = 64


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
            handle = Handle.connect(uri, CONNECT_TIMEOUT)
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

    def make_durable(self) -> None:
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


def _poll_bits(epoll_events: int) -> int:
    """epoll event bits -> the poll bits :meth:`Handle.notify` takes (same values on Linux)."""
    return epoll_events & (select.POLLIN | select.POLLOUT | select.POLLHUP | select.POLLERR)


class NbdEngine(Engine):
    """One queue's NBD connection, driven from the queue's worker thread."""

    name = "nbd"
    batched = True

    def __init__(self, storage: NbdStorage, queue_index: int, handle: Handle | None) -> None:
        self.storage = storage
        self.index = queue_index
        self._ep = select.epoll()
        self._timer = timerfd_create()
        self._ep.register(self._timer, select.EPOLLIN)
        self.completion_fd = self._ep.fileno()
        self.handle: Handle | None = None
        self._sock = -1
        self._mask = 0
        self._cmds: dict[int, _Pending] = {}  # cookie -> op
        self._active: dict[int, _Pending] = {}  # id(op) -> every op not yet completed
        self._waiting: collections.deque[_Pending] = collections.deque()  # to (re)issue
        self._done: list[IoOp] = []
        self._outage_since: float | None = None
        self._gave_up = False
        self._next_try = 0.0
        self._backoff = BACKOFF_MIN
        self._attempt_deadline = 0.0
        self._more = False
        self._armed = True  # (unknown: the first _arm_timer sets it either way)
        self._was_connected = handle is not None
        self.reconnects = 0
        if handle is not None:
            self._attach(handle)
        else:  # the queue starts and waits for the server like after a lost connection
            self._lost("not connected")
            self._arm_timer()

    # ------------------------------------------------------------------ Engine
    def submit(self, op: IoOp) -> bool:
        st = self.storage
        p = _Pending(op, op.sync and op.kind in WRITE_THROUGH_KINDS
                     and not st.can_fua and st.caps.flush)
        h = self.handle
        if h is not None and not h.connecting:
            self._active[id(op)] = p
            if self._issue(h, p):
                self._complete(p, report=False)
                return True
            # A command libnbd took is in its hands (a connection that dies later is seen by
            # submit_batch and reap); one it refused may mean the connection just died.
            if p.error is not None and h.dead:
                self._lost("connection lost")
            return False
        if self._gave_up and time.monotonic() < self._next_try and h is None:
            p.error = OSError(errno.EIO, "NBD server unreachable")
            self._complete(p, report=False)
            return True
        self._active[id(op)] = p
        self._waiting.append(p)
        if h is None:
            self._tick()
        return False

    def submit_batch(self) -> None:
        h = self.handle
        # A connection that died while sending (libnbd closes its socket then, so no poll
        # event would ever say so) is noticed once per batch rather than after every command.
        if h is not None and self._outage_since is None and h.dead:  # (connected: see reap)
            self._lost("connection lost")
        self._update_mask()

    def reap(self) -> list[IoOp]:
        timer = heard = False
        # libnbd may stop after one reply with more in the socket: ask again until the socket
        # has nothing for it (the socket is level-triggered inside our epoll, and the worker
        # only gets a new edge for new data).  Never a notify without poll's word: libnbd 1.14
        # would wait in REPLY.START for a reply and hold back every new command meanwhile.
        for _ in range(_MAX_NOTIFY_ROUNDS):
            moved = self._more = False
            for fd, ev in self._ep.poll(0):
                if fd == self._timer:
                    timer = True
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._timer, 8)
                elif fd == self._sock and self.handle is not None:
                    self.handle.notify(_poll_bits(ev))
                    moved = heard = True
            if not moved:
                break
            if self._outage_since is not None:
                self._update_mask()  # a handshake turns between sending and receiving
        else:
            self._more = True  # the timer fires at once: a fresh edge for the rest
        h = self.handle
        if h is not None:
            if self._outage_since is None:  # connected: an outage ends only with a handshake
                if heard:
                    # Commands complete only inside a notify (a refused one fails in submit,
                    # a connection that died sending is seen by submit_batch): a reap that
                    # heard nothing -- the one right after each batch, mostly -- has nothing
                    # to retire.
                    self._retire(h)
                    if h.dead:
                        self._lost("connection lost")
            elif h.connecting:
                if timer and time.monotonic() >= self._attempt_deadline:
                    self._attempt_failed("no handshake in time")
            elif h.ready:  # a reconnect attempt finished
                self._connected(h)
            else:
                self._attempt_failed(libnbd.last_error("connect").strerror or "failed")
        if self.handle is None or self._outage_since is not None:
            self._tick()
        self._update_mask()
        self._arm_timer()
        done, self._done = self._done, []
        return done

    def close(self, timeout: float | None = None) -> bool:
        """Fail what is still waiting, flush, and close the connection.  libnbd only touches
        guest memory inside our own calls on this thread (it writes a read's data as it reads
        the reply), so once the handle is closed nothing can: always quiet."""
        st = self.storage
        for p in list(self._active.values()):  # only if the queue is torn down mid-outage
            p.error = OSError(errno.EIO, "NBD connection closed")
            self._complete(p)
        h, self.handle = self.handle, None
        if h is not None:
            if h.ready and st.caps.flush and not st.info.read_only:
                try:
                    _sync_flush(h)
                except OSError as exc:
                    log.error("queue %d: flush at close failed: %s", self.index, exc)
            _shutdown(h)
        self._ep.close()
        os.close(self._timer)
        self.completion_fd = None
        return True

    # ------------------------------------------------------------------ connection
    def _attach(self, h: Handle) -> None:
        self.handle = h
        self._update_mask()

    def _update_mask(self) -> None:
        """Watch the socket for reading, and for writing only while libnbd has to send."""
        h = self.handle
        fd = h.fd if h is not None else -1
        if fd != self._sock:
            if self._sock >= 0:
                with contextlib.suppress(OSError):
                    self._ep.unregister(self._sock)
            self._sock, self._mask = fd, 0
            if h is None or fd < 0:
                return
            mask = select.EPOLLIN | (select.EPOLLOUT if h.poll_events() & select.POLLOUT else 0)
            self._ep.register(fd, mask)
            self._mask = mask
            return
        if h is None or fd < 0:
            return
        mask = select.EPOLLIN | (select.EPOLLOUT if h.poll_events() & select.POLLOUT else 0)
        if mask != self._mask:
            self._ep.modify(fd, mask)
            self._mask = mask

    def _drop_handle(self) -> None:
        h, self.handle = self.handle, None
        if self._sock >= 0:
            with contextlib.suppress(OSError):
                self._ep.unregister(self._sock)
            self._sock, self._mask = -1, 0
        if h is not None:
            h.close()

    def _lost(self, why: str) -> None:
        """The connection is gone: everything in flight waits for the next one."""
        st = self.storage
        if self.handle is not None:
            log.warning("queue %d: NBD %s (%s); %d requests wait, reconnecting for up to "
                        "%.0f s", self.index, why, st.uri, len(self._active), st.reconnect_delay)
        self._drop_handle()
        self._cmds.clear()
        self._waiting.clear()
        for p in self._active.values():
            p.left = 0
            p.error = None
            self._waiting.append(p)
        now = time.monotonic()
        self._outage_since = now
        self._gave_up = False
        self._next_try = now
        self._backoff = BACKOFF_MIN
        self._tick()

    def _tick(self) -> None:
        """During an outage: give up on waiting requests at the deadline; start the next
        connection attempt when its backoff has passed."""
        st = self.storage
        now = time.monotonic()
        since = self._outage_since
        if since is not None and not self._gave_up and now - since >= st.reconnect_delay:
            self._gave_up = True
            log.error("queue %d: %s unreachable for %.0f s: failing %d requests", self.index,
                      st.uri, now - since, len(self._waiting))
            self._fail_waiting("NBD server unreachable")
        if self.handle is not None or now < self._next_try:
            return
        if self._gave_up and not self._waiting:
            return  # retried when a request comes
        try:
            h = Handle(st.uri)
        except OSError as exc:
            self._attempt_failed(exc.strerror or str(exc))
            return
        self._attempt_deadline = now + CONNECT_TIMEOUT
        self._attach(h)
        # A Unix socket connect may have finished (or failed) inside the call already.
        if not h.connecting:
            if h.ready:
                self._connected(h)
            else:
                self._attempt_failed(libnbd.last_error("connect").strerror or "failed")

    def _attempt_failed(self, why: str) -> None:
        log.debug("queue %d: reconnect failed: %s", self.index, why)
        self._drop_handle()
        self._next_try = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        if self._gave_up:
            self._fail_waiting("NBD server unreachable")

    def _connected(self, h: Handle) -> None:
        st = self.storage
        size = h.lib.nbd_get_size(h.h)
        if size - size % st.info.logical_block_size != st.info.size:
            self._attempt_failed(f"the export's size changed to {size} bytes")
            return
        since = self._outage_since
        self._outage_since = None
        self._gave_up = False
        self._backoff = BACKOFF_MIN
        if self._was_connected:
            self.reconnects += 1
            log.info("queue %d: reconnected to %s after %.1f s; reissuing %d requests",
                     self.index, st.uri, time.monotonic() - (since or 0.0), len(self._waiting))
        else:
            log.debug("queue %d: connected to %s", self.index, st.uri)
        self._was_connected = True
        while self._waiting and self.handle is h:
            p = self._waiting.popleft()
            if self._issue(h, p):
                self._complete(p)
            elif h.dead:
                self._lost("connection lost")

    def _fail_waiting(self, why: str) -> None:
        while self._waiting:
            p = self._waiting.popleft()
            p.error = OSError(errno.EIO, why)
            self._complete(p)

    def _arm_timer(self) -> None:
        """The timer fires at the next moment the outage logic has something to do."""
        when: float | None = None
        if self._more:
            when = time.monotonic()
        elif self.handle is not None and self.handle.connecting:
            when = self._attempt_deadline
        elif self._outage_since is not None or self.handle is None:
            if self._waiting or not self._gave_up:
                when = self._next_try
            if self._outage_since is not None and not self._gave_up:
                deadline = self._outage_since + self.storage.reconnect_delay
                when = deadline if when is None else min(when, deadline)
        if when is None and not self._armed:
            return  # connected and idle: no timerfd_settime per reap
        self._armed = when is not None
        timerfd_arm(self._timer, None if when is None else when - time.monotonic())

    # ------------------------------------------------------------------ commands
    def _complete(self, p: _Pending, report: bool = True) -> None:
        op = p.op
        self._active.pop(id(op), None)
        if p.error is not None:
            op.result = p.error
        elif op.kind in DATA_KINDS:
            op.result = op.length
        else:
            op.result = 0
        if report:
            self._done.append(op)

    def _issue(self, h: Handle, p: _Pending) -> bool:
        """Send ``p``'s commands; True if it is already complete (nothing to send, or refused
        at once while the connection is alive)."""
        st = self.storage
        op = p.op
        kind = op.kind
        cmds = self._cmds
        cookies: list[int] = []
        try:
            self._COMMANDS[kind](self, h, op, cookies)
        except ctypes.ArgumentError as exc:  # a value out of the C type's range: not sent
            log.error("%s: %s refused: %s", st.uri, kind.name.lower(), exc)
            if p.error is None:
                p.error = OSError(errno.EINVAL, str(exc))
        finally:
            for c in cookies:
                if c < 0:
                    if p.error is None:
                        p.error = libnbd.last_error(kind.name.lower())
                else:
                    cmds[c] = p
                    p.left += 1
        if p.left:
            return False
        return not (p.error is not None and h.dead)  # dead: requeued with the others

    def _read(self, h: Handle, op: IoOp, cookies: list[int]) -> None:
        self._rw(h.lib.nbd_aio_pread, 0, h, op, cookies)

    def _write(self, h: Handle, op: IoOp, cookies: list[int]) -> None:
        st = self.storage
        self._rw(h.lib.nbd_aio_pwrite, CMD_FLAG_FUA if op.sync and st.can_fua else 0,
                 h, op, cookies)

    def _rw(self, call: Any, flags: int, h: Handle, op: IoOp, cookies: list[int]) -> None:
        """One command per ``max_payload`` piece of each buffer.

        The range is checked here, against the export's size, because the data commands are
        declared with plain C types (:mod:`.libnbd`): nothing past the export, nothing
        negative, reaches the server (which would fail it -- or, for a huge offset, a value
        ctypes wrapped round)."""
        hh = h.h
        offset = op.offset
        chunk = self.storage.max_payload
        end = offset
        for buf in op.buffers or ():
            end += buf.view.nbytes
        if not 0 <= offset <= end <= self.storage.info.size:
            raise ctypes.ArgumentError(f"bytes {offset}..{end} are outside the export")
        for buf in op.buffers or ():
            n = buf.view.nbytes
            addr = buf.address
            while n:
                take = min(n, chunk)
                cookies.append(call(hh, addr, take, offset, NO_CALLBACK, flags))
                addr += take
                offset += take
                n -= take

    def _flush(self, h: Handle, op: IoOp, cookies: list[int]) -> None:
        if self.storage.caps.flush:
            cookies.append(h.lib.nbd_aio_flush(h.h, NO_CALLBACK, 0))

    def _discard(self, h: Handle, op: IoOp, cookies: list[int]) -> None:
        if self.storage.caps.discard:
            self._ranges(h.lib.nbd_aio_trim, False, h, op, cookies)

    def _write_zeroes(self, h: Handle, op: IoOp, cookies: list[int]) -> None:
        self._ranges(h.lib.nbd_aio_zero, True, h, op, cookies)

    def _ranges(self, call: Any, zero: bool, h: Handle, op: IoOp, cookies: list[int]) -> None:
        """Trim or zero commands for each segment, at most ``MAX_RANGE_COMMAND`` each."""
        st = self.storage
        hh = h.h
        for seg in op.segments:
            flags = 0
            if zero:
                flags = 0 if seg.unmap else CMD_FLAG_NO_HOLE
                if op.sync and st.can_fua:
                    flags |= CMD_FLAG_FUA
            off, n = seg.offset, seg.length
            while n:
                take = min(n, MAX_RANGE_COMMAND)
                cookies.append(call(hh, take, off, NO_CALLBACK, flags))
                off += take
                n -= take

    #: How each kind of op is sent (a kind without an entry fails at import).
    _COMMANDS = by_kind({
        OpKind.READ: _read,
        OpKind.WRITE: _write,
        OpKind.FLUSH: _flush,
        OpKind.DISCARD: _discard,
        OpKind.WRITE_ZEROES: _write_zeroes,
    }, "NbdEngine")

    def _retire(self, h: Handle) -> int:
        """Collect every command libnbd has finished; how many there were."""
        lib = h.lib
        hh = h.h
        cmds = self._cmds
        retired = 0
        while True:
            cookie = lib.nbd_aio_peek_command_completed(hh)
            if cookie <= 0:
                return retired
            retired += 1
            r = lib.nbd_aio_command_completed(hh, cookie)
            p = cmds.pop(cookie, None)
            if p is None:
                continue
            if r == -1:
                err = libnbd.last_error()
                if h.dead:
                    continue  # requeued when the dead connection is noticed
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
            self._complete(p)
