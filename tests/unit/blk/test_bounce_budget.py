"""The per-queue bounce budget: a spent budget defers requests, it never fails or hangs them.

Requests are published in one batch and the device kicked once, so the queue worker starts them
all before it reaps any completion -- with the threads engine, pages only come back when the
worker reaps, so a batch needing more pages than the budget is always partly deferred.
"""

from __future__ import annotations

import logging
import os
import time

import pytest

from tests.unit.blk.conftest import MakeBlk
from vhost_frontend.blk import T_IN, T_OUT, BlkDriver, Piece
from virtio_blk.request import Status

BUDGET = 4  # pages: two 8 KiB bounced requests at a time


def settle(drv: BlkDriver) -> None:
    """One request end to end: afterwards the queue worker is idle, waiting for a kick (its
    first look at the ring, made when the queue started, is long over)."""
    assert drv.read(0, 512).status == Status.OK


def split_8k(drv: BlkDriver) -> list[Piece]:
    """8 KiB of data cut mid-sector into pieces in separate pages: always bounced."""
    return drv.pieces([1000, 24, 3000, 4168])


def test_spent_budget_defers_and_every_request_completes(make_blk: MakeBlk) -> None:
    env = make_blk(engine="threads", bounce_pages=BUDGET, io_threads=4)
    drv = env.drv
    stats = env.device.stats
    settle(drv)
    count = 24
    payloads = [os.urandom(8192) for _ in range(count)]
    writes = [drv.start(T_OUT, 16 * i, out=payloads[i], out_pieces=split_8k(drv), kick=False,
                       indirect=True)
              for i in range(count)]
    drv.kick()
    for res in drv.wait(writes):
        assert (res.status, res.used) == (Status.OK, 1)
    assert stats.deferred > 0
    for i in range(count):
        assert env.file(16 * i * 512, 8192) == payloads[i]

    deferred = stats.deferred
    reads = [drv.start(T_IN, 16 * i, in_len=8192, in_pieces=split_8k(drv), kick=False,
                       indirect=True)
             for i in range(count)]
    drv.kick()
    for i, res in enumerate(drv.wait(reads)):
        assert (res.status, res.used) == (Status.OK, 8193)
        assert res.data == payloads[i]
    assert stats.deferred > deferred
    assert stats.bounced_requests == 2 * count
    assert stats.errors == 0
    assert env.device.tracker.free_pages(0) == BUDGET  # every page came back


def test_requests_behind_deferred_ones_wait_and_complete(make_blk: MakeBlk) -> None:
    # Bounced and zero-copy requests interleaved: the zero-copy ones queue behind the waiting
    # bounced ones (arrival order), and everything completes with the right data.
    env = make_blk(engine="threads", bounce_pages=BUDGET)
    drv = env.drv
    image = env.file(0, 1 << 20)
    settle(drv)
    pending = []
    for i in range(16):
        pieces = split_8k(drv) if i % 2 == 0 else drv.pieces([8192])
        pending.append(drv.start(T_IN, 16 * i, in_len=8192, in_pieces=pieces, kick=False,
                       indirect=True))
    drv.kick()
    for i, res in enumerate(drv.wait(pending)):
        assert (res.status, res.used) == (Status.OK, 8193)
        assert res.data == image[8192 * i : 8192 * (i + 1)]
    # Requests 0 and 2 take the whole budget, 1 and 3 need none; 4 finds no pages and every
    # later one queues behind it: 12 waited, and every request is counted once.
    assert env.device.stats.deferred == 12
    assert env.device.stats.requests == 16 + 1


def test_inline_engine_never_defers(make_blk: MakeBlk) -> None:
    # Inline IO releases its pages before the next request starts.
    env = make_blk(engine="inline", bounce_pages=BUDGET)
    drv = env.drv
    image = env.file(0, 1 << 20)
    pending = [drv.start(T_IN, 16 * i, in_len=8192, in_pieces=split_8k(drv), kick=False,
                       indirect=True)
               for i in range(16)]
    drv.kick()
    for i, res in enumerate(drv.wait(pending)):
        assert (res.status, res.data) == (Status.OK, image[8192 * i : 8192 * (i + 1)])
    assert env.device.stats.deferred == 0
    assert env.device.stats.bounced_requests == 16


