"""Guest physical memory: a sorted set of host buffers, each standing for one guest range.

A vhost-user frontend describes guest RAM as a table of regions (guest physical address, size, an fd
to mmap).  :class:`GuestMemory` is that table after mapping: it turns a guest range into host
``memoryview`` slices, and it is the only way the rest of the code reaches guest memory, so every
address the guest hands us is checked here exactly once:

* a range outside every region, or crossing a hole between regions, is an
  :class:`AccessError` of kind ``MEMORY`` -- never an ``IndexError`` and never a view of
  unrelated host memory;
* a range that runs from one region into an adjacent one is split into one view per region;
* lookup is a ``bisect`` over region starts, so 509 regions (the vhost-user slot limit) cost the
  same as one.

Regions can be added and removed while worker threads translate addresses.  The table is
copy-on-write: a lookup reads one immutable snapshot, a change publishes a new one.  A removed
region's mapping is closed only once nothing views it any more (CPython keeps the mmap alive
while a memoryview slice of it exists), so an in-flight request never touches unmapped memory; a
request that raced with the removal sees a released view and fails with ``MEMORY``.
"""

from __future__ import annotations

import bisect
import enum
import logging
import mmap
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
PAGE_SHIFT = 12
U64_MAX = (1 << 64) - 1


class AccessErrorKind(enum.Enum):
    """Why a guest memory access failed (the reference crate's ``AccessError`` variants)."""

    MEMORY = "memory"
    OUT_OF_RANGE = "out_of_range"
    READ_ONLY = "read_only"


