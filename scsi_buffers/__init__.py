"""Guest memory buffer model for storage IO, after OpenVMM's ``scsi_buffers`` crate.

See ``../shared/design/scsi_buffers-model.md`` for the semantics each type implements.

* :mod:`.paged_range` -- :class:`PagedRange`, one byte stream over a list of guest pages;
* :mod:`.buffers` -- :class:`RequestBuffers` (reader / writer / lock for zero-copy IO) and friends;
* :mod:`.bounce` -- page-aligned bounce buffers and the per-thread page budget.

Guest memory itself (:class:`GuestMemory`, :class:`AccessError`) and the host views of one IO
(:class:`IoBuffer`, :class:`LockedIoBuffers`, :class:`AtomicIoVec`) live in the ``guestmem``
package underneath; they are re-exported here because the model's API names them.
"""

from guestmem import (
    PAGE_SIZE,
    AccessError,
    AccessErrorKind,
    AtomicIoVec,
    GuestMemory,
    GuestRegion,
    IoBuffer,
    LockedIoBuffers,
)
from scsi_buffers.bounce import (
    DEFAULT_MAX_PAGES,
    BounceBuffer,
    BounceBufferTracker,
    TrackedBounceBuffer,
)
from scsi_buffers.buffers import (
    OwnedRequestBuffers,
    RequestBuffers,
    RequestReader,
    RequestWriter,
    gather,
    scatter,
    total_length,
)
from scsi_buffers.paged_range import MAX_GPN, InvalidGpnError, PagedRange, PagedRanges

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
