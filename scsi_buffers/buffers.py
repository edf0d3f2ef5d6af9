"""RequestBuffers: the guest memory of one storage request, and the ways a disk backend reaches it.

A backend gets a :class:`RequestBuffers` (guest memory + :class:`PagedRange` + direction) and has
two ways in:

* **copying** -- :meth:`RequestBuffers.reader` / :meth:`RequestBuffers.writer` stream bytes from
  the front, for headers, small requests and bounce buffering (:func:`gather` / :func:`scatter` do
  it over a list of buffers);
* **zero-copy** -- :meth:`RequestBuffers.lock` translates the whole range once and hands back
  :class:`LockedIoBuffers`: memoryviews of guest memory for ``os.preadv``/``os.pwritev`` and an
  ``iovec`` array for io_uring or a raw ``preadv``.

Direction: ``is_write`` means *guest memory may be written*, i.e. the buffer is the target of a
disk read.  A read-only buffer's writer has length 0 and refuses any non-empty write with
``READ_ONLY``; locking it for write fails the same way before any address is translated.

Every access translates all of its guest addresses before copying a byte, so one that fails
(``MEMORY``, ``READ_ONLY``, ``OUT_OF_RANGE``) leaves guest memory and the caller's buffer untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np

from guestmem import (
    PAGE_SIZE,
    AccessError,
    AtomicIoVec,
    GuestMemory,
    GuestRegion,
    IoBuffer,
    LockedIoBuffers,
    alignment_mask,
    iovec_array,
    release_views,
)
from scsi_buffers.paged_range import InvalidGpnError, PagedRange

__all__ = [
    "AtomicIoVec",
    "IoBuffer",
    "LockedIoBuffers",
    "OwnedRequestBuffers",
    "RequestBuffers",
    "RequestReader",
    "RequestWriter",
    "gather",
    "iovec_array",
    "scatter",
    "total_length",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# translation helpers
def _runs(rng: PagedRange) -> list[tuple[int, int]]:
    try:
        return rng.ranges()
    except InvalidGpnError as exc:
        raise AccessError.memory(
            exc.gpn if isinstance(exc.gpn, int) else 0, len(rng), "has an invalid page number"
        ) from exc


def _translate(mem: GuestMemory, rng: PagedRange, for_write: bool) -> list[memoryview]:
    """Views covering ``rng`` in order; raises before any copy if some byte is not accessible."""
    out: list[memoryview] = []
    try:
        for gpa, n in _runs(rng):
            out.extend(mem.views(gpa, n, for_write=for_write))
    except BaseException:
        release_views(out)
        raise
    return out


def _as_bytes_view(data: Any) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _fill_view(view: memoryview, value: int) -> None:
    np.frombuffer(view, dtype=np.uint8).fill(value)


# ---------------------------------------------------------------------------------------------
# reader / writer
class RequestReader:
    """Reads a request's guest bytes from the front.

    Each call consumes what it read.  Asking for more than remains is ``OUT_OF_RANGE`` and consumes
    nothing.
    """

    __slots__ = ("_mem", "_range")

    def __init__(self, guest_memory: GuestMemory, paged_range: PagedRange) -> None:
        self._mem = guest_memory
        self._range = paged_range

    def __len__(self) -> int:
        return len(self._range)

    @property
    def remaining(self) -> int:
        return len(self._range)

    def _take(self, n: int) -> list[memoryview]:
        if n < 0:
            raise ValueError(f"negative length {n}")
        have = len(self._range)
        if n > have:
            raise AccessError.out_of_range(have, n)
        head, rest = self._range.split(n)
        views = _translate(self._mem, head, False)
        self._range = rest
        return views

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes, copied out."""
        views = self._take(n)
        try:
            if len(views) == 1:
                return views[0].tobytes()
            return b"".join(views)
        finally:
            release_views(views)

    def read_into(self, buf: Any) -> int:
        """Fill the writable ``buf`` (its length says how many bytes); return the count."""
        dst = _as_bytes_view(buf)
        if dst.readonly:
            raise TypeError("read_into needs a writable buffer")
        views = self._take(dst.nbytes)
        pos = 0
        try:
            for v in views:
                end = pos + v.nbytes
                dst[pos:end] = v
                pos = end
        finally:
            release_views(views)
        return pos

    def read_all(self) -> bytes:
        """Everything that remains."""
        return self.read(len(self._range))

    def skip(self, n: int) -> None:
        """Consume ``n`` bytes without reading them."""
        if n < 0:
            raise ValueError(f"negative length {n}")
        if n > len(self._range):
            raise AccessError.out_of_range(len(self._range), n)
        self._range = self._range.skip(n)


