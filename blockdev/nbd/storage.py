"""NBD exports as storage: one connection per queue, driven by the queue's worker.

libnbd connects and does the handshake (URI parsing, fixed-newstyle negotiation, NBD_OPT_GO,
block sizes, export flags), asked for no structured replies and no TLS; from then on the
engine speaks the transmission phase itself on libnbd's socket (:mod:`.wire` packs and parses)
and never calls libnbd's aio functions on that handle again.  Why: libnbd cost several ctypes
calls and syscalls per command (``python -m benchmarks.nbd_engine``: 18.4 us CPU per 4k write
and 19.4 per read through libnbd, 5.6 and 6.9 on our own wire).  ``submit`` packs a
request's commands; ``submit_batch`` sends the batch with one ``sendmsg`` (a write's payload is
the guest memory view itself, at most IOV_MAX buffers a call; what the socket does not take
waits for EPOLLOUT); ``reap`` takes the replies with one ``recv_into`` while the socket has
data and completes their requests (a read's data is written straight into its buffers, a large
one received straight into them: 207 against 252 us CPU per 1 MiB read).  At close: a flush,
then NBD_CMD_DISC, then ``nbd_close`` (which only closes the socket).

No extra thread: the engine's completion fd is an epoll fd holding the connection's socket
(readable; writable only while bytes wait to be sent) and a timerfd (reconnect backoff, the
reconnect deadline, the handshake timeout).  The worker sleeps on it like on any completion fd.

Requests map onto the commands the server offers: READ/WRITE → NBD_CMD_READ/WRITE (split at the
server's maximum block size; a write in write-through mode carries FUA, or is followed by a
flush), FLUSH → NBD_CMD_FLUSH, DISCARD → NBD_CMD_TRIM, WRITE_ZEROES → NBD_CMD_WRITE_ZEROES with
NO_HOLE unless the guest allowed unmapping.  Every range is checked against the export first.
An error reply fails its request with the errno it names.

A connection that drops (server killed, restarted), or whose server breaks the protocol (a wrong
magic, a reply to a cookie not in flight), is retried with backoff; the requests in flight on
it wait and are reissued on the new connection (reads and writes of whole ranges are
idempotent).  After ``reconnect_delay`` seconds without a working connection they fail with
EIO, and new requests fail at once until the server is back -- QEMU's ``reconnect-delay``.  A
server that does the handshake and then fails every time does not reset that clock: only a
reply does.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time

from blockdev.engine import Engine, IoOp
from blockdev.libc import timerfd_arm, timerfd_create
from blockdev.nbd import libnbd, wire
from blockdev.nbd.libnbd import NO_CALLBACK, Handle
from blockdev.nbd.wire import ProtocolError, ReplyParser
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
#: Most handshake turns handled per reap (the timer wakes the worker again for the rest:
#: the socket may hold more and will not make a new edge for it).
_MAX_NOTIFY_ROUNDS = 64
#: Most full receive buffers taken per reap (likewise).
_MAX_RECV_ROUNDS = 64
#: Replies are received into a buffer this big (32 4k reads' replies fit twice).
RECV_BUFFER = 256 << 10
#: A read's data still to come of at least this many bytes is received straight into its
#: destination instead of through the receive buffer (a copy saved per byte).
DIRECT_RECV = 32 << 10
#: Most buffers one sendmsg takes (Linux's UIO_MAXIOV).
IOV_MAX = 1024
_READABLE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
# A short recv means the socket is empty -- unless the event said the peer hung up: the end
# of the stream may then be waiting behind the data, and no new event would wake the worker
# for it (it sleeps on the epoll fd, woken by the socket's changes, not by its state).
_WIRE_IN = select.EPOLLIN | select.EPOLLRDHUP
_WIRE_OUT = _WIRE_IN | select.EPOLLOUT
_HUNG_UP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


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
            if handle.flag("nbd_get_structured_replies_negotiated"):  # never asked for
                raise StorageError(f"{uri}: the server forced structured replies")
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


def _wait(fd: int, events: int, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for ``events`` on ``fd`` (poll: select cannot take a
    descriptor past FD_SETSIZE, and a server with many queues has many)."""
    p = select.poll()
    p.register(fd, events)
    p.poll(max(1, int(timeout * 1000)))


