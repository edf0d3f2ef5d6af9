"""A vhost-user frontend in Python: plays QEMU and the guest driver against any backend.

It drives a vhost-user-blk backend -- this project's or qemu-storage-daemon -- the way QEMU and a
Linux guest would, or deliberately not: for conformance tests, fuzzing and load generation.

* :mod:`.memory` -- guest RAM in memfd regions (:class:`FrontendMemory`);
* :mod:`.ring` -- the driver's side of a split ring (:class:`DriverRing`, sans-IO, in any guest
  memory) and :class:`DriverQueue` (the same with kick/call/err eventfds);
* :mod:`.client` -- the vhost-user protocol as QEMU speaks it (:class:`Frontend`);
* :mod:`.blk` -- a virtio-blk driver on top (:class:`BlkDriver`): requests of any layout.

The backend never imports this package: it is a tool that stands outside the server.
"""

from vhost_frontend.client import Frontend
from vhost_frontend.errors import FrontendError
from vhost_frontend.memory import FrontendMemory, FrontendRegion
from vhost_frontend.ring import DriverQueue, DriverRing, Piece, need_event

__all__ = [
    "DriverQueue",
    "DriverRing",
    "Frontend",
    "FrontendError",
    "FrontendMemory",
    "FrontendRegion",
    "Piece",
    "need_event",
]
