"""The driver's side of a packed virtqueue (virtio 2.8), the twin of :mod:`.ring`'s split one.

:class:`PackedDriverRing` is sans-IO, like :class:`~vhost_frontend.ring.DriverRing`: it lays out
chains at its avail position with its wrap counter (the first descriptor's flags written last,
as the spec's driver does), reads used elements at its used position, keeps the driver event
area and decides whether a kick is due from the device event area.  Raw writers
(:meth:`write_desc`, :meth:`write_table`) build malformed rings for the hostile-ring tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from guestmem import GuestMemory
from vhost.queue.base import RingAddresses, full_fence
from vhost.queue.packed import (
    DESC,
    DESC_SIZE,
    EVENT_DESC,
    EVENT_DISABLE,
    EVENT_SIZE,
    F_AVAIL,
    F_INDIRECT,
    F_NEXT,
    F_USED,
    F_WRITE,
    decode_base,
)
from vhost_frontend.errors import FrontendError
from vhost_frontend.memory import FrontendMemory
from vhost_frontend.ring import Piece, QueueFds, need_event


class PackedDriverRing:
    """The driver's view of one packed ring at ``addresses`` (descriptor ring, driver event
    area, device event area) in ``memory``."""

    def __init__(self, memory: GuestMemory, size: int, addresses: RingAddresses,
                 event_idx: bool, alloc: Callable[[int], int] | None = None) -> None:
        self.memory = memory
        self.size = size
        self.addresses = addresses
        #: SET_VRING_ADDR's three fields: descriptor ring, driver area, device area.
        self.desc, self.avail, self.used = addresses.desc, addresses.avail, addresses.used
        self.event_idx = event_idx
        self._alloc = alloc
        self._desc = memory.view(addresses.desc, DESC_SIZE * size, for_write=True)
        self._desc_h = self._desc.cast("H")
        self._driver_event = memory.view(addresses.avail, EVENT_SIZE, for_write=True).cast("H")
        self._device_event = memory.view(addresses.used, EVENT_SIZE, for_write=True).cast("H")
        self.avail_pos = 0
        self.avail_wrap = 1
        self.used_pos = 0
        self.used_wrap = 1
        self.free_ids = list(range(size - 1, -1, -1))
        #: Ring slots each buffer id in flight took (what the device skips when using it).
        self.slots: dict[int, int] = {}
        self.free_slots = size
        #: Chains made available since the last :meth:`kick_needed`: its ``old``.
        self._added_slots = 0
        if event_idx:
            self.set_used_event(0, 1)  # a notification on the first completion

    def start_at(self, base: int) -> None:
        """Make the positions those of a SET_VRING_BASE value (a ring handed over mid-life)."""
        self.avail_pos, self.avail_wrap, self.used_pos, self.used_wrap = decode_base(base)

    # -- descriptors
    def avail_flags(self, wrap: int | None = None) -> int:
        """AVAIL/USED bits that make a descriptor available in lap ``wrap`` (default: now)."""
        w = self.avail_wrap if wrap is None else wrap
        return F_AVAIL if w else F_USED

    def write_desc(self, slot: int, addr: int, length: int, buf_id: int, flags: int) -> None:
        """Write ring slot ``slot`` as given (no checks: for malformed rings too)."""
        DESC.pack_into(self._desc, slot * DESC_SIZE, addr, length, buf_id, flags)

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) of ring slot ``slot``."""
        return DESC.unpack_from(self._desc, slot * DESC_SIZE)

    def write_table(self, gpa: int, descs: Sequence[tuple[int, int, int]]) -> int:
        """An indirect table of raw (addr, len, flags) descriptors at ``gpa``."""
        self.memory.write(gpa, b"".join(DESC.pack(a, n, 0, f) for a, n, f in descs))
        return gpa

    def add_raw(self, descs: Sequence[tuple[int, int, int]], buf_id: int) -> int:
        """Make ``descs`` (addr, len, flags without AVAIL/USED) available as one chain at the
        avail position, ``buf_id`` in each, the first one's flags written last; the id.  No
        checks: NEXT is as given, so a test can write any chain."""
        if len(descs) > self.free_slots:
            raise FrontendError("ring full")
        first = self.avail_pos
        first_flags = 0
        for k, (addr, length, flags) in enumerate(descs):
            f = flags | self.avail_flags()
            if k == 0:
                first_flags = f
                self.write_desc(self.avail_pos, addr, length, buf_id, self._unavailable())
            else:
                self.write_desc(self.avail_pos, addr, length, buf_id, f)
            self.avail_pos += 1
            if self.avail_pos == self.size:
                self.avail_pos = 0
                self.avail_wrap ^= 1
        self.slots[buf_id] = len(descs)
        self.free_slots -= len(descs)
        self._added_slots += len(descs)
        full_fence()  # the rest of the chain before its first flags (a store barrier suffices)
        self._desc_h[8 * first + 7] = first_flags
        return buf_id

    def _unavailable(self) -> int:
        """Flags that do not make a slot available now (what the device last wrote there)."""
        return F_AVAIL | F_USED if not self.avail_wrap else 0

    def add_chain(self, pieces: Sequence[Piece], indirect: bool = False) -> int:
        """Lay out a chain of (gpa, length, writable) pieces and make it available; its id."""
        if not self.free_ids:
            raise FrontendError("no free buffer id")
        if indirect:
            if self._alloc is None:
                raise FrontendError("this ring has no memory for indirect tables")
            table = self._alloc(DESC_SIZE * len(pieces))
            self.write_table(table, [(a, n, F_WRITE if w else 0) for a, n, w in pieces])
            descs = [(table, DESC_SIZE * len(pieces), F_INDIRECT)]
        else:
            descs = [(a, n, (F_WRITE if w else 0) | (F_NEXT if k + 1 < len(pieces) else 0))
                     for k, (a, n, w) in enumerate(pieces)]
        if len(descs) > self.free_slots:
            raise FrontendError("ring full")
        return self.add_raw(descs, self.free_ids.pop())

    # -- notifications
    def set_used_event(self, off: int, wrap: int, flags: int = EVENT_DESC) -> None:
        """The driver event area: a notification once the device's used position passes
        ``off`` in lap ``wrap`` (``flags`` DESC), or always (ENABLE) / never (DISABLE)."""
        self._driver_event[0] = (off & 0x7FFF) | (wrap & 1) << 15
        self._driver_event[1] = flags

    def set_event_flags(self, flags: int) -> None:
        self._driver_event[1] = flags

    def device_event(self) -> tuple[int, int]:
        """(off_wrap, flags) as the device wrote them."""
        return self._device_event[0], self._device_event[1]

    @property
    def avail_idx(self) -> int:
        """The avail position and wrap counter (bit 15): what a split ring's avail.idx is to
        :meth:`kick_needed`'s callers."""
        return self.avail_pos | self.avail_wrap << 15

    def kick_needed(self, old_avail: int | None = None) -> bool:
        """Whether the device asked for a kick for the chains added since the last call
        (Linux's virtqueue_kick_prepare_packed).  ``old_avail`` is not needed: the ring counts
        the slots it made available since (the argument keeps the split ring's call shape)."""
        full_fence()  # the descriptors' flags before the event area's load
        added = self._added_slots
        self._added_slots = 0
        off_wrap, flags = self.device_event()
        if flags != EVENT_DESC:
            return flags != EVENT_DISABLE
        event = off_wrap & 0x7FFF
        if off_wrap >> 15 != self.avail_wrap:
            event -= self.size
        new = self.avail_pos
        return need_event(event & 0xFFFF, new, (new - added) & 0xFFFF)

    # -- what the device wrote
    def take_used(self, free_ids: bool = True) -> list[tuple[int, int]]:
        """Used elements not seen yet, as (id, len); their slots are freed, and their ids
        unless the caller keeps fixed ids of its own (``free_ids=False``, a load generator).
        With EVENT_IDX the driver event area then asks for a notification on the next one."""
        out = []
        while self.slots:  # (with nothing in flight, whatever the slot holds is stale)
            flags = self._desc_h[8 * self.used_pos + 7]
            w = self.used_wrap
            if flags >> 7 & 1 != w or flags >> 15 & 1 != w:
                break
            _, length, buf_id, _ = self.read_desc(self.used_pos)
            slots = self.slots.pop(buf_id, None)
            if slots is None:
                raise FrontendError(f"the device used buffer id {buf_id}, not in flight")
            out.append((buf_id, length))
            if free_ids:
                self.free_ids.append(buf_id)
            self.free_slots += slots
            self.used_pos += slots
            if self.used_pos >= self.size:
                self.used_pos -= self.size
                self.used_wrap ^= 1
        if self.event_idx:
            self.set_used_event(self.used_pos, self.used_wrap)
        return out

    def release(self) -> None:
        for view in (self._desc_h, self._driver_event, self._device_event, self._desc):
            view.release()


class PackedDriverQueue(PackedDriverRing, QueueFds):
    """A :class:`PackedDriverRing` in :class:`FrontendMemory` with its kick, call and err
    eventfds (the packed twin of :class:`~vhost_frontend.ring.DriverQueue`)."""

    def __init__(self, mem: FrontendMemory, index: int, size: int, event_idx: bool,
                 region: int | None = None) -> None:
        addresses = RingAddresses(mem.alloc(DESC_SIZE * size, 16, region),
                                  mem.alloc(EVENT_SIZE, 4, region),
                                  mem.alloc(EVENT_SIZE, 4, region))
        super().__init__(mem.guest, size, addresses, event_idx,
                         alloc=lambda n: mem.alloc(n, 16))
        self.mem = mem
        self.open_fds(index)

    def where(self) -> str:
        return (f"used position {self.used_pos}/{self.used_wrap}, avail position "
                f"{self.avail_pos}/{self.avail_wrap}")