class RequestWriter:
    """Writes a request's guest bytes from the front.

    A writer over a read-only buffer has length 0; any non-empty write or fill on it is
    ``READ_ONLY`` (not ``OUT_OF_RANGE``: the caller broke the direction rule, not the length), and a
    zero-length one succeeds.
    """

    __slots__ = ("_is_write", "_mem", "_range")

    def __init__(self, guest_memory: GuestMemory, paged_range: PagedRange, is_write: bool) -> None:
        self._mem = guest_memory
        self._range = paged_range if is_write else PagedRange.empty()
        self._is_write = is_write

    def __len__(self) -> int:
        return len(self._range)

    @property
    def remaining(self) -> int:
        return len(self._range)

    def _take(self, n: int) -> list[memoryview]:
        if n < 0:
            raise ValueError(f"negative length {n}")
        if n and not self._is_write:
            raise AccessError.read_only()
        have = len(self._range)
        if n > have:
            raise AccessError.out_of_range(have, n)
        head, rest = self._range.split(n)
        views = _translate(self._mem, head, True)
        self._range = rest
        return views

    def write(self, data: Any) -> None:
        """Copy the bytes-like ``data`` in and consume that many bytes."""
        src = _as_bytes_view(data)
        views = self._take(src.nbytes)
        pos = 0
        try:
            for v in views:
                end = pos + v.nbytes
                v[:] = src[pos:end]
                pos = end
        finally:
            release_views(views)

    def fill(self, value: int, n: int) -> None:
        """Set the next ``n`` bytes to ``value`` (0..255)."""
        if not 0 <= value <= 255:
            raise ValueError(f"fill value {value} is not a byte")
        views = self._take(n)
        try:
            for v in views:
                _fill_view(v, value)
        finally:
            release_views(views)

    def skip(self, n: int) -> None:
        """Consume ``n`` bytes without writing them."""
        if n < 0:
            raise ValueError(f"negative length {n}")
        if n > len(self._range):
            raise AccessError.out_of_range(len(self._range), n)
        self._range = self._range.skip(n)


