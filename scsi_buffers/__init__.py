"""Guest memory buffer model for storage IO, after OpenVMM's ``scsi_buffers`` crate.

See ``../shared/design/scsi_buffers-model.md`` for the semantics each type implements.

* :mod:`.guestmem` -- guest physical memory as host buffers, and :class:`AccessError`;
* :mod:`.paged_range` -- :class:`PagedRange`, one byte stream over a list of guest pages;
* :mod:`.buffers` -- :class:`RequestBuffers` (reader / writer / lock for zero-copy IO) and friends;
* :mod:`.bounce` -- page-aligned bounce buffers and the per-thread page budget.
"""

from .bounce import DEFAULT_MAX_PAGES, BounceBuffer, BounceBufferTracker, TrackedBounceBuffer
from .buffers import (
    AtomicIoVec,
    IoBuffer,
    LockedIoBuffers,
    OwnedRequestBuffers,
    RequestBuffers,
    RequestReader,
    RequestWriter,
    gather,
    scatter,
    total_length,
)
from .guestmem import PAGE_SIZE, AccessError, AccessErrorKind, GuestMemory, GuestRegion
from .paged_range import MAX_GPN, InvalidGpnError, PagedRange, PagedRanges

__all__ = [
    "DEFAULT_MAX_PAGES",
    "MAX_GPN",
    "PAGE_SIZE",
    "AccessError",
    "AccessErrorKind",
    "AtomicIoVec",
    "BounceBuffer",
    "BounceBufferTracker",
    "GuestMemory",
    "GuestRegion",
    "InvalidGpnError",
    "IoBuffer",
    "LockedIoBuffers",
    "OwnedRequestBuffers",
    "PagedRange",
    "PagedRanges",
    "RequestBuffers",
    "RequestReader",
    "RequestWriter",
    "TrackedBounceBuffer",
    "gather",
    "scatter",
    "total_length",
]
