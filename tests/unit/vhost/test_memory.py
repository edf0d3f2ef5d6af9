"""Point 2: the memory table -- odd mmap offsets, adjacent regions, ADD/REM_MEM_REG, replacement."""

from __future__ import annotations

import gc
import os

import pytest

from tests.unit.vhost.helpers import (
    ODD_LAYOUT,
    WAIT,
    MiB,
    assert_refused,
    backend_vq,
    fd_count,
    memfd_mappings,
    wait_disconnected,
    wait_for,
)
from tests.vhost_devices import EchoDevice
from vhost import messages as m
from vhost.memory import MemoryTable, MemoryTableError
from vhost.messages import Request
from vhost.queue.split import DESC, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vhost_frontend import FrontendMemory


def _table(regions) -> bytes:
    descs = [r.description() for r in regions]
    return m.MemoryTable.build({"num_regions": len(descs), "padding": 0, "regions": descs})


def test_regions_with_odd_mmap_offsets_carry_rings_and_buffers(serve, open_session) -> None:
    """Rings at aligned guest addresses inside regions with unaligned mmap offsets must start
    (regression: the backend checked alignment on frontend virtual addresses)."""
    running = serve(EchoDevice(num_queues=3))
    s = open_session(running, layout=ODD_LAYOUT).start()
    handler = running.daemon.handler
    assert [(r.gpa, r.size, r.mmap_offset) for r in handler.memory.guest.regions] == list(
        ODD_LAYOUT)
    for i in range(3):
        assert s.mem.regions[i].uaddr % 16, "the layout should give unaligned frontend addresses"
        q = s.queue(i, 16, region=i)
        s.echo(q, f"queue {i} in region {i}".encode(), region=i)
        # Buffers in every region, on every queue.
        for r in range(3):
            s.echo(q, b"x" * (100 + r), region=r)


def test_descriptor_spanning_two_adjacent_regions(serve, open_session) -> None:
    running = serve(EchoDevice())
    s = open_session(running, layout=ODD_LAYOUT).start()
    q = s.queue(0, 16)
    boundary = ODD_LAYOUT[1][0]
    data = bytes(range(256)) * 4
    spanning, inside = boundary - 100, boundary + 4096  # the first runs from region 0 into 1
    for indirect in (False, True):
        for src, dst in ((spanning, inside), (inside, spanning)):
            s.mem.write(src, data)
            head = s.fe.submit(q, [(src, len(data), False), (dst, len(data), True)], indirect)
            assert q.wait_used(1, WAIT) == [(head, len(data))]
            assert s.mem.read(dst, len(data)) == data.upper()
    # An indirect table that itself straddles the boundary is read in two pieces.
    table, src, dst = boundary - 16, inside, inside + 64
    s.mem.write(src, b"split table")
    s.mem.write(table, DESC.pack(src, 11, VIRTQ_DESC_F_NEXT, 1)
                + DESC.pack(dst, 11, VIRTQ_DESC_F_WRITE, 0))
    head = q.free.pop()
    q.write_desc(head, table, 32, VIRTQ_DESC_F_INDIRECT)
    q.publish(head)
    q.kick()
    assert q.wait_used(1, WAIT) == [(head, 11)]
    assert s.mem.read(dst, 11) == b"SPLIT TABLE"
    assert not backend_vq(running, 0).broken


