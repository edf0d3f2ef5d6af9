"""The packed virtqueue (vhost.queue.packed) without IO: popping with wrap counters, chains and
indirect tables, used elements, notifications both ways, the vring base, the fast path's
peek/claim, dirty logging, and every hostile-ring rule -- over a bytearray made guest memory,
the driver played by :class:`vhost_frontend.packed.PackedDriverRing` (see :mod:`.ring`)."""

from __future__ import annotations

import mmap
import struct

import pytest

from guestmem import GuestMemory
from tests.unit.vhost.ring import BASE, EVENT_IDX, INDIRECT, MEM_SIZE, PackedRing
from vhost.queue.base import CHAIN_HEAD, CHAIN_INTO_GUEST, CHAIN_TOKEN, QueueError, RingAddresses
from vhost.queue.packed import (
    EVENT_DESC,
    EVENT_DISABLE,
    EVENT_ENABLE,
    F_AVAIL,
    F_INDIRECT,
    F_NEXT,
    F_USED,
    F_WRITE,
    FRESH_BASE,
    PackedQueue,
    decode_base,
    encode_base,
    validate_size,
)

W, N, IND = F_WRITE, F_NEXT, F_INDIRECT


def pieces(ring: PackedRing, i: int, n: int = 2) -> list[tuple[int, int, bool]]:
    """``n`` pieces in the data area: readable ones, the last writable."""
    gpa = ring.data + 256 * i
    return [(gpa + 16 * k, 8, k == n - 1) for k in range(n)]


# ---------------------------------------------------------------------------- construction


@pytest.mark.parametrize("size", [0, 32769, -1])
def test_invalid_sizes(size: int) -> None:
    with pytest.raises(QueueError, match="size"):
        validate_size(size)


