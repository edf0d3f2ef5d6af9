"""A packed ring across backend crashes (SIGKILL), with the in-flight area: what was in flight
is resubmitted exactly once, and the ring position comes from the area although the frontend's
SET_VRING_BASE is stale -- QEMU 7.2's GET_VRING_BASE failed with the backend gone, so it sends
what it knew before (here: a fresh ring's value every time)."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.unit.vhost.helpers import wait_for
from tests.unit.vhost.test_inflight import start_echo_server
from vhost.messages import ProtocolFeature
from vhost.queue import inflight_packed as infp
from vhost.queue.packed import FRESH_BASE, encode_base
from vhost_frontend import Frontend, FrontendMemory
from vhost_frontend.packed import PackedDriverQueue

SIZE = 16


def connect(sock: Path, mem: FrontendMemory) -> Frontend:
    fe = Frontend(sock, timeout=10)
    fe.negotiate(packed=True)
    assert fe.protocol & ProtocolFeature.INFLIGHT_SHMFD
    fe.set_mem_table(mem)
    return fe


def submit(fe: Frontend, q: PackedDriverQueue, mem: FrontendMemory, text: bytes) -> tuple[int,
                                                                                          int]:
    src, dst = mem.alloc(16), mem.alloc(16)
    mem.write(src, text)
    return fe.submit(q, [(src, 16, False), (dst, 16, True)]), dst


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def test_packed_requests_in_flight_at_sigkill_are_resubmitted_exactly_once(
        tmp_path: Path) -> None:
    sock = tmp_path / "vhost.sock"
    mem = FrontendMemory([(0, 8 << 20, 0)])
    server = start_echo_server(sock, delay=0.01)
    fe = connect(sock, mem)
    inflight_fd, inflight_size = fe.get_inflight_fd(1, SIZE)
    assert inflight_size == infp.area_size(1, SIZE)  # made for packed rings (acked first)
    fe.set_inflight_fd(inflight_fd, inflight_size, 1, SIZE)
    q = fe.setup_packed_queue(0, size=SIZE)
    area = mmap.mmap(inflight_fd, inflight_size)
    procs = [server]
    try:
        # 1. Two requests complete; the backend dies after: the ring is 4 slots on.
        done = [submit(fe, q, mem, b"first-request-%d" % i) for i in range(2)]
        assert sorted(q.wait_used(2)) == sorted((buf, 16) for buf, _ in done)
        kill(server)
        fe.close(queues=False)
        # 2. A slow backend, told the stale base, takes three requests and dies with them.
        sock.unlink()
        server = start_echo_server(sock, delay=30.0)
        procs.append(server)
        fe = connect(sock, mem)
        fe.set_inflight_fd(inflight_fd, inflight_size, 1, SIZE)
        fe.restart_queue(q, FRESH_BASE)
        pending = dict(submit(fe, q, mem, b"request-%d-abcdef" % i) for i in range(3))

        def marked() -> int:
            return sum(area[infp.HEADER_SIZE + infp.ENTRY_SIZE * e] for e in range(SIZE))

        wait_for(lambda: marked() == 3, "the backend to mark 3 requests in flight")
        kill(server)
        fe.close(queues=False)
        assert q.take_used() == []
        # 3. A new backend, the stale base again: it resubmits the three, then serves more.
        sock.unlink()
        server = start_echo_server(sock, delay=0.01)
        procs.append(server)
        fe = connect(sock, mem)
        fe.set_inflight_fd(inflight_fd, inflight_size, 1, SIZE)
        fe.restart_queue(q, FRESH_BASE)
        got = q.wait_used(3, timeout=10)
        assert sorted(buf for buf, _ in got) == sorted(pending)
        for dst in pending.values():
            assert mem.read(dst, 16).startswith(b"REQUEST-")
        buf, dst = submit(fe, q, mem, b"after-the-crash!")
        assert q.wait_used(1, timeout=10) == [(buf, 16)]
        assert mem.read(dst, 16) == b"AFTER-THE-CRASH!"
        time.sleep(0.2)
        assert q.take_used() == []
        assert marked() == 0
        # 6 chains of 2 slots: both positions at 12 in the first lap.
        assert fe.get_vring_base(0) == encode_base(12, 1, 12, 1)
        assert (q.avail_pos, q.used_pos) == (12, 12)
        fe.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        area.close()
        os.close(inflight_fd)
        mem.close()
