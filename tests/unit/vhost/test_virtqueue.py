"""Point 6: SplitQueue without IO -- popping, completing, and the notification decisions, over a
bytearray made guest memory (see :mod:`.ring`)."""

from __future__ import annotations

import mmap
import struct

import pytest

from guestmem import GuestMemory
from tests.unit.vhost.ring import BASE, EVENT_IDX, Ring
from vhost.queue.base import QueueError, RingAddresses
from vhost.queue.split import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    SplitQueue,
    ring_sizes,
    validate_size,
)

W, N, IND = VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event as the virtio spec writes it."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


# ---------------------------------------------------------------------------- construction


@pytest.mark.parametrize("size", [0, 3, 6, 1000, 32768 * 2])
def test_invalid_sizes(size) -> None:
    with pytest.raises(QueueError, match="power of two"):
        validate_size(size)


@pytest.mark.parametrize("size", [1, 2, 256, 32768])
def test_valid_sizes(size) -> None:
    validate_size(size)
    assert ring_sizes(size) == (16 * size, 6 + 2 * size, 6 + 8 * size)


@pytest.mark.parametrize(
    ("desc", "avail", "used", "why"),
    [
        (BASE + 8, BASE + 256, BASE + 512, "descriptor table at 0x10008 is not 16-byte aligned"),
        (BASE, BASE + 257, BASE + 512, "avail ring at 0x10101 is not 2-byte aligned"),
        (BASE, BASE + 256, BASE + 514, "used ring at 0x10202 is not 4-byte aligned"),
        (0, BASE + 256, BASE + 512, "descriptor table at 0x0"),
        (BASE, BASE + (1 << 16) - 8, BASE + 512, "avail ring"),
        (BASE, BASE + 256, BASE + (1 << 16) - 16, "used ring"),
    ],
)
def test_ring_addresses_checked(desc, avail, used, why) -> None:
    mem = GuestMemory.from_buffer(bytearray(1 << 16), gpa=BASE)
    with pytest.raises(QueueError, match=why.replace("+", r"\+")):
        SplitQueue(mem, 8, RingAddresses(desc, avail, used), EVENT_IDX)


def test_read_only_memory_cannot_hold_the_used_ring() -> None:
    mem = GuestMemory.from_buffer(bytes(1 << 16), gpa=BASE)
    with pytest.raises(QueueError, match="used ring"):
        SplitQueue(mem, 8, RingAddresses(BASE, BASE + 256, BASE + 512), 0)


def test_next_used_starts_from_the_ring() -> None:
    ring = Ring(used_idx=1234, next_avail=1234)
    assert ring.vq.next_used == 1234 and ring.vq.next_avail == 1234
    assert Ring(used_idx=1234, next_used=7).vq.next_used == 7


def test_release_lets_the_memory_be_unmapped() -> None:
    mm = mmap.mmap(-1, 1 << 16)
    mem = GuestMemory.from_buffer(mm, gpa=BASE)
    vq = SplitQueue(mem, 8, RingAddresses(BASE, BASE + 256, BASE + 512), EVENT_IDX)
    with pytest.raises(BufferError):
        mm.close()  # the ring views pin the mapping while the queue runs
    vq.release()
    mem.close()
    assert mm.closed


# ---------------------------------------------------------------------------- pop


def test_pop_batch_in_ring_order_with_readable_and_writable_pieces() -> None:
    ring = Ring()
    ring.simple_chain(0, 4, 8)
    ring.simple_chain(2, 16, 32)
    ring.write_desc(4, ring.data + 1000, 3, W)  # writable only
    ring.publish(2, 0, 4)
    assert ring.vq.has_avail() and ring.vq.avail_idx() == 3
    chains = ring.vq.pop_batch()
    assert [c.head for c in chains] == [2, 0, 4]
    c = chains[1]
    assert c.readable == [(ring.data, 4)] and c.writable == [(ring.data + 32, 8)]
    assert (c.readable_len, c.writable_len) == (4, 8)
    assert c.pieces == [(ring.data, 4, False), (ring.data + 32, 8, True)]
    assert chains[2].readable == [] and chains[2].writable_len == 3
    assert ring.vq.next_avail == 3 and ring.vq.in_flight_count == 3
    assert ring.vq.pop_batch() == []
    assert not ring.vq.has_avail()


def test_pop_batch_limit_and_pop() -> None:
    ring = Ring()
    for head in range(4):
        ring.write_desc(head, ring.data, 1)
    ring.publish(0, 1, 2, 3)
    assert [c.head for c in ring.vq.pop_batch(3)] == [0, 1, 2]
    last = ring.vq.pop()
    assert last is not None
    assert last.head == 3
    assert ring.vq.pop() is None


