"""The per-queue worker: its loop run directly on a bytearray ring, stopping and draining, the
call/err notifiers, and a device that fails (which must stop its queue only, and quickly)."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from tests.unit.vhost.helpers import (
    WAIT,
    assert_fresh_frontend_works,
    backend_vq,
    errors_logged,
    wait_err,
    wait_for,
    wait_readable,
    worker_threads,
)
from tests.unit.vhost.ring import Ring
from tests.vhost_devices import EchoDevice, EchoHandler
from vhost import messages as m
from vhost.device import QueueHandler
from vhost.messages import Request
from vhost.queue.base import DescriptorChain
from vhost.runner.thread import Notifier, QueueWorker

# ---------------------------------------------------------------------------- Notifier


def test_notifier_signals_replaces_and_closes() -> None:
    first = os.eventfd(0, os.EFD_NONBLOCK)
    second = os.eventfd(0, os.EFD_NONBLOCK)
    spare = os.dup(first)  # to watch the first one after the notifier closed its fd
    try:
        n = Notifier()
        n.signal()  # nobody listens: nothing happens
        assert n.count == 0
        n.replace(first)
        n.signal()
        n.signal()
        assert os.eventfd_read(spare) == 2 and n.count == 2
        n.replace(second)
        with pytest.raises(OSError):
            os.fstat(first)  # the old fd was closed
        n.signal()
        assert os.eventfd_read(second) == 1
        n.close()
        assert n.fd is None
        with pytest.raises(OSError):
            os.fstat(second)
    finally:
        os.close(spare)


# ---------------------------------------------------------------------------- the loop, no socket


class ListHandler(QueueHandler):
    """Completes chains when told to (``finish``), through a completion eventfd."""

    def __init__(self, sync: bool = True) -> None:
        self.sync = sync
        self.completion_fd = None if sync else os.eventfd(0, os.EFD_NONBLOCK)
        self.seen: list[DescriptorChain] = []
        self._done: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self.closed = False

    def submit(self, chain: DescriptorChain) -> int | None:
        self.seen.append(chain)
        return chain.writable_len if self.sync else None

    def finish(self) -> None:
        with self._lock:
            self._done.extend((c.head, 1) for c in self.seen)
        assert self.completion_fd is not None, "finish() completes an asynchronous handler"
        os.eventfd_write(self.completion_fd, 1)

    def reap(self) -> list[tuple[int, int]]:
        with self._lock:
            done, self._done = self._done, []
        return done

    def close(self) -> bool:
        self.closed = True
        if self.completion_fd is not None:
            os.close(self.completion_fd)
        return True


@pytest.fixture
def loop_parts():
    ring = Ring(size=8, features=0)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call_fd = os.eventfd(0, os.EFD_NONBLOCK)
    err_fd = os.eventfd(0, os.EFD_NONBLOCK)
    call, err = Notifier(os.dup(call_fd)), Notifier(os.dup(err_fd))
    yield ring, kick, call_fd, err_fd, call, err
    call.close()
    err.close()
    for fd in (kick, call_fd, err_fd):
        os.close(fd)
    ring.vq.release()


def test_worker_serves_kicks_and_signals_once_per_batch(loop_parts) -> None:
    ring, kick, call_fd, _, call, err = loop_parts
    handler = ListHandler()
    worker = QueueWorker(ring.vq, handler, kick, call, err)
    worker.start()
    try:
        assert worker.alive and any(t.name == "vq0" for t in worker_threads())
        for head in (0, 2, 4):
            ring.simple_chain(head, 4, 8)
        ring.publish(0, 2, 4)
        os.eventfd_write(kick, 1)
        assert wait_readable(call_fd)
        assert os.eventfd_read(call_fd) == 1
        wait_for(lambda: ring.used_idx() == 3, "three completions")
        assert [ring.used_elem(i) for i in range(3)] == [(0, 8), (2, 8), (4, 8)]
        assert worker.batches == 1 and worker.completed == 3
    finally:
        assert worker.stop(WAIT)
    assert not worker.alive and worker._wake_fd == -1


@pytest.mark.parametrize("used_idx", [0, 5])
def test_a_restarted_queue_signals_the_driver_once(used_idx: int) -> None:
    """A backend killed after publishing used entries and before the call leaves the driver
    waiting: a queue started on a ring with used entries signals once (a fresh one does not)."""
    ring = Ring(size=8, features=0, next_avail=used_idx, used_idx=used_idx)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call_fd = os.eventfd(0, os.EFD_NONBLOCK)
    worker = QueueWorker(ring.vq, ListHandler(), kick, Notifier(os.dup(call_fd)))
    worker.start()
    try:
        wait_for(lambda: worker.passes, "the first pass")
        assert wait_readable(call_fd, 0.2) == bool(used_idx)
    finally:
        assert worker.stop(WAIT)
        worker.call.close()
        for fd in (kick, call_fd):
            os.close(fd)
        ring.vq.release()


def test_worker_stop_waits_for_in_flight_requests(loop_parts) -> None:
    ring, kick, call_fd, _, call, err = loop_parts
    handler = ListHandler(sync=False)
    worker = QueueWorker(ring.vq, handler, kick, call, err)
    worker.start()
    ring.simple_chain(0)
    ring.publish(0)
    os.eventfd_write(kick, 1)
    wait_for(lambda: handler.seen, "the request to be in flight")
    threading.Timer(0.05, handler.finish).start()
    t0 = time.monotonic()
    assert worker.stop(WAIT), "stop must report a full drain"
    assert time.monotonic() - t0 >= 0.04
    assert ring.used_idx() == 1 and ring.vq.in_flight_count == 0
    assert os.eventfd_read(call_fd) == 1
    handler.close()


def test_worker_stop_gives_up_on_requests_that_never_finish(loop_parts, caplog) -> None:
    ring, kick, _, _, call, err = loop_parts
    handler = ListHandler(sync=False)
    worker = QueueWorker(ring.vq, handler, kick, call, err)
    worker.drain_timeout = 0.1
    worker.start()
    ring.simple_chain(0)
    ring.publish(0)
    os.eventfd_write(kick, 1)
    wait_for(lambda: handler.seen, "the request to be in flight")
    assert not worker.stop(WAIT)
    assert not worker.alive and ring.vq.in_flight_count == 1
    assert errors_logged(caplog, "still in flight")
    handler.close()


def test_worker_reports_a_ring_violation_on_err(loop_parts, caplog) -> None:
    ring, kick, _, err_fd, call, err = loop_parts
    worker = QueueWorker(ring.vq, ListHandler(), kick, call, err)
    worker.start()
    ring.publish(8)
    os.eventfd_write(kick, 1)
    assert wait_readable(err_fd)
    assert ring.vq.broken and errors_logged(caplog, "queue 0 stopped: avail ring head 8")
    assert worker.stop(WAIT)


def test_worker_with_a_kick_fd_epoll_cannot_watch_stops_with_one_line(loop_parts,
                                                                      caplog) -> None:
    """The handler accepts only eventfds as kick fds; should one that epoll refuses (a memfd:
    EPERM) reach a worker anyway, the queue stops with one log line and its err eventfd --
    not a "worker failed" traceback (issue 25, case 2)."""
    ring, _, _, err_fd, call, err = loop_parts
    memfd = os.memfd_create("not-a-kick-fd", os.MFD_CLOEXEC)
    try:
        worker = QueueWorker(ring.vq, ListHandler(), memfd, call, err)
        worker.start()
        assert wait_readable(err_fd)
        assert worker.stop(WAIT)
    finally:
        os.close(memfd)
    assert ring.vq.broken and "cannot be watched" in str(ring.vq.error)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in lines] == [f"queue 0 stopped: {ring.vq.error}"]
    assert not any(r.exc_info for r in caplog.records)


# ---------------------------------------------------------------------------- a failing device


class FailingHandler(EchoHandler):
    """Raises (a device bug) on a request whose data starts with BOOM."""

    def submit(self, chain: DescriptorChain) -> int:
        if self.memory.read(*chain.readable[0])[:4] == b"BOOM":
            raise RuntimeError("device bug")
        return super().submit(chain)


class FailingDevice(EchoDevice):
    def create_handler(self, queue_index, memory) -> QueueHandler:
        return FailingHandler(self, queue_index, memory)


def test_device_exception_stops_only_its_queue_and_quickly(serve, open_session, caplog) -> None:
    """Regression: the worker waited drain_timeout (30 s) for chains the failed device never
    accepted, stalling GET_VRING_BASE and disconnects; and it did not signal err."""
    running = serve(FailingDevice(num_queues=2))
    s = open_session(running).start()
    q0, q1 = s.queue(0, 8), s.queue(1, 8)
    s.echo(q0)
    src, dst = s.mem.alloc(4), s.mem.alloc(4)
    s.mem.write(src, b"BOOM")
    s.fe.submit(q0, [(src, 4, False), (dst, 4, True)])
    wait_err(q0)
    assert backend_vq(running, 0).broken
    assert errors_logged(caplog, "worker failed")
    assert any(r.exc_info for r in errors_logged(caplog, "worker failed")), "no traceback"
    s.echo(q1)
    t0 = time.monotonic()
    assert s.fe.get_vring_base(0) == 2
    assert time.monotonic() - t0 < 1.0, "GET_VRING_BASE stalled on the failed device"
    s.echo(q1)
    s.close()
    assert_fresh_frontend_works(running, num_queues=2)


# ---------------------------------------------------------------------------- over the socket


def test_call_fd_replaced_while_running(serve, open_session) -> None:
    running = serve(EchoDevice())
    s = open_session(running).start()
    q = s.queue(0, 8)

    def complete_and_wait_call(fd: int) -> None:
        src, dst = s.mem.alloc(4), s.mem.alloc(4)
        s.fe.submit(q, [(src, 4, False), (dst, 4, True)])
        assert wait_readable(fd), "no call"
        assert os.eventfd_read(fd) == 1
        assert len(q.take_used()) == 1  # also moves used_event: the next completion calls

    old = q.call_fd
    complete_and_wait_call(old)
    q.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        s.fe.checked(Request.SET_VRING_CALL, m.u64(0), [q.call_fd])
        complete_and_wait_call(q.call_fd)
        assert s.fe.get_vring_base(0) == 2  # joins the worker: no signal still on its way
        assert not wait_readable(old, 0), "the replaced call fd was signalled"
    finally:
        os.close(old)


def test_disable_waits_for_in_flight_requests_and_enable_continues(serve, open_session) -> None:
    device = EchoDevice(asynchronous=True, delay=0.05)
    running = serve(device)
    s = open_session(running).start()
    q = s.queue(0, 8)
    src, dst = s.mem.alloc(4), s.mem.alloc(4)
    s.mem.write(src, b"slow")
    s.fe.submit(q, [(src, 4, False), (dst, 4, True)])
    wait_for(lambda: device.seen, "the request to be in flight")
    s.fe.checked(Request.SET_VRING_ENABLE, m.vring_state(0, 0))
    assert q.used_idx() == 1 and s.mem.read(dst, 4) == b"SLOW"
    assert len(q.take_used()) == 1
    assert not worker_threads()
    s.fe.checked(Request.SET_VRING_ENABLE, m.vring_state(0, 1))
    s.echo(q)
    assert s.fe.get_vring_base(0) == 2


def test_worker_logs_are_quiet_in_normal_operation(serve, open_session, caplog) -> None:
    running = serve(EchoDevice(num_queues=2))
    s = open_session(running).start()
    for i in range(2):
        s.echo(s.queue(i, 8))
    s.close()
    assert_fresh_frontend_works(running)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
