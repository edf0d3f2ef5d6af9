"""Framing vhost-user messages on a Unix stream socket, with fds in SCM_RIGHTS ancillary data.

QEMU sends header, payload and fds in one ``sendmsg``; on a stream socket the fds arrive with the
first byte, so they come back with the header read.  Anything odd at this level -- a truncated
fd array, a short message, a header of the wrong version or an absurd size -- means the stream can
no longer be trusted, and the connection is closed (:class:`ConnectionClosed`).
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket

from vhost.messages import HEADER_SIZE, MAX_FDS, Message, ProtocolError, parse_header

log = logging.getLogger(__name__)

_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class ConnectionClosed(Exception):
    """The peer went away, or broke the framing so badly that we hung up."""


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionClosed("peer closed the connection mid-message")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_message(sock: socket.socket) -> tuple[Message, list[int]]:
    """Read one message and its fds (the caller owns them).  ConnectionClosed at EOF."""
    data, ancdata, flags, _ = sock.recvmsg(HEADER_SIZE, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
    fds = _fds_from(ancdata)
    try:
        if not data:
            raise ConnectionClosed("peer closed the connection")
        if flags & socket.MSG_CTRUNC:
            raise ConnectionClosed(f"more than {MAX_FDS} fds attached to one message")
        if len(data) < HEADER_SIZE:
            data += recv_exact(sock, HEADER_SIZE - len(data))
        try:
            request, msg_flags, size = parse_header(data)
        except ProtocolError as exc:
            raise ConnectionClosed(str(exc)) from exc
        payload = recv_exact(sock, size) if size else b""
    except BaseException:
        _close_all(fds)
        raise
    return Message(request, msg_flags, payload), fds


def send_message(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    """Send one whole message (header already included), with fds if any."""
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], anc)
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)
