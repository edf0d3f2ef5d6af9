"""A virtio-blk request once started: the disk operation it is, and what it holds until done.

Its own module so the device (:mod:`.device`) and the fast path (:mod:`.fastpath`) both import it
and neither imports the other: the device builds the fast path, the fast path builds requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blockdev.engine import IoOp
from blockdev.ops import OpKind
from virtio_blk.request import SECTOR_SHIFT

if TYPE_CHECKING:
    from guestmem import IoBuffer, LockedIoBuffers
    from scsi_buffers import TrackedBounceBuffer
    from virtio_blk.layout import DataLayout

_op_init = IoOp.__init__


class BlkRequest(IoOp):
    """A request in flight: its disk operation, where its status goes, what to release after.

    One object per request (the engine's op *is* the request) keeps the hot path to a single
    allocation.  The generic path attaches its buffers after building it; the fast path, which
    has them locked already, passes ``layout``, ``locks`` and ``buffers`` to the constructor.
    """

    __slots__ = ("bounce", "head", "layout", "locks", "sector", "start_ns", "status_gpa")

    #: Started by the fast path, finished by its fused completion (see :class:`FastRequest`).
    fast = False

    def __init__(self, kind: OpKind, head: int, status_gpa: int, sector: int, length: int,
                 layout: DataLayout | None = None, locks: list[LockedIoBuffers] | None = None,
                 buffers: list[IoBuffer] | None = None, sync: bool = False) -> None:
        _op_init(self, kind, sector << SECTOR_SHIFT, buffers, length)  # (super() costs more)
        self.sync = sync
        self.head = head
        self.status_gpa = status_gpa
        self.sector = sector
        self.locks: list[LockedIoBuffers] = [] if locks is None else locks
        self.bounce: TrackedBounceBuffer | None = None
        self.layout = layout
        self.start_ns = 0

    def release(self) -> None:
        for lock in self.locks:
            lock.close()
        self.locks = []
        if self.bounce is not None:
            self.bounce.release()
            self.bounce = None


class FastRequest(BlkRequest):
    """A read or write started by the fast path (:mod:`.fastpath`).

    ``fast`` routes its completion to the fast path's fused one; everything else is a
    :class:`BlkRequest`'s, so the generic ``finish`` (which handles its failures) sees no
    difference.
    """

    __slots__ = ()
    fast = True