class _Refused(ValueError):
    """A request the engine will not send (outside the export): it fails with EINVAL."""


class _Wire:
    """The transmission phase on a connected handle's socket (libnbd keeps the socket and closes
    it; we only borrow its descriptor, and never call libnbd's aio functions on it again).

    ``out`` holds what is queued and not yet sent -- request headers and, zero-copy, the
    guest memory views of writes' payloads -- sent with one ``sendmsg`` per batch."""

    __slots__ = ("cookie", "fd", "out", "parser", "queued", "sock")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.sock = socket.socket(fileno=fd)  # detached at the end: nbd_close closes the fd
        self.sock.setblocking(False)
        self.parser = ReplyParser()
        self.out: list[bytes | memoryview] = []
        self.queued = 0  # stream position just past everything queued
        self.cookie = 0

    def command(self, kind: int, flags: int, offset: int, length: int,
                payload: memoryview | None = None, dest: memoryview | None = None) -> int:
        """Queue one request (and a write's payload); its cookie."""
        self.cookie = cookie = self.cookie + 1
        self.out.append(wire.request(kind, flags, cookie, offset, length))
        queued = self.queued + wire.REQUEST.size
        if payload is not None:
            self.out.append(payload)
            queued += length
        self.queued = queued
        self.parser.expect(cookie, dest, length if kind == wire.CMD_READ else 0, queued)
        return cookie

    def send(self) -> bool:
        """Send what the socket takes now (raising OSError if the connection is gone); True if
        everything went, False if the rest waits for EPOLLOUT."""
        out = self.out
        parser = self.parser
        while out:
            batch = out if len(out) <= IOV_MAX else out[:IOV_MAX]
            try:
                n = self.sock.sendmsg(batch, (), socket.MSG_NOSIGNAL)
            except BlockingIOError:
                return False
            parser.sent += n
            if parser.sent == self.queued:
                out.clear()  # the common case: all of it went
                return True
            # Drop the buffers that went; keep the unsent end of one cut in the middle.
            i = 0
            for piece in batch:
                size = len(piece) if isinstance(piece, bytes) else piece.nbytes
                if n < size:
                    if n:
                        out[i] = memoryview(piece).cast("B")[n:]
                    break
                n -= size
                i += 1
            del out[:i]
            if i < len(batch):
                return False  # the socket's buffer is full
        return True

    def detach(self) -> None:
        """Forget the socket object without closing the descriptor (libnbd's to close)."""
        self.sock.detach()


