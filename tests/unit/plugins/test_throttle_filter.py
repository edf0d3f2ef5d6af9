"""The throttle filter's engines (blockdev.throttle_filter) over a RAM disk: held requests
never block submit, keep their queue's order, wake the worker through the completion fd;
flushes pass; two nodes in one group share its budget; close drops what is held."""

from __future__ import annotations

import select
import time

import pytest

from blockdev.disk import Disk
from blockdev.engine import Engine, IoOp
from blockdev.ops import OpKind
from blockdev.python.storage import PluginStorage
from blockdev.storage import FileStorage, Storage
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


@pytest.mark.parametrize("engine", ["plugin", "inline", "threads"])
def test_held_requests_do_not_block_submit_and_keep_their_order(tmp_path, engine):
    """Over an engine that completes in submit (inline) and asynchronous ones."""
    group = ThrottleGroup.create("g", {"iops-total": 100})
    child: Storage = ram()
    if engine != "plugin":
        path = tmp_path / "d.img"
        path.write_bytes(bytes(1 << 20))
        child = FileStorage(Disk(path), engine)
    st = ThrottleStorage(child, "t", group)
    (q,) = engines(st, 1)
    ops = reads(40)
    t0 = time.monotonic()
    done, submit_took = drive(q, ops)
    took = time.monotonic() - t0
    assert submit_took < 0.05  # 29 of them held, none waited for in submit
    if engine != "threads":  # (a thread pool completes in any order; FIFO is dispatch)
        assert [id(op) for op in done] == [id(op) for op in ops]
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
    drive(q, reads(1))  # the one that goes at once (1/10 + 1), completed and reaped
    ops = reads(2)  # the next would wait ~0.9 s, the one after ~1.9 s
    ep = select.epoll()  # the worker's way: woken by edges only, reaping at each wake
    assert q.completion_fd is not None
    ep.register(q.completion_fd, select.EPOLLIN | select.EPOLLET)
    t0 = time.monotonic()
    assert not any(q.submit(op) for op in ops)
    q.submit_batch()
    ep.poll(0.05)
    done: list[IoOp] = q.reap()
    assert not done
    group.set_limits({"iops-total": 10000})
    while len(done) < 2 and time.monotonic() - t0 < 5:
        ep.poll(1.0)
        done.extend(q.reap())
    ep.close()
    assert len(done) == 2
    assert time.monotonic() - t0 < 0.5  # not the ~2 s the old limit asked for
    assert q.close()
    st.close()
    group.close()


def test_a_request_never_overtakes_one_held_before_it():
    group = ThrottleGroup.create("g", {"iops-total": 10})
    st = ThrottleStorage(ram(), "t", group)
    (q,) = engines(st, 1)
    a, b, held, later = reads(4)
    q.submit(a)
    q.submit(b)  # the bucket (1) takes these two
    q.submit(held)  # held ~0.1 s
    time.sleep(0.35)  # the worker was busy: the budget is back, but `held` was not reaped
    q.submit(later)  # it queues behind `held` instead of taking the budget
    done: list[IoOp] = []
    deadline = time.monotonic() + 5
    fd = q.completion_fd
    assert fd is not None
    while len(done) < 4 and time.monotonic() < deadline:
        select.select([fd], [], [], 0.5)
        done.extend(q.reap())
    assert st.throttled_ns >= 0.3e9  # `held` was held (until this reap)
    assert [id(op) for op in done if op not in (a, b)] == [id(held), id(later)]
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