def test_add_and_remove_regions_at_run_time(serve, open_session) -> None:
    running = serve(EchoDevice())
    s = open_session(running, layout=ODD_LAYOUT).start(mem_table=False)
    s.fe.memory = s.mem
    s.fe.checked(Request.SET_MEM_TABLE, _table(s.mem.regions[:1]), [s.mem.regions[0].fd])
    q = s.queue(0, 16, region=0)
    s.echo(q)
    guest = running.daemon.handler.memory.guest
    assert len(guest) == 1
    mapped = memfd_mappings()
    assert s.fe.add_mem_reg(s.mem.regions[2]) == 0
    assert len(guest) == 2 and memfd_mappings() == mapped + 1
    s.echo(q, b"buffers in the hot-added region", region=2)
    assert s.fe.rem_mem_reg(s.mem.regions[2]) == 0
    assert guest.region_at(ODD_LAYOUT[2][0]) is None
    assert memfd_mappings() == mapped, "the removed region is still mapped by the backend"
    s.echo(q, b"still running")
    # Adjacent regions added one by one still let a descriptor span them.
    assert s.fe.add_mem_reg(s.mem.regions[1]) == 0
    boundary = ODD_LAYOUT[1][0]
    s.mem.write(boundary - 3, b"abcdef")
    head = s.fe.submit(q, [(boundary - 3, 6, False), (boundary + 64, 6, True)])
    assert q.wait_used(1, WAIT) == [(head, 6)]
    assert s.mem.read(boundary + 64, 6) == b"ABCDEF"


def test_add_mem_reg_only_as_qemu_does_with_configure_mem_slots(serve, open_session) -> None:
    """QEMU 7.2 with CONFIGURE_MEM_SLOTS never sends SET_MEM_TABLE: every region is added."""
    running = serve(EchoDevice())
    s = open_session(running, layout=ODD_LAYOUT).start(mem_table=False)
    assert s.fe.get_u64(Request.GET_MAX_MEM_SLOTS) == 509
    s.fe.memory = s.mem
    for region in s.mem.regions:
        assert s.fe.add_mem_reg(region) == 0
    q = s.queue(0, 16, region=1)
    for r in range(3):
        s.echo(q, region=r)


def test_add_mem_reg_overlapping_and_rem_mem_reg_unknown_are_refused(
        serve, open_session, caplog) -> None:
    running = serve(EchoDevice())
    s = open_session(running, layout=ODD_LAYOUT).start()
    q = s.queue(0, 16)
    region = s.mem.regions[1]
    one = m.SingleMemoryRegion.build({"padding": 0, "region": region.description()})
    assert_refused(s.fe, caplog, Request.ADD_MEM_REG, one, [region.fd])
    ghost = m.SingleMemoryRegion.build(
        {"padding": 0, "region": m.memory_region(64 * MiB, MiB, 0x1000, 0)})
    assert_refused(s.fe, caplog, Request.REM_MEM_REG, ghost)
    # Same gpa and size but another user address: not the region that was added.
    wrong = m.SingleMemoryRegion.build({"padding": 0, "region": m.memory_region(
        region.gpa, region.size, region.uaddr + 4096, region.mmap_offset)})
    assert_refused(s.fe, caplog, Request.REM_MEM_REG, wrong)
    assert len(running.daemon.handler.memory.guest) == 3
    s.echo(q, region=1)


def test_set_mem_table_while_a_queue_runs(serve, open_session) -> None:
    """QEMU resends the whole table on hotplug; rings and in-flight requests must survive it."""
    # Earlier tests' garbage may still map guest RAM until a collection (a compiled fast path
    # and its handler refer to each other); the count at the end is this test's own.
    gc.collect()
    assert memfd_mappings() == 0
    device = EchoDevice(asynchronous=True, delay=0.05)
    running = serve(device)
    before = fd_count()
    s = open_session(running, layout=ODD_LAYOUT)
    s.start(mem_table=False)
    s.fe.memory = s.mem
    s.fe.checked(Request.SET_MEM_TABLE, _table(s.mem.regions[:2]),
                 [r.fd for r in s.mem.regions[:2]])
    q = s.queue(0, 16)
    s.echo(q)
    # A request in flight while the table is replaced by a bigger one.
    src, dst = s.mem.alloc(8), s.mem.alloc(8)
    s.mem.write(src, b"inflight")
    head = s.fe.submit(q, [(src, 8, False), (dst, 8, True)])
    wait_for(lambda: len(device.seen) == 2, "the request to be in flight")
    s.fe.set_mem_table(s.mem)
    assert q.wait_used(1, WAIT) == [(head, 8)]
    assert s.mem.read(dst, 8) == b"INFLIGHT"
    assert len(running.daemon.handler.memory.guest) == 3
    s.echo(q, b"after the new table")
    s.echo(q, b"in the new region", region=2)
    # And a table that shrinks again (the ring's region is kept).
    s.fe.checked(Request.SET_MEM_TABLE, _table(s.mem.regions[:1]), [s.mem.regions[0].fd])
    s.echo(q, b"after shrinking", region=0)
    assert not backend_vq(running, 0).broken
    s.close()
    wait_disconnected(running)
    # Old tables' mappings were pinned by the ring views; they must go once the queue stops.
    wait_for(lambda: fd_count() == before, "every mapping's fd to be closed")
    assert memfd_mappings() == 0


