"""Issue 25: what a socket-level fuzzer found a hostile frontend could do to a queue.

Each case is played against a server whose queues run on threads (one queue) and one whose
queues run in processes of their own (two queues, the queue-process mode).  In both, the bad
input is refused at the message that carries it -- or, for the in-flight area's contents, at
queue start -- with one log line and the protocol's answer (a failed REPLY_ACK, the err eventfd),
never a traceback and never a queue process exiting non-zero; and the next frontend is served.
"""

from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.unit.vhost.devices import ProcessEchoDevice
from tests.unit.vhost.helpers import (
    WAIT,
    Session,
    assert_fresh_frontend_works,
    assert_refused,
    tracebacks,
    wait_disconnected,
    wait_err,
    warnings_since,
)
from tests.unit.vhost.test_inflight import MAX_COUNTER, RegionFields, write_region
from tests.vhost_devices import EchoDevice
from vhost import messages as m
from vhost.messages import Request, VirtioFeature
from vhost.queue import inflight as inf
from vhost_frontend import DriverQueue
from vhost_frontend.errors import FrontendError

SIZE = 8
MODES = ["threads", "processes"]


@dataclass
class Server:
    """A running server, a negotiated session on it, and what its queue processes did."""

    running: Any
    s: Session
    num_queues: int
    spawned: list[subprocess.Popen[bytes]]
    capfd: pytest.CaptureFixture[str]
    caplog: pytest.LogCaptureFixture

    def driver_queue(self, index: int = 0) -> DriverQueue:
        """A ring for queue ``index``, laid out but not yet handed to the backend."""
        q = DriverQueue(self.s.mem, index, SIZE,
                        bool(self.s.fe.features & VirtioFeature.RING_EVENT_IDX))
        q.start_at(0)
        return q

    def finish(self) -> None:
        """The frontend goes; the next one is served; nothing died or logged a traceback."""
        self.s.close()
        wait_disconnected(self.running)
        assert_fresh_frontend_works(self.running, self.num_queues)
        wait_disconnected(self.running)
        for proc in self.spawned:
            assert proc.wait(WAIT) == 0, f"queue process {proc.pid} exited {proc.returncode}"
        stderr = self.capfd.readouterr().err
        assert tracebacks(self.caplog, stderr) == []


@pytest.fixture(params=MODES)
def server(request: pytest.FixtureRequest, serve: Any, spawned: list[subprocess.Popen[bytes]],
           capfd: pytest.CaptureFixture[str],
           caplog: pytest.LogCaptureFixture) -> Iterator[Server]:
    if request.param == "threads":
        device: EchoDevice = EchoDevice(num_queues=1)
    else:
        device = ProcessEchoDevice(num_queues=2)
    running = serve(device)
    s = Session(running.path)
    try:
        s.start()
        yield Server(running, s, device.num_queues, spawned, capfd, caplog)
    finally:
        s.close()


def _inflight_area(srv: Server) -> tuple[int, int, mmap.mmap]:
    """GET_INFLIGHT_FD for every queue: (fd, size, mapping), to be filled by the test."""
    fd, size = srv.s.fe.get_inflight_fd(srv.num_queues, SIZE)
    return fd, size, mmap.mmap(fd, size)


def _request(srv: Server, q: DriverQueue, text: bytes) -> tuple[int, int]:
    """A 16-byte echo request made available on ``q`` (not kicked); (head, dst)."""
    mem = srv.s.mem
    src, dst = mem.alloc(16), mem.alloc(16)
    mem.write(src, text)
    return q.add_chain([(src, 16, False), (dst, 16, True)]), dst


# ---------------------------------------------------------------------------- case 1


