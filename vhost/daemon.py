"""Listen on a Unix socket, serve one frontend at a time, and listen again when it goes.

The control thread (the caller of :meth:`VhostUserDaemon.serve_forever`) only ever waits in
``select`` for a message, a new connection or a stop request; IO happens on the queue workers.
A frontend that disconnects -- cleanly, by crashing, or because it broke the protocol -- has its
queues drained and stopped, its fds closed and its memory unmapped, and the next frontend (a
restarted QEMU) is accepted on the same socket.  A second frontend arriving while one is served is
told no by closing its connection, with a log line (for the 1st, 2nd, 4th... such refusal, so a
flood of them cannot flood the log).  When accepting fails (EMFILE: no fd left) the listener is
left alone for a growing delay (:class:`AcceptBackoff`) rather than retried in a busy loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vhost.connection import ConnectionClosed, recv_message, send_message
from vhost.device import Device
from vhost.handler import BackendHandler, WorkerFactory
from vhost.runner.pool import QueueProcessError
from vhost.runner.thread import QueueWorker

log = logging.getLogger(__name__)

#: How long one message may take to arrive once its first byte has (QEMU sends each message
#: with one sendmsg; a peer that stalls mid-message is dropped after this).
MESSAGE_TIMEOUT = 10.0


class QueueStateError(Exception):
    """A queue's state could not be read (its process did not answer in time)."""


class DaemonError(Exception):
    """The daemon cannot start (socket in use, bad fd...); the message says why."""


