"""The packed ring's in-flight area (vhost.queue.inflight_packed): a backend killed at any point
of a pop or a publication resumes with nothing lost and nothing done twice, and takes its ring
position from the area (QEMU 7.2's SET_VRING_BASE after a crash is stale); a hostile area is
refused with QueueError before anything is written.

A crash is played by a tracker that stops (raises :class:`Crash`) at a chosen store; the ring
and the area are left as they are, and a new queue is built over the same memory -- what a
restarted backend sees."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import pytest

from tests.unit.vhost.ring import PackedRing
from vhost.queue import inflight as inf
from vhost.queue import inflight_packed as infp
from vhost.queue.base import QueueError
from vhost.queue.inflight_packed import (
    ENTRY_SIZE,
    HEADER_SIZE,
    PackedInflightQueue,
    RawDesc,
    queue_stride,
)
from vhost.queue.packed import FRESH_BASE, encode_base

SIZE = 8


class Crash(Exception):
    """The backend died here."""


def region() -> memoryview:
    return memoryview(bytearray(queue_stride(SIZE)))


def restart(ring: PackedRing, area: memoryview, base: int = FRESH_BASE) -> PackedRing:
    """A new backend over the same guest memory and area; the driver state carries over."""
    new = PackedRing.__new__(PackedRing)
    new.__dict__.update(ring.__dict__)
    new.vq = type(ring.vq)(ring.mem, SIZE, ring.addresses, ring.features, base,
                            inflight=PackedInflightQueue(area, SIZE))
    return new


def chains(n: int, ring: PackedRing, slots: int = 2) -> list[int]:
    return [ring.add_chain([(ring.data + 256 * i + 16 * k, 8, k == slots - 1)
                            for k in range(slots)]) for i in range(n)]


def finish(ring: PackedRing, want: list[int]) -> None:
    """Pop what is there, complete it, and check the driver gets exactly ``want``, in order of
    popping."""
    popped = [c.head for c in ring.vq.pop_batch()]
    assert popped == want
    ring.vq.add_used_many([(b, 1) for b in popped])
    ring.vq.publish_used()
    assert sorted(b for b, _ in ring.take_used()) == sorted(want)
    assert ring.vq.in_flight_count == 0


def test_fresh_area_initialised_at_the_vring_base() -> None:
    area = region()
    ring = PackedRing(size=SIZE, base=encode_base(3, 0, 3, 0),
                      inflight=PackedInflightQueue(area, SIZE))
    version, desc_num, free_head, old_free, used, old_used = struct.unpack_from("<6H", area, 8)
    assert (version, desc_num, free_head, old_free, used, old_used) == (1, SIZE, 0, 0, 3, 3)
    assert area[20] == area[21] == 0  # used wrap counters
    assert [struct.unpack_from("<H", area, HEADER_SIZE + i * ENTRY_SIZE + 2)[0]
            for i in range(SIZE)] == [1, 2, 3, 4, 5, 6, 7, 0xFFFF]
    assert ring.vq.vring_base() == encode_base(3, 0, 3, 0)


def test_restart_resubmits_in_flight_chains_in_order_from_the_area_position() -> None:
    """Three chains popped, the second completed and published; the backend dies.  The new one
    is told the stale FRESH_BASE (QEMU 7.2), yet resumes at the right place: the first and third
    come back, oldest first, and new chains after them are read where the driver put them."""
    area = region()
    ring = PackedRing(size=SIZE, inflight=PackedInflightQueue(area, SIZE))
    a, b, c = chains(3, ring)
    assert [x.head for x in ring.vq.pop_batch()] == [a, b, c]
    ring.vq.add_used(b, 1)
    ring.vq.publish_used()
    assert ring.take_used() == [(b, 1)]
    ring2 = restart(ring, area)
    assert ring2.vq.replay_pending
    assert ring2.vq.vring_base() == encode_base(6, 1, 2, 1)  # used 2 (after b), avail 2 + 4
    (d,) = chains(1, ring2)
    popped = ring2.vq.pop_batch()
    assert [x.head for x in popped] == [a, c, d]
    assert popped[0].writable == [(ring.data + 16, 8)]  # the chain as the area kept it
    ring2.vq.add_used_many([(c, 1), (a, 1), (d, 1)])
    ring2.vq.publish_used()
    assert ring2.take_used() == [(c, 1), (a, 1), (d, 1)]


def test_restart_replays_indirect_chains_from_their_table() -> None:
    area = region()
    ring = PackedRing(size=SIZE, inflight=PackedInflightQueue(area, SIZE))
    buf = ring.add_chain([(ring.data, 16, False), (ring.data + 64, 8, True)], indirect=True)
    ring.vq.pop_batch()
    ring2 = restart(ring, area)
    (chain,) = ring2.vq.pop_batch()
    assert (chain.head, chain.readable, chain.writable) == (
        buf, [(ring.data, 16)], [(ring.data + 64, 8)])
    assert ring2.vq.vring_base() == encode_base(1, 1, 0, 1)


class Crashing(PackedInflightQueue):
    """A tracker that dies at ``at`` once ``armed``: "pop" just before the store that commits
    a pop, "before-ring" after storing the new used position but before the ring is written,
    "after-ring" after the ring is written but before the batch is committed in the area."""

    def __init__(self, view: memoryview, size: int, at: str) -> None:
        super().__init__(view, size)
        self.at = at
        self.armed = False

    def popped(self, descs: list[RawDesc]) -> int:
        if not self.armed or self.at != "pop":
            return super().popped(descs)
        before = bytes(self._view[14:16])
        super().popped(descs)
        self._view[14:16] = before  # old_free_head: the commit store never happened
        raise Crash

    def publishing(self, used_idx: int, used_wrap: int) -> None:
        super().publishing(used_idx, used_wrap)
        if self.armed and self.at == "before-ring":
            raise Crash

    def published(self) -> None:
        if self.armed and self.at == "after-ring":
            raise Crash
        super().published()


def run_until_crash(at: str, area: memoryview) -> tuple[PackedRing, list[int]]:
    """Chains a, b, c popped; b completed.  Then d popped and c completed while the backend
    dies at ``at``."""
    tracker = Crashing(area, SIZE, at)
    ring = PackedRing(size=SIZE, inflight=tracker)
    bufs = chains(3, ring)
    ring.vq.pop_batch()
    ring.vq.add_used(bufs[1], 1)
    ring.vq.publish_used()
    assert ring.take_used() == [(bufs[1], 1)]
    bufs += chains(1, ring)
    tracker.armed = True
    with pytest.raises(Crash):
        if at == "pop":
            ring.vq.pop_batch()
        else:
            ring.vq.pop_batch()
            ring.vq.add_used(bufs[2], 1)
            ring.vq.publish_used()
    return ring, bufs


def test_crash_before_a_pop_commits_pops_it_again() -> None:
    area = region()
    ring, (a, _, c, d) = run_until_crash("pop", area)
    ring2 = restart(ring, area)
    assert ring2.vq.vring_base() == encode_base(6, 1, 2, 1)  # d is not in flight
    finish(ring2, [a, c, d])  # a, c resubmitted; d popped from the ring, once
    # The entries the cut-short pop had written are free again: a full ring fits.
    finish(ring2, chains(SIZE // 2, ring2))
    assert not ring2.vq.broken


def test_crash_before_the_ring_is_written_resubmits_the_batch() -> None:
    area = region()
    ring, (a, _, c, d) = run_until_crash("before-ring", area)
    assert ring.take_used() == []  # the driver never saw c complete
    ring2 = restart(ring, area)
    assert ring2.vq.vring_base() == encode_base(0, 0, 2, 1)  # a, c, d in flight: 6 slots
    finish(ring2, [a, c, d])


def test_crash_after_the_ring_is_written_commits_the_batch() -> None:
    area = region()
    ring, (a, _, c, d) = run_until_crash("after-ring", area)
    assert ring.take_used() == [(c, 1)]  # the driver saw it: it must not come back
    ring2 = restart(ring, area)
    assert ring2.vq.vring_base() == encode_base(0, 0, 4, 1)
    finish(ring2, [a, d])


def test_many_crashes_lose_nothing() -> None:
    """Crash at every kind of point in turn, many times: every chain the driver made
    available completes exactly once."""
    area = region()
    ring = PackedRing(size=SIZE, inflight=PackedInflightQueue(area, SIZE))
    outstanding: dict[int, int] = {}
    completed: list[int] = []
    serial = 0
    for round_ in range(30):
        while ring.free_ids and ring.free_slots >= 2:
            buf = chains(1, ring)[0]
            outstanding[buf] = serial
            serial += 1
        at = ("pop", "before-ring", "after-ring")[round_ % 3]
        tracker = Crashing(area, SIZE, at)
        ring = restart(ring, area)
        ring.vq = type(ring.vq)(ring.mem, SIZE, ring.addresses, ring.features, FRESH_BASE,
                                inflight=tracker)
        popped = [c.head for c in ring.vq.pop_batch(3)]
        tracker.armed = True
        try:
            more = [c.head for c in ring.vq.pop_batch()]
            ring.vq.add_used_many([(b, 1) for b in (popped + more)[::2]])
            ring.vq.publish_used()
        except Crash:
            pass
        for buf, _ in ring.take_used():
            assert buf in outstanding, buf
            del outstanding[buf]
            completed.append(buf)
    ring = restart(ring, area)
    popped = [c.head for c in ring.vq.pop_batch()]
    assert sorted(popped) == sorted(outstanding)
    ring.vq.add_used_many([(b, 1) for b in popped])
    ring.vq.publish_used()
    assert sorted(b for b, _ in ring.take_used()) == sorted(outstanding)
    assert len(completed) + len(outstanding) == serial


# ---------------------------------------------------------------------------- hostile areas


def poke(fmt: str, offset: int, value: int) -> Callable[[memoryview], None]:
    return lambda area: struct.pack_into(fmt, area, offset, value)


def entry(i: int, field: int) -> int:
    return HEADER_SIZE + i * ENTRY_SIZE + field


@pytest.mark.parametrize(("damage", "why"), [
    (poke("<H", 8, 2), "version 2"),
    (poke("<Q", 0, 1), "features 0x1"),
    (poke("<H", 10, 4), "of 4 entries"),
    (poke("<H", 14, SIZE), "old_free_head 8"),
    (poke("<H", 18, SIZE + 3), "old_used_idx 11"),
    (poke("<B", 21, 2), "wrap counters"),
    (poke("<B", 25, 1), "padding"),
    (poke("<B", entry(3, 0), 2), "entry 3: in flight 2"),
    (poke("<B", entry(3, 1), 1), "entry 3: in flight"),
    (poke("<H", entry(7, 2), 9), "next 9"),
    (poke("<H", entry(7, 2), 4), "free list loops"),  # 4 -> ... -> 7 -> 4
    (poke("<H", entry(0, 6), 0), "num 0"),  # the chain at entry 0 (a's)
    (poke("<H", entry(0, 6), 9), "num 9"),
    (poke("<H", entry(0, 4), 3), "not at its last entry 3"),
    (poke("<H", entry(0, 2), 4), "is out of range, free or in another chain"),
    # Entries on neither the free list nor a chain (found by fuzz/packed_ring.py): a pop would
    # find the free list empty with ring slots free, and the fast path's claim() raise.
    (poke("<H", entry(6, 2), 0xFFFF), "1 entries neither free nor in flight"),  # 4, 5, 6 free
    (poke("<H", 14, 0xFFFF), "4 entries neither free nor in flight"),  # no free list
])
def test_hostile_area_refused(damage: Callable[[memoryview], None], why: str) -> None:
    """Chains a (entries 0, 1) and b (2, 3) in flight, the free list 4..7; one field damaged:
    the new queue refuses the area, naming the field, and writes nothing."""
    area = region()
    ring = PackedRing(size=SIZE, inflight=PackedInflightQueue(area, SIZE))
    chains(2, ring)
    ring.vq.pop_batch()
    damage(area)
    before = bytes(area)
    with pytest.raises(QueueError, match=why):
        restart(ring, area)
    assert bytes(area) == before


def test_huge_counters_are_renumbered() -> None:
    area = region()
    ring = PackedRing(size=SIZE, inflight=PackedInflightQueue(area, SIZE))
    a, b = chains(2, ring)
    ring.vq.pop_batch()
    struct.pack_into("<Q", area, entry(0, 8), (1 << 64) - 1)  # a: newest now
    ring2 = restart(ring, area)
    assert [c.head for c in ring2.vq.pop_batch()] == [b, a]
    assert [struct.unpack_from("<Q", area, entry(i, 8))[0] for i in (2, 0)] == [0, 1]


# ---------------------------------------------------------------------------- the shared area


def test_area_made_and_mapped_for_packed_rings() -> None:
    """GET_INFLIGHT_FD after SET_FEATURES with RING_PACKED: the area has packed regions (32-byte
    header and entries), each queue's tracker sees its own, and a split tracker is refused."""
    fd, size = inf.create_area(2, SIZE, packed=True)
    try:
        assert size == 2 * queue_stride(SIZE) == 2 * ((32 * SIZE + 32 + 63) & ~63)
        with pytest.raises(inf.InflightError, match=r"bytes, .* needed"):
            inf.InflightArea.map(fd, inf.area_size(2, SIZE), 0, 2, SIZE, packed=True)
        area = inf.InflightArea.map(fd, size, 0, 2, SIZE, packed=True)
        split_area = inf.InflightArea.map(fd, size, 0, 2, SIZE)
    finally:
        os.close(fd)
    try:
        first = infp.tracker(area, 0, SIZE)
        second = infp.tracker(area, 1, SIZE)
        second.recover(lambda slot: 0, 5, 0)
        first.recover(lambda slot: 0, 0, 1)
        assert struct.unpack_from("<H", area.mapping, queue_stride(SIZE) + 16)[0] == 5
        assert struct.unpack_from("<H", area.mapping, 16)[0] == 0
        with pytest.raises(inf.InflightError, match="made for packed rings"):
            area.queue(0, SIZE)
        with pytest.raises(inf.InflightError, match="made for split rings"):
            infp.tracker(split_area, 0, SIZE)
        with pytest.raises(inf.InflightError, match="beyond the 2"):
            infp.tracker(area, 2, SIZE)
        first.release()
        second.release()
    finally:
        area.close()
        split_area.close()