def test_zero_length_descriptors_are_dropped() -> None:
    ring = Ring()
    ring.write_desc(0, 0, 0, N, 1)  # zero length: the address is never looked at
    ring.write_desc(1, ring.data, 4, W | N, 2)
    ring.write_desc(2, 0xDEAD_0000_0000, 0, W)
    ring.publish(0)
    (chain,) = ring.vq.pop_batch()
    assert chain.readable == [] and chain.writable == [(ring.data, 4)]


def test_indirect_chain() -> None:
    ring = Ring()
    table = ring.write_table(ring.data + 4096, [(ring.data, 4, N, 1), (ring.data + 4, 6, N | W, 2),
                                          (ring.data + 10, 2, W, 0)])
    ring.write_desc(5, table, 48, IND)
    ring.publish(5)
    (chain,) = ring.vq.pop_batch()
    assert chain.head == 5
    assert chain.readable == [(ring.data, 4)]
    assert chain.writable == [(ring.data + 4, 6), (ring.data + 10, 2)]


def test_direct_descriptors_then_an_indirect_table() -> None:
    ring = Ring()
    table = ring.write_table(ring.data + 4096, [(ring.data + 8, 4, W, 0)])
    ring.write_desc(0, ring.data, 4, N, 1)
    ring.write_desc(1, table, 16, IND)
    ring.publish(0)
    (chain,) = ring.vq.pop_batch()
    assert chain.readable == [(ring.data, 4)] and chain.writable == [(ring.data + 8, 4)]


def test_error_keeps_chains_popped_before_it_and_breaks_the_queue() -> None:
    ring = Ring()
    ring.write_desc(0, ring.data, 4)
    ring.write_desc(1, ring.data, 4)
    ring.publish(0, 9, 1)  # 9 >= size
    chains = ring.vq.pop_batch()
    assert [c.head for c in chains] == [0]
    assert ring.vq.broken and "head 9 >= queue size 8" in str(ring.vq.error)
    assert ring.vq.next_avail == 1 and ring.vq.in_flight_count == 1
    assert ring.vq.pop_batch() == []  # broken for good
    with pytest.raises(QueueError, match="head 9"):
        ring.vq.pop()
    # The chain popped before the error is still completed normally.
    ring.vq.add_used(0, 4)
    assert ring.vq.publish_used()
    assert ring.used_idx() == 1


@pytest.mark.parametrize(
    ("setup", "why"),
    [
        (lambda r: (r.set_avail_idx(9),), "9 ahead of last_avail 0"),
        (lambda r: (r.write_desc(0, r.data, 4, N, 8), r.publish(0)), "next 8 >= table size 8"),
        (lambda r: (r.write_desc(0, r.data, 4, N, 0), r.publish(0)), "loops"),
        (lambda r: (r.write_desc(0, r.data, 4, W | N, 1), r.write_desc(1, r.data, 4), r.publish(0)),
         "readable descriptor after writable"),
        (lambda r: (r.write_desc(0, BASE + (1 << 16) - 2, 4), r.publish(0)), "not in guest memory"),
        (lambda r: (r.write_desc(0, r.data, 0xFFFF_FFFF, W | N, 1),
                    r.write_desc(1, r.data, 1, W), r.publish(0)), "not in guest memory"),
        (lambda r: (r.write_desc(0, r.data, 0, IND), r.publish(0)), "indirect table of 0 bytes"),
        (lambda r: (r.write_desc(0, r.data, 20, IND), r.publish(0)), "indirect table of 20 bytes"),
        (lambda r: (r.write_desc(0, r.data, 16, IND | N, 1), r.publish(0)), "with NEXT"),
        (lambda r: (r.write_table(r.data, [(r.data, 16, IND, 0)]), r.write_desc(0, r.data, 16, IND),
                    r.publish(0)), "nested indirect"),
        (lambda r: (r.write_table(r.data, [(r.data, 4, N, 1), (r.data, 4, N, 0)]),
                    r.write_desc(0, r.data, 32, IND), r.publish(0)), "loops (more than 2"),
        (lambda r: (r.write_table(r.data, [(r.data, 4, N, 2), (r.data, 4, 0, 0)]),
                    r.write_desc(0, r.data, 32, IND), r.publish(0)), "next 2 >= table size 2"),
        (lambda r: (r.write_desc(0, 0, 16, IND), r.publish(0)), "indirect table 0x0+0x10"),
        (lambda r: (r.write_desc(0, r.data, 16 * 32769, IND), r.publish(0)), "32769 descriptors"),
        (lambda r: (r.write_desc(0, r.data, 4), r.publish(0, 0)), "made available again"),
    ],
    ids=["avail-ahead", "next", "loop", "r-after-w", "outside", "outside-huge", "ind-empty",
         "ind-20", "ind-next", "nested", "ind-loop", "ind-next-range", "ind-unmapped",
         "ind-too-long", "twice"],
)
def test_violations_are_recorded(setup, why) -> None:
    ring = Ring()
    setup(ring)
    ring.vq.pop_batch()
    assert ring.vq.broken
    assert isinstance(ring.vq.error, QueueError) and why in str(ring.vq.error)


