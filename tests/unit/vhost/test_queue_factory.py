"""open_queue: the negotiated features pick the layout (VIRTIO_F_RING_PACKED, bit 34), and the
ring part sizes and alignments follow the layout."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from guestmem import GuestMemory
from vhost.messages import VirtioFeature
from vhost.queue import factory
from vhost.queue.base import QueueError, RingAddresses
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


def test_the_packed_bit_picks_the_packed_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever vhost.queue.packed is (a stand-in here), the packed bit goes to it."""
    made: list[tuple[Any, ...]] = []

    class PackedQueue:
        layout = "packed"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append((args, kwargs))

    module = types.ModuleType("vhost.queue.packed")
    module.PackedQueue = PackedQueue  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vhost.queue.packed", module)
    mem = GuestMemory.from_buffer(bytearray(1 << 16))
    features = int(VirtioFeature.VERSION_1) | PACKED
    queue = factory.open_queue(mem, 8, ADDRS, features, 7, 1, None)
    assert isinstance(queue, PackedQueue)
    assert made == [((mem, 8, ADDRS, features, 7), {"index": 1, "inflight": None})]


def test_packed_without_an_implementation_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vhost.queue.packed", None)  # as if absent
    mem = GuestMemory.from_buffer(bytearray(1 << 16))
    with pytest.raises(QueueError, match="packed ring not supported"):
        factory.open_queue(mem, 8, ADDRS, int(VirtioFeature.VERSION_1) | PACKED, 0, 0, None)


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