class AccessError(Exception):
    """A guest memory access that cannot be done.

    ``kind`` says which rule was broken; ``gpa``/``length`` name the guest range for ``MEMORY``,
    ``have``/``want`` the remaining and requested byte counts for ``OUT_OF_RANGE``.
    """

    def __init__(
        self,
        kind: AccessErrorKind,
        message: str,
        *,
        gpa: int | None = None,
        length: int | None = None,
        have: int | None = None,
        want: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.gpa = gpa
        self.length = length
        self.have = have
        self.want = want

    @classmethod
    def memory(cls, gpa: int, length: int, why: str = "not mapped") -> AccessError:
        return cls(
            AccessErrorKind.MEMORY,
            f"guest range {gpa:#x}+{length:#x} {why}",
            gpa=gpa,
            length=length,
        )

    @classmethod
    def out_of_range(cls, have: int, want: int) -> AccessError:
        return cls(
            AccessErrorKind.OUT_OF_RANGE,
            f"access of {want} bytes with only {have} remaining",
            have=have,
            want=want,
        )

    @classmethod
    def read_only(cls) -> AccessError:
        return cls(AccessErrorKind.READ_ONLY, "write to a buffer the guest gave as read-only")


def buffer_address(view: memoryview) -> int:
    """Host virtual address of the first byte of ``view`` (for iovec arrays).

    numpy reads the address without copying; the temporary array drops its export at once, so this
    does not pin the buffer.  Empty views have no meaningful address and give 0.
    """
    if view.nbytes == 0:
        return 0
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


@dataclass(eq=False)
class GuestRegion:
    """One guest physical range backed by a host buffer.

    ``view`` is a flat byte view of exactly ``size`` bytes; ``host_addr`` is its first byte's
    address; ``owner`` is what to close when the region goes (the mmap, for a vhost-user region).
    ``userspace_addr`` and ``mmap_offset`` keep the frontend's description for vhost-user
    (frontend virtual addresses translate through it; REM_MEM_REG matches on it).
    """

    gpa: int
    size: int
    view: memoryview
    host_addr: int
    owner: Any = None
    userspace_addr: int = 0
    mmap_offset: int = 0
    readonly: bool = False
    _closed: bool = field(default=False, repr=False)
    #: A read-only twin of ``view``: pieces locked for a disk write are sliced from it, so
    #: they cannot write guest memory and need no per-request ``toreadonly()``.
    ro_view: memoryview = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.ro_view = self.view.toreadonly()

    @property
    def end(self) -> int:
        """One past the last guest physical address of the region."""
        return self.gpa + self.size

    def close(self) -> None:
        """Drop this region's own view and close its mapping if nothing else still views it.

        Views handed out earlier keep the mapping alive (and valid) until they are released; the
        mmap is then unmapped by CPython when its last reference goes.
        """
        if self._closed:
            return
        self._closed = True
        self.ro_view.release()
        self.view.release()
        close = getattr(self.owner, "close", None)
        if close is None:
            return
        try:
            close()
        except BufferError:
            log.debug("region %#x+%#x still viewed; unmapped when the last view goes",
                      self.gpa, self.size)


def _as_byte_view(buffer: Any) -> memoryview:
    view = memoryview(buffer)
    if view.ndim != 1 or view.format not in ("B", "b", "c") or view.itemsize != 1:
        view = view.cast("B")
    return view


class GuestMemory:
    """The guest's physical memory as a sorted, non-overlapping set of :class:`GuestRegion`."""

    def __init__(self, regions: Iterable[GuestRegion] = ()) -> None:
        self._lock = threading.Lock()
        # (starts, regions): one immutable snapshot, replaced as a whole on every change.
        self._table: tuple[tuple[int, ...], tuple[GuestRegion, ...]] = ((), ())
        #: The regions, sorted by guest physical address: the current table's, stored after
        #: it (:meth:`_publish`).  An attribute, not a property: queues compare it with the
        #: tuple they last saw on every chain (a property call costs ~30 times a load).  A
        #: reader that sees a new tuple here finds the new table in :attr:`_table` too.
        self.regions: tuple[GuestRegion, ...] = ()
        for region in regions:
            self._insert(region)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_buffer(cls, buffer: Any, gpa: int = 0, *, readonly: bool | None = None) -> GuestMemory:
        """Guest memory made of one buffer (a bytearray or anonymous mmap) at ``gpa``; for tests."""
        mem = cls()
        mem.add_buffer(gpa, buffer, readonly=readonly)
        return mem

    @classmethod
    def anonymous(cls, size: int, gpa: int = 0) -> GuestMemory:
        """Guest memory made of one fresh, zero-filled anonymous mapping."""
        mem = cls()
        mem.add_buffer(gpa, mmap.mmap(-1, size))
        return mem

    def add_buffer(
        self,
        gpa: int,
        buffer: Any,
        *,
        size: int | None = None,
        offset: int = 0,
        readonly: bool | None = None,
        userspace_addr: int = 0,
        mmap_offset: int = 0,
    ) -> GuestRegion:
        """Make ``buffer[offset:offset+size]`` the guest range ``[gpa, gpa+size)``.

        The buffer is closed (if it has ``close``) when the region is removed and no view of it is
        left.  Raises ``ValueError`` for an empty region, one past 2**64, one the buffer cannot
        back, or one overlapping an existing region.
        """
        whole = _as_byte_view(buffer)
        if size is None:
            size = whole.nbytes - offset
        if offset < 0 or size <= 0 or offset + size > whole.nbytes:
            whole.release()
            raise ValueError(
                f"region of {size} bytes at offset {offset} does not fit a buffer of "
                f"{whole.nbytes} bytes"
            )
        if gpa < 0 or gpa + size - 1 > U64_MAX:
            whole.release()
            raise ValueError(f"region {gpa:#x}+{size:#x} overflows the 64-bit address space")
        view = whole[offset : offset + size]
        whole.release()
        if readonly is None:
            readonly = view.readonly
        region = GuestRegion(
            gpa=gpa,
            size=size,
            view=view,
            host_addr=buffer_address(view),
            owner=buffer,
            userspace_addr=userspace_addr,
            mmap_offset=mmap_offset,
            readonly=readonly,
        )
        try:
            self._insert(region)
        except ValueError:
            region.ro_view.release()
            view.release()
            raise
        return region

    def _insert(self, region: GuestRegion) -> None:
        with self._lock:
            starts, regions = self._table
            i = bisect.bisect_right(starts, region.gpa)
            if i > 0 and regions[i - 1].end > region.gpa:
                prev = regions[i - 1]
                raise ValueError(
                    f"region {region.gpa:#x}+{region.size:#x} overlaps {prev.gpa:#x}+{prev.size:#x}"
                )
            if i < len(regions) and region.end > regions[i].gpa:
                nxt = regions[i]
                raise ValueError(
                    f"region {region.gpa:#x}+{region.size:#x} overlaps {nxt.gpa:#x}+{nxt.size:#x}"
                )
            self._publish((
                (*starts[:i], region.gpa, *starts[i:]),
                (*regions[:i], region, *regions[i:]),
            ))

    def remove_region(self, gpa: int, size: int | None = None) -> GuestRegion:
        """Take the region starting at ``gpa`` (and of ``size``, if given) out of the table.

        The caller decides when to :meth:`GuestRegion.close` it.  ``KeyError`` if there is none.
        """
        with self._lock:
            starts, regions = self._table
            i = bisect.bisect_left(starts, gpa)
            found = i < len(starts) and starts[i] == gpa
            if not found or (size is not None and regions[i].size != size):
                raise KeyError(f"no region at {gpa:#x}" + (f" of size {size:#x}" if size else ""))
            region = regions[i]
            self._publish((starts[:i] + starts[i + 1 :], regions[:i] + regions[i + 1 :]))
        return region

    def replace(self, other: GuestMemory) -> list[GuestRegion]:
        """Take over ``other``'s regions in one step (``other`` is left empty); return the old ones.

        Holders of this object (running queues) see the new table from their next lookup, so a
        whole-table update never leaves them translating through a stale object.
        """
        with other._lock:
            table = other._table
            other._publish(((), ()))
        with self._lock:
            old = self._table
            self._publish(table)
        return list(old[1])

    def clear(self) -> list[GuestRegion]:
        """Remove every region; return them so the caller can close them."""
        with self._lock:
            regions = list(self._table[1])
            self._publish(((), ()))
        return regions

    def close(self) -> None:
        """Remove and close every region."""
        for region in self.clear():
            region.close()

    def _publish(self, table: tuple[tuple[int, ...], tuple[GuestRegion, ...]]) -> None:
        """Make ``table`` the current one (under ``_lock``): the table first, then
        :attr:`regions`, so whoever sees the new regions there looks up in the new table."""
        self._table = table
        self.regions = table[1]

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._table[1])

    def region_at(self, gpa: int) -> GuestRegion | None:
        """The region containing ``gpa``, or None."""
        starts, regions = self._table
        i = bisect.bisect_right(starts, gpa) - 1
        if i >= 0 and gpa < regions[i].end:
            return regions[i]
        return None

    def locate(self, gpa: int, length: int) -> tuple[memoryview, int] | None:
        """(the region's whole view, offset of ``gpa`` in it) when the range lies in one region.

        For small fixed-size fields read or written on every request (a virtio-blk header, a
        status byte): ``struct.unpack_from(view, offset)`` or ``view[offset] = byte`` then costs
        one bisect and no new memoryview.  None when the range is unmapped or spans regions
        (callers fall back to :meth:`views`).  The view is released if the region is removed,
        so a racing use raises ValueError, never touches unmapped memory.
        """
        starts, regions = self._table
        i = bisect.bisect_right(starts, gpa) - 1
        if i >= 0:
            region = regions[i]
            off = gpa - region.gpa
            if off + length <= region.size:
                return region.view, off
        return None

    def is_mapped(self, gpa: int, length: int) -> bool:
        """Whether every byte of ``[gpa, gpa+length)`` lies in some region.

        Cheap when the range is inside one region (one bisect, no view made): the virtqueue calls
        this for every descriptor it pops.
        """
        if length <= 0:
            return length == 0
        starts, regions = self._table
        i = bisect.bisect_right(starts, gpa) - 1
        if i >= 0:
            region = regions[i]
            if gpa + length <= region.gpa + region.size:
                return True
        try:
            self.views(gpa, length)
        except AccessError:
            return False
        return True

    # ------------------------------------------------------------------ translation
    def _locate(
        self, gpa: int, length: int, for_write: bool
    ) -> list[tuple[GuestRegion, int, int]]:
        """(region, offset in region, byte count) for each region the range touches.

        Every check happens here, before any view is made, so a failing access touches nothing.
        A zero-length range gives ``[]`` without a lookup: it touches nothing, wherever it points.
        """
        if length <= 0:
            if length < 0:
                raise AccessError.memory(gpa, length, "has a negative length")
            return []
        if gpa < 0 or gpa + length - 1 > U64_MAX:
            raise AccessError.memory(gpa, length, "overflows the address space")
        starts, regions = self._table
        i = bisect.bisect_right(starts, gpa) - 1
        if i < 0:
            raise AccessError.memory(gpa, length)
        region = regions[i]
        off = gpa - region.gpa
        if off >= region.size:
            raise AccessError.memory(gpa, length)
        if off + length <= region.size:  # the common case: one region
            if for_write and region.readonly:
                raise AccessError.read_only()
            return [(region, off, length)]
        out: list[tuple[GuestRegion, int, int]] = []
        remaining = length
        while True:
            if for_write and region.readonly:
                raise AccessError.read_only()
            take = min(remaining, region.size - off)
            out.append((region, off, take))
            remaining -= take
            if not remaining:
                return out
            i += 1
            if i == len(regions) or regions[i].gpa != region.end:
                raise AccessError.memory(gpa, length, "crosses a hole between regions")
            region = regions[i]
            off = 0

    def views(self, gpa: int, length: int, *, for_write: bool = False) -> list[memoryview]:
        """Host views covering the guest range, one per region it touches, in order.

        Raises :class:`AccessError` (``MEMORY``) when any byte is unmapped, and ``READ_ONLY`` when
        ``for_write`` and a region is read-only.  A zero-length range gives ``[]`` without a
        lookup (a zero-length access touches nothing, wherever it points).
        """
        pieces = self._locate(gpa, length, for_write)
        try:
            if len(pieces) == 1:
                region, off, n = pieces[0]
                return [region.view[off : off + n]]
            return [region.view[off : off + n] for region, off, n in pieces]
        except ValueError as exc:  # the region was removed and its view released meanwhile
            raise AccessError.memory(gpa, length, "was unmapped during the access") from exc

    def io_pieces(
        self, gpa: int, length: int, *, for_write: bool = False
    ) -> list[tuple[memoryview, int]]:
        """Like :meth:`views`, with each view's host address (for iovec arrays).

        The address comes from the region's base address, so this costs no more than
        :meth:`views` (asking numpy for a view's address costs about a microsecond).
        """
        pieces = self._locate(gpa, length, for_write)
        try:
            if len(pieces) == 1:
                region, off, n = pieces[0]
                view = region.view if for_write else region.ro_view
                return [(view[off : off + n], region.host_addr + off)]
            return [
                ((region.view if for_write else region.ro_view)[off : off + n],
                 region.host_addr + off)
                for region, off, n in pieces
            ]
        except ValueError as exc:  # the region was removed and its view released meanwhile
            raise AccessError.memory(gpa, length, "was unmapped during the access") from exc

    def view(self, gpa: int, length: int, *, for_write: bool = False) -> memoryview:
        """One contiguous host view of the guest range; ``MEMORY`` if it is not in one region.

        For structures the device needs as one piece (ring tables): a ring split over two regions
        is not something a real frontend produces, and refusing it keeps the hot path simple.
        """
        views = self.views(gpa, length, for_write=for_write)
        if len(views) == 1:
            return views[0]
        if not views:
            return memoryview(b"")
        raise AccessError.memory(gpa, length, "spans more than one region")

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` guest bytes out."""
        views = self.views(gpa, length)
        if len(views) == 1:
            return views[0].tobytes()
        return b"".join(v.tobytes() for v in views)

    def read_into(self, gpa: int, out: memoryview | bytearray) -> None:
        """Copy guest bytes into ``out`` (its length says how many)."""
        out = memoryview(out).cast("B")
        pos = 0
        for v in self.views(gpa, out.nbytes):
            out[pos : pos + v.nbytes] = v
            pos += v.nbytes

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``gpa``."""
        src = memoryview(data).cast("B")
        pos = 0
        for v in self.views(gpa, src.nbytes, for_write=True):
            v[:] = src[pos : pos + v.nbytes]
            pos += v.nbytes

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        """Set ``length`` guest bytes to ``value``."""
        for v in self.views(gpa, length, for_write=True):
            np.frombuffer(v, dtype=np.uint8)[:] = value
