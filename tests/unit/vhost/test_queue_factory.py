"""open_queue: the negotiated features pick the layout (VIRTIO_F_RING_PACKED, bit 34), and the
ring part sizes and alignments follow the layout."""

from __future__ import annotations

import os

import pytest

from guestmem import GuestMemory
from vhost.messages import VirtioFeature
from vhost.queue import factory
from vhost.queue import inflight as inf
from vhost.queue.base import QueueError, RingAddresses
from vhost.queue.inflight_packed import PackedInflightQueue
from vhost.queue.packed import FRESH_BASE, PackedQueue, encode_base
from vhost.queue.split import SplitQueue

ADDRS = RingAddresses(0x1000, 0x2000, 0x3000)
PACKED = int(VirtioFeature.RING_PACKED)


def test_ring_packed_is_bit_34() -> None:
    assert PACKED == 1 << 34


def test_without_the_packed_bit_the_queue_is_split() -> None:
    mem = GuestMemory.from_buffer(bytearray(1 << 16))
    vq = factory.open_queue(mem, 8, ADDRS, int(VirtioFeature.VERSION_1), 5, 2, None)
    assert isinstance(vq, SplitQueue) and vq.layout == "split"
    assert (vq.index, vq.size, vq.vring_base()) == (2, 8, 5)
    vq.release()


def test_the_packed_bit_picks_the_packed_layout() -> None:
    mem = GuestMemory.from_buffer(bytearray(1 << 16))
    features = int(VirtioFeature.VERSION_1) | PACKED
    base = encode_base(3, 0, 2, 0)
    vq = factory.open_queue(mem, 8, ADDRS, features, base, 1, None)
    assert isinstance(vq, PackedQueue) and vq.layout == "packed"
    assert (vq.index, vq.size, vq.vring_base()) == (1, 8, base)
    vq.release()

    class Hooked(PackedQueue):
        pass

    hooked = factory.open_queue(mem, 8, ADDRS, features, FRESH_BASE, 0, None,
                                packed_class=Hooked)
    assert type(hooked) is Hooked
    hooked.release()


def test_a_tracker_of_the_other_layout_is_refused() -> None:
    """The in-flight area is made for the layout SET_FEATURES acked before GET_INFLIGHT_FD; a
    queue of the other layout cannot use it."""
    mem = GuestMemory.from_buffer(bytearray(1 << 16))
    split_fd, split_size = inf.create_area(1, 8)
    packed_fd, packed_size = inf.create_area(1, 8, packed=True)
    split_area = inf.InflightArea.map(split_fd, split_size, 0, 1, 8)
    packed_area = inf.InflightArea.map(packed_fd, packed_size, 0, 1, 8, packed=True)
    os.close(split_fd)
    os.close(packed_fd)
    try:
        split_tracker = factory.inflight_tracker(split_area, 0, 8)
        packed_tracker = factory.inflight_tracker(packed_area, 0, 8)
        assert isinstance(split_tracker, inf.InflightQueue)
        assert isinstance(packed_tracker, PackedInflightQueue)
        version = int(VirtioFeature.VERSION_1)
        with pytest.raises(QueueError, match="made for split rings"):
            factory.open_queue(mem, 8, ADDRS, version | PACKED, FRESH_BASE, 0, split_tracker)
        with pytest.raises(QueueError, match="made for packed rings"):
            factory.open_queue(mem, 8, ADDRS, version, 0, 0, packed_tracker)
        split_tracker.release()
        packed_tracker.release()
    finally:
        split_area.close()
        packed_area.close()


def test_ring_sizes_and_alignment_follow_the_layout() -> None:
    assert factory.ring_sizes(256) == (16 * 256, 6 + 2 * 256, 6 + 8 * 256)
    assert factory.ring_sizes(256, packed=True) == (16 * 256, 4, 4)
    assert factory.is_packed(PACKED) and not factory.is_packed(int(VirtioFeature.VERSION_1))
    factory.check_alignment(RingAddresses(0x1010, 0x2004, 0x3004), packed=True)
    with pytest.raises(QueueError, match="descriptor ring"):
        factory.check_alignment(RingAddresses(0x1008, 0x2004, 0x3004), packed=True)
    with pytest.raises(QueueError, match="device event area"):
        factory.check_alignment(RingAddresses(0x1010, 0x2004, 0x3002), packed=True)
    factory.check_alignment(RingAddresses(0x1010, 0x2002, 0x3004))  # split: avail needs 2
    with pytest.raises(QueueError, match="used ring"):
        factory.check_alignment(RingAddresses(0x1010, 0x2002, 0x3002))
