"""The throttle filter's engines (blockdev.throttle_filter) over a RAM disk: held requests
never block submit, keep their queue's order, wake the worker through the completion fd;
flushes pass; two nodes in one group share its budget; close drops what is held."""

from __future__ import annotations

import select
import time

from blockdev.engine import Engine, IoOp
from blockdev.ops import OpKind
from blockdev.python.storage import PluginStorage
from blockdev.throttle import ThrottleGroup
from blockdev.throttle_filter import ThrottleStorage
from examples.ramdisk import RamDisk
from guestmem import IoBuffer
from tests.unit.plugins.helpers import engines, flush, ranged, read, write


def ram() -> PluginStorage:
    return PluginStorage(RamDisk("1M"), "ram")


def reads(n: int, length: int = 512) -> list[IoOp]:
    return [IoOp(OpKind.READ, i * length, [IoBuffer(memoryview(bytearray(length)))], length)
            for i in range(n)]


def drive(engine: Engine, ops: list[IoOp], timeout: float = 10.0) -> tuple[list[IoOp], float]:
    """Submit all of ``ops`` (timing the submits), then the worker's loop: an edge-triggered
    epoll on the completion fd, reap on each wake.  The completion order and the submit time."""
    ep = select.epoll()
    assert engine.completion_fd is not None
    ep.register(engine.completion_fd, select.EPOLLIN | select.EPOLLET)
    t0 = time.monotonic()
    done = [op for op in ops if engine.submit(op)]
    engine.submit_batch()
    took = time.monotonic() - t0
    deadline = time.monotonic() + timeout
    while len(done) < len(ops):
        assert time.monotonic() < deadline, f"{len(done)} of {len(ops)} done"
        ep.poll(1.0)
        done.extend(engine.reap())
    ep.close()
    return done, took


def test_held_requests_do_not_block_submit_and_keep_their_order():
    group = ThrottleGroup.create("g", {"iops-total": 100})
    st = ThrottleStorage(ram(), "t", group)
    (q,) = engines(st, 1)
    ops = reads(40)
    t0 = time.monotonic()
    done, submit_took = drive(q, ops)
    took = time.monotonic() - t0
    assert submit_took < 0.05  # 29 of them held, none waited for in submit
    assert [id(op) for op in done] == [id(op) for op in ops]  # FIFO per queue
    assert all(op.result == 512 for op in ops)
    # 11 at once (avg/10 + 1), the other 29 at 100/s.
    assert 0.27 <= took <= 0.45, took
    assert 3.5e9 < st.throttled_ns < 5.5e9  # held: 10 ms, 20 ms, ... 290 ms: 4.35 s in all
    assert group.held_ns == st.throttled_ns
    assert q.close()
    st.close()
    group.close()


def test_writes_discards_zeroes_count_as_writes_flushes_pass():
    group = ThrottleGroup.create("g", {"iops-write": 10})
    st = ThrottleStorage(ram(), "t", group)
    (q,) = engines(st, 1)
    t0 = time.monotonic()
    for _ in range(3):
        assert flush(q) == 0
        assert read(q, 0, 512) == bytes(512)
    assert time.monotonic() - t0 < 0.1  # reads and flushes are not limited here
    assert write(q, 0, b"x" * 512) == 512  # the bucket takes 1 + 1 at once
    assert ranged(q, OpKind.DISCARD, 0, 512) == 0
    t0 = time.monotonic()
    assert ranged(q, OpKind.WRITE_ZEROES, 0, 512) == 0  # the third waits ~0.1 s
    assert time.monotonic() - t0 >= 0.08
    assert q.close()
    st.close()
    group.close()


def test_two_nodes_and_queues_in_one_group_share_its_budget():
    group = ThrottleGroup.create("g", {"iops-total": 100})
    a = ThrottleStorage(ram(), "a", group)
    b = ThrottleStorage(ram(), "b", group)
    qa, qb = engines(a, 1)[0], engines(b, 2)[1]
    assert group.users == {"a", "b"}
    t0 = time.monotonic()
    drive(qa, reads(25))
    drive(qb, reads(25))
    took = time.monotonic() - t0
    # 50 in all at 100/s, 11 of them at once: ~0.39 s (each node alone would be ~0.14 s).
    assert 0.3 <= took <= 0.6, took
    for q, st in ((qa, a), (qb, b)):
        assert q.close()
        st.close()
    assert group.users == set()
    group.close()


def test_raised_limit_reaches_held_requests_within_recheck():
    group = ThrottleGroup.create("g", {"iops-total": 1})
    st = ThrottleStorage(ram(), "t", group)
    (q,) = engines(st, 1)
    ops = reads(3)  # one at once (1/10 + 1), the next would wait ~1 s, the third ~2 s
    t0 = time.monotonic()
    done = [op for op in ops if q.submit(op)]
    q.submit_batch()
    time.sleep(0.05)
    group.set_limits({"iops-total": 10000})
    ep = select.epoll()
    assert q.completion_fd is not None
    ep.register(q.completion_fd, select.EPOLLIN)
    while len(done) < 3 and time.monotonic() - t0 < 5:
        ep.poll(1.0)
        done.extend(q.reap())
    ep.close()
    assert len(done) == 3
    assert time.monotonic() - t0 < 0.5  # not the 2 s the old limit asked for
    assert q.close()
    st.close()
    group.close()


def test_close_drops_held_requests():
    group = ThrottleGroup.create("g", {"iops-total": 1})
    st = ThrottleStorage(ram(), "t", group)
    (q,) = engines(st, 1)
    ops = reads(5)
    held = [op for op in ops if not q.submit(op)]
    assert len(held) >= 3
    assert q.close(timeout=1)
    assert all(op.result is None for op in held[1:])  # never reached the disk
    st.close()
    group.close()