def test_inflight_counter_at_its_maximum(server: Server) -> None:
    """A head in flight with counter 2**64-1 is resubmitted and served, and the queue goes on
    (it used to stop the queue with a struct.error traceback)."""
    srv, fe, mem = server, server.s.fe, server.s.mem
    fd, size, area = _inflight_area(srv)
    try:
        q = srv.driver_queue()
        head, dst = _request(srv, q, b"counter-at-max!!")
        write_region(memoryview(area)[: inf.queue_stride(SIZE)], SIZE,
                     entries={head: (1, inf.NO_HEAD, MAX_COUNTER, bytes(5))})
        fe.set_inflight_fd(fd, size, srv.num_queues, SIZE)
        # The backend "restarted": avail.idx is 1 and the request is marked in flight.
        fe.restart_queue(q, base=0)
        assert q.wait_used(1, WAIT) == [(head, 16)]
        assert mem.read(dst, 16) == b"COUNTER-AT-MAX!!"
        src2, dst2 = mem.alloc(16), mem.alloc(16)
        mem.write(src2, b"and-the-next-one")
        head2 = fe.submit(q, [(src2, 16, False), (dst2, 16, True)])
        assert q.wait_used(1, WAIT) == [(head2, 16)]
        assert fe.get_vring_base(0) == 2
        assert not q.err_signalled()
    finally:
        area.close()
        os.close(fd)
    srv.finish()


# ---------------------------------------------------------------------------- case 2


def test_kick_fd_that_epoll_cannot_watch(server: Server) -> None:
    """SET_VRING_KICK with a memfd is refused with a failed ack (it used to be acknowledged and
    the worker's epoll registration failed with a traceback); a proper kick fd then works."""
    srv, fe = server, server.s.fe
    memfd = os.memfd_create("not-a-kick-fd", os.MFD_CLOEXEC)
    try:
        start = len(srv.caplog.records)
        assert_refused(fe, srv.caplog, Request.SET_VRING_KICK, m.u64(0), [memfd])
        lines = warnings_since(srv.caplog, start)
        assert len(lines) == 1 and "not an eventfd" in lines[0], lines
    finally:
        os.close(memfd)
    assert srv.running.daemon.handler.vrings[0].kick_fd is None
    srv.s.echo(srv.s.queue(0, SIZE))
    srv.finish()


# ---------------------------------------------------------------------------- case 3


def test_inflight_fd_that_is_an_eventfd_with_a_huge_size(server: Server) -> None:
    """SET_INFLIGHT_FD with an eventfd and mmap_size 2**63 is refused (mmap used to raise
    OverflowError and the frontend was dropped with a traceback)."""
    srv, fe = server, server.s.fe
    ev = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        start = len(srv.caplog.records)
        assert_refused(fe, srv.caplog, Request.SET_INFLIGHT_FD,
                       m.inflight(1 << 63, 0, srv.num_queues, SIZE), [ev])
        lines = warnings_since(srv.caplog, start)
        assert len(lines) == 1 and "not a file that can be mapped" in lines[0], lines
    finally:
        os.close(ev)
    assert srv.running.daemon.handler.inflight is None
    srv.s.echo(srv.s.queue(0, SIZE))  # the connection goes on
    srv.finish()


# ---------------------------------------------------------------------------- case 4

BAD_AREAS: dict[str, tuple[RegionFields, str]] = {
    "version": ({"version": 9}, "version 9"),
    "entry-count": ({"desc_num": SIZE * 2}, f"of {SIZE * 2} entries"),
    "used-index": ({"used_idx": 0x8000}, "past the tracked"),
    "counter-padding": ({"entries": {0: (1, inf.NO_HEAD, 0, b"\xff" * 5)}}, "padding"),
}


@pytest.mark.parametrize("case", list(BAD_AREAS))
def test_invalid_inflight_area_refused_at_queue_start(server: Server, case: str) -> None:
    """The queue does not start: its SET_VRING_ENABLE fails, its err eventfd is signalled,
    one log line says why -- and in queue-process mode no process is started for it (one used
    to start, log an InflightError traceback and exit 1)."""
    srv, fe = server, server.s.fe
    fields, why = BAD_AREAS[case]
    fd, size, area = _inflight_area(srv)
    try:
        write_region(memoryview(area)[: inf.queue_stride(SIZE)], SIZE, **fields)
        fe.set_inflight_fd(fd, size, srv.num_queues, SIZE)
        q = srv.driver_queue()
        start = len(srv.caplog.records)
        with pytest.raises(FrontendError, match="SET_VRING_ENABLE failed"):
            fe.restart_queue(q, base=0)
        wait_err(q)
        lines = warnings_since(srv.caplog, start)
        assert len(lines) == 1, lines
        assert "refused SET_VRING_ENABLE: queue 0 cannot start" in lines[0] and why in lines[0]
        assert not srv.running.daemon.handler.vrings[0].running
        assert srv.spawned == []
    finally:
        area.close()
        os.close(fd)
    srv.finish()