class AcceptBackoff:
    """``accept()`` on a listening socket that stops asking while accepting fails.

    When accept fails with EMFILE/ENFILE (no fd for the new connection) the connection stays
    queued and the listener stays readable: a loop that logs and retries at once spins a core
    and writes a line per turn (tens of millions were seen).  After a failure the caller stops
    watching the listener for a delay that doubles from :attr:`MIN_DELAY` to :attr:`MAX_DELAY`
    while failures go on, and resets once a connection is accepted.  Any accept error backs off
    the same way: a per-connection one (ECONNABORTED) costs one short delay, an unknown
    persistent one cannot spin.

    Logging is limited here rather than by ``blockdev.ratelimit`` (vhost/ sits below it):
    one warning when a run of failures starts -- at most one per :attr:`LOG_INTERVAL`, later
    runs are counted into the next -- and one line when accepting works again.
    """

    MIN_DELAY = 0.01
    MAX_DELAY = 1.0
    LOG_INTERVAL = 60.0

    def __init__(self, what: str, logger: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.log = logger or log
        self._clock = clock
        self._delay = 0.0
        self._resume_at = 0.0
        self._failures = 0  # in the current run
        self._run_logged = False
        self._last_warning = -self.LOG_INTERVAL
        self._unlogged_runs = 0
        #: accept() failures in all, for tests and statistics.
        self.total_failures = 0

    @property
    def waiting(self) -> bool:
        """True while the listener should not be watched."""
        return self._clock() < self._resume_at

    def timeout(self) -> float | None:
        """Seconds until the listener is to be watched again (None when it is watched)."""
        left = self._resume_at - self._clock()
        return left if left > 0 else None

    def accept(self, listener: socket.socket) -> socket.socket | None:
        """A new connection, or None (none waiting, or accepting failed: back off)."""
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self._failed(exc)
            return None
        if self._failures:
            if self._run_logged:
                self.log.info("%s: accepting again after %d failed attempts", self.what,
                              self._failures)
            self._failures = 0
            self._delay = 0.0
        return conn

    def _failed(self, exc: OSError) -> None:
        self.total_failures += 1
        self._failures += 1
        self._delay = min(self.MAX_DELAY, max(self.MIN_DELAY, self._delay * 2))
        now = self._clock()
        self._resume_at = now + self._delay
        if self._failures > 1:
            return
        if now - self._last_warning >= self.LOG_INTERVAL:
            earlier = (f" ({self._unlogged_runs} earlier runs of failures not logged)"
                       if self._unlogged_runs else "")
            self.log.warning("%s: accept failed: %s; retrying with backoff up to %.0f s%s",
                             self.what, exc.strerror or exc, self.MAX_DELAY, earlier)
            self._last_warning = now
            self._unlogged_runs = 0
            self._run_logged = True
        else:
            self._unlogged_runs += 1
            self._run_logged = False


def _check_listening_unix(sock: socket.socket) -> None:
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise DaemonError(f"fd {sock.fileno()} is not a Unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise DaemonError(f"fd {sock.fileno()} is not listening")


def bind_unix_socket(path: str | os.PathLike[str], mode: int = 0o600) -> socket.socket:
    """A listening Unix socket at ``path`` with file mode ``mode``.

    A stale socket file (nobody listening) is replaced; a live one, or a path that is not a
    socket, is a :class:`DaemonError` -- two servers on one path would steal each other's
    frontends.
    """
    path = Path(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise DaemonError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise DaemonError(f"{path}: {exc.strerror}") from exc
            path.unlink(missing_ok=True)
        else:
            raise DaemonError(f"{path} is in use by another server")
        finally:
            probe.close()
    # The socket is bound and listening under a temporary name and only then linked to
    # ``path``: whoever waits for the file to appear (QEMU, a test, a unit's ExecStartPost)
    # can connect at once, never between bind() and listen().
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        staging.unlink(missing_ok=True)
        sock.bind(str(staging))
        os.chmod(staging, mode)
        sock.listen(4)
        os.link(staging, path)
    except FileExistsError:
        sock.close()
        raise DaemonError(f"{path} is in use by another server") from None
    except OSError as exc:
        sock.close()
        raise DaemonError(f"cannot bind {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
        staging.unlink(missing_ok=True)
    return sock


class VhostUserDaemon:
    """Serves ``device`` to vhost-user frontends on one listening socket."""

    def __init__(
        self,
        device: Device,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        listen_fd: int | None = None,
        socket_mode: int = 0o600,
        worker_factory: WorkerFactory = QueueWorker,
    ) -> None:
        if (socket_path is None) == (listen_fd is None):
            raise DaemonError("give exactly one of a socket path and a listening fd")
        self.device = device
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.worker_factory = worker_factory
        if listen_fd is not None:
            if listen_fd < 0:
                raise DaemonError(f"fd {listen_fd} is not a file descriptor")
            try:
                sock = socket.socket(fileno=listen_fd)
            except OSError as exc:
                raise DaemonError(f"fd {listen_fd}: {exc.strerror}") from exc
            _check_listening_unix(sock)
            self._listener = sock
            self._owns_path = False
        else:
            assert socket_path is not None  # exactly one of the two, checked above
            self._listener = bind_unix_socket(socket_path, socket_mode)
            self._owns_path = True
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._conn: socket.socket | None = None
        self.handler: BackendHandler | None = None
        self.connections = 0
        self.rejected = 0
        self._backoff = AcceptBackoff("vhost-user socket")

    @property
    def address(self) -> str:
        """Where frontends connect: the socket path, or ``fd N`` for an inherited socket."""
        if self.socket_path is not None:
            return str(self.socket_path)
        return f"fd {self._listener.fileno()}"

    # ------------------------------------------------------------------ control
    def shutdown(self) -> None:
        """Make serve_forever return; safe from a signal handler or another thread."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._stop_w, b"x")

    def serve_forever(self) -> None:
        """Accept frontends and serve their messages until :meth:`shutdown`."""
        try:
            while True:
                watch = [self._stop_r, *self.watched()]
                try:
                    ready, _, _ = select.select(watch, [], [], self.timeout())
                except InterruptedError:
                    continue
                if self._stop_r in ready:
                    break
                self.handle_ready(set(ready))
        finally:
            self._drop_connection("server stopping")

    # A server of several exports runs one loop for all of them (storage_daemon.exports):
    # it watches every daemon's fds and hands each the ones that are ready.
    def watched(self) -> list[int]:
        """The fds this daemon wants watched for reading now (listener, connection)."""
        watch = []
        if not self._backoff.waiting:
            watch.append(self._listener.fileno())
        if self._conn is not None:
            watch.append(self._conn.fileno())
        return watch

    def timeout(self) -> float | None:
        """Seconds until the listener is to be watched again (None: nothing to wait for)."""
        return self._backoff.timeout()

    def handle_ready(self, ready: set[int]) -> None:
        """Serve whatever of this daemon's fds is in ``ready`` (a message, a connection)."""
        if self._conn is not None and self._conn.fileno() in ready:
            self._serve_one()
        if self._listener.fileno() in ready:
            self._accept()

    def disconnect(self, why: str) -> None:
        """Drop the frontend (its queues drained and stopped); the listener stays."""
        self._drop_connection(why)

    def close(self) -> None:
        """Close the listening socket (removing the socket file we made) and the stop pipe."""
        self._drop_connection("server closing")
        self._listener.close()
        if self._owns_path and self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # ------------------------------------------------------------------ for other threads
    @property
    def connected(self) -> bool:
        """A frontend is connected (a snapshot: it may go at any moment)."""
        return self._conn is not None

    def in_use(self) -> bool:
        """A frontend is connected and has not hung up: what ``block-export-del`` in safe
        mode refuses to cut off.

        :attr:`connected` stays true until the serving loop has torn the connection down,
        which stops the queue processes and can take a while; a frontend that has already
        closed its socket (QEMU after ``device_del`` and ``chardev-remove``) is gone from
        the moment the kernel says so, and deleting its export then loses nothing.  A poll
        with no timeout from another thread: it reads the socket's state, never its data.
        """
        conn = self._conn
        if conn is None:
            return False
        try:
            fd = conn.fileno()
        except OSError:
            return False
        if fd < 0:  # closed by the loop meanwhile
            return False
        poller = select.poll()
        poller.register(fd, select.POLLRDHUP)
        hung_up = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
        return not any(events & hung_up for _, events in poller.poll(0))

    def in_flight(self) -> list[int]:
        """Requests in flight per queue (0 for a queue not running), read without locks."""
        handler = self.handler
        counts = [0] * self.device.num_queues
        if handler is None:
            return counts
        for vring in list(handler.vrings):
            worker = vring.worker
            if worker is not None and vring.index < len(counts):
                counts[vring.index] = worker.vq.in_flight_count
        return counts

    def queue_states(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        """Each queue's state for a diagnostics query: what the frontend set (enabled, the
        base to start from) and, for a running queue, its ring state as its worker sees it
        (:meth:`vhost.queue.split.SplitQueue.ring_state`).

        Read from another thread without the control thread's help, so a snapshot: a queue
        that stops meanwhile reports ``stopped meanwhile``.  :class:`QueueStateError` if a
        queue process does not answer within ``timeout`` (never a hang).
        """
        handler = self.handler
        if handler is None:
            return []
        states: list[dict[str, Any]] = []
        for vring in list(handler.vrings):
            state: dict[str, Any] = {"index": vring.index, "enabled": vring.enabled,
                                     "running": vring.worker is not None,
                                     "broken": vring.broken, "base": vring.base,
                                     "size": vring.size}
            worker = vring.worker
            if worker is not None:
                try:
                    state.update(worker.ring_state(timeout))
                except ValueError:  # released: the queue stopped while we looked
                    state["running"] = False
                    state["note"] = "stopped meanwhile"
                except QueueProcessError as exc:
                    raise QueueStateError(str(exc)) from exc
            states.append(state)
        return states

    def notify_config_change(self) -> bool:
        """Tell the connected frontend the device's config space changed.

        False when nobody is connected or the frontend has no backend request channel (it reads
        the new config when it next connects).  Called from any thread: the backend channel is
        a socket of its own, so this does not race the control thread.
        """
        handler = self.handler
        return handler is not None and handler.notify_config_change()

    # ------------------------------------------------------------------ connections
    def _accept(self) -> None:
        conn = self._backoff.accept(self._listener)
        if conn is None:
            return
        if self._conn is not None:
            self.rejected += 1
            if self.rejected & (self.rejected - 1) == 0:  # 1st, 2nd, 4th...: a flood logs little
                log.warning("refused a second frontend: one is already connected (%d refused "
                            "so far)", self.rejected)
            conn.close()
            return
        conn.settimeout(MESSAGE_TIMEOUT)
        self._conn = conn
        self.handler = BackendHandler(self.device, self.worker_factory)
        self.connections += 1
        log.info("frontend connected (connection %d)", self.connections)

    def _serve_one(self) -> None:
        assert self._conn is not None and self.handler is not None
        fds: list[int] = []
        try:
            message, fds = recv_message(self._conn)
            log.debug("<- %s flags %#x size %d fds %d", message.name, message.flags,
                      len(message.payload), len(fds))
            result = self.handler.handle(message, fds)
            try:
                if result.reply is not None:
                    send_message(self._conn, result.reply, result.reply_fds)
            finally:
                for fd in result.reply_fds:  # the peer has its own copies now
                    os.close(fd)
            if result.disconnect:
                self._drop_connection("protocol error")
        except ConnectionClosed as exc:
            self._drop_connection(str(exc))
        except OSError as exc:
            self._drop_connection(f"socket error: {exc}")
        except Exception:
            log.exception("internal error while handling a message; dropping the frontend")
            self._drop_connection("internal error")
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _drop_connection(self, why: str) -> None:
        if self._conn is None:
            return
        log.info("frontend disconnected: %s", why)
        try:
            if self.handler is not None:
                self.handler.close()
        except Exception:
            log.exception("error while cleaning up the connection")
        finally:
            self.handler = None
            self._conn.close()
            self._conn = None
