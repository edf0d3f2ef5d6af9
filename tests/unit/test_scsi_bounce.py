"""BounceBuffer and the per-thread bounce page budget."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import queue
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from scsi_buffers import (
    PAGE_SIZE,
    AccessError,
    AccessErrorKind,
    BounceBuffer,
    BounceBufferTracker,
    GuestMemory,
    IoBuffer,
    PagedRange,
    RequestBuffers,
    TrackedBounceBuffer,
)

JOIN = 10.0  # seconds: a generous bound so a broken tracker fails the test instead of hanging CI


def wait_until(cond: Callable[[], bool], timeout: float = JOIN) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


class Acquirer(threading.Thread):
    """A thread that acquires once and records the result (or the exception)."""

    def __init__(
        self,
        tracker: BounceBufferTracker,
        size: int,
        thread: int = 0,
        timeout: float | None = JOIN,
        log: list[str] | None = None,
        name: str = "",
    ) -> None:
        super().__init__(daemon=True)
        self.tracker, self.size, self.index, self.timeout = tracker, size, thread, timeout
        self.log, self.label = log, name
        self.result: TrackedBounceBuffer | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.tracker.acquire(self.size, self.index, timeout=self.timeout)
            if self.log is not None:
                self.log.append(self.label)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> TrackedBounceBuffer:
        self.join(JOIN)
        assert not self.is_alive()
        assert self.error is None, self.error
        assert self.result is not None
        return self.result


@pytest.fixture
def tmpfile() -> Iterator[int]:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    yield fd
    os.close(fd)


# ---------------------------------------------------------------- BounceBuffer
@pytest.mark.parametrize("size", [1, 511, 4096, 4097, 3 * 4096 + 7])
def test_bounce_buffer_shape(size: int) -> None:
    with BounceBuffer(size) as b:
        assert len(b) == b.size == size
        assert b.pages == -(-size // PAGE_SIZE)
        view = b.as_mut_bytes()
        assert view.nbytes == size and not view.readonly
        assert view.tobytes() == bytes(size)  # zero-filled
        assert b.address % PAGE_SIZE == 0  # page-aligned
        vecs = b.io_vecs()
        assert len(vecs) == 1 and vecs[0].nbytes == size
        (io,) = b.io_buffers()
        assert isinstance(io, IoBuffer) and io.address == b.address and len(io) == size
        (iov,) = b.iovec_array()
        assert (iov.address, iov.iov_len) == (b.address, size)
        view[-1:] = b"\xff"
        assert b.io_vecs()[0][-1] == 0xFF


def test_bounce_buffer_size_zero() -> None:
    b = BounceBuffer(0)
    assert len(b) == 0 and b.pages == 0
    assert b.as_mut_bytes().nbytes == 0 and not b.as_mut_bytes().readonly
    assert [v.nbytes for v in b.io_vecs()] == [0]
    assert b.gather_from([]) == 0
    b.close()
    with pytest.raises(ValueError):
        BounceBuffer(-1)


def test_bounce_buffer_close() -> None:
    b = BounceBuffer(100)
    kept = b.as_mut_bytes()
    b.close()
    b.close()
    assert b.closed
    kept[:2] = b"ok"  # a view handed out earlier keeps its memory valid
    with pytest.raises(ValueError, match="closed"):
        b.io_vecs()


def test_bounce_gather_write_then_read_scatter(tmpfile: int) -> None:
    """The device's bounce route: OUT gathers guest pieces then pwritev; IN preadv then scatters."""
    mem = GuestMemory.anonymous(16 * PAGE_SIZE)
    mem.write(0, bytes(range(256)) * 256)
    out = [
        RequestBuffers(mem, PagedRange.linear(0x1040, 448), False),
        RequestBuffers(mem, PagedRange.linear(0x5010, 64), False),
    ]
    with BounceBuffer(512) as bounce:
        assert bounce.gather_from(out) == 512
        assert os.pwritev(tmpfile, bounce.io_vecs(), 0) == 512
    assert os.pread(tmpfile, 512, 0) == mem.read(0x1040, 448) + mem.read(0x5010, 64)

    into = [
        RequestBuffers(mem, PagedRange(3952, 2704, [9, 11]), True),
        RequestBuffers(mem, PagedRange.linear(0xC000, 1392), True),
    ]
    os.pwrite(tmpfile, bytes(reversed(range(256))) * 16, 4096)
    with BounceBuffer(4096) as bounce:
        assert os.preadv(tmpfile, bounce.io_vecs(), 4096) == 4096
        assert bounce.scatter_to(into) == 4096
        expect = bounce.as_mut_bytes().tobytes()
    got = b"".join(b.reader().read_all() for b in into)
    assert got == expect
    with BounceBuffer(10) as bounce, pytest.raises(AccessError) as e:
        bounce.gather_from(out)
    assert e.value.kind is AccessErrorKind.OUT_OF_RANGE
    mem.close()