# ---------------------------------------------------------------------------------------------
# RequestBuffers
class RequestBuffers:
    """The guest memory of one storage request: guest memory, one :class:`PagedRange`, direction.

    ``is_write`` is True when guest memory may be written (the buffer receives a disk read).
    Cheap to build and to sub-range; nothing is translated until a reader, writer or lock is used.

    A buffer made with :meth:`linear` (one run of guest physical bytes -- what almost every
    descriptor of a real request is) keeps just the address and length: its page list is built
    only when someone asks for :attr:`range`, and :meth:`lock` translates the run directly.  The
    request hot path then never builds a page tuple it does not use; every public answer is the
    same as for ``RequestBuffers(memory, PagedRange.linear(gpa, length), is_write)``.
    """

    __slots__ = ("_gpa", "_is_write", "_len", "_mem", "_range")

    def __init__(self, guest_memory: GuestMemory, paged_range: PagedRange, is_write: bool) -> None:
        self._mem = guest_memory
        self._range: PagedRange | None = paged_range
        self._gpa = -1
        self._len = len(paged_range)
        self._is_write = bool(is_write)

    @classmethod
    def linear(cls, guest_memory: GuestMemory, gpa: int, length: int,
               is_write: bool) -> RequestBuffers:
        """The guest physical bytes ``[gpa, gpa+length)``, the page list built lazily.

        The same checks as :meth:`PagedRange.linear` (``ValueError`` for a negative address or
        length, or one past 2**64), made now, so a lazily built range can never fail later.
        """
        if gpa < 0 or length < 0 or gpa + length > 1 << 64:
            raise ValueError(f"guest range {gpa:#x}+{length:#x} is outside the 64-bit space")
        self = cls.__new__(cls)
        self._mem = guest_memory
        self._range = None
        self._gpa = gpa
        self._len = length
        self._is_write = bool(is_write)
        return self

    @property
    def guest_memory(self) -> GuestMemory:
        return self._mem

    @property
    def range(self) -> PagedRange:
        rng = self._range
        if rng is None:  # a linear buffer: its pages are made the first time they are asked for
            rng = self._range = PagedRange.linear(self._gpa, self._len)
        return rng

    @property
    def is_write(self) -> bool:
        """Whether guest memory may be written (the buffer is the target of a disk read)."""
        return self._is_write

    def __len__(self) -> int:
        return self._len

    @property
    def length(self) -> int:
        return self._len

    @property
    def is_empty(self) -> bool:
        return not self._len

    def is_aligned(self, alignment: int) -> bool:
        """Whether every piece's start and length are multiples of ``alignment``.

        Checking the first-page offset, the length and the page size is enough: interior pages
        are whole, so every run boundary after the first is a page boundary.  Hence nothing is
        aligned to more than 4096.  ``ValueError`` unless ``alignment`` is a power of two.
        (The host-address counterpart, for locked pieces, is ``LockedIoBuffers.is_aligned``.)
        """
        rng = self._range
        offset = (self._gpa & (PAGE_SIZE - 1)) if rng is None else rng.offset
        return not (offset | self._len | PAGE_SIZE) & alignment_mask(alignment)

    def runs(self) -> list[tuple[int, int]]:
        """The ``(gpa, length)`` runs of guest memory the buffer covers, in order.

        ``range.ranges()`` without building a page list for a linear buffer (what a dirty-page
        log records after a read).  ``MEMORY`` for a page number past the 64-bit space.
        """
        if self._range is None:
            return [(self._gpa, self._len)] if self._len else []
        return _runs(self._range)

    def reader(self) -> RequestReader:
        """A reader over all the bytes (always allowed, whatever the direction)."""
        return RequestReader(self._mem, self.range)

    def writer(self) -> RequestWriter:
        """A writer over all the bytes; length 0 (and refusing writes) when not ``is_write``."""
        return RequestWriter(self._mem, self.range, self._is_write)

    def subrange(self, offset: int, length: int) -> RequestBuffers:
        """Bytes ``[offset, offset+length)``, same memory and direction (ValueError if outside)."""
        return RequestBuffers(self._mem, self.range.subrange(offset, length), self._is_write)

    def lock(self, for_write: bool = False) -> LockedIoBuffers:
        """Translate the whole range to host pieces for one IO.

        ``for_write=True`` (the IO writes guest memory: a disk read) on a buffer that is not
        ``is_write`` raises ``READ_ONLY`` before any address is looked at.  Each run of consecutive
        pages gives one :class:`IoBuffer`, or one per region when a run crosses into an adjacent
        region; an unmapped page raises ``MEMORY`` and nothing stays locked.  Pieces locked for
        reading are read-only views, so a bug cannot scribble on guest memory through them.
        """
        if for_write and not self._is_write:
            raise AccessError.read_only()
        mem = self._mem
        if self._range is None:  # linear: one run, translated without a page list
            n = self._len
            if not n:
                return LockedIoBuffers([], 0)
            gpa = self._gpa
            region = mem.region_at(gpa)
            if region is not None and gpa + n <= region.gpa + region.size:
                # One run in one region (what nearly every request is): one lookup, one slice.
                return self._lock_run(region, for_write)
            found = mem.io_pieces(gpa, n, for_write=for_write)  # spans regions, or unmapped
            if len(found) == 1:  # ... in one region: the common case
                return LockedIoBuffers([IoBuffer(*found[0])], n)
            return LockedIoBuffers([IoBuffer(v, a) for v, a in found], n)
        runs = _runs(self._range)
        if len(runs) == 1:  # the common case; io_pieces checks everything before any view
            gpa, n = runs[0]
            found = mem.io_pieces(gpa, n, for_write=for_write)
            if len(found) == 1:  # ... in one region
                return LockedIoBuffers([IoBuffer(*found[0])], n)
            return LockedIoBuffers([IoBuffer(v, a) for v, a in found], n)
        pieces: list[IoBuffer] = []
        try:
            for gpa, n in runs:
                for view, addr in mem.io_pieces(gpa, n, for_write=for_write):
                    pieces.append(IoBuffer(view, addr))
        except BaseException:
            release_views(p.view for p in pieces)
            raise
        return LockedIoBuffers(pieces)

    def lock_in(self, region: GuestRegion, for_write: bool = False) -> LockedIoBuffers:
        """:meth:`lock`, for a caller that has just looked up ``region`` -- one of this buffer's
        guest memory regions, in its current table -- as the one holding the whole run.

        A linear buffer wholly inside ``region`` is then locked with one slice and no second
        lookup (the request hot path finds the region anyway, to check the descriptor); every
        other case is :meth:`lock`'s.
        """
        gpa = self._gpa
        n = self._len
        if (self._range is None and n and (self._is_write or not for_write)
                and region.gpa <= gpa and gpa + n <= region.gpa + region.size):
            return self._lock_run(region, for_write)
        return self.lock(for_write)

    def _lock_run(self, region: GuestRegion, for_write: bool) -> LockedIoBuffers:
        """A linear buffer's run, wholly inside ``region``, as one host piece (one slice).

        :meth:`linear` already checked the run fits the 64-bit space.
        """
        if for_write and region.readonly:
            raise AccessError.read_only()
        gpa = self._gpa
        n = self._len
        off = gpa - region.gpa
        try:
            view = (region.view if for_write else region.ro_view)[off : off + n]
        except ValueError as exc:  # the region was removed, its view released
            raise AccessError.memory(gpa, n, "was unmapped during the access") from exc
        return LockedIoBuffers([IoBuffer(view, region.host_addr + off)], n)

    def __repr__(self) -> str:
        kind = "writable" if self._is_write else "read-only"
        return f"RequestBuffers({self.range!r}, {kind})"


