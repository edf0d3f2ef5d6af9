"""One place that builds a started queue: the layout is chosen by the negotiated features.

The protocol handler (thread runner) and the queue processes both start queues here, so a new
layout is one more branch in :func:`open_queue` and :func:`ring_sizes`, nothing else above
``vhost.queue`` changes.
"""

from __future__ import annotations

from guestmem import GuestMemory
from vhost.messages import VirtioFeature
from vhost.queue import inflight_packed, split
from vhost.queue.base import Queue, QueueError, RingAddresses
from vhost.queue.inflight import InflightArea, InflightQueue
from vhost.queue.inflight_packed import PackedInflightQueue
from vhost.queue.packed import PackedQueue, decode_base
from vhost.queue.split import SplitQueue

#: Packed ring (virtio 2.8): descriptor ring 16 bytes an entry, driver and device event
#: suppression areas 4 bytes each; their alignment (2.8.10.1).
PACKED_ALIGNMENT = (16, 4, 4)


def is_packed(features: int) -> bool:
    """VIRTIO_F_RING_PACKED (bit 34) was negotiated."""
    return bool(features & VirtioFeature.RING_PACKED)


def ring_sizes(size: int, packed: bool = False) -> tuple[int, int, int]:
    """Bytes of a ring's three parts (see :class:`RingAddresses`) for ``size`` entries."""
    if packed:
        return 16 * size, 4, 4
    return split.ring_sizes(size)


def ring_alignment(packed: bool = False) -> tuple[int, int, int]:
    """Alignment virtio requires of the three parts' guest physical addresses."""
    return PACKED_ALIGNMENT if packed else split.RING_ALIGNMENT


def base_text(base: int, features: int) -> str:
    """A vring base for a log line: the split ring's avail index, or the packed ring's
    positions with their wrap counters (avail/wrap, used/wrap)."""
    if not is_packed(features):
        return str(base)
    avail, avail_wrap, used, used_wrap = decode_base(base)
    return f"{avail}/{avail_wrap} (used {used}/{used_wrap})"


def inflight_tracker(area: InflightArea, index: int, size: int
                     ) -> InflightQueue | PackedInflightQueue:
    """Queue ``index``'s tracker in ``area``, of the layout the area was made for (GET_INFLIGHT_FD
    comes after SET_FEATURES, so the backend made it for the negotiated layout)."""
    if area.packed:
        return inflight_packed.tracker(area, index, size)
    return area.queue(index, size)


def open_queue(memory: GuestMemory, size: int, addresses: RingAddresses, features: int,
               base: int, index: int, inflight: InflightQueue | PackedInflightQueue | None,
               split_class: type[SplitQueue] = SplitQueue,
               packed_class: type[PackedQueue] = PackedQueue) -> Queue:
    """A started queue of the layout ``features`` negotiated, positioned at ``base`` (what
    SET_VRING_BASE carried), with its in-flight tracker (None without INFLIGHT_SHMFD).

    QueueError for a size, address or in-flight area the layout refuses (a tracker of the
    other layout included).  ``split_class``/``packed_class``: subclasses of the layouts'
    queues (queue processes hook the used-side publication).
    """
    if is_packed(features):
        if inflight is not None and not isinstance(inflight, PackedInflightQueue):
            raise QueueError("packed ring with an inflight area made for split rings")
        return packed_class(memory, size, addresses, features, base, index=index,
                            inflight=inflight)
    if inflight is not None and not isinstance(inflight, InflightQueue):
        raise QueueError("split ring with an inflight area made for packed rings")
    return split_class(memory, size, addresses, features, base, index=index, inflight=inflight)


def check_alignment(addresses: RingAddresses, packed: bool = False) -> None:
    """QueueError unless each ring part's guest physical address is aligned as the layout
    requires."""
    if not packed:
        split.check_ring_alignment(addresses)
        return
    for name, gpa, align in zip(("descriptor ring", "driver event area", "device event area"),
                                (addresses.desc, addresses.avail, addresses.used),
                                PACKED_ALIGNMENT, strict=True):
        if gpa % align:
            raise QueueError(f"{name} at {gpa:#x} is not {align}-byte aligned")
