"""Host views of guest memory for one IO: what a disk backend hands to the kernel.

* :class:`IoBuffer` -- one host-contiguous piece (a memoryview and its host address);
* :class:`AtomicIoVec` / :func:`iovec_array` -- the C ``struct iovec`` layout, for io_uring or a
  raw ``preadv``;
* :class:`LockedIoBuffers` -- the pieces of one request, held for the duration of the IO and
  released afterwards (which is what lets a removed guest memory region actually be unmapped).

These sit beside :class:`~guestmem.memory.GuestMemory` rather than in ``scsi_buffers`` because
they describe host memory, not a request: the virtqueue code and any storage engine use them
without knowing about request buffers.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterable, Sequence

from guestmem.memory import buffer_address

__all__ = [
    "AtomicIoVec",
    "IoBuffer",
    "LockedIoBuffers",
    "alignment_mask",
    "iovec_array",
    "release_views",
]

log = logging.getLogger(__name__)


class AtomicIoVec(ctypes.Structure):
    """``struct iovec`` (``void *iov_base; size_t iov_len``), for io_uring or a raw ``preadv``.

    The name follows the reference crate (whose pointer is to atomic bytes because the guest may
    change the memory under us); in Python it is simply the C layout.
    """

    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))

    @property
    def address(self) -> int:
        return self.iov_base or 0

    def __len__(self) -> int:
        return self.iov_len

    def __repr__(self) -> str:
        return f"AtomicIoVec(address={self.address:#x}, len={self.iov_len})"


def alignment_mask(alignment: int) -> int:
    """``alignment - 1``; ``ValueError`` unless ``alignment`` is a power of two.

    The one definition of "aligned" the project uses: a start and a length are aligned when
    neither has a bit of this mask set (guest ranges in ``RequestBuffers.is_aligned``, host
    pieces in :meth:`LockedIoBuffers.is_aligned`).
    """
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment {alignment} is not a power of two")
    return alignment - 1


def iovec_array(pieces: Sequence[IoBuffer]) -> ctypes.Array[AtomicIoVec]:
    """A C array of :class:`AtomicIoVec`, one per buffer, in order."""
    arr = (AtomicIoVec * len(pieces))()
    for i, piece in enumerate(pieces):
        arr[i].iov_base = piece.address or None
        arr[i].iov_len = piece.view.nbytes
    return arr


class IoBuffer:
    """One host-contiguous piece of an IO: a memoryview and the host address of its first byte.

    The view is what Python IO calls take; the address is what goes into an iovec array.  The
    address is only meaningful while the view is alive (and not released).
    """

    __slots__ = ("address", "view")

    def __init__(self, view: memoryview, address: int | None = None) -> None:
        self.view = view
        self.address = buffer_address(view) if address is None else address

    def __len__(self) -> int:
        return self.view.nbytes

    @property
    def length(self) -> int:
        return self.view.nbytes

    def as_iovec(self) -> AtomicIoVec:
        return AtomicIoVec(self.address or None, self.view.nbytes)

    def __repr__(self) -> str:
        return f"IoBuffer(address={self.address:#x}, len={len(self)})"


def release_views(views: Iterable[memoryview]) -> bool:
    """Release every view; False if some are still exported (they then go with the last user)."""
    ok = True
    for v in views:
        try:
            v.release()
        except BufferError:
            ok = False
    return ok


class LockedIoBuffers:
    """The host pieces of one :class:`RequestBuffers`, held for the duration of an IO.

    Use it as a context manager (or call :meth:`close`): closing releases the views, which is what
    lets a guest memory region that was removed meanwhile actually be unmapped.  After closing,
    every accessor raises ``ValueError``, as a closed file does.
    """

    __slots__ = ("_buffers", "_closed", "_length")

    def __init__(self, buffers: list[IoBuffer], length: int | None = None) -> None:
        self._buffers = buffers
        if length is None:
            length = 0
            for b in buffers:
                length += b.view.nbytes
        self._length = length
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise ValueError("I/O buffers are closed")

    @property
    def io_buffers(self) -> list[IoBuffer]:
        """The :class:`IoBuffer` pieces, in order (the list itself; do not modify it)."""
        if self._closed:  # _check, inline: read once per request on the hot path
            raise ValueError("I/O buffers are closed")
        return self._buffers

    def io_vecs(self) -> list[memoryview]:
        """The pieces as memoryviews, ready for ``os.preadv(fd, locked.io_vecs(), offset)``."""
        self._check()
        return [b.view for b in self._buffers]

    def iovec_array(self) -> ctypes.Array[AtomicIoVec]:
        """The pieces as a C ``struct iovec`` array (valid until :meth:`close`)."""
        self._check()
        return iovec_array(self._buffers)

    def __len__(self) -> int:
        return self._length

    def is_aligned(self, alignment: int) -> bool:
        """Whether every piece's host address and length are multiples of ``alignment``.

        What O_DIRECT asks of the buffers.  Where guest memory keeps page offsets (host address
        and guest address equal modulo 4096, as QEMU's regions do), this agrees with
        ``RequestBuffers.is_aligned`` on the guest range (a property test checks it); a region
        mapped at an odd offset is where only this host-side answer is right.
        """
        self._check()
        mask = alignment_mask(alignment)
        return not any((b.address | b.view.nbytes) & mask for b in self._buffers)

    @property
    def length(self) -> int:
        """Total bytes over all pieces."""
        return self._length

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release every view.  Idempotent.

        A view some other object still exports (say a numpy array made from it and kept) cannot be
        released; it is logged and left to that object's lifetime rather than raised, since close
        often runs on the way out of an exception.
        """
        if self._closed:
            return
        self._closed = True
        for b in self._buffers:
            try:
                b.view.release()
            except BufferError:
                log.warning("locked IO buffers closed while a view of them is still exported")

    def __enter__(self) -> LockedIoBuffers:
        self._check()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._buffers)} pieces"
        return f"LockedIoBuffers({self._length} bytes, {state})"