# ---------------------------------------------------------------------------- case 5

#: The largest count an eventfd holds; a write to a blocking eventfd at it waits for a read.
EVENTFD_FULL = 0xFFFF_FFFF_FFFF_FFFE


def test_call_eventfd_left_full_and_blocking(server: Server) -> None:
    """A frontend hands over a blocking call eventfd whose count it left at the maximum: the
    server's write to it must not block (found by fuzzing: the worker hung in the write, and
    the control thread with it at the next GET_VRING_BASE)."""
    srv, fe, mem = server, server.s.fe, server.s.mem
    q = srv.driver_queue()
    os.close(q.call_fd)
    q.call_fd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, as a careless frontend makes it
    os.eventfd_write(q.call_fd, EVENTFD_FULL)
    fe.restart_queue(q, base=0)
    src, dst = mem.alloc(16), mem.alloc(16)
    mem.write(src, b"full-call-fd-ok!")
    fe.submit(q, [(src, 16, False), (dst, 16, True)])
    # Not q.wait_used: it reads the call fd, which would unblock a stuck writer.
    deadline = time.monotonic() + WAIT
    while q.used_idx() != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert q.used_idx() == 1
    assert mem.read(dst, 16) == b"FULL-CALL-FD-OK!"
    assert fe.get_vring_base(0) == 1  # the worker stopped: it is not stuck in the write
    assert os.eventfd_read(q.call_fd) == EVENTFD_FULL
    srv.finish()


def test_queue_process_refusing_a_start_exits_cleanly() -> None:
    """The control process checks the in-flight area before it spawns a queue process, but the
    area is shared with the frontend, which may change it in between: the process then
    refuses the start with one line and the reason, and exits 0 (it used to log an
    InflightError traceback and exit 1)."""
    from vhost.runner.base import QueueKey
    from vhost.runner.ipc import CounterBlock, Error, Start, receive, send

    region = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(region, 1 << 16)
    area_fd, area_size = inf.create_area(1, SIZE)
    with mmap.mmap(area_fd, area_size) as area:
        write_region(memoryview(area)[: inf.queue_stride(SIZE)], SIZE, version=9)
    notifiers = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3)]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([sys.executable, "-m", "vhost.runner.process", str(theirs.fileno())],
                            pass_fds=[theirs.fileno()], stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[3],
                            env={**os.environ, "VHOST_QUEUEPROC_LOG_LEVEL": "30"})  # warnings
    try:
        theirs.close()
        start = Start(key=QueueKey(0, 0), size=SIZE,
                      ring_uaddrs=(0x7000_1000, 0x7000_2000, 0x7000_3000),
                      features=int(VirtioFeature.VERSION_1), base=0,
                      regions=[(0, 1 << 16, 0x7000_0000, 0)],
                      inflight=(area_size, 0, 1, SIZE),
                      recipe=("tests.unit.vhost.devices:rebuild_echo", {"num_queues": 1}),
                      state={}, log=None, log_call=False, log_addr=None, counter_slots=0)
        counters, counters_fd = CounterBlock.create(0)
        send(ours, start, [*notifiers, counters_fd, region, area_fd])
        os.close(counters_fd)
        counters.close()
        ours.settimeout(20)
        reply, fds = receive(ours)
        assert not fds
        assert isinstance(reply, Error) and "version 9" in reply.why
        assert proc.wait(20) == 0
        assert proc.stderr is not None
        lines = proc.stderr.read().decode().splitlines()
        assert len(lines) == 1 and "queue 0 refused to start" in lines[0], lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        ours.close()
        for fd in (*notifiers, region, area_fd):
            os.close(fd)