# ---------------------------------------------------------------------------------------------
# several buffers at once (bounce buffering)
def total_length(buffers: Iterable[RequestBuffers]) -> int:
    """Sum of the buffers' lengths."""
    return sum(len(b) for b in buffers)


def gather(buffers: Iterable[RequestBuffers], out: Any) -> int:
    """Copy every buffer's bytes, in order, to the front of the writable buffer ``out``.

    For a write request whose pieces cannot go to the disk as they are: gather them into a bounce
    buffer, then write that.  Returns the bytes copied.  All guest addresses are translated first,
    so a ``MEMORY`` error copies nothing; ``OUT_OF_RANGE`` if ``out`` is too small.
    """
    dst = _as_bytes_view(out)
    if dst.readonly:
        raise TypeError("gather needs a writable destination")
    bufs = list(buffers)
    total = total_length(bufs)
    if total > dst.nbytes:
        raise AccessError.out_of_range(dst.nbytes, total)
    views: list[memoryview] = []
    try:
        for b in bufs:
            views.extend(_translate(b.guest_memory, b.range, False))
        pos = 0
        for v in views:
            end = pos + v.nbytes
            dst[pos:end] = v
            pos = end
    finally:
        release_views(views)
    return total


def scatter(data: Any, buffers: Iterable[RequestBuffers]) -> int:
    """Copy consecutive slices of ``data`` into each buffer in turn (the reverse of :func:`gather`).

    For a read request that went through a bounce buffer.  Returns the bytes copied (the buffers'
    total).  Checks everything first -- every non-empty buffer writable (``READ_ONLY``), ``data``
    long enough (``OUT_OF_RANGE``), every address mapped (``MEMORY``) -- so a failure writes
    nothing.
    """
    src = _as_bytes_view(data)
    bufs = list(buffers)
    for b in bufs:
        if not b.is_write and not b.is_empty:
            raise AccessError.read_only()
    total = total_length(bufs)
    if total > src.nbytes:
        raise AccessError.out_of_range(src.nbytes, total)
    views: list[memoryview] = []
    try:
        for b in bufs:
            views.extend(_translate(b.guest_memory, b.range, True))
        pos = 0
        for v in views:
            end = pos + v.nbytes
            v[:] = src[pos:end]
            pos = end
    finally:
        release_views(views)
    return total