@pytest.mark.parametrize("engine", ["inline", "threads"])
def test_request_needing_the_whole_budget_completes(make_blk: MakeBlk, engine: str) -> None:
    env = make_blk(engine=engine, bounce_pages=BUDGET)
    data = os.urandom(BUDGET * 4096)
    pieces = env.drv.pieces([100, BUDGET * 4096 - 100])
    res = env.drv.write(0, data, pieces=pieces)
    assert (res.status, res.used) == (Status.OK, 1)
    assert env.file(0, len(data)) == data
    assert env.device.stats.bounced_requests == 1


@pytest.mark.parametrize("engine", ["inline", "threads"])
def test_bounced_request_larger_than_the_budget_is_ioerr(make_blk: MakeBlk, engine: str) -> None:
    env = make_blk(engine=engine, bounce_pages=BUDGET)
    drv = env.drv
    before = env.file(0, 1 << 20)
    too_big = BUDGET * 4096 + 512
    res = drv.write(0, os.urandom(too_big), pieces=drv.pieces([100, too_big - 100]), timeout=5)
    assert (res.status, res.used) == (Status.IOERR, 1)
    res = drv.read(0, too_big, pieces=drv.pieces([100, too_big - 100]), timeout=5)
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert env.file(0, 1 << 20) == before
    # And the queue is not stuck: a normal request still completes, and no page is held.
    res = drv.read(0, 4096, pieces=drv.pieces([1000, 3096]))
    assert (res.status, res.data) == (Status.OK, before[:4096])
    assert env.device.tracker.free_pages(0) == BUDGET


def test_disconnect_with_deferred_requests_drains_them(make_blk: MakeBlk) -> None:
    # Stopping the queue (GET_VRING_BASE, as QEMU does on stop) while requests the worker has
    # taken wait for pages: they are all completed before the reply, none is lost.
    env = make_blk(engine="threads", bounce_pages=BUDGET)
    drv = env.drv
    pending = [drv.start(T_IN, 16 * i, in_len=8192, in_pieces=split_8k(drv), kick=False,
                       indirect=True)
               for i in range(16)]
    drv.kick()
    deadline = time.monotonic() + 5
    while env.device.stats.requests < 16:  # wait until the worker has taken them all
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert env.device.stats.deferred > 0
    base = env.frontend.get_vring_base(0)
    assert base == 16
    results = drv.wait(pending, timeout=5)
    assert all(r.status == Status.OK for r in results)
    assert env.device.tracker.free_pages(0) == BUDGET


def test_small_budget_does_not_limit_zero_copy_requests(make_blk: MakeBlk,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    # Regression: the transfer limit used to be min(4 MiB, budget), so with --bounce-pages 4
    # every request above 16 KiB was IOERR, bounced or not -- and the guest cannot know.
    caplog.set_level(logging.DEBUG, logger="virtio_blk.device")
    env = make_blk(bounce_pages=BUDGET)
    drv = env.drv
    data = os.urandom(16 * BUDGET * 4096)
    res = drv.write(0, data, pieces=drv.pieces([len(data) // 2] * 2))  # page-joined
    assert (res.status, res.used) == (Status.OK, 1)
    res = drv.read(0, len(data), pieces=drv.pieces([512, len(data) - 512]))  # two ranges
    assert (res.status, res.used, res.data) == (Status.OK, len(data) + 1, data)
    assert env.device.stats.bounced_requests == 0
    # The same size needing a bounce buffer cannot have one: IOERR, said why.
    res = drv.read(0, len(data), pieces=drv.pieces([100, len(data) - 100]))
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert any("cannot bounce" in r.getMessage() for r in caplog.records)
