"""NbdEngine driven directly, as a queue's worker drives it, against a real nbdkit: the checks
that replaced per-call work on the data path (range-checked C types, a dead-connection test
after every command, a timer re-armed on every reap) still hold."""

from __future__ import annotations

import ctypes
import errno
import select
import signal
import time

import pytest

import blockdev.nbd.storage as nbd_storage
from blockdev.engine import Engine, IoOp
from blockdev.nbd.storage import NbdStorage
from blockdev.ops import OpKind
from guestmem import IoBuffer
from tests.remote.fixtures import MakeNbd

BS = 4096


class Memory:
    """Buffers with their addresses, as guest memory hands them to an engine."""

    def __init__(self, pages: int) -> None:
        self.raw = (ctypes.c_char * (pages * BS))()
        self.view = memoryview(self.raw).cast("B")
        self.base = ctypes.addressof(self.raw)

    def buffer(self, page: int) -> IoBuffer:
        return IoBuffer(self.view[page * BS:(page + 1) * BS], self.base + page * BS)


@pytest.fixture
def memory() -> Memory:
    return Memory(64)


def run(engine: Engine, ops: list[IoOp], timeout: float = 10.0) -> None:
    """Submit ``ops`` as one batch and reap until every one has a result (or fail)."""
    pending = {id(op) for op in ops}
    for op in ops:
        if engine.submit(op):
            pending.discard(id(op))
    engine.submit_batch()
    poller = select.epoll()
    assert engine.completion_fd is not None
    poller.register(engine.completion_fd, select.EPOLLIN | select.EPOLLET)
    deadline = time.monotonic() + timeout
    try:
        while True:
            for op in engine.reap():
                pending.discard(id(op))
            if not pending:
                return
            left = deadline - time.monotonic()
            assert left > 0, f"{len(pending)} ops never completed (a hung queue)"
            poller.poll(left)
    finally:
        poller.close()


def test_an_offset_past_64_bits_fails_and_writes_nothing(make_nbd: MakeNbd,
                                                         memory: Memory) -> None:
    """The data commands take plain C types: 2**64 + 4096 would reach the server as 4096 (a
    write to the wrong place) if the engine did not check the range itself."""
    server = make_nbd("nbdkit", "unix")
    st = NbdStorage(server.uri)
    engine = st.open_engine(0)
    try:
        memory.view[:BS] = b"\xaa" * BS
        bad = [IoOp(OpKind.WRITE, off, [memory.buffer(0)], BS)
               for off in (2**64 + BS, -BS, st.info.size - BS // 2)]
        for op in bad:
            assert engine.submit(op) is True  # refused at once, nothing sent
            assert isinstance(op.result, OSError) and op.result.errno == errno.EINVAL
        read = IoOp(OpKind.READ, BS, [memory.buffer(1)], BS)
        run(engine, [read])
        assert read.result == BS
        assert bytes(memory.view[BS:2 * BS]) == bytes(BS)  # still the zeroes it started with
    finally:
        engine.close()
        st.close()


def test_a_busy_connection_sets_no_timer(make_nbd: MakeNbd, memory: Memory,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Connected, the timer has nothing to do: reaps do not re-arm it (a timerfd_settime per
    wake-up was a syscall per reap for nothing)."""
    server = make_nbd("nbdkit", "unix")
    st = NbdStorage(server.uri)
    engine = st.open_engine(0)
    armed: list[float | None] = []
    real = nbd_storage.timerfd_arm

    def counting(fd: int, seconds: float | None) -> None:
        armed.append(seconds)
        real(fd, seconds)

    monkeypatch.setattr(nbd_storage, "timerfd_arm", counting)
    try:
        for rnd in range(8):
            ops = [IoOp(OpKind.WRITE, (rnd * 32 + i) * BS, [memory.buffer(i)], BS)
                   for i in range(32)]
            run(engine, ops)
            assert all(op.result == BS for op in ops)
        assert armed in ([], [None])  # at most the first reap's disarm
    finally:
        engine.close()
        st.close()


def test_a_server_gone_before_the_batch_fails_it_instead_of_hanging(
        make_nbd: MakeNbd, memory: Memory) -> None:
    """The server dies while the queue is idle and nothing reaps before the next batch: the
    commands sent to the dead connection wait for a reconnect and fail after the delay."""
    server = make_nbd("nbdkit", "unix")
    st = NbdStorage(server.uri, reconnect_delay=0.5)
    engine = st.open_engine(0)
    try:
        warm = [IoOp(OpKind.WRITE, i * BS, [memory.buffer(i)], BS) for i in range(4)]
        run(engine, warm)
        assert all(op.result == BS for op in warm)
        server.kill(signal.SIGKILL)
        time.sleep(0.2)  # the hang-up is in the socket; no reap has seen it
        ops = [IoOp(OpKind.WRITE, i * BS, [memory.buffer(i)], BS) for i in range(8)]
        run(engine, ops, timeout=10.0)
        assert all(isinstance(op.result, OSError) and op.result.errno == errno.EIO
                   for op in ops)
    finally:
        engine.close()
        st.close()
