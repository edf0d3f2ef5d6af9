"""The frontend's memory table, mapped: vhost-user regions -> :class:`guestmem.GuestMemory`.

Each region arrives as (guest physical address, size, frontend virtual address, mmap offset) plus
an fd.  We mmap ``size`` bytes at ``mmap_offset`` of the fd; mmap wants its offset aligned to the
allocation granularity and QEMU's need not be, so the mapping starts at the offset rounded down and
the region's view skips the difference.  The fd itself is closed once mapped (the mapping keeps the
memory; Python's mmap holds its own duplicate for resizing, which we never do).

Ring addresses in SET_VRING_ADDR are frontend virtual addresses; :meth:`MemoryTable.uva_to_gpa`
translates them through the same table.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Sequence

from guestmem import GuestMemory, GuestRegion
from vhost.fdkinds import FdKindError, check_mappable
from vhost.messages import MAX_MEM_SLOTS, RegionFields

log = logging.getLogger(__name__)

U64_LIMIT = 1 << 64


class MemoryTableError(Exception):
    """A region the frontend described cannot be mapped as asked."""


def _check_region(gpa: int, size: int, uaddr: int, mmap_offset: int) -> None:
    if size == 0:
        raise MemoryTableError(f"region at gpa {gpa:#x} has size 0")
    for name, base in (("guest", gpa), ("user", uaddr), ("mmap offset", mmap_offset)):
        if base + size > U64_LIMIT:
            raise MemoryTableError(
                f"region {name} address {base:#x} + size {size:#x} overflows 64 bits"
            )


def map_region(
    fd: int, gpa: int, size: int, uaddr: int, mmap_offset: int
) -> tuple[mmap.mmap, int]:
    """mmap ``size`` bytes of ``fd`` at ``mmap_offset``; (mapping, offset of the region in it)."""
    _check_region(gpa, size, uaddr, mmap_offset)
    gran = mmap.ALLOCATIONGRANULARITY
    map_offset = mmap_offset - mmap_offset % gran
    delta = mmap_offset - map_offset
    try:
        # A regular file opened read-write, the range inside it (a mapping past the end would
        # SIGBUS on first touch, an empty memfd too); a device or an eventfd is refused here.
        check_mappable(fd, mmap_offset, size, f"region gpa {gpa:#x}")
    except FdKindError as exc:
        raise MemoryTableError(str(exc)) from None
    try:
        mm = mmap.mmap(
            fd, size + delta, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=map_offset,
        )
    except (OSError, ValueError, OverflowError) as exc:
        raise MemoryTableError(f"cannot map region gpa {gpa:#x} size {size:#x}: {exc}") from exc
    return mm, delta


#: Regions of pinned tables that were dropped: never unmapped (see :meth:`MemoryTable.pin`).
KEPT_REGIONS: list[GuestRegion] = []


class MemoryTable:
    """Guest memory as the frontend described it, with add/remove and uva translation."""

    def __init__(self, max_slots: int = MAX_MEM_SLOTS) -> None:
        self.max_slots = max_slots
        self.guest = GuestMemory()
        #: Set once IO that may still write guest memory outlived its queue's stop.
        self.pinned = False

    def pin(self, why: str) -> None:
        """From now on never unmap a region of this table, only drop it from the table: ``why``
        some IO (a worker thread that did not stop, a stuck disk op) may still write it.  A
        leak (the memory stays mapped for the life of the process) instead of a write into an
        address that is unmapped or, worse, mapped again to something else."""
        if not self.pinned:
            log.error("guest memory stays mapped for the life of the process: %s", why)
        self.pinned = True

    def _drop(self, regions: Sequence[GuestRegion]) -> None:
        """Unmap regions no longer in the table (keep them if the table is pinned)."""
        if self.pinned:
            KEPT_REGIONS.extend(regions)
            return
        for region in regions:
            region.close()

    def __len__(self) -> int:
        return len(self.guest)

    def _map_into(self, memory: GuestMemory, region: RegionFields, fd: int) -> GuestRegion:
        gpa, size = region.guest_phys_addr, region.memory_size
        uaddr, offset = region.userspace_addr, region.mmap_offset
        mm, delta = map_region(fd, gpa, size, uaddr, offset)
        try:
            return memory.add_buffer(
                gpa, mm, size=size, offset=delta, userspace_addr=uaddr, mmap_offset=offset
            )
        except ValueError as exc:
            why = str(exc)
        # Unmapped only here, once the exception is gone: its traceback keeps the half-built
        # region, and any view it made of ``mm``, alive -- closing inside ``except`` can fail
        # with BufferError.  If a view still lingers, the mapping goes with its last view.
        try:
            mm.close()
        except BufferError:
            log.debug("region gpa %#x: mapping still viewed; unmapped when the last view goes", gpa)
        raise MemoryTableError(why)

    def set_table(self, regions: Sequence[RegionFields], fds: Sequence[int]) -> None:
        """Replace the whole table (SET_MEM_TABLE).  All or nothing: on error the old one stays.

        The fds are the caller's to close.
        """
        if len(regions) != len(fds):
            raise MemoryTableError(f"{len(regions)} regions but {len(fds)} fds")
        fresh = GuestMemory()
        try:
            for desc, fd in zip(regions, fds, strict=True):
                self._map_into(fresh, desc, fd)
        except MemoryTableError:
            fresh.close()
            raise
        # Running queues keep slices of the old mappings; they stay valid until released.
        self._drop(self.guest.replace(fresh))
        log.info("memory table: %d regions, %d MiB", len(self.guest),
                 sum(r.size for r in self.guest.regions) >> 20)

    def add(self, region: RegionFields, fd: int) -> GuestRegion:
        """Map one more region (ADD_MEM_REG)."""
        if len(self.guest) >= self.max_slots:
            raise MemoryTableError(f"all {self.max_slots} memory slots are in use")
        added = self._map_into(self.guest, region, fd)
        log.debug("added region gpa %#x size %#x", added.gpa, added.size)
        return added

    def remove(self, region: RegionFields) -> None:
        """Unmap the region matching gpa, size and user address (REM_MEM_REG)."""
        gpa, size, uaddr = region.guest_phys_addr, region.memory_size, region.userspace_addr
        found = self.guest.region_at(gpa)
        if found is None or found.gpa != gpa or found.size != size or found.userspace_addr != uaddr:
            raise MemoryTableError(
                f"no region gpa {gpa:#x} size {size:#x} uaddr {uaddr:#x} to remove"
            )
        self._drop([self.guest.remove_region(gpa, size)])
        log.debug("removed region gpa %#x size %#x", gpa, size)

    def uva_to_gpa(self, uva: int, length: int = 1) -> int:
        """The guest physical address of a frontend virtual address range inside one region."""
        for region in self.guest.regions:
            off = uva - region.userspace_addr
            if off >= 0 and off + length <= region.size:
                return region.gpa + off
        raise MemoryTableError(f"frontend address {uva:#x}+{length:#x} is in no region")

    def close(self) -> None:
        self._drop(self.guest.clear())