def test_sizes_need_not_be_powers_of_two() -> None:
    ring = PackedRing(size=5)
    for i in range(12):  # more than two laps of a 5-slot ring, 2 slots a chain
        buf = ring.add_chain(pieces(ring, i % 4))
        (chain,) = ring.vq.pop_batch()
        assert chain.head == buf
        ring.vq.add_used(buf, 8)
        ring.vq.publish_used()
        assert ring.take_used() == [(buf, 8)]
    assert (ring.vq.next_avail, ring.vq.avail_wrap) == (24 % 5, (24 // 5 + 1) % 2)


@pytest.mark.parametrize(("desc", "driver", "device", "why"), [
    (BASE + 8, BASE + 256, BASE + 260, "descriptor ring at 0x10008 is not 16-byte aligned"),
    (BASE, BASE + 258, BASE + 260, "driver event area at 0x10102 is not 4-byte aligned"),
    (BASE, BASE + 256, BASE + 262, "device event area at 0x10106 is not 4-byte aligned"),
    (0, BASE + 256, BASE + 260, "descriptor ring at 0x0"),
    (BASE, BASE + MEM_SIZE, BASE + 260, "driver event area"),
])
def test_ring_addresses_checked(desc: int, driver: int, device: int, why: str) -> None:
    mem = GuestMemory.from_buffer(bytearray(MEM_SIZE), gpa=BASE)
    with pytest.raises(QueueError, match=why):
        PackedQueue(mem, 8, RingAddresses(desc, driver, device), 0)


def test_vring_base_encoding() -> None:
    """Bits 0-14 avail position, 15 avail wrap, 16-30 used position, 31 used wrap."""
    assert encode_base(5, 1, 3, 0) == 5 | 1 << 15 | 3 << 16
    assert decode_base(0x8003_0005) == (5, 0, 3, 1)
    assert encode_base(0, 1, 0, 1) == FRESH_BASE


def test_constructed_from_a_set_vring_base_value() -> None:
    """A ring handed over mid-life (avail 6 in lap 0, used 6 in lap 0) continues there: the
    next chain is read at slot 6 with wrap 0, its used element goes to slot 6 with wrap 0."""
    base = encode_base(6, 0, 6, 0)
    ring = PackedRing(size=8, base=base)
    assert ring.vq.vring_base() == base
    buf = ring.add_chain(pieces(ring, 0, 3))  # slots 6, 7, 0: wraps to lap 1
    (chain,) = ring.vq.pop_batch()
    assert chain.head == buf
    assert ring.vq.vring_base() == encode_base(1, 1, 6, 0)
    ring.vq.add_used(buf, 8)
    ring.vq.publish_used()
    assert ring.read_desc(6)[3] & (F_AVAIL | F_USED) == 0  # lap 0: both bits 0
    assert ring.take_used() == [(buf, 8)]
    assert ring.vq.vring_base() == encode_base(1, 1, 1, 1)


@pytest.mark.parametrize(("base", "why"), [
    (encode_base(8, 1, 0, 1), "beyond the ring"),
    (encode_base(0, 1, 8, 1), "beyond the ring"),
    (encode_base(2, 1, 3, 1), "not within a ring ahead"),  # avail behind used, same lap
    (encode_base(3, 0, 2, 1), "not within a ring ahead"),  # avail a lap and more ahead
])
def test_bad_vring_base_refused(base: int, why: str) -> None:
    with pytest.raises(QueueError, match=why):
        PackedRing(size=8, base=base)


# ---------------------------------------------------------------------------- pop and use


def test_direct_chain_popped_and_used() -> None:
    ring = PackedRing()
    buf = ring.add_chain([(ring.data, 16, False), (ring.data + 64, 512, True),
                          (ring.data + 1024, 1, True)])
    assert ring.vq.has_avail()
    (chain,) = ring.vq.pop_batch()
    assert chain.head == buf
    assert chain.readable == [(ring.data, 16)]
    assert chain.writable == [(ring.data + 64, 512), (ring.data + 1024, 1)]
    assert (chain.readable_len, chain.writable_len) == (16, 513)
    assert not ring.vq.has_avail() and ring.vq.in_flight_count == 1
    assert ring.vq.vring_base() == encode_base(3, 1, 0, 1)
    ring.vq.add_used_many([(buf, 513)])
    assert ring.take_used() == []  # not published yet
    assert ring.vq.publish_used()
    _, length, buf_id, flags = ring.read_desc(0)
    assert (length, buf_id, flags) == (513, buf, F_AVAIL | F_USED | F_WRITE)
    assert ring.take_used() == [(buf, 513)]
    assert ring.vq.vring_base() == encode_base(3, 1, 3, 1)  # used moved by the chain's 3 slots
    assert ring.vq.in_flight_count == 0


def test_zero_length_descriptors_dropped_from_the_chain() -> None:
    ring = PackedRing()
    ring.add_raw([(ring.data, 4, N), (ring.data + 8, 0, N), (ring.data + 16, 4, W)], 3)
    (chain,) = ring.vq.pop_batch()
    assert chain.readable == [(ring.data, 4)] and chain.writable == [(ring.data + 16, 4)]


def test_out_of_order_completion_and_wrap() -> None:
    """Used elements go at the device's used position in completion order, each moving it by
    its chain's slots; over many laps of a small ring the driver reads them all."""
    ring = PackedRing(size=4)
    for lap in range(6):
        a = ring.add_chain(pieces(ring, 0, 3))
        b = ring.add_chain(pieces(ring, 1, 1))
        chains = ring.vq.pop_batch()
        assert [c.head for c in chains] == [a, b]
        ring.vq.add_used_many([(b, 1), (a, 2)])
        ring.vq.publish_used()
        assert ring.take_used() == [(b, 1), (a, 2)], lap
        assert ring.vq.vring_base() == encode_base(0, lap % 2 == 1, 0, lap % 2 == 1)


def test_indirect_chain_takes_one_slot() -> None:
    ring = PackedRing(size=4)
    for i in range(5):
        buf = ring.add_chain(pieces(ring, i % 3, 4), indirect=True)
        (chain,) = ring.vq.pop_batch()
        assert chain.head == buf and len(chain.readable) == 3 and len(chain.writable) == 1
        ring.vq.add_used(buf, 0)
        ring.vq.publish_used()
        assert ring.read_desc((i) % 4)[3] & F_WRITE == 0  # nothing written: no WRITE flag
        assert ring.take_used() == [(buf, 0)]
    assert ring.vq.vring_base() == encode_base(1, 0, 1, 0)


def test_pop_batch_limit_and_pop() -> None:
    ring = PackedRing()
    bufs = [ring.add_chain(pieces(ring, i, 1)) for i in range(3)]
    assert [c.head for c in ring.vq.pop_batch(2)] == bufs[:2]
    chain = ring.vq.pop()
    assert chain is not None and chain.head == bufs[2]
    assert ring.vq.pop() is None


def test_add_used_of_an_id_not_in_flight() -> None:
    ring = PackedRing()
    buf = ring.add_chain(pieces(ring, 0))
    ring.vq.pop_batch()
    with pytest.raises(ValueError, match="not in flight"):
        ring.vq.add_used_many([(buf, 1), (buf, 1)])
    with pytest.raises(ValueError, match="not in flight"):
        ring.vq.add_used(99, 1)
    ring.vq.publish_used()
    assert ring.take_used() == [(buf, 1)]  # the one before the bad entry was added


# ---------------------------------------------------------------------------- hostile rings


def broken(ring: PackedRing, why: str) -> None:
    assert ring.vq.pop_batch() == []
    assert ring.vq.broken and why in str(ring.vq.error), ring.vq.error
    assert ring.vq.pop_batch() == []  # stays broken
    assert ring.vq.peek_simple(8) is None


def test_buffer_id_out_of_range() -> None:
    ring = PackedRing()
    ring.add_raw([(ring.data, 4, 0)], 8)
    broken(ring, "buffer id 8 >= queue size 8")


def test_buffer_id_is_taken_from_the_last_descriptor() -> None:
    ring = PackedRing()
    ring.add_raw([(ring.data, 4, N), (ring.data, 4, W)], 2)
    struct.pack_into("<H", ring.buf, 12, 7)  # the first descriptor's id: ignored
    (chain,) = ring.vq.pop_batch()
    assert chain.head == 2


def test_buffer_id_in_flight_made_available_again() -> None:
    ring = PackedRing()
    ring.add_raw([(ring.data, 4, 0)], 2)
    ring.add_raw([(ring.data, 4, 0)], 2)
    chains = ring.vq.pop_batch()
    assert [c.head for c in chains] == [2]  # the first one is in flight and returned
    assert ring.vq.broken and "buffer id 2 made available again" in str(ring.vq.error)


def test_chain_longer_than_the_ring() -> None:
    """Every slot NEXT and available (the lap flips halfway, so do the flags): the walk stops
    at the ring's size instead of going round forever."""
    ring = PackedRing(size=4)
    ring.add_raw([(ring.data, 4, N)] * 4, 0)
    broken(ring, "longer than the 4 slots not in flight")


def test_chain_longer_than_the_slots_not_in_flight() -> None:
    """With 2 slots held by a chain in flight, a 3-slot chain would run over them."""
    ring = PackedRing(size=4)
    ring.add_chain(pieces(ring, 0, 2))
    assert len(ring.vq.pop_batch()) == 1
    ring.add_raw([(ring.data, 4, N), (ring.data, 4, N)], 1)
    # the third descriptor would be slot 0, which the device holds: forge its flags as
    # available in lap 0 (as if the driver went round)
    ring.write_desc(0, ring.data, 4, 3, F_USED)
    broken(ring, "longer than the 2 slots not in flight")


def test_chain_running_into_a_descriptor_not_available() -> None:
    ring = PackedRing()
    ring.add_raw([(ring.data, 4, N)], 1)  # NEXT, but slot 1 was never made available
    broken(ring, "descriptor at slot 1 is not marked available")


@pytest.mark.parametrize("flags", [0, F_AVAIL | F_USED, F_USED])
def test_flag_games_do_not_make_a_descriptor_available(flags: int) -> None:
    """In lap 1 only AVAIL=1, USED=0 is available; the other three combinations are not (a
    used-looking or never-written slot), and the queue just sees nothing."""
    ring = PackedRing()
    ring.write_desc(0, ring.data, 4, 0, flags)
    assert not ring.vq.has_avail()
    assert ring.vq.pop_batch() == [] and not ring.vq.broken
    ring.write_desc(0, ring.data, 4, 0, F_AVAIL)
    assert ring.vq.has_avail() and len(ring.vq.pop_batch()) == 1


def test_wrap_counter_abuse_after_a_lap() -> None:
    """In lap 0 the lap-1 'available' pattern is what the device left there: not available."""
    ring = PackedRing(size=2, base=encode_base(0, 0, 0, 0))
    ring.write_desc(0, ring.data, 4, 0, F_AVAIL)  # available in lap 1, not lap 0
    assert not ring.vq.has_avail() and ring.vq.pop_batch() == [] and not ring.vq.broken
    ring.write_desc(0, ring.data, 4, 0, F_USED)  # lap 0's pattern
    assert len(ring.vq.pop_batch()) == 1


def test_buffer_outside_guest_memory() -> None:
    ring = PackedRing()
    ring.add_raw([(BASE + MEM_SIZE - 2, 4, 0)], 0)
    broken(ring, "is not in guest memory")


def test_readable_after_writable() -> None:
    ring = PackedRing()
    ring.add_raw([(ring.data, 4, W | N), (ring.data, 4, 0)], 0)
    broken(ring, "readable descriptor after writable")


def test_indirect_not_negotiated() -> None:
    ring = PackedRing(features=EVENT_IDX)
    table = ring.write_table(ring.data, [(ring.data + 64, 4, 0)])
    ring.add_raw([(table, 16, IND)], 0)
    broken(ring, "without VIRTIO_RING_F_INDIRECT_DESC")


@pytest.mark.parametrize(("descs", "why"), [
    ([(0, 16, IND | N), (0, 4, W)], "indirect descriptor in a chain"),
    ([(0, 4, N), (0, 16, IND)], "indirect descriptor in a chain"),
    ([(0, 0, IND)], "indirect table of 0 bytes"),
    ([(0, 24, IND)], "indirect table of 24 bytes"),
    ([(BASE + MEM_SIZE - 16, 32, IND)], "indirect table"),
])
def test_indirect_rules(descs: list[tuple[int, int, int]], why: str) -> None:
    ring = PackedRing()
    table = ring.write_table(ring.data, [(ring.data + 64, 4, 0), (ring.data + 64, 4, W)])
    ring.add_raw([(a or table, n, f) for a, n, f in descs], 0)
    broken(ring, why)


def test_nested_indirect() -> None:
    ring = PackedRing()
    table = ring.write_table(ring.data, [(ring.data + 64, 16, IND)])
    ring.add_raw([(table, 16, IND)], 0)
    broken(ring, "nested indirect descriptor")


def test_indirect_table_next_flags_are_ignored() -> None:
    """The table is the chain: NEXT inside it means nothing (the spec: only WRITE is valid)."""
    ring = PackedRing()
    table = ring.write_table(ring.data, [(ring.data + 64, 4, N), (ring.data + 96, 4, W)])
    ring.add_raw([(table, 32, IND)], 0)
    (chain,) = ring.vq.pop_batch()
    assert chain.readable == [(ring.data + 64, 4)] and chain.writable == [(ring.data + 96, 4)]


def test_chain_of_2_pow_32_bytes() -> None:
    mm = mmap.mmap(-1, (1 << 31) + (1 << 16))  # untouched pages cost nothing
    mem = GuestMemory.from_buffer(mm, gpa=0)
    try:
        ring_view = memoryview(mm)
        addrs = RingAddresses(0, 64, 68)
        vq = PackedQueue(mem, 4, addrs, 0)
        struct.pack_into("<QIHH", ring_view, 0, 4096, 1 << 31, 0, W | N | F_AVAIL)
        struct.pack_into("<QIHH", ring_view, 16, 4096, (1 << 31) - 1, 0, W | N | F_AVAIL)
        struct.pack_into("<QIHH", ring_view, 32, 4096, 1, 0, W | F_AVAIL)
        assert vq.pop_batch() == [] and "2**32 bytes" in str(vq.error)
        struct.pack_into("<QIHH", ring_view, 32, 4096, 0, 0, W | F_AVAIL)  # 2**32 - 1: fine
        vq2 = PackedQueue(mem, 4, addrs, 0)
        (chain,) = vq2.pop_batch()
        assert chain.writable_len == (1 << 32) - 1
        ring_view.release()
        vq.release()
        vq2.release()
    finally:
        mem.close()


# ---------------------------------------------------------------------------- notifications


def test_used_notification_flags_without_event_idx() -> None:
    ring = PackedRing(features=INDIRECT)
    for flags, want in ((EVENT_ENABLE, True), (EVENT_DISABLE, False), (EVENT_DESC, True)):
        ring.set_event_flags(flags)
        buf = ring.add_chain(pieces(ring, 0))
        ring.vq.pop_batch()
        ring.vq.add_used(buf, 1)
        assert ring.vq.publish_used() is want, flags
        ring.take_used()
    assert ring.vq.publish_used() is False  # nothing to publish


def test_used_notification_event_idx() -> None:
    """With EVENT_IDX and flags DESC the device notifies when its used position passes the
    driver's off_wrap, a position in the driver's lap; an event in the previous lap counts as
    passed."""
    ring = PackedRing(size=8)

    def complete(n: int) -> bool:
        bufs = [ring.add_chain(pieces(ring, i, 1)) for i in range(n)]
        ring.vq.pop_batch()
        ring.vq.add_used_many([(b, 1) for b in bufs])
        got = ring.vq.publish_used()
        ring.free_ids.extend(bufs)
        for b in bufs:
            ring.free_slots += ring.slots.pop(b)
        ring.used_pos, ring.used_wrap = ring.vq.next_used, ring.vq.used_wrap
        return got

    assert complete(1)  # the first publication always notifies (positions 0 -> 1)
    ring.set_used_event(5, 1)
    assert not complete(2)  # 1 -> 3: event 5 not passed
    assert complete(3)  # 3 -> 6: passes 5
    ring.set_used_event(7, 1)
    assert complete(3)  # 6 -> 1 (lap 0): passes 7
    ring.set_used_event(3, 0)
    assert not complete(1)  # 1 -> 2 in lap 0
    ring.set_used_event(1, 0)
    assert not complete(1)  # 2 -> 3: event 1 is behind, already passed before
    ring.set_used_event(7, 1)  # the previous lap's slot 7 is position -1 here
    assert not complete(1)  # 3 -> 4: not in [3, 4)
    ring.set_event_flags(EVENT_DISABLE)
    assert not complete(4)
    ring.set_event_flags(EVENT_ENABLE)
    assert complete(1)


def test_kick_suppression_event_idx() -> None:
    ring = PackedRing(size=4)
    assert not ring.vq.enable_notifications()
    assert ring.device_event() == (0 | 1 << 15, EVENT_DESC)
    ring.add_chain(pieces(ring, 0, 3))
    assert ring.kick_needed()
    ring.vq.disable_notifications()  # EVENT_IDX: the off_wrap already suppresses
    ring.vq.pop_batch()
    ring.add_chain(pieces(ring, 1, 1))  # slot 3: the device asked for slot 0
    assert not ring.kick_needed()
    assert ring.vq.enable_notifications()  # one arrived meanwhile
    assert ring.device_event() == (3 | 1 << 15, EVENT_DESC)
    ring.vq.pop_batch()
    assert not ring.vq.enable_notifications()
    assert ring.device_event() == (0 | 0 << 15, EVENT_DESC)  # slot 0 of lap 0


def test_kick_suppression_flags() -> None:
    ring = PackedRing(features=0)
    ring.vq.disable_notifications()
    assert ring.device_event()[1] == EVENT_DISABLE
    ring.add_chain(pieces(ring, 0))
    assert not ring.kick_needed()
    assert ring.vq.enable_notifications()
    assert ring.device_event()[1] == EVENT_ENABLE
    ring.add_chain(pieces(ring, 1))
    assert ring.kick_needed()


# ---------------------------------------------------------------------------- peek / claim


def test_peek_simple_and_claim() -> None:
    ring = PackedRing()
    hdr, d1, d2, st = ring.data, ring.data + 64, ring.data + 1024, ring.data + 2048
    buf = ring.add_chain([(hdr, 16, False), (d1, 512, True), (d2, 512, True), (st, 1, True)])
    chain = ring.vq.peek_simple(8)
    assert chain is not None
    *fields, _ = chain  # (region: every piece in the one region)
    assert fields == [buf, hdr, 16, [(d1, 512), (d2, 512)], 1024, True, st, 1, 4]
    assert ring.vq.vring_base() == FRESH_BASE and ring.vq.in_flight_count == 0  # nothing moved
    assert ring.vq.peek_simple(3) is None  # 4 pieces > 3
    chain = ring.vq.peek_simple(4)
    assert chain is not None
    ring.vq.claim(chain)
    assert ring.vq.vring_base() == encode_base(4, 1, 0, 1) and ring.vq.in_flight_count == 1
    assert ring.vq.peek_simple(8) is None and ring.vq.pop_batch() == []
    ring.vq.add_used(buf, 1025)
    ring.vq.publish_used()
    assert ring.take_used() == [(buf, 1025)]


def test_peek_simple_indirect() -> None:
    ring = PackedRing()
    buf = ring.add_chain([(ring.data, 16, False), (ring.data + 64, 8, False),
                          (ring.data + 128, 1, True)], indirect=True)
    chain = ring.vq.peek_simple(8)
    assert chain is not None
    assert (chain[CHAIN_HEAD], chain[CHAIN_INTO_GUEST], chain[CHAIN_TOKEN]) == (buf, False, 1)
    ring.vq.claim(chain)
    assert ring.vq.vring_base() == encode_base(1, 1, 0, 1)


@pytest.mark.parametrize("layout", [
    [(0, 16, False), (64, 1, True)],  # no data
    [(0, 16, False), (64, 8, True), (96, 8, False), (128, 1, True)],  # readable after writable
    [(0, 16, True), (64, 8, True), (128, 1, True)],  # writable header
    [(0, 16, False), (64, 8, False), (128, 1, False)],  # readable trailer
    [(0, 16, False), (64, 8, False), (100, 8, True), (128, 1, True)],  # mixed data
    [(0, 16, False), (64, 0, True), (128, 1, True)],  # empty data run
])
def test_peek_simple_declines_other_shapes(layout: list[tuple[int, int, bool]]) -> None:
    ring = PackedRing()
    ring.add_chain([(ring.data + a, n, w) for a, n, w in layout])
    assert ring.vq.peek_simple(8) is None
    assert not ring.vq.broken


def test_peek_simple_declines_a_bad_chain_and_the_pop_reports_it() -> None:
    ring = PackedRing()
    ring.add_raw([(ring.data, 16, N), (ring.data, 8, W | N), (BASE + MEM_SIZE, 1, W)], 0)
    assert ring.vq.peek_simple(8) is None and not ring.vq.broken
    broken(ring, "not in guest memory")


def test_claim_needs_the_chain_just_peeked() -> None:
    ring = PackedRing()
    ring.add_chain([(ring.data, 16, False), (ring.data + 64, 8, False),
                    (ring.data + 128, 1, True)])
    chain = ring.vq.peek_simple(8)
    assert chain is not None
    ring.vq.pop_batch()
    with pytest.raises(ValueError, match="peek_simple"):
        ring.vq.claim(chain)


# ---------------------------------------------------------------------------- dirty logging


class _Recorder:
    """Stands in for a DirtyMarker: what the ring records, commits and marks, in order."""

    def __init__(self, ring: PackedRing) -> None:
        self.events: list[tuple[str, int, int]] = []
        self.ring = ring
        self.first_flags_at_commit: list[int] = []

    def record(self, gpa: int, length: int) -> None:
        self.events.append(("record", gpa, length))

    def commit(self) -> None:
        self.first_flags_at_commit.append(self.ring.read_desc(6)[3] & (F_AVAIL | F_USED))
        self.events.append(("commit", 0, 0))

    def mark(self, gpa: int, length: int) -> None:
        self.events.append(("mark", gpa, length))


def test_used_elements_logged_by_their_guest_address() -> None:
    """QEMU's used-ring log address covers only the device event area: the used elements in
    the descriptor ring are recorded by their own addresses, committed before the first
    element's flags publish the batch, and that store marked after it."""
    ring = PackedRing(size=8, base=encode_base(6, 1, 6, 1))
    a = ring.add_chain(pieces(ring, 0, 3))  # slots 6, 7, 0
    b = ring.add_chain(pieces(ring, 1, 1))  # slot 1
    ring.vq.pop_batch()
    recorder = _Recorder(ring)
    ring.vq.dirty = recorder  # type: ignore[assignment]
    ring.vq.add_used_many([(a, 1), (b, 1)])
    ring.vq.publish_used()
    desc = ring.addresses.desc
    assert recorder.events == [
        ("record", desc + 16 * 6, 16),
        ("record", desc + 16 * 1, 16),  # b's element at slot 6 + 3 - 8
        ("commit", 0, 0),
        ("mark", desc + 16 * 6 + 14, 2),  # the first element's flags, after the store
    ]
    assert recorder.first_flags_at_commit == [F_AVAIL]  # still available: not published
    assert ring.take_used() == [(a, 1), (b, 1)]
    recorder.events.clear()
    ring.vq.used_log_addr = 0x9000  # VHOST_VRING_F_LOG's address: the device event area
    ring.vq.enable_notifications()
    assert recorder.events == [("record", 0x9000, 4)]


def test_device_event_area_writes_logged_without_event_idx() -> None:
    ring = PackedRing(features=0)
    recorder = _Recorder(ring)
    ring.vq.dirty = recorder  # type: ignore[assignment]
    ring.vq.used_log_addr = 0x9000
    ring.vq.disable_notifications()
    ring.vq.enable_notifications()
    assert recorder.events == [("record", 0x9002, 2), ("record", 0x9002, 2)]
    assert not ring.vq.publish_used()
    assert recorder.events[-1] == ("commit", 0, 0)
