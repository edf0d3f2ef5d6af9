"""The backend request channel: messages from the backend to the frontend.

With ``VHOST_USER_PROTOCOL_F_BACKEND_REQ`` the frontend hands the backend one end of a socket
pair (``SET_BACKEND_REQ_FD``); the backend sends requests on it with the same 12-byte header as
the frontend's messages.  The one this library sends is ``CONFIG_CHANGE_MSG`` (2): "the config
space changed" -- QEMU's vhost-user-blk then re-reads it with ``GET_CONFIG`` on the main socket and
interrupts the guest's driver with a config change (how a resized disk reaches the guest).

The channel is its own socket, so any thread may send on it (under the channel's lock) without
racing the control thread that reads the main socket.  That matters: QEMU answers the config
change by sending ``GET_CONFIG`` on the main socket *before* it acks ours, so the control thread
must be free to answer while the sender waits.  With ``REPLY_ACK`` negotiated the sender asks for
an ack and waits for it, at most ``timeout`` seconds -- never forever: a frontend that does not
answer costs a log line, not a hung server.

Source: ``docs/interop/vhost-user.rst`` ("Back-end message types") in qemu/qemu.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import select
import socket
import struct
import threading
import time

from vhost.messages import FLAG_NEED_REPLY, FLAG_REPLY, HEADER, HEADER_SIZE, VERSION, encode

log = logging.getLogger(__name__)

#: How long to wait for the frontend's ack of a backend request.
REPLY_TIMEOUT = 5.0


class BackendRequest(enum.IntEnum):
    """VHOST_USER_BACKEND_* request codes (backend -> frontend)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class BackendChannelError(Exception):
    """The request could not be delivered or was refused; the message says why."""


class BackendChannel:
    """One end of the backend request socket pair (owned: :meth:`close` closes it)."""

    def __init__(self, fd: int, *, reply_ack: bool, timeout: float = REPLY_TIMEOUT) -> None:
        sock = socket.socket(fileno=fd)  # OSError if fd is not a socket
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise OSError(f"fd {fd} is not a Unix stream socket")
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._lock = threading.Lock()
        self.reply_ack = reply_ack
        self.timeout = timeout
        self.sent = 0

    def fileno(self) -> int:
        sock = self._sock
        return sock.fileno() if sock is not None else -1

    @property
    def closed(self) -> bool:
        return self._sock is None

    def config_changed(self) -> None:
        """Tell the frontend the device's config space changed (BackendChannelError if not)."""
        self.send(BackendRequest.CONFIG_CHANGE_MSG)

    def send(self, request: BackendRequest, payload: bytes = b"") -> None:
        """Send one request; with REPLY_ACK wait for the frontend's ack (status 0)."""
        with self._lock:
            sock = self._sock
            if sock is None:
                raise BackendChannelError("the backend request channel is closed")
            deadline = time.monotonic() + self.timeout
            self._discard_stale(sock)
            flags = VERSION | (FLAG_NEED_REPLY if self.reply_ack else 0)
            data = encode(request, payload, flags)
            try:
                while data:
                    self._wait(sock, deadline, write=True)
                    data = data[sock.send(data):]
            except OSError as exc:
                raise BackendChannelError(f"cannot send {request.name}: {exc}") from exc
            self.sent += 1
            if not self.reply_ack:
                return
            try:
                status = self._read_ack(sock, request, deadline)
            except OSError as exc:
                raise BackendChannelError(f"no ack for {request.name}: {exc}") from exc
            if status != 0:
                raise BackendChannelError(f"the frontend failed {request.name} ({status})")

    def close(self) -> None:
        """Close the socket; a sender waiting for an ack is woken (and fails) first."""
        sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            sock.close()
            self._sock = None

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _wait(sock: socket.socket, deadline: float, write: bool = False) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        r, w, _ = select.select([] if write else [sock], [sock] if write else [], [], left)
        if not (r or w):
            raise TimeoutError("timed out")

    def _recv_exact(self, sock: socket.socket, n: int, deadline: float) -> bytes:
        chunks = []
        while n:
            self._wait(sock, deadline)
            chunk = sock.recv(n)
            if not chunk:
                raise ConnectionResetError("the frontend closed the channel")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _read_ack(self, sock: socket.socket, request: BackendRequest, deadline: float) -> int:
        code, flags, size = HEADER.unpack(self._recv_exact(sock, HEADER_SIZE, deadline))
        if size > 64:
            raise ConnectionResetError(f"reply of {size} bytes")
        payload = self._recv_exact(sock, size, deadline) if size else b""
        if code != request or not flags & FLAG_REPLY or size != 8:
            raise ConnectionResetError(f"unexpected reply: request {code} flags {flags:#x} "
                                       f"size {size}")
        return struct.unpack("<Q", payload)[0]

    @staticmethod
    def _discard_stale(sock: socket.socket) -> None:
        """Drop a late ack of an earlier request that timed out (it would pass for ours)."""
        while True:
            try:
                if not sock.recv(4096):
                    return
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            log.warning("discarded a late reply on the backend request channel")
