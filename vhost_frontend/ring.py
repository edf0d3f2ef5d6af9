"""The driver's side of a split virtqueue: the one implementation the project has.

:class:`DriverRing` is sans-IO: it lays out descriptors, publishes heads, reads used entries and
decides whether a kick is due, in any :class:`guestmem.GuestMemory` -- a bytearray in a unit test,
an anonymous mapping in the hot-path benchmark, memfd guest RAM shared with a backend.  Every
write is raw (no checks), so a test can build a malformed ring as easily as a good one.
:class:`DriverQueue` adds what a queue needs between processes: kick, call and err eventfds.

Ring indices are written with one 16-bit store through a ``cast('H')`` view, as a driver must:
the backend may read them at any moment.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable, Sequence

from guestmem import GuestMemory
from vhost.queue.base import RingAddresses, full_fence
from vhost.queue.split import (
    DESC,
    DESC_SIZE,
    USED_ELEM,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    ring_sizes,
)
from vhost_frontend.errors import FrontendError
from vhost_frontend.memory import FrontendMemory

#: One piece of a chain as a driver lays it out: (guest address, length, device-writable).
Piece = tuple[int, int, bool]


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: did [old, new) pass ``event``?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class DriverRing:
    """The driver's view of one split ring at ``addresses`` in ``memory``.

    ``alloc(size)`` gives guest memory for indirect tables (``add_chain(indirect=True)``);
    without it only direct chains can be added.
    """

    def __init__(self, memory: GuestMemory, size: int, addresses: RingAddresses,
                 event_idx: bool, alloc: Callable[[int], int] | None = None) -> None:
        self.memory = memory
        self.size = size
        self.addresses = addresses
        self.desc, self.avail, self.used = addresses.desc, addresses.avail, addresses.used
        self.event_idx = event_idx
        self._alloc = alloc
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self._chain_desc: dict[int, list[int]] = {}
        desc_len, avail_len, used_len = ring_sizes(size)
        self._avail_h = memory.view(self.avail, avail_len, for_write=True).cast("H")
        self._used_h = memory.view(self.used, used_len, for_write=True).cast("H")
        self._used_b = memory.view(self.used, used_len, for_write=True)
        self._desc_b = memory.view(self.desc, desc_len, for_write=True)
        self._used_event_slot = 2 + size  # in avail, as u16 index
        self._avail_event_slot = 2 + 4 * size  # in used, as u16 index
        if event_idx:
            self._avail_h[self._used_event_slot] = 0  # interrupt on the first completion

    def start_at(self, base: int) -> None:
        """Make ``base`` the ring's avail and used index (a ring handed over mid-life)."""
        self.avail_idx = self.last_used = base & 0xFFFF
        self._avail_h[1] = self.avail_idx
        self._used_h[1] = self.avail_idx

    # -- descriptors and the avail ring
    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        """Write descriptor ``i`` of the table as given (no checks: for malformed rings too)."""
        DESC.pack_into(self._desc_b, i * DESC_SIZE, addr, length, flags, nxt)

    def write_table(self, gpa: int, descs: Sequence[tuple[int, int, int, int]]) -> int:
        """Write an indirect table of raw (addr, len, flags, next) descriptors at ``gpa``."""
        self.memory.write(gpa, b"".join(DESC.pack(*d) for d in descs))
        return gpa

    def publish(self, *heads: int) -> None:
        """Put ``heads`` in the avail ring, then bump avail.idx once (one 16-bit store)."""
        avail = self._avail_h
        idx = self.avail_idx
        for head in heads:
            avail[2 + (idx % self.size)] = head
            idx = (idx + 1) & 0xFFFF
        self.avail_idx = idx
        avail[1] = idx

    def set_avail_idx(self, value: int) -> None:
        """Force avail.idx (malformed-ring tests)."""
        self.avail_idx = value & 0xFFFF
        self._avail_h[1] = self.avail_idx

    def set_avail_flags(self, flags: int) -> None:
        self._avail_h[0] = flags

    def set_used_event(self, value: int) -> None:
        """Ask for an interrupt once the used index passes ``value`` (EVENT_IDX)."""
        self._avail_h[self._used_event_slot] = value & 0xFFFF

    def add_chain(self, pieces: Sequence[Piece], indirect: bool = False) -> int:
        """Lay out a chain of (gpa, length, writable) pieces and make it available; its head."""
        if indirect:
            if self._alloc is None:
                raise FrontendError("this ring has no memory for indirect tables")
            if not self.free:
                raise FrontendError("queue full")
            n = len(pieces)
            table = self._alloc(DESC_SIZE * n)
            self.write_table(table, [
                (addr, length,
                 (VIRTQ_DESC_F_WRITE if writable else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < n else 0),
                 i + 1 if i + 1 < n else 0)
                for i, (addr, length, writable) in enumerate(pieces)
            ])
            head = self.free.pop()
            self.write_desc(head, table, DESC_SIZE * n, VIRTQ_DESC_F_INDIRECT)
            self._chain_desc[head] = [head]
        else:
            if len(pieces) > len(self.free):
                raise FrontendError("queue full")
            ids = [self.free.pop() for _ in pieces]
            for i, (addr, length, writable) in enumerate(pieces):
                last = i + 1 == len(pieces)
                flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                self.write_desc(ids[i], addr, length, flags, 0 if last else ids[i + 1])
            head = ids[0]
            self._chain_desc[head] = ids
        self.publish(head)
        return head

    # -- what the device wrote
    def kick_needed(self, old_avail: int) -> bool:
        """Whether the device asked for a kick for the heads published since ``old_avail``."""
        full_fence()  # avail.idx store before the avail_event / flags load
        if self.event_idx:
            return need_event(self._used_h[self._avail_event_slot], self.avail_idx, old_avail)
        return not self._used_h[0] & 1

    def used_idx(self) -> int:
        return self._used_h[1]

    def used_flags(self) -> int:
        return self._used_h[0]

    def avail_event(self) -> int:
        return self._used_h[self._avail_event_slot]

    def used_elem(self, slot: int) -> tuple[int, int]:
        """The (head, length) the device wrote in used-ring slot ``slot`` (mod the size)."""
        return USED_ELEM.unpack_from(self._used_b, 4 + 8 * (slot % self.size))

    def take_used(self, free_descriptors: bool = True) -> list[tuple[int, int]]:
        """Used entries not seen yet, as (head, length); their descriptors are freed unless the
        caller keeps fixed chains of its own (``free_descriptors=False``, a load generator).

        With EVENT_IDX, used_event then asks for an interrupt on the next completion.
        """
        out = []
        idx = self._used_h[1]
        while self.last_used != idx:
            head, length = self.used_elem(self.last_used)
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
            if free_descriptors:
                self.free.extend(self._chain_desc.pop(head, [head]))
        if self.event_idx:
            self._avail_h[self._used_event_slot] = self.last_used
        return out

    def release(self) -> None:
        """Drop the ring views so the memory can be unmapped."""
        for view in (self._avail_h, self._used_h, self._used_b, self._desc_b):
            view.release()