def test_set_mem_table_is_all_or_nothing(serve, open_session, caplog) -> None:
    running = serve(EchoDevice())
    s = open_session(running, layout=ODD_LAYOUT).start()
    q = s.queue(0, 16)
    regions = [r.description() for r in s.mem.regions]
    regions[2]["memory_size"] = 64 * MiB  # past the end of its memfd
    bad = m.MemoryTable.build({"num_regions": 3, "padding": 0, "regions": regions})
    assert_refused(s.fe, caplog, Request.SET_MEM_TABLE, bad, [r.fd for r in s.mem.regions])
    guest = running.daemon.handler.memory.guest
    assert [r.size for r in guest.regions] == [size for _, size, _ in ODD_LAYOUT]
    s.echo(q, region=2)


# ---------------------------------------------------------------------------- MemoryTable alone


@pytest.fixture
def frontend_mem():
    mem = FrontendMemory(ODD_LAYOUT)
    yield mem
    mem.close()


def _region(r):
    return m.SingleMemoryRegion.parse(
        m.SingleMemoryRegion.build({"padding": 0, "region": r.description()})).region


def test_memory_table_translates_frontend_addresses(frontend_mem) -> None:
    table = MemoryTable()
    try:
        table.set_table([_region(r) for r in frontend_mem.regions],
                        [r.fd for r in frontend_mem.regions])
        for r in frontend_mem.regions:
            assert table.uva_to_gpa(r.uaddr + 5, 10) == r.gpa + 5
            with pytest.raises(MemoryTableError):
                table.uva_to_gpa(r.uaddr + r.size - 4, 8)
        # Both sides see the same bytes through their own mappings.
        frontend_mem.write(ODD_LAYOUT[1][0] - 2, b"wxyz")
        assert table.guest.read(ODD_LAYOUT[1][0] - 2, 4) == b"wxyz"
    finally:
        table.close()


def test_memory_table_slot_limit_and_fd_count(frontend_mem) -> None:
    table = MemoryTable(max_slots=2)
    try:
        with pytest.raises(MemoryTableError, match="3 regions but 2 fds"):
            table.set_table([_region(r) for r in frontend_mem.regions],
                            [r.fd for r in frontend_mem.regions[:2]])
        table.add(_region(frontend_mem.regions[0]), frontend_mem.regions[0].fd)
        table.add(_region(frontend_mem.regions[1]), frontend_mem.regions[1].fd)
        with pytest.raises(MemoryTableError, match="slots"):
            table.add(_region(frontend_mem.regions[2]), frontend_mem.regions[2].fd)
    finally:
        table.close()


@pytest.mark.parametrize(
    ("size", "offset", "why"),
    [(0, 0, "size 0"), (2 * MiB, 1 << 64, "overflows"), (4 * MiB, 0, "past the end")],
)
def test_memory_table_refuses_bad_regions(frontend_mem, size, offset, why) -> None:
    r = frontend_mem.regions[0]
    region = _region(r)
    region.memory_size = size
    region.mmap_offset = min(offset, (1 << 64) - 1)
    table = MemoryTable()
    try:
        with pytest.raises(MemoryTableError, match=why):
            table.add(region, r.fd)
        assert len(table) == 0
    finally:
        table.close()
    assert os.fstat(r.fd)  # the caller's fd is untouched