def test_indirect_needs_the_feature() -> None:
    ring = Ring(features=EVENT_IDX)
    ring.write_desc(0, ring.write_table(ring.data, [(ring.data, 4, 0, 0)]), 16, IND)
    ring.publish(0)
    assert ring.vq.pop_batch() == [] and "INDIRECT_DESC" in str(ring.vq.error)


def test_chain_of_2_pow_32_bytes_with_a_wrapping_view() -> None:
    """Lengths add up past 2**32 only with huge buffers; a big sparse mapping provides them."""
    mm = mmap.mmap(-1, (1 << 31) + (1 << 16))  # untouched pages cost nothing
    try:
        mem = GuestMemory.from_buffer(mm, gpa=0)
        vq = SplitQueue(mem, 4, RingAddresses(0, 64, 128), 0)
        ring = memoryview(mm)
        struct.pack_into("<QIHH", ring, 0, 4096, 1 << 31, W | N, 1)
        struct.pack_into("<QIHH", ring, 16, 4096, (1 << 31) - 1, W | N, 2)
        struct.pack_into("<QIHH", ring, 32, 4096, 1, W, 0)
        struct.pack_into("<HHH", ring, 64, 0, 1, 0)
        assert vq.pop_batch() == [] and "2**32 bytes" in str(vq.error)
        struct.pack_into("<QIHH", ring, 32, 4096, 0, W, 0)  # now 2**32 - 1: fine
        vq2 = SplitQueue(mem, 4, RingAddresses(0, 64, 128), 0)
        (chain,) = vq2.pop_batch()
        assert chain.writable_len == (1 << 32) - 1
        ring.release()
        vq.release()
        vq2.release()
    finally:
        mem.close()


# ---------------------------------------------------------------------------- used ring


def test_add_used_is_published_by_flush() -> None:
    ring = Ring(features=0)
    ring.simple_chain(0)
    ring.simple_chain(2)
    ring.publish(0, 2)
    ring.vq.pop_batch()
    ring.vq.add_used(2, 7)
    ring.vq.add_used(0, 3)
    assert ring.used_idx() == 0, "published before flush"
    assert ring.used_elem(0) == (2, 7) and ring.used_elem(1) == (0, 3)
    assert ring.vq.publish_used()
    assert ring.used_idx() == 2 and ring.vq.in_flight_count == 0
    assert not ring.vq.publish_used(), "nothing new: no notification"


def test_add_used_many_is_add_used_in_order() -> None:
    ring = Ring(features=0)
    for i in range(4):
        ring.write_desc(i, ring.data, 4)
    ring.publish(0, 1, 2, 3)
    ring.vq.pop_batch()
    ring.vq.add_used_many([(2, 7), (0, 3)])
    ring.vq.add_used_many([])
    assert ring.used_idx() == 0, "published before flush"
    assert ring.used_elem(0) == (2, 7) and ring.used_elem(1) == (0, 3)
    assert ring.vq.in_flight_count == 2
    # A head not in flight stops the batch there, as the same add_used calls would.
    with pytest.raises(ValueError, match="not in flight"):
        ring.vq.add_used_many([(1, 5), (1, 5), (3, 1)])
    assert ring.used_elem(2) == (1, 5) and ring.vq.in_flight_count == 1
    assert ring.vq.publish_used()
    assert ring.used_idx() == 3


@pytest.mark.parametrize("head", [0, 3, 8, -1])
def test_add_used_of_a_head_not_in_flight(head) -> None:
    ring = Ring()
    ring.write_desc(1, ring.data, 4)
    ring.publish(1)
    ring.vq.pop_batch()
    with pytest.raises(ValueError, match="not in flight"):
        ring.vq.add_used(head, 0)
    ring.vq.add_used(1, 0)
    with pytest.raises(ValueError, match="not in flight"):
        ring.vq.add_used(1, 0)


def test_flush_without_event_idx_follows_no_interrupt() -> None:
    ring = Ring(features=0)
    for i in range(4):
        ring.write_desc(i, ring.data, 4)
    ring.publish(0, 1, 2, 3)
    ring.vq.pop_batch()
    ring.vq.add_used(0, 0)
    assert ring.vq.publish_used()
    ring.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    ring.vq.add_used(1, 0)
    assert not ring.vq.publish_used()
    assert ring.used_idx() == 2, "published even without an interrupt"
    ring.set_avail_flags(0)
    ring.vq.add_used(2, 0)
    assert ring.vq.publish_used()