# ---------------------------------------------------------------- tracker: accounting
def test_tracker_defaults_and_accounting() -> None:
    t = BounceBufferTracker(threads=3)
    assert t.max_pages == 2048 and t.threads == 3
    assert t.free_pages_per_thread() == [2048, 2048, 2048]
    a = t.acquire(5000, 1)
    assert a.pages == 2 and a.thread == 1 and len(a.buffer) == 5000
    b = t.acquire(4096, 1)
    c = t.acquire(1, 2)
    assert t.free_pages_per_thread() == [2048, 2045, 2047]
    assert t.in_use_pages(1) == 3
    a.release()
    with b, c:
        pass
    assert t.free_pages_per_thread() == [2048, 2048, 2048]
    assert a.released and a.buffer.closed


def test_size_zero_is_immediate_even_with_no_pages_free() -> None:
    t = BounceBufferTracker(max_pages=1, threads=1)
    held = t.acquire(1)
    start = time.monotonic()
    z = t.acquire(0, timeout=5)
    assert time.monotonic() - start < 1
    assert len(z.buffer) == 0 and z.pages == 0
    z.release()
    assert t.free_pages(0) == 0
    held.release()


@pytest.mark.parametrize("thread", [-1, 2, 100])
def test_thread_index_out_of_range(thread: int) -> None:
    t = BounceBufferTracker(max_pages=4, threads=2)
    with pytest.raises(ValueError, match="out of range"):
        t.acquire(1, thread)
    with pytest.raises(ValueError, match="out of range"):
        asyncio.run(t.acquire_async(1, thread))
    with pytest.raises(ValueError):
        t.free_pages(thread)


def test_oversize_request_fails_at_once() -> None:
    t = BounceBufferTracker(max_pages=4, threads=1)
    start = time.monotonic()
    with pytest.raises(ValueError, match="whole per-thread budget"):
        t.acquire(4 * PAGE_SIZE + 1)
    with pytest.raises(ValueError, match="never be served"):
        asyncio.run(t.acquire_async(5 * PAGE_SIZE))
    assert time.monotonic() - start < 1
    t.acquire(4 * PAGE_SIZE).release()  # exactly the budget is fine
    with pytest.raises(ValueError):
        t.acquire(-1)


def test_double_release_is_harmless() -> None:
    t = BounceBufferTracker(max_pages=4, threads=1)
    a = t.acquire(2 * PAGE_SIZE)
    b = t.acquire(PAGE_SIZE)
    a.release()
    a.release()
    a.close()
    with a:
        pass
    assert t.free_pages(0) == 3
    b.release()
    assert t.free_pages(0) == 4


def test_release_from_another_thread_returns_to_the_budget_taken_from() -> None:
    t = BounceBufferTracker(max_pages=8, threads=2)
    buf = t.acquire(3 * PAGE_SIZE, thread=1)
    releaser = threading.Thread(target=buf.release)
    releaser.start()
    releaser.join(JOIN)
    assert t.free_pages_per_thread() == [8, 8]


def test_timeout_raises_and_leaves_the_budget_alone() -> None:
    t = BounceBufferTracker(max_pages=2, threads=1)
    held = t.acquire(2 * PAGE_SIZE)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        t.acquire(1, timeout=0.05)
    assert 0.04 <= time.monotonic() - start < 5
    with pytest.raises(TimeoutError):
        t.acquire(1, timeout=0)
    assert t.waiting(0) == 0 and t.free_pages(0) == 0
    held.release()
    assert t.free_pages(0) == 2
    assert t.try_acquire(PAGE_SIZE) is not None  # (collected at once: pages come back)


def test_timed_out_head_lets_smaller_waiters_behind_it_through() -> None:
    t = BounceBufferTracker(max_pages=4, threads=1)
    held = [t.acquire(PAGE_SIZE) for _ in range(3)]  # one page free
    big = Acquirer(t, 3 * PAGE_SIZE, timeout=0.2)
    big.start()
    wait_until(lambda: t.waiting(0) == 1)
    small = Acquirer(t, PAGE_SIZE)
    small.start()
    wait_until(lambda: t.waiting(0) == 2)
    big.join(JOIN)
    assert isinstance(big.error, TimeoutError)
    small.finish().release()  # served once the head withdrew, without any release
    for h in held:
        h.release()
    assert t.free_pages(0) == 4