def _byte_view(view: memoryview) -> memoryview:
    """``view`` indexed by bytes (guest memory views already are)."""
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


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
        self._wire: _Wire | None = None  # the transmission phase, once the handshake is done
        self._rbuf = bytearray(RECV_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._sock = -1
        self._mask = 0
        self._cmds: dict[int, _Pending] = {}  # cookie -> op
        self._active: dict[int, _Pending] = {}  # id(op) -> every op not yet completed
        self._waiting: collections.deque[_Pending] = collections.deque()  # to (re)issue
        self._done: list[IoOp] = []
        self._outage_since: float | None = None
        self._trouble_since: float | None = None  # first loss since the last reply
        self._gave_up = False
        self._next_try = 0.0
        self._backoff = BACKOFF_MIN
        self._attempt_deadline = 0.0
        self._more = False
        self._armed = True  # (unknown: the first _arm_timer sets it either way)
        self._was_connected = handle is not None
        self.reconnects = 0
        if handle is not None:
            self.handle = handle
            self._wire = _Wire(handle.fd)
            self._update_mask()
        else:  # the queue starts and waits for the server like after a lost connection
            self._lost("not connected")
            self._arm_timer()

    # ------------------------------------------------------------------ Engine
    def submit(self, op: IoOp) -> bool:
        st = self.storage
        p = _Pending(op, op.sync and op.kind in WRITE_THROUGH_KINDS
                     and not st.can_fua and st.caps.flush)
        w = self._wire
        if w is not None:
            self._active[id(op)] = p
            if self._issue(w, p):
                self._complete(p, report=False)
                return True
            return False  # queued: sent by submit_batch
        h = self.handle
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
        w = self._wire
        if w is not None and w.out:
            self._send(w)
        self._update_mask()

    def reap(self) -> list[IoOp]:
        timer = False
        self._more = False
        # While connecting, libnbd's handshake may want several turns (send, receive, send);
        # never a notify without poll's word: libnbd would wait for a reply meanwhile.
        for _ in range(_MAX_NOTIFY_ROUNDS):
            moved = False
            sock = self._sock
            for fd, ev in self._ep.poll(0):
                if fd == self._timer:
                    timer = True
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._timer, 8)
                elif fd == self._sock:
                    w = self._wire
                    if w is not None:
                        if ev & select.EPOLLOUT:
                            self._send(w)
                        if ev & _READABLE and self._wire is w:
                            self._receive(w, bool(ev & _HUNG_UP))
                    elif self.handle is not None:
                        self.handle.notify(_poll_bits(ev))
                        moved = True
            # A connection lost in this round has its successor's socket in the epoll now:
            # poll again, so a handshake that can move on at once does so in this reap.
            if not moved and self._sock == sock:
                break
            self._update_mask()  # a handshake turns between sending and receiving
        else:
            self._more = True  # the timer fires at once: a fresh edge for the rest
        h = self.handle
        if h is not None and self._wire is None:
            if h.connecting:
                if timer and time.monotonic() >= self._attempt_deadline:
                    self._attempt_failed("no handshake in time")
            elif h.ready:  # a reconnect attempt finished
                self._connected(h)
            else:
                self._attempt_failed(libnbd.last_error("connect").strerror or "failed")
        if self.handle is None or self._outage_since is not None:
            self._tick()
        w = self._wire
        if w is not None and w.out:  # flushes owed after writes, reissued requests
            self._send(w)
        self._update_mask()
        self._arm_timer()
        done, self._done = self._done, []
        return done

    def close(self, timeout: float | None = None) -> bool:
        """Fail what is still waiting, flush, say NBD_CMD_DISC and close the connection.  Data
        of replies still owed to the failed requests is discarded, not written to their
        buffers, and once the handle is closed nothing can touch them: always quiet."""
        st = self.storage
        for p in list(self._active.values()):  # only if the queue is torn down with some
            p.error = OSError(errno.EIO, "NBD connection closed")
            self._complete(p)
        w = self._wire
        if w is not None:
            w.parser.forget_destinations()
            try:
                if st.caps.flush and not st.info.read_only:
                    try:
                        self._sync_flush(w)
                    except OSError as exc:
                        log.error("queue %d: flush at close failed: %s", self.index, exc)
                # nbd_close sends nothing (it only closes the socket): the goodbye is ours.
                w.command(wire.CMD_DISC, 0, 0, 0)
                self._drain(w, time.monotonic() + 5.0)
            except OSError as exc:
                log.debug("queue %d: NBD_CMD_DISC not sent: %s", self.index, exc)
        self._drop_handle()
        self._ep.close()
        os.close(self._timer)
        self.completion_fd = None
        return True

    # ------------------------------------------------------------------ the wire
    def _send(self, w: _Wire) -> None:
        try:
            w.send()
        except OSError as exc:
            self._lost(f"connection lost ({exc.strerror or exc})")

    def _receive(self, w: _Wire, hung_up: bool = False) -> None:
        """Take what the socket holds (one ``recv_into`` while it has data), complete what it
        answers.  A read's data of :data:`DIRECT_RECV` bytes or more goes from the socket
        straight into its destination."""
        parser = w.parser
        sock = w.sock
        rbuf = self._rview
        full = len(rbuf)
        for _ in range(_MAX_RECV_ROUNDS):
            target = parser.direct_target(DIRECT_RECV)
            try:
                if target is None:
                    n = sock.recv_into(rbuf)
                    want = full
                    done = parser.feed(rbuf[:n]) if n else []
                else:
                    n = sock.recv_into(target)
                    want = len(target)
                    done = parser.advance(n) if n else []
            except BlockingIOError:
                return
            except ProtocolError as exc:
                log.error("queue %d: NBD server %s broke the protocol: %s", self.index,
                          self.storage.uri, exc)
                self._lost(f"protocol error ({exc})")
                return
            except OSError as exc:
                self._lost(f"connection lost ({exc.strerror or exc})")
                return
            if not n:
                self._lost("connection lost (closed by the server)")
                return
            if done:
                self._completed(w, done)
            if n < want and not hung_up:
                return  # the socket is empty: new data makes a new edge
        self._more = True  # the timer fires at once: a fresh wake-up for the rest

    def _completed(self, w: _Wire, done: list[tuple[int, int]]) -> None:
        self._trouble_since = None  # the connection works: a later loss is a new outage
        cmds = self._cmds
        for cookie, err in done:
            p = cmds.pop(cookie, None)
            if p is None:
                continue  # (a command of a request failed at close)
            if err and p.error is None:
                p.error = OSError(err, f"NBD server: {os.strerror(err)}")
            p.left -= 1
            if p.left:
                continue
            if p.flush_after and p.error is None:
                p.flush_after = False
                self._command(w, p, wire.CMD_FLUSH, 0, 0, 0)
                continue
            self._complete(p)

    def _sync_flush(self, w: _Wire, timeout: float = 30.0) -> None:
        """One flush, waited for (the queue's close)."""
        cookie = w.command(wire.CMD_FLUSH, 0, 0, 0)
        deadline = time.monotonic() + timeout
        self._drain(w, deadline)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError(errno.ETIMEDOUT, "flush did not complete")
            _wait(w.fd, select.POLLIN, left)
            try:
                n = w.sock.recv_into(self._rview)
            except BlockingIOError:
                continue
            if not n:
                raise OSError(errno.EIO, "connection closed during the flush")
            try:
                done = w.parser.feed(self._rview[:n])
            except ProtocolError as exc:
                raise OSError(errno.EIO, str(exc)) from None
            for c, err in done:
                if c == cookie:
                    if err:
                        raise OSError(err, os.strerror(err))
                    return

    @staticmethod
    def _drain(w: _Wire, deadline: float) -> None:
        """Send everything queued, waiting for the socket up to ``deadline``."""
        while not w.send():
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError(errno.ETIMEDOUT, "the NBD server takes no more data")
            _wait(w.fd, select.POLLOUT, left)

    # ------------------------------------------------------------------ connection
    def _update_mask(self) -> None:
        """Watch the socket for reading, and for writing only while bytes wait to be sent."""
        w = self._wire
        if w is not None:
            fd = w.fd
            mask = _WIRE_OUT if w.out else _WIRE_IN
        else:
            h = self.handle
            fd = h.fd if h is not None else -1
            mask = select.EPOLLIN
            if h is not None and fd >= 0 and h.poll_events() & select.POLLOUT:
                mask |= select.EPOLLOUT
        if fd != self._sock:
            if self._sock >= 0:
                with contextlib.suppress(OSError):
                    self._ep.unregister(self._sock)
            self._sock, self._mask = fd, 0
            if fd >= 0:
                self._ep.register(fd, mask)
                self._mask = mask
        elif fd >= 0 and mask != self._mask:
            self._ep.modify(fd, mask)
            self._mask = mask

    def _drop_handle(self) -> None:
        h, self.handle = self.handle, None
        w, self._wire = self._wire, None
        if self._sock >= 0:
            with contextlib.suppress(OSError):
                self._ep.unregister(self._sock)
            self._sock, self._mask = -1, 0
        if w is not None:
            w.detach()
        if h is not None:
            h.close()  # closes the socket; sends nothing

    def _lost(self, why: str) -> None:
        """The connection is gone (or no longer trusted): everything in flight waits for the
        next one."""
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
        if self._trouble_since is None:
            self._trouble_since = self._next_try = now
            self._backoff = BACKOFF_MIN
        else:
            # The last connection answered nothing before it failed (a server that does the
            # handshake and then breaks the protocol, or hangs up, every time): the outage
            # goes on from its start -- the deadline still comes -- and so does the backoff.
            self._next_try = now + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        self._outage_since = self._trouble_since
        self._gave_up = False
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
        self.handle = h
        self._update_mask()
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
        """The handshake is done: from here on the wire is ours."""
        st = self.storage
        size = h.lib.nbd_get_size(h.h)
        if size - size % st.info.logical_block_size != st.info.size:
            self._attempt_failed(f"the export's size changed to {size} bytes")
            return
        if h.flag("nbd_get_structured_replies_negotiated"):
            self._attempt_failed("structured replies negotiated though not asked for")
            return
        since = self._outage_since
        self._outage_since = None
        self._gave_up = False
        if self._was_connected:
            self.reconnects += 1
            log.info("queue %d: reconnected to %s after %.1f s; reissuing %d requests",
                     self.index, st.uri, time.monotonic() - (since or 0.0), len(self._waiting))
        else:
            log.debug("queue %d: connected to %s", self.index, st.uri)
        self._was_connected = True
        w = self._wire = _Wire(h.fd)
        while self._waiting:
            p = self._waiting.popleft()
            if self._issue(w, p):
                self._complete(p)
        self._send(w)
        self._update_mask()

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
        elif self._wire is None and self.handle is not None and self.handle.connecting:
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

    def _issue(self, w: _Wire, p: _Pending) -> bool:
        """Queue ``p``'s commands; True if it is already complete (nothing to send, or
        refused)."""
        try:
            self._COMMANDS[p.op.kind](self, w, p)
        except _Refused as exc:  # checked before any command was queued: nothing sent
            log.error("%s: %s refused: %s", self.storage.uri, p.op.kind.name.lower(), exc)
            p.error = OSError(errno.EINVAL, str(exc))
        return not p.left

    def _command(self, w: _Wire, p: _Pending, kind: int, flags: int, offset: int, length: int,
                 payload: memoryview | None = None, dest: memoryview | None = None) -> None:
        self._cmds[w.command(kind, flags, offset, length, payload, dest)] = p
        p.left += 1

    def _read(self, w: _Wire, p: _Pending) -> None:
        self._rw(w, p, wire.CMD_READ, 0)

    def _write(self, w: _Wire, p: _Pending) -> None:
        fua = p.op.sync and self.storage.can_fua
        self._rw(w, p, wire.CMD_WRITE, wire.CMD_FLAG_FUA if fua else 0)

    def _rw(self, w: _Wire, p: _Pending, kind: int, flags: int) -> None:
        """One command per ``max_payload`` piece of each buffer: a read's data goes to (a write's
        payload is sent from) the buffer's own view, no copy on our side.  Nothing past the
        export, nothing negative, reaches the server."""
        op = p.op
        offset = op.offset
        chunk = self.storage.max_payload
        end = offset
        for buf in op.buffers:
            end += buf.view.nbytes
        if not 0 <= offset <= end <= self.storage.info.size:
            raise _Refused(f"bytes {offset}..{end} are outside the export")
        read = kind == wire.CMD_READ
        for buf in op.buffers:
            view = buf.view
            if read and view.format != "B":
                view = _byte_view(view)  # the parser writes it by byte offsets
            n = view.nbytes
            if n <= chunk:  # the common case: one command per buffer
                self._command(w, p, kind, flags, offset, n, None if read else view,
                              view if read else None)
                offset += n
                continue
            view = _byte_view(view)
            at = 0
            while at < n:
                take = min(n - at, chunk)
                piece = view[at:at + take]
                self._command(w, p, kind, flags, offset, take, None if read else piece,
                              piece if read else None)
                offset += take
                at += take

    def _flush(self, w: _Wire, p: _Pending) -> None:
        if self.storage.caps.flush:
            self._command(w, p, wire.CMD_FLUSH, 0, 0, 0)

    def _discard(self, w: _Wire, p: _Pending) -> None:
        if self.storage.caps.discard:
            self._ranges(w, p, wire.CMD_TRIM)

    def _write_zeroes(self, w: _Wire, p: _Pending) -> None:
        self._ranges(w, p, wire.CMD_WRITE_ZEROES)

    def _ranges(self, w: _Wire, p: _Pending, kind: int) -> None:
        """Trim or zero commands for each segment, at most ``MAX_RANGE_COMMAND`` each; every
        segment is checked against the export before any is queued."""
        st = self.storage
        op = p.op
        size = st.info.size
        for seg in op.segments:
            if not (seg.offset >= 0 and seg.length >= 0 and seg.offset + seg.length <= size):
                raise _Refused(f"{seg.length} bytes at {seg.offset} are outside the export")
        for seg in op.segments:
            flags = 0
            if kind == wire.CMD_WRITE_ZEROES:
                flags = 0 if seg.unmap else wire.CMD_FLAG_NO_HOLE
                if op.sync and st.can_fua:
                    flags |= wire.CMD_FLAG_FUA
            off, n = seg.offset, seg.length
            while n:
                take = min(n, MAX_RANGE_COMMAND)
                self._command(w, p, kind, flags, off, take)
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
