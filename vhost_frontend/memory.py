"""Guest RAM as a frontend makes it: memfd regions at any mmap offset, and a bump allocator.

The backend maps these regions from the fds the frontend sends; the frontend keeps its own
mapping (and a :class:`guestmem.GuestMemory` over it) to lay out rings and buffers and to read
back what the backend wrote.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass

from guestmem import GuestMemory, buffer_address
from vhost import messages as m


@dataclass
class FrontendRegion:
    """One memfd-backed guest RAM region as the frontend mapped it."""

    gpa: int
    size: int
    mmap_offset: int
    fd: int
    mapping: mmap.mmap
    uaddr: int  # where the region's first byte is in this process (QEMU's "user address")

    def description(self) -> dict[str, int]:
        return m.memory_region(self.gpa, self.size, self.uaddr, self.mmap_offset)


class FrontendMemory:
    """Guest RAM made of memfd regions, with a bump allocator for rings and buffers.

    ``layout`` is a list of ``(gpa, size, mmap_offset)``; the memfd of each region is made
    ``mmap_offset + size`` long so the backend maps the region at that offset, as QEMU does for
    RAM blocks that share one file.
    """

    def __init__(self, layout: Sequence[tuple[int, int, int]] = ((0, 64 << 20, 0),)) -> None:
        self.regions: list[FrontendRegion] = []
        self.guest = GuestMemory()
        for gpa, size, mmap_offset in layout:
            self.add_region(gpa, size, mmap_offset)
        self._cursor = [(r.gpa, r.gpa + r.size) for r in self.regions]
        self._next = 0

    def add_region(self, gpa: int, size: int, mmap_offset: int = 0) -> FrontendRegion:
        fd = os.memfd_create(f"guest-ram-{gpa:#x}", os.MFD_CLOEXEC)
        os.ftruncate(fd, mmap_offset + size)
        base = mmap_offset - mmap_offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, size + mmap_offset - base, offset=base)
        delta = mmap_offset - base
        region_view = memoryview(mapping)[delta : delta + size]
        uaddr = buffer_address(region_view)
        region_view.release()
        self.guest.add_buffer(gpa, mapping, size=size, offset=delta, userspace_addr=uaddr,
                              mmap_offset=mmap_offset)
        region = FrontendRegion(gpa, size, mmap_offset, fd, mapping, uaddr)
        self.regions.append(region)
        return region

    def remove_region(self, region: FrontendRegion) -> None:
        self.regions.remove(region)
        self.guest.remove_region(region.gpa).close()
        os.close(region.fd)

    def uaddr(self, gpa: int) -> int:
        """The frontend virtual address of a guest physical address."""
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r.uaddr + gpa - r.gpa
        raise ValueError(f"gpa {gpa:#x} is in no region")

    def alloc(self, size: int, align: int = 16, region: int | None = None) -> int:
        """A fresh guest range (never freed: tests are short); in ``region`` if given."""
        order = [region] if region is not None else list(range(len(self._cursor)))
        for i in order:
            start, end = self._cursor[i]
            gpa = -(-start // align) * align
            if gpa + size <= end:
                self._cursor[i] = (gpa + size, end)
                return gpa
        raise MemoryError(f"no room for {size} bytes of guest memory")

    def read(self, gpa: int, n: int) -> bytes:
        return self.guest.read(gpa, n)

    def write(self, gpa: int, data: bytes) -> None:
        self.guest.write(gpa, data)

    def close(self) -> None:
        self.guest.close()
        for r in self.regions:
            with contextlib.suppress(OSError):
                os.close(r.fd)
        self.regions.clear()