def test_try_acquire() -> None:
    t = BounceBufferTracker(max_pages=2, threads=1)
    a = t.try_acquire(2 * PAGE_SIZE)
    assert a is not None
    assert t.try_acquire(1) is None
    a.release()
    b = t.try_acquire(1)
    assert b is not None
    b.release()


# ---------------------------------------------------------------- tracker: waiting
def test_waiter_is_woken_by_release() -> None:
    t = BounceBufferTracker(max_pages=2, threads=1)
    held = t.acquire(2 * PAGE_SIZE)
    waiter = Acquirer(t, PAGE_SIZE)
    waiter.start()
    wait_until(lambda: t.waiting(0) == 1)
    assert waiter.is_alive()
    held.release()
    got = waiter.finish()
    assert t.free_pages(0) == 1
    got.release()


def test_fifo_no_overtaking() -> None:
    """A small request never jumps a large one queued before it, even when it would fit."""
    t = BounceBufferTracker(max_pages=4, threads=1)
    held = [t.acquire(PAGE_SIZE) for _ in range(4)]
    order: list[str] = []
    big = Acquirer(t, 3 * PAGE_SIZE, log=order, name="big")
    big.start()
    wait_until(lambda: t.waiting(0) == 1)
    small = Acquirer(t, PAGE_SIZE, log=order, name="small")
    small.start()
    wait_until(lambda: t.waiting(0) == 2)

    held.pop().release()  # 1 free: fits "small", but "big" is first in line
    time.sleep(0.05)
    assert order == [] and t.waiting(0) == 2 and t.free_pages(0) == 1
    held.pop().release()
    held.pop().release()  # 3 free: "big" goes
    big_buf = big.finish()
    assert order == ["big"] and t.free_pages(0) == 0
    held.pop().release()  # the last page: "small" goes
    small.finish().release()
    assert order == ["big", "small"]
    big_buf.release()
    assert t.free_pages(0) == 4


def test_fifo_arrival_order() -> None:
    t = BounceBufferTracker(max_pages=1, threads=1)
    held = t.acquire(1)
    order: list[str] = []
    waiters = []
    for i in range(6):
        w = Acquirer(t, 1, log=order, name=str(i))
        w.start()

        def queued(i: int = i) -> bool:
            return t.waiting(0) == i + 1

        wait_until(queued)
        waiters.append(w)
    held.release()
    for w in waiters:  # each releases after being served, which serves the next in line
        w.finish().release()
    assert order == [str(i) for i in range(6)]
    assert t.free_pages(0) == 1


def test_budgets_are_independent() -> None:
    t = BounceBufferTracker(max_pages=1, threads=2)
    held = t.acquire(1, thread=0)
    other = t.acquire(1, thread=1, timeout=1)  # thread 1's budget is untouched
    waiter = Acquirer(t, 1, thread=0)
    waiter.start()
    wait_until(lambda: t.waiting(0) == 1)
    other.release()  # frees thread 1's page: must not wake thread 0's waiter
    time.sleep(0.02)
    assert waiter.is_alive()
    held.release()
    waiter.finish().release()
    assert t.free_pages_per_thread() == [1, 1]


def test_stress_no_missed_wakeups() -> None:
    """Many threads contend for two small budgets; releases hop threads.  Bounded in iterations
    and time: a missed wake-up shows as a TimeoutError, never a hang."""
    max_pages, budgets, workers, rounds = 6, 2, 8, 150
    t = BounceBufferTracker(max_pages=max_pages, threads=budgets)
    lock = threading.Lock()
    in_use = [0] * budgets
    peak = [0] * budgets
    errors: list[BaseException] = []
    handoff: queue.Queue[TrackedBounceBuffer | None] = queue.Queue()

    def releaser() -> None:
        while (item := handoff.get()) is not None:
            with lock:
                in_use[item.thread] -= item.pages
            item.release()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(rounds):
                idx = rng.randrange(budgets)
                size = rng.randint(0, max_pages * PAGE_SIZE)
                buf = t.acquire(size, idx, timeout=JOIN)
                with lock:
                    in_use[idx] += buf.pages
                    peak[idx] = max(peak[idx], in_use[idx])
                    assert in_use[idx] <= max_pages
                if rng.random() < 0.3:
                    handoff.put(buf)  # released by another thread
                else:
                    if rng.random() < 0.2:
                        time.sleep(0)
                    with lock:
                        in_use[idx] -= buf.pages
                    buf.release()
        except BaseException as exc:
            errors.append(exc)

    rel = threading.Thread(target=releaser, daemon=True)
    rel.start()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(JOIN * 3)
        assert not th.is_alive(), "a worker hung"
    handoff.put(None)
    rel.join(JOIN)
    assert errors == []
    assert t.free_pages_per_thread() == [max_pages] * budgets
    assert all(t.waiting(i) == 0 for i in range(budgets))
    assert max(peak) <= max_pages


