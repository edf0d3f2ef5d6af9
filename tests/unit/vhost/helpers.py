"""Shared helpers for the vhost tests: sessions over a real socket, waits with deadlines, checks.

Everything here waits with a deadline and fails loudly: a backend that stops answering must turn
into a failed test within seconds, never a hung CI job.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from vhost import messages as m
from vhost.messages import ProtocolFeature, Request, VirtioFeature
from vhost_frontend import DriverQueue, Frontend, FrontendMemory
from vhost_frontend.packed import PackedDriverQueue

#: Socket timeout of every test frontend: a reply that does not come fails the test.
SOCKET_TIMEOUT = 5.0
#: How long to wait for anything asynchronous (a completion, a worker noticing a bad ring).
WAIT = 5.0

MiB = 1 << 20
#: Two adjacent regions with non-zero, non-page-aligned mmap offsets, and one more after a hole.
#: The offsets are also not 16-byte aligned, so rings placed in them (at aligned guest addresses)
#: sit at unaligned frontend addresses.
ODD_LAYOUT = ((0, 2 * MiB, 12345), (2 * MiB, MiB, 4096 + 4001), (8 * MiB, MiB, 3 * 4096 + 7))


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def fd_count() -> int:
    """Open fds of this process (the daemon runs in it, on a thread)."""
    return len(os.listdir("/proc/self/fd"))


def memfd_mappings() -> int:
    """Mappings of guest-RAM memfds in this process (frontend's and backend's alike)."""
    with open("/proc/self/maps") as f:
        return sum("memfd:guest-ram" in line for line in f)


def worker_threads() -> list[threading.Thread]:
    """Live queue worker threads (named ``vq<index>`` by QueueWorker)."""
    return [t for t in threading.enumerate() if t.name.startswith("vq") and t.is_alive()]


def wait_readable(fd: int, timeout: float = WAIT) -> bool:
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready)


def wait_err(q: DriverQueue | PackedDriverQueue, timeout: float = WAIT) -> None:
    """Wait for the backend to signal the queue's err eventfd."""
    if not wait_readable(q.err_fd, timeout):
        pytest.fail(f"queue {q.index}: err eventfd not signalled within {timeout} s")
    assert q.err_signalled()


def assert_closed_by_peer(fe: Frontend, timeout: float = WAIT) -> None:
    """The backend hung up on ``fe``: the next read is EOF (or a reset), not a timeout."""
    fe.sock.settimeout(timeout)
    try:
        data = fe.sock.recv(1)
    except ConnectionResetError:
        return
    except TimeoutError:
        pytest.fail("the backend kept the connection open")
    assert data == b"", f"unexpected bytes from the backend: {data!r}"


def errors_logged(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.ERROR) -> list:
    return [r for r in caplog.records if r.levelno >= level and text in r.getMessage()]


def tracebacks(caplog: pytest.LogCaptureFixture, stderr: str = "") -> list[str]:
    """Every traceback logged in this process (records with exc_info) or written to ``stderr``
    (what the queue processes, which log to the stderr they inherit, wrote)."""
    found = [r.getMessage() for r in caplog.records if r.exc_info]
    if "Traceback" in stderr:
        found.append(stderr)
    return found


def warnings_since(caplog: pytest.LogCaptureFixture, start: int) -> list[str]:
    """Messages of WARNING and above logged since record number ``start``."""
    return [r.getMessage() for r in caplog.records[start:] if r.levelno >= logging.WARNING]


class Session:
    """One test frontend with its guest memory; closed (both) by :meth:`close`."""

    def __init__(self, path: os.PathLike[str] | str,
                 layout: Sequence[tuple[int, int, int]] = ((0, 4 * MiB, 0),)) -> None:
        self.mem = FrontendMemory(layout)
        self.fe = Frontend(path, timeout=SOCKET_TIMEOUT)

    def start(self, features: int | None = None, protocol: ProtocolFeature | None = None,
              mem_table: bool = True) -> Session:
        """Negotiate (everything offered unless told) and send the memory table."""
        self.fe.negotiate(features, protocol)
        if mem_table:
            self.fe.set_mem_table(self.mem)
        return self

    def queue(self, index: int = 0, size: int = 16, **kw: Any) -> DriverQueue:
        return self.fe.setup_queue(index, size, **kw)

    def echo(self, q: DriverQueue | PackedDriverQueue, data: bytes = b"hello, vhost", *,
             indirect: bool = False, region: int | None = None) -> None:
        """One request through the echo device; checks the completion and the echoed bytes."""
        mem = self.mem
        src = mem.alloc(len(data), region=region)
        dst = mem.alloc(len(data), region=region)
        mem.write(src, data)
        head = self.fe.submit(q, [(src, len(data), False), (dst, len(data), True)], indirect)
        assert q.wait_used(1, WAIT) == [(head, len(data))]
        assert mem.read(dst, len(data)) == data.upper()

    def close(self) -> None:
        self.fe.close()
        self.mem.close()


@contextmanager
def session(path: os.PathLike[str] | str, **kw: Any) -> Iterator[Session]:
    s = Session(path, **kw)
    try:
        yield s
    finally:
        s.close()


def wait_disconnected(running: Any, timeout: float = WAIT) -> None:
    """Wait until the daemon has dropped its frontend (and cleaned it up)."""
    wait_for(lambda: running.daemon._conn is None and running.daemon.handler is None,
             "the daemon to drop the frontend", timeout)


def assert_fresh_frontend_works(running: Any, num_queues: int = 1) -> None:
    """The daemon survived: after the current frontend is gone, a new one negotiates and echoes."""
    assert running.thread.is_alive(), "the daemon thread died"
    wait_disconnected(running)
    with session(running.path) as s:
        s.start()
        for i in range(num_queues):
            s.echo(s.queue(i, 8))


def backend_vq(running: Any, index: int) -> Any:
    """The backend's SplitQueue of queue ``index`` while it runs (None otherwise)."""
    handler = running.daemon.handler
    if handler is None:
        return None
    worker = handler.vrings[index].worker
    return None if worker is None else worker.vq


def ack_of(fe: Frontend, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
    """Send ``request`` with NEED_REPLY and return the ack's u64 status."""
    fe.send(request, payload, fds, flags=m.VERSION | m.FLAG_NEED_REPLY)
    code, _, reply = fe.recv()
    assert code == request, f"ack for {code}, want {request}"
    assert len(reply) == 8, f"ack payload {reply!r}"
    return struct.unpack("<Q", reply)[0]


def assert_refused(fe: Frontend, caplog: pytest.LogCaptureFixture, request: int,
                   payload: bytes = b"", fds: Sequence[int] = ()) -> None:
    """``request`` is answered with a failure ack and a warning naming it."""
    before = len(caplog.records)
    status = ack_of(fe, request, payload, fds)
    assert status != 0, f"request {request} was accepted"
    try:
        name = Request(request).name
    except ValueError:
        name = f"request {request}"
    new = caplog.records[before:]
    assert any(f"refused {name}" in r.getMessage() for r in new), \
        f"no 'refused {name}' log line in {[r.getMessage() for r in new]}"


def all_features_but(*bits: int) -> int:
    """Everything the echo device offers minus ``bits``."""
    offered = (1 << 5) | int(VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC
                             | VirtioFeature.RING_EVENT_IDX | VirtioFeature.PROTOCOL_FEATURES)
    for bit in bits:
        offered &= ~int(bit)
    return offered


def socketpair_fd() -> tuple[int, socket.socket]:
    """An fd to pass as a backend request channel; the other end is returned to close."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = a.detach()
    return fd, b
