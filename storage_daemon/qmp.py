"""The QMP server: a Unix socket (mode 0600), up to :data:`MAX_CLIENTS` clients, one thread.

The thread waits in a selector on the listening socket, its clients and a wake-up pipe; each
client has a :class:`~.protocol.JsonStream` for what it sends and a :class:`~.protocol.QmpSession`
that turns it into replies (commands run on this thread, one at a time, as in QEMU's monitor).
Output is buffered per client and written as the socket takes it, so a client that stops reading
holds up nobody; one that lets more than :data:`MAX_OUTPUT` pile up is dropped.  A client that
disconnects mid-command just has its reply discarded.

No client can end the server: a command that fails unexpectedly is an error reply (the
session's catch-all), and whatever else goes wrong while serving one client drops that client
only.  Clients beyond :data:`MAX_CLIENTS` get one error object --
``{"error": {"class": "GenericError", "desc": "too many QMP clients ..."}}`` -- and are closed:
QEMU's monitor serves one client and leaves the next waiting in the backlog, but here a
waiting client would hold an fd and learn nothing; the error says why at once, in the shape
every QMP client parses.  A client that has not finished capability negotiation within
:data:`HANDSHAKE_TIMEOUT` is dropped, so idle or half-open connections cannot keep the slots.
When accepting fails (EMFILE: out of fds) the listener is left alone for a growing delay
(:class:`vhost.daemon.AcceptBackoff`) instead of being retried at once.

Events (:meth:`QmpServer.emit`) may come from any thread; they go to every client that finished
capability negotiation.  :meth:`QmpServer.stop` sends the final events, flushes what it can
within a second, closes the clients and removes the socket file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import selectors
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blockdev.ratelimit import RateLimitedLog
from storage_daemon.qmp_protocol import (
    Execute,
    JsonStream,
    QmpSession,
    encode,
    event,
    internal_error_log,
)
from vhost.daemon import AcceptBackoff, bind_unix_socket

log = logging.getLogger(__name__)

#: Output a client may leave unread before it is dropped.
MAX_OUTPUT = 4 << 20
#: How long stop() keeps flushing output to slow clients.
FLUSH_TIMEOUT = 1.0
#: Clients served at once (QEMU's monitor: one; libvirt, a metrics agent and an operator's
#: qmp-shell fit with room to spare).
MAX_CLIENTS = 8
#: Time from connecting to the end of capability negotiation.
HANDSHAKE_TIMEOUT = 10.0


class _Client:
    def __init__(self, sock: socket.socket, session: QmpSession, number: int,
                 deadline: float) -> None:
        self.sock = sock
        self.session = session
        self.number = number
        self.stream = JsonStream()
        self.out = bytearray()
        self.deadline = deadline  # for capability negotiation


class QmpServer:
    """Serves QMP on ``path`` until :meth:`stop`."""

    def __init__(self, path: str | os.PathLike[str], execute: Execute,
                 version: dict[str, Any], *, max_clients: int = MAX_CLIENTS,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.path = Path(path)
        self.execute = execute
        self.version = version
        self.max_clients = max_clients
        self.handshake_timeout = handshake_timeout
        self.refused = 0
        self._errors = internal_error_log()
        self._refusals = RateLimitedLog(log, burst=3, interval=60.0)
        self._backoff = AcceptBackoff("QMP socket", log)
        self._listening = True
        self._listener = bind_unix_socket(self.path, 0o600)  # DaemonError if it cannot
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._clients: dict[int, _Client] = {}
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._closed = False
        self._accepted = 0
        self._thread = threading.Thread(target=self._run, name="qmp", daemon=True)

    @property
    def clients(self) -> int:
        return len(self._clients)

    def start(self) -> None:
        self._thread.start()

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to every negotiated client (from any thread)."""
        with self._lock:
            self._events.append(event(name, data))
        self._wake()

    def stop(self, final_events: Sequence[tuple[str, dict[str, Any]]] = ()) -> None:
        """Send ``final_events``, flush, close every client and the socket (idempotent)."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._events.extend(event(name, data) for name, data in final_events)
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(FLUSH_TIMEOUT + 5)
        elif not self._thread.is_alive():
            self._close_all()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            while True:
                self._watch_listener()
                for key, mask in self._selector.select(self._timeout()):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    else:
                        self._serve(key.data, mask)
                self._send_events()
                self._expire_handshakes()
                if self._stopping:
                    self._flush_all()
                    break
        except Exception:  # the selector itself failed: nothing left to serve with
            log.exception("QMP server failed; closing it")
        finally:
            self._close_all()

    def _serve(self, client: _Client, mask: int) -> None:
        """One client's events; whatever goes wrong drops that client, not the server."""
        try:
            if mask & selectors.EVENT_READ:
                self._read(client)
            if mask & selectors.EVENT_WRITE and client.number in self._clients:
                self._write(client)
        except Exception:
            self._errors.log(logging.ERROR, "QMP client %d: internal error", client.number,
                             exc_info=True)
            self._drop(client, "internal error")

    def _timeout(self) -> float | None:
        """How long select may sleep: until the listener is due back or a handshake expires."""
        waits = [c.deadline for c in self._clients.values() if not c.session.negotiated]
        left = [w - time.monotonic() for w in waits]
        backoff = self._backoff.timeout()
        if backoff is not None:
            left.append(backoff)
        return max(0.0, min(left)) if left else None

    def _watch_listener(self) -> None:
        """Stop watching the listener while accepting backs off (it stays readable: the
        connection that could not be accepted is still queued), resume after."""
        want = not self._backoff.waiting
        if want == self._listening:
            return
        if want:
            self._selector.register(self._listener, selectors.EVENT_READ, None)
        else:
            self._selector.unregister(self._listener)
        self._listening = want

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        for client in list(self._clients.values()):
            if not client.session.negotiated and now >= client.deadline:
                self._drop(client, f"no capability negotiation within "
                                   f"{self.handshake_timeout:g} s")

    def _accept(self) -> None:
        sock = self._backoff.accept(self._listener)
        if sock is None:
            return
        try:
            self._admit(sock)
        except Exception:
            self._errors.log(logging.ERROR, "QMP: internal error admitting a client",
                             exc_info=True)
            for client in list(self._clients.values()):
                if client.sock is sock:
                    self._drop(client, "internal error")
                    break
            else:
                sock.close()

    def _admit(self, sock: socket.socket) -> None:
        if len(self._clients) >= self.max_clients:
            self._refuse(sock)
            return
        sock.setblocking(False)
        self._accepted += 1
        client = _Client(sock, QmpSession(self.execute, self.version, self._errors),
                         self._accepted, time.monotonic() + self.handshake_timeout)
        self._clients[client.number] = client
        self._selector.register(sock, selectors.EVENT_READ, client)
        log.info("QMP client %d connected", client.number)
        self._queue(client, client.session.greeting())

    def _refuse(self, sock: socket.socket) -> None:
        """One error object (if the socket takes it at once) and close."""
        self.refused += 1
        desc = f"too many QMP clients (at most {self.max_clients} at once); try again later"
        with contextlib.suppress(OSError):
            sock.send(encode({"error": {"class": "GenericError", "desc": desc}}),
                      socket.MSG_DONTWAIT)
        sock.close()
        self._refusals.log(logging.WARNING, "QMP client refused: %d clients connected already "
                           "(%d refused in all)", len(self._clients), self.refused)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(client, str(exc))
            return
        if not data:
            self._drop(client, "disconnected")
            return
        for item in client.stream.feed(data):
            reply = client.session.handle(item)
            if client.number not in self._clients:
                return
            self._queue(client, reply)

    def _queue(self, client: _Client, message: dict[str, Any]) -> None:
        client.out += encode(message)
        if len(client.out) > MAX_OUTPUT:
            self._drop(client, f"more than {MAX_OUTPUT} bytes of output unread")
            return
        self._write(client)

    def _write(self, client: _Client) -> None:
        try:
            while client.out:
                n = client.sock.send(client.out)
                del client.out[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._drop(client, str(exc))
            return
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)
        self._selector.modify(client.sock, mask, client)

    def _send_events(self) -> None:
        with self._lock:
            events, self._events = self._events, []
        for ev in events:
            for client in list(self._clients.values()):
                if client.session.negotiated:
                    self._queue(client, ev)

    def _flush_all(self) -> None:
        """Write pending output (replies, final events) for up to FLUSH_TIMEOUT seconds."""
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while True:
            waiting = {c.sock: c for c in self._clients.values() if c.out}
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                return
            _, writable, _ = select.select([], list(waiting), [], left)
            for sock in writable:
                self._write(waiting[sock])

    def _drop(self, client: _Client, why: str) -> None:
        if self._clients.pop(client.number, None) is None:
            return
        log.info("QMP client %d: %s", client.number, why)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.sock)
        client.sock.close()

    def _close_all(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for client in list(self._clients.values()):
            self._drop(client, "server stopping")
        if self._listener.fileno() >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._listener)
            self._listener.close()
            self.path.unlink(missing_ok=True)
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