def _completed(ring: Ring, count: int) -> bool:
    """Make ``count`` one-descriptor chains available, pop, complete and flush them."""
    for _ in range(count):
        head = ring.avail_idx % ring.size
        ring.write_desc(head, ring.data, 4, W)
        ring.publish(head)
    chains = ring.vq.pop_batch()
    assert len(chains) == count and not ring.vq.broken
    for chain in chains:
        ring.vq.add_used(chain.head, 4)
    return ring.vq.publish_used()


@pytest.mark.parametrize("start", [0, 100, 0xFFFC, 0xFFFF])
@pytest.mark.parametrize("first", [1, 2, 5])
@pytest.mark.parametrize("second", [1, 3, 6])
def test_flush_with_event_idx_follows_used_event_across_wrap(start, first, second) -> None:
    ring = Ring(size=8, next_avail=start, used_idx=start)
    assert _completed(ring, first), "the first flush always notifies"
    old = (start + first) & 0xFFFF
    new = (old + second) & 0xFFFF
    for event in {old - 1, old, old + 1, new - 1, new, new + 1, start, start - 3}:
        event &= 0xFFFF
        probe = Ring(size=8, next_avail=start, used_idx=start)
        probe.set_used_event(start)  # irrelevant for the first flush
        _completed(probe, first)
        probe.set_used_event(event)
        assert _completed(probe, second) == need_event(event, new, old), (
            f"used_event {event:#x}, old {old:#x}, new {new:#x}")
        assert probe.used_idx() == new


def test_event_idx_ignores_no_interrupt() -> None:
    ring = Ring(size=8)
    _completed(ring, 1)
    ring.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    ring.set_used_event(1)
    assert _completed(ring, 1)


def test_event_idx_suppression_counts_from_the_last_flush_not_the_last_call() -> None:
    """used_event already passed by an earlier, silent flush does not trigger later calls."""
    ring = Ring(size=8)
    assert _completed(ring, 1)  # used 0 -> 1
    ring.set_used_event(0)
    assert not _completed(ring, 2)  # 1 -> 3: event 0 is behind
    assert not _completed(ring, 2)  # 3 -> 5
    ring.set_used_event(6)
    assert not _completed(ring, 1)  # 5 -> 6: entry 6 not used yet
    assert _completed(ring, 1)  # 6 -> 7


# ---------------------------------------------------------------------------- kick suppression


def test_notifications_without_event_idx_use_used_flags() -> None:
    ring = Ring(features=0)
    ring.vq.disable_notifications()
    assert ring.used_flags() == VIRTQ_USED_F_NO_NOTIFY
    assert not ring.vq.enable_notifications()
    assert ring.used_flags() == 0
    ring.vq.disable_notifications()
    ring.write_desc(0, ring.data, 4)
    ring.publish(0)  # a buffer arrives while kicks are off
    assert ring.vq.enable_notifications(), "must tell the caller to drain again"
    assert ring.used_flags() == 0


def test_notifications_with_event_idx_use_avail_event() -> None:
    ring = Ring(next_avail=0xFFFE, used_idx=0xFFFE)
    ring.vq.disable_notifications()
    assert ring.used_flags() == 0, "EVENT_IDX never uses the flag"
    assert not ring.vq.enable_notifications()
    assert ring.avail_event() == 0xFFFE
    for head in range(3):
        ring.write_desc(head, ring.data, 4)
    ring.publish(0, 1, 2)  # avail.idx wraps to 1
    assert ring.vq.enable_notifications()
    assert [c.head for c in ring.vq.pop_batch()] == [0, 1, 2]
    assert ring.vq.next_avail == 1
    assert not ring.vq.enable_notifications()
    assert ring.avail_event() == 1


def test_wrap_around_of_next_avail() -> None:
    ring = Ring(size=4, next_avail=0xFFFE, used_idx=0xFFFE)
    for head in range(4):
        ring.write_desc(head, ring.data, 4, W)
    ring.publish(0, 1, 2, 3)
    assert ring.avail_idx == 2
    assert [c.head for c in ring.vq.pop_batch()] == [0, 1, 2, 3]
    assert ring.vq.next_avail == 2
    for head in (3, 1, 0, 2):
        ring.vq.add_used(head, 1)
    assert ring.vq.publish_used()
    assert ring.used_idx() == 2
    assert [ring.used_elem(i)[0] for i in (0xFFFE, 0xFFFF, 0, 1)] == [3, 1, 0, 2]
    # A full queue's worth more after the wrap is fine; one more is not.
    ring.set_avail_idx(2 + 5)
    assert ring.vq.pop_batch() == [] and "more than the queue size 4" in str(ring.vq.error)