def test_unreleased_buffer_is_reclaimed_when_collected(caplog: pytest.LogCaptureFixture) -> None:
    t = BounceBufferTracker(max_pages=2, threads=1)
    buf = t.acquire(2 * PAGE_SIZE)
    assert t.free_pages(0) == 0
    with caplog.at_level(logging.WARNING, logger="scsi_buffers.bounce"):
        del buf
        gc.collect()
    assert t.free_pages(0) == 2
    assert "never released" in caplog.text


# ---------------------------------------------------------------- tracker: asyncio
def test_async_acquire_waits_without_blocking_the_loop() -> None:
    async def main() -> None:
        t = BounceBufferTracker(max_pages=2, threads=1)
        first = await t.acquire_async(2 * PAGE_SIZE)
        second_task = asyncio.create_task(t.acquire_async(PAGE_SIZE))
        ticks = 0
        while t.waiting(0) == 0:
            await asyncio.sleep(0)
        for _ in range(10):  # the loop keeps running while the task waits
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 10 and not second_task.done()
        releaser = threading.Thread(target=first.release)  # woken from another thread
        releaser.start()
        second = await asyncio.wait_for(second_task, JOIN)
        releaser.join(JOIN)
        assert len(second.buffer) == PAGE_SIZE and t.free_pages(0) == 1
        second.release()
        assert t.free_pages(0) == 2
        zero = await t.acquire_async(0)
        assert zero.pages == 0

    asyncio.run(main())


def test_async_fifo_and_cancellation() -> None:
    async def main() -> None:
        t = BounceBufferTracker(max_pages=2, threads=1)
        held = await t.acquire_async(2 * PAGE_SIZE)
        order: list[str] = []

        async def want(name: str, size: int) -> TrackedBounceBuffer:
            buf = await t.acquire_async(size)
            order.append(name)
            return buf

        a = asyncio.create_task(want("a", 2 * PAGE_SIZE))
        while t.waiting(0) < 1:
            await asyncio.sleep(0)
        doomed = asyncio.create_task(want("doomed", PAGE_SIZE))
        while t.waiting(0) < 2:
            await asyncio.sleep(0)
        b = asyncio.create_task(want("b", PAGE_SIZE))
        while t.waiting(0) < 3:
            await asyncio.sleep(0)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert t.waiting(0) == 2

        held.release()
        got_a = await asyncio.wait_for(a, JOIN)
        assert order == ["a"]
        got_a.release()
        (await asyncio.wait_for(b, JOIN)).release()
        assert order == ["a", "b"]
        assert t.free_pages(0) == 2

        # A deadline through asyncio.timeout withdraws cleanly.
        held = await t.acquire_async(2 * PAGE_SIZE)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02):
                await t.acquire_async(PAGE_SIZE)
        assert t.waiting(0) == 0
        held.release()
        assert t.free_pages(0) == 2

    asyncio.run(main())


def test_async_and_threaded_waiters_share_the_queue() -> None:
    t = BounceBufferTracker(max_pages=1, threads=1)
    held = t.acquire(1)
    order: list[str] = []
    sync_waiter = Acquirer(t, 1, log=order, name="thread")
    sync_waiter.start()
    wait_until(lambda: t.waiting(0) == 1)

    async def main() -> None:
        task = asyncio.create_task(t.acquire_async(1))
        while t.waiting(0) < 2:
            await asyncio.sleep(0)
        held.release()  # serves the thread (first in line)
        buf = await asyncio.to_thread(sync_waiter.finish)
        assert order == ["thread"] and not task.done()
        buf.release()  # now the task
        (await asyncio.wait_for(task, JOIN)).release()

    asyncio.run(main())
    assert t.free_pages(0) == 1
