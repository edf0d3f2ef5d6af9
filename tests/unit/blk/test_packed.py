"""The packed ring end to end over the socket: a frontend that acks VIRTIO_F_RING_PACKED (QEMU's
``packed=on``) gets packed queues -- served in a thread or in a queue process, on each engine,
by the fast path and the generic path -- GET_VRING_BASE answers in the packed encoding, and a
backend restarted with the same in-flight area resubmits what it left in flight, taking the ring
position from the area."""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from tests.qemu_log import PAGE, QemuLog, pages, pieces_pages
from tests.unit.blk.conftest import MakeBlk
from tests.unit.vhost.helpers import wait_err
from vhost.messages import Request, VirtioFeature
from vhost.queue import inflight_packed as infp
from vhost.queue.packed import encode_base
from vhost_frontend.blk import T_IN
from vhost_frontend.errors import FrontendError
from vhost_frontend.packed import PackedDriverQueue
from virtio_blk.request import Status

STATUS_OK = int(Status.OK)


def test_packed_offered_and_acked_only_on_request(make_blk: MakeBlk) -> None:
    env = make_blk()
    assert env.frontend.get_u64(Request.GET_FEATURES) & VirtioFeature.RING_PACKED
    assert not env.frontend.features & VirtioFeature.RING_PACKED  # split unless asked
    packed = make_blk(packed=True)
    assert packed.frontend.features & VirtioFeature.RING_PACKED
    assert isinstance(packed.queue, PackedDriverQueue)


@pytest.mark.parametrize("engine", ["inline", "threads", "io_uring"])
@pytest.mark.parametrize("fast_path", [True, False])
def test_reads_and_writes_over_many_laps(make_blk: MakeBlk, engine: str,
                                         fast_path: bool) -> None:
    """Small rings wrap many times; direct and indirect chains, one and several data pieces."""
    env = make_blk(packed=True, engine=engine, fast_path=fast_path, queue_size=8)
    drv = env.drv
    for i in range(40):
        data = bytes([i]) * 4096
        indirect = i % 2 == 1
        pieces = drv.pieces([1024, 3072]) if i % 3 == 0 else None
        assert drv.write(8 * i, data, pieces=pieces, indirect=indirect).status == STATUS_OK
        got = drv.read(8 * i, 4096, indirect=indirect)
        assert got.status == STATUS_OK and got.data == data, i
        assert env.file(4096 * i, 4096) == data
    assert drv.flush().status == STATUS_OK
    handler = env.queue_handler()
    taken = handler._fast.taken if handler._fast else 0
    assert (taken > 0) == fast_path
    q = env.queue
    assert isinstance(q, PackedDriverQueue)
    base = env.frontend.get_vring_base(0)
    assert base == encode_base(q.avail_pos, q.avail_wrap, q.used_pos, q.used_wrap)
    assert q.avail_wrap == q.used_wrap and base >> 31 == q.used_wrap


def test_served_in_a_queue_process(make_blk: MakeBlk) -> None:
    """The process's counters reach the control process as a split ring's do (published with
    each batch of used elements)."""
    env = make_blk(packed=True, queue_processes=True, queue_size=8)
    for i in range(20):
        data = os.urandom(512)
        assert env.drv.write(i, data).status == STATUS_OK
        assert env.drv.read(i, 512).data == data
    stats = env.device.stats
    assert (stats.writes, stats.reads, stats.requests) == (20, 20, 40)
    q = env.queue
    assert isinstance(q, PackedDriverQueue)
    assert env.frontend.get_vring_base(0) == encode_base(q.avail_pos, q.avail_wrap, q.used_pos,
                                                         q.used_wrap)


def test_many_requests_in_flight_complete_out_of_order(make_blk: MakeBlk) -> None:
    """A full ring of requests at once, indirect (one slot each; threads complete them in any
    order)."""
    env = make_blk(packed=True, engine="threads", queue_size=16)
    drv = env.drv
    pending = [drv.start(T_IN, 8 * i, in_len=4096, kick=False, indirect=True)
               for i in range(16)]
    drv.kick()
    results = drv.wait(pending)
    assert [r.status for r in results] == [STATUS_OK] * 16
    assert [r.data for r in results] == [env.file(4096 * i, 4096) for i in range(16)]


@pytest.mark.parametrize("queue_processes", [False, True])
def test_dirty_log_marks_used_elements_in_the_descriptor_ring(make_blk: MakeBlk,
                                                              queue_processes: bool) -> None:
    """While QEMU migrates: the read's data and status, and the used element -- written over
    the chain's first slot in the descriptor ring, which QEMU's used-ring log address (the
    device event area) does not cover -- are marked; nothing else."""
    qlog = QemuLog(32 << 20)
    try:
        # 256 slots: the descriptor ring fills a page, so slot 0 and the device event area
        # (marked on every notification change) lie in different pages
        env = make_blk(packed=True, queue_processes=queue_processes, queue_size=256)
        assert env.frontend.set_log_base(qlog.fd, qlog.size) == b"\0" * 8
        env.frontend.set_logging(True)  # log address: the device event area, as QEMU's
        qlog.take()
        q = env.queue
        assert isinstance(q, PackedDriverQueue)
        slot = q.avail_pos
        pending = env.drv.start(T_IN, 8, in_len=2 * PAGE)
        assert env.drv.wait([pending])[0].status == STATUS_OK
        marked = qlog.take()
        assert pieces_pages(pending.writable) <= marked
        assert not pages(q.desc + 16 * slot, 16) & (pages(q.used, 4)
                                                    | pieces_pages(pending.writable))
        assert pages(q.desc + 16 * slot, 16) <= marked
        assert marked <= (pieces_pages(pending.writable) | pages(q.desc, 16 * q.size)
                          | pages(q.used, 4))
    finally:
        qlog.close()


@pytest.mark.parametrize("queue_processes", [False, True])
def test_hostile_packed_inflight_region_refused_at_start(make_blk: MakeBlk,
                                                         queue_processes: bool) -> None:
    """A packed region the frontend scribbled on (here: a chain in flight of 0 descriptors)
    stops that queue at start -- err eventfd, nothing resubmitted -- in a thread and before a
    queue process is spawned; the device's other queue keeps serving."""
    env = make_blk(packed=True, num_queues=2, queue_processes=queue_processes)
    fe = env.frontend
    fd, size = fe.get_inflight_fd(2, 128)
    area = mmap.mmap(fd, size)
    try:
        stride = infp.queue_stride(128)
        tracker = infp.PackedInflightQueue(memoryview(area)[stride : 2 * stride], 128)
        tracker.recover(lambda slot: 0, 0, 1)
        tracker.popped([(0x1000, 16, 3, 0)])  # a chain in flight at entry 0 ...
        struct.pack_into("<H", area, stride + infp.HEADER_SIZE + 6, 0)  # ... of 0 descriptors
        tracker.release()
        fe.set_inflight_fd(fd, size, 2, 128)
        with pytest.raises(FrontendError, match="SET_VRING_ENABLE failed"):
            fe.setup_packed_queue(1, size=128)  # (the start it triggers is refused)
        q1 = fe.queues[1]
        wait_err(q1)
        assert q1.take_used() == []  # nothing resubmitted
        assert env.drv.read(0, 512).status == STATUS_OK  # queue 0 is untouched
    finally:
        area.close()
        os.close(fd)