class QueueFds:
    """A driven queue's kick, call and err eventfds, and waiting for its completions -- the part
    of a queue between processes that does not depend on the ring layout (mixed into
    :class:`DriverQueue` and :class:`vhost_frontend.packed.PackedDriverQueue`)."""

    index: int

    def open_fds(self, index: int) -> None:
        self.index = index
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kicks = 0
        self.calls = 0

    def take_used(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def where(self) -> str:
        """The ring's positions, for an error message."""
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)
        self.kicks += 1

    def wait_call(self, timeout: float) -> bool:
        """Wait for the call eventfd; True if it fired."""
        ready, _, _ = select.select([self.call_fd], [], [], timeout)
        if ready:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.call_fd)
            self.calls += 1
            return True
        return False

    def wait_used(self, count: int, timeout: float = 10.0) -> list[tuple[int, int]]:
        """Collect ``count`` used entries, waiting for calls; FrontendError on timeout."""
        got = self.take_used()
        deadline = time.monotonic() + timeout
        while len(got) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FrontendError(
                    f"queue {self.index}: {len(got)} of {count} completions after {timeout} s "
                    f"({self.where()})"
                )
            self.wait_call(min(remaining, 0.05))
            got.extend(self.take_used())
        return got

    def err_signalled(self) -> bool:
        try:
            return os.eventfd_read(self.err_fd) > 0
        except BlockingIOError:
            return False

    def close(self) -> None:
        self.release()
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class DriverQueue(DriverRing, QueueFds):
    """A :class:`DriverRing` in :class:`FrontendMemory` with its kick, call and err eventfds."""

    def __init__(self, mem: FrontendMemory, index: int, size: int, event_idx: bool,
                 region: int | None = None) -> None:
        desc_len, avail_len, used_len = ring_sizes(size)
        addresses = RingAddresses(mem.alloc(desc_len, 16, region), mem.alloc(avail_len, 2, region),
                                  mem.alloc(used_len, 4, region))
        super().__init__(mem.guest, size, addresses, event_idx,
                         alloc=lambda n: mem.alloc(n, 16))
        self.mem = mem
        self.open_fds(index)

    def where(self) -> str:
        return f"used.idx {self.used_idx()}, avail.idx {self.avail_idx}"
