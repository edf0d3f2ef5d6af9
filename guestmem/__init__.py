"""Guest physical memory as host buffers: the ground floor every other package stands on.

* :mod:`.memory` -- :class:`GuestMemory` (a copy-on-write table of :class:`GuestRegion`,
  translation of guest ranges to host views, every address checked once) and
  :class:`AccessError`;
* :mod:`.iovec` -- the host views one IO holds: :class:`IoBuffer`, :class:`LockedIoBuffers`, and
  the C ``struct iovec`` layout (:class:`AtomicIoVec`).

Like OpenVMM's ``guestmem`` crate under ``scsi_buffers``, or rust-vmm's ``vm-memory`` under
``vhost-user-backend``: the vhost-user library and the request-buffer model both use it, and it
uses neither.
"""

from guestmem.iovec import (
    AtomicIoVec,
    IoBuffer,
    LockedIoBuffers,
    alignment_mask,
    iovec_array,
    release_views,
)
from guestmem.memory import (
    PAGE_SHIFT,
    PAGE_SIZE,
    AccessError,
    AccessErrorKind,
    GuestMemory,
    GuestRegion,
    buffer_address,
)

__all__ = [
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "AccessError",
    "AccessErrorKind",
    "AtomicIoVec",
    "GuestMemory",
    "GuestRegion",
    "IoBuffer",
    "LockedIoBuffers",
    "alignment_mask",
    "buffer_address",
    "iovec_array",
    "release_views",
]
