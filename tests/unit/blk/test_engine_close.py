"""Closing an engine, and stopping a queue, while IO is still running: nothing may write a
closed fd, and nothing may write guest memory (or the dirty log) after it is unmapped."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from blockdev import engine as engine_mod
from blockdev.disk import Disk
from blockdev.engine import IoOp, ThreadPoolEngine, UringEngine
from blockdev.ops import OpKind
from blockdev.uring import available
from guestmem import IoBuffer
from tests.qemu_log import QemuLog
from tests.unit.blk.conftest import MakeBlk
from vhost.dirty_logging import KEPT_LOGS
from vhost.memory import KEPT_REGIONS
from vhost.runner.thread import QueueWorker
from vhost_frontend.blk import T_IN

BLOCK = 4096


class StuckDisk:
    """A disk whose reads hang until ``gate`` is set (then read zeroes)."""

    path = "stuck"
    fd = -1

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()

    def readv(self, buffers: Sequence[memoryview], offset: int) -> int:
        self.entered.set()
        assert self.gate.wait(30)
        return sum(b.nbytes for b in buffers)


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def test_a_thread_pool_keeps_its_eventfd_while_an_io_thread_may_write_it() -> None:
    disk = StuckDisk()
    engine = ThreadPoolEngine(disk, threads=2)  # type: ignore[arg-type]
    efd = engine.completion_fd
    assert efd is not None
    buf = bytearray(BLOCK)
    engine.submit(IoOp(OpKind.READ, 0, [IoBuffer(memoryview(buf))], BLOCK))
    assert disk.entered.wait(5)
    t0 = time.monotonic()
    assert engine.close(timeout=0.3) is False  # a thread is stuck: not quiet
    assert time.monotonic() - t0 < 5
    assert engine in engine_mod.UNFINISHED
    # The fd number still names the engine's eventfd: no new file can get it, so the stuck
    # thread's completion write cannot land in someone else's file.
    assert _is_eventfd(efd)
    disk.gate.set()
    for t in engine._threads:
        t.join(5)
    assert not any(t.is_alive() for t in engine._threads)
    with pytest.raises(OSError):  # closed by the last thread, once nothing can write it
        os.fstat(efd)
    engine_mod.UNFINISHED.remove(engine)


def test_a_thread_pool_closes_its_eventfd_at_once_when_idle() -> None:
    engine = ThreadPoolEngine(StuckDisk(), threads=3)  # type: ignore[arg-type]
    efd = engine.completion_fd
    assert efd is not None
    assert engine.close(timeout=5) is True
    with pytest.raises(OSError):
        os.fstat(efd)


class PipeDisk:
    """A "disk" whose fd is the read end of a pipe: an io_uring read of it waits for data."""

    path = "pipe"

    def __init__(self) -> None:
        self.fd, self.wfd = os.pipe()

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.wfd)


@pytest.mark.skipif(not available(), reason="io_uring unavailable here")
def test_io_uring_close_cancels_ops_in_flight_and_waits_for_them() -> None:
    """No op may be left in the kernel after close: it would write guest memory later."""
    disk = PipeDisk()
    engine = UringEngine(disk)  # type: ignore[arg-type]
    buf = bytearray(BLOCK)
    op = IoOp(OpKind.READ, 0, [IoBuffer(memoryview(buf))], BLOCK)
    try:
        assert engine.submit(op) is False
        engine.submit_batch()
        assert engine.reap() == []  # waiting on the pipe
        result: list[bool] = []
        closer = threading.Thread(target=lambda: result.append(engine.close(timeout=5)),
                                  daemon=True)
        closer.start()
        closer.join(8)
        assert not closer.is_alive(), "close waited forever for an op it could cancel"
        assert result == [True]
        assert engine._ops == {}
        os.write(disk.wfd, b"z" * BLOCK)  # too late: nothing reads it into the buffer
        time.sleep(0.1)
        assert buf == bytearray(BLOCK)
    finally:
        disk.close()


def test_a_worker_that_does_not_stop_keeps_the_dirty_log_and_guest_memory_mapped(
        make_blk: MakeBlk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """GET_VRING_BASE on a queue whose worker is stuck inside a request (inline engine, a disk
    that does not answer): the stop times out with the thread still running, and neither the
    dirty log it marks nor guest memory may be unmapped under it -- not at the stop, not when
    the connection ends."""
    monkeypatch.setattr(QueueWorker, "drain_timeout", 0.2)
    qlog = QemuLog(32 << 20)
    env = make_blk(engine="inline", fast_path=False)
    gate = threading.Event()
    handler = env.daemon.daemon.handler
    assert handler is not None
    worker = handler.vrings[0].worker
    assert isinstance(worker, QueueWorker)
    try:
        assert env.frontend.set_log_base(qlog.fd, qlog.size) == b"\0" * 8
        env.frontend.set_logging(True)
        entered = threading.Event()
        real_readv = Disk.readv

        def stuck_readv(self: Disk, buffers: Any, offset: int) -> int:
            entered.set()
            gate.wait(60)
            return real_readv(self, buffers, offset)

        monkeypatch.setattr(env.disk, "readv", stuck_readv.__get__(env.disk))
        dirty_log = handler.dirty_logging.log
        assert dirty_log is not None
        regions = list(handler.memory.guest.regions)
        env.drv.start(T_IN, 0, in_len=BLOCK)
        assert entered.wait(10)
        env.frontend.get_vring_base(0)  # the stop gives up after drain_timeout + 5 s
        assert worker.alive
        assert handler.memory.pinned
        assert not dirty_log.closed
        env.frontend.close()
        deadline = time.monotonic() + 10
        while env.daemon.daemon.handler is not None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not dirty_log.closed  # the connection ended, the worker still runs
        assert all(not r.owner.closed for r in regions)
        gate.set()  # the read finishes into memory that is still mapped, and marks the log
        worker._thread.join(10)
        assert not worker.alive
        # It finished its pass on its own ring and engine: nothing was released under it.
        assert not [r for r in caplog.records if "worker failed" in r.getMessage()]
    finally:
        gate.set()
        worker._thread.join(10)
        # The test's leak, undone now that the worker is gone (later tests count mappings).
        for region in KEPT_REGIONS:
            region.close()
        KEPT_REGIONS.clear()
        for kept in KEPT_LOGS:
            kept.close()
        KEPT_LOGS.clear()
        qlog.close()


class PipeQcow2:
    """What MappedUringEngine uses of a Qcow2Disk: every IO maps to host offset 0 of a pipe
    (a read waits for data), and map_batch/unmap_io are counted."""

    path = "pipe.qcow2"

    def __init__(self) -> None:
        self.fd, self.wfd = os.pipe()
        self.in_flight = 0

    def map_batch(self, ops: list[IoOp], guest: dict[int, int]) -> list[IoOp]:
        for op in ops:
            guest[id(op)] = op.offset
            op.offset = 0
        self.in_flight += len(ops)
        return []

    def unmap_io(self, count: int = 1) -> None:
        self.in_flight -= count

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.wfd)


@pytest.mark.skipif(not available(), reason="io_uring unavailable here")
def test_qcow2_io_uring_close_cancels_waits_and_counts_the_ops_out() -> None:
    """The qcow2 ring engine closed with a read in flight: cancelled and waited for (it used
    to wait for it forever), and counted out of the image's in-flight IO."""
    from blockdev.qcow2.uring_engine import MappedUringEngine

    disk = PipeQcow2()
    engine = MappedUringEngine(disk)  # type: ignore[arg-type]
    engine.nowait = False  # a pipe has no page cache to try a lone read in first
    buf = bytearray(BLOCK)
    result: list[bool] = []
    closer = threading.Thread(target=lambda: result.append(engine.close(timeout=5)),
                              daemon=True)
    try:
        assert engine.submit(IoOp(OpKind.READ, 0, [IoBuffer(memoryview(buf))], BLOCK)) is False
        engine.submit_batch()
        assert disk.in_flight == 1
        closer.start()
        closer.join(8)
        assert not closer.is_alive(), "close waited forever for an op it could cancel"
        assert result == [True]
        assert disk.in_flight == 0
        os.write(disk.wfd, b"z" * BLOCK)
        time.sleep(0.1)
        assert buf == bytearray(BLOCK)
    finally:
        if closer.is_alive():
            os.write(disk.wfd, b"z" * BLOCK * 2)  # let a stuck close end
            closer.join(5)
        disk.close()
