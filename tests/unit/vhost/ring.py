"""A split ring in a bytearray, for testing :class:`vhost.queue.split.SplitQueue` with no socket, no
thread and no mmap: the test plays the driver through :class:`vhost_frontend.DriverRing` (the
project's one driver-side ring) and the device through the ``vq`` it is paired with."""

from __future__ import annotations

from guestmem import GuestMemory
from vhost.messages import VirtioFeature
from vhost.queue.base import RingAddresses
from vhost.queue.inflight_packed import PackedInflightQueue
from vhost.queue.packed import F_NEXT, F_WRITE, FRESH_BASE, PackedQueue
from vhost.queue.split import SplitQueue
from vhost_frontend import DriverRing
from vhost_frontend.packed import PackedDriverRing

EVENT_IDX = int(VirtioFeature.RING_EVENT_IDX)
INDIRECT = int(VirtioFeature.RING_INDIRECT_DESC)
BASE = 0x10000  # guest memory starts here (so gpa 0 is unmapped)
MEM_SIZE = 1 << 16


class Ring(DriverRing):
    """Guest memory ``[BASE, BASE + MEM_SIZE)`` with a ring of ``size`` at its start; buffers and
    indirect tables go to the second half (``data``)."""

    def __init__(self, size: int = 8, features: int = EVENT_IDX | INDIRECT, next_avail: int = 0,
                 used_idx: int = 0, next_used: int | None = None) -> None:
        self.buf = bytearray(MEM_SIZE)
        mem = GuestMemory.from_buffer(self.buf, gpa=BASE)
        desc = BASE
        avail = desc + 16 * size
        used = (avail + 6 + 2 * size + 3) // 4 * 4
        super().__init__(mem, size, RingAddresses(desc, avail, used),
                         bool(features & EVENT_IDX))
        self.mem = mem
        self.data = BASE + MEM_SIZE // 2
        self.set_avail_idx(next_avail)
        self.set_used_event(0)
        self._used_h[1] = used_idx  # the device's field: a ring handed over mid-life
        self.vq = SplitQueue(self.mem, size, self.addresses, features, next_avail, next_used)

    def write(self, gpa: int, data: bytes) -> None:
        self.mem.write(gpa, data)

    def simple_chain(self, head: int, readable: int = 4, writable: int = 4) -> None:
        """head -> head+1: one readable and one writable buffer in the data area."""
        self.write_desc(head, self.data + 64 * head, readable, 1, head + 1)
        self.write_desc(head + 1, self.data + 64 * head + 32, writable, 2)


class PackedRing(PackedDriverRing):
    """The packed twin of :class:`Ring`: guest memory ``[BASE, BASE + MEM_SIZE)`` with a packed
    ring of ``size`` at its start (descriptor ring, driver event area, device event area),
    buffers and indirect tables in the second half (``data``, ``alloc``), and the device's
    :class:`PackedQueue` as ``vq``."""

    def __init__(self, size: int = 8, features: int = EVENT_IDX | INDIRECT,
                 base: int = FRESH_BASE, inflight: PackedInflightQueue | None = None,
                 buf: bytearray | None = None) -> None:
        self.buf = bytearray(MEM_SIZE) if buf is None else buf
        mem = GuestMemory.from_buffer(self.buf, gpa=BASE)
        desc = BASE
        driver = desc + 16 * size
        device = driver + 4
        self.data = BASE + MEM_SIZE // 2
        self._next_table = BASE + MEM_SIZE - 4096
        super().__init__(mem, size, RingAddresses(desc, driver, device),
                         bool(features & EVENT_IDX), alloc=self._take_table)
        self.mem = mem
        self.features = features
        self.start_at(base)
        self.vq = PackedQueue(self.mem, size, self.addresses, features, base, inflight=inflight)

    def _take_table(self, n: int) -> int:
        """Memory for an indirect table: the last 4 KiB, reused round-robin."""
        if self._next_table + n > BASE + MEM_SIZE:
            self._next_table = BASE + MEM_SIZE - 4096
        gpa = self._next_table
        self._next_table += (n + 15) & ~15
        return gpa

    def write(self, gpa: int, data: bytes) -> None:
        self.mem.write(gpa, data)

    def simple_chain(self, buf_id: int, readable: int = 4, writable: int = 4) -> int:
        """One readable and one writable buffer in the data area as a direct chain."""
        gpa = self.data + 64 * buf_id
        self.free_ids.remove(buf_id)
        return self.add_raw([(gpa, readable, F_NEXT), (gpa + 32, writable, F_WRITE)], buf_id)