# ---------------------------------------------------------------------------------------------
# OwnedRequestBuffers
class OwnedRequestBuffers:
    """A request's page list, offset, length and direction, independent of any guest memory.

    The triple is checked when the object is made (``ValueError`` naming what does not fit), so
    :meth:`buffer` cannot fail later.
    """

    __slots__ = ("_gpns", "_offset", "_range", "is_write")

    def __init__(
        self, gpns: Iterable[int], offset: int, length: int, is_write: bool = True
    ) -> None:
        gpns = tuple(gpns)
        rng = PagedRange.new(offset, length, gpns)
        if rng is None:
            raise ValueError(
                f"{length} bytes at offset {offset} do not fit {len(gpns)} pages "
                f"({len(gpns) * PAGE_SIZE} bytes)"
            )
        self._gpns = gpns
        self._offset = offset
        self._range = rng
        self.is_write = bool(is_write)

    @classmethod
    def new(cls, gpns: Iterable[int], is_write: bool = True) -> OwnedRequestBuffers:
        """Every byte of every page in ``gpns``."""
        gpns = tuple(gpns)
        return cls(gpns, 0, len(gpns) * PAGE_SIZE, is_write)

    @classmethod
    def new_unaligned(
        cls, gpns: Iterable[int], offset: int, length: int, is_write: bool = True
    ) -> OwnedRequestBuffers:
        """``length`` bytes from ``offset`` into the pages ``gpns``."""
        return cls(gpns, offset, length, is_write)

    @classmethod
    def linear(cls, gpa: int, length: int, is_write: bool) -> OwnedRequestBuffers:
        """The guest physical bytes ``[gpa, gpa+length)``.

        Pages are counted from ``gpa % 4096 + length`` (the reference counts from ``length``
        alone and comes up one page short when the range straddles one more boundary):
        ``linear(0x800, 4096)`` covers pages 0 and 1.
        """
        rng = PagedRange.linear(gpa, length)
        return cls(rng.gpns, rng.offset, length, is_write)

    @property
    def gpns(self) -> tuple[int, ...]:
        """The page list as given."""
        return self._gpns

    @property
    def offset(self) -> int:
        """The byte offset into the page list, as given (may exceed a page)."""
        return self._offset

    @property
    def range(self) -> PagedRange:
        return self._range

    def __len__(self) -> int:
        return len(self._range)

    @property
    def length(self) -> int:
        return len(self._range)

    def buffer(self, guest_memory: GuestMemory) -> RequestBuffers:
        """A :class:`RequestBuffers` over this range of ``guest_memory``."""
        return RequestBuffers(guest_memory, self._range, self.is_write)

    def __repr__(self) -> str:
        return (
            f"OwnedRequestBuffers(gpns={list(self.gpns)!r}, offset={self.offset}, "
            f"length={len(self)}, is_write={self.is_write})"
        )
