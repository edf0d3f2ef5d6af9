"""A split ring laid out in a bytearray, for testing :class:`vhost.virtqueue.VirtQueue` with no
socket, no thread and no mmap: the test plays the driver by writing the ring bytes directly."""

from __future__ import annotations

import struct

from scsi_buffers import GuestMemory
from vhost.messages import VirtioFeature
from vhost.virtqueue import DESC, DESC_SIZE, USED_ELEM, RingAddresses, VirtQueue

EVENT_IDX = int(VirtioFeature.RING_EVENT_IDX)
INDIRECT = int(VirtioFeature.RING_INDIRECT_DESC)
BASE = 0x10000  # guest memory starts here (so gpa 0 is unmapped)
MEM_SIZE = 1 << 16


class Ring:
    """Guest memory ``[BASE, BASE + MEM_SIZE)`` with a ring of ``size`` at its start; buffers and
    indirect tables go to the second half."""

    def __init__(self, size: int = 8, features: int = EVENT_IDX | INDIRECT, next_avail: int = 0,
                 used_idx: int = 0, next_used: int | None = None) -> None:
        self.size = size
        self.buf = bytearray(MEM_SIZE)
        self.mem = GuestMemory.from_buffer(self.buf, gpa=BASE)
        self.desc = BASE
        self.avail = self.desc + DESC_SIZE * size
        self.used = (self.avail + 6 + 2 * size + 3) // 4 * 4
        self.data = BASE + MEM_SIZE // 2
        self.avail_idx = next_avail
        self._u16(self.avail + 2, next_avail)
        self._u16(self.used + 2, used_idx)
        self.vq = VirtQueue(self.mem, size, RingAddresses(self.desc, self.avail, self.used),
                            features, next_avail, next_used)

    # -- raw access
    def _u16(self, gpa: int, value: int) -> None:
        struct.pack_into("<H", self.buf, gpa - BASE, value & 0xFFFF)

    def _r16(self, gpa: int) -> int:
        return struct.unpack_from("<H", self.buf, gpa - BASE)[0]

    def write(self, gpa: int, data: bytes) -> None:
        self.buf[gpa - BASE : gpa - BASE + len(data)] = data

    # -- driver side
    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        DESC.pack_into(self.buf, self.desc - BASE + i * DESC_SIZE, addr, length, flags, nxt)

    def table(self, gpa: int, descs: list[tuple[int, int, int, int]]) -> int:
        self.write(gpa, b"".join(DESC.pack(*d) for d in descs))
        return gpa

    def publish(self, *heads: int) -> None:
        for head in heads:
            self._u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._u16(self.avail + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self._u16(self.avail + 2, value)

    def set_avail_flags(self, flags: int) -> None:
        self._u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self._u16(self.avail + 4 + 2 * self.size, value)

    # -- device side, as the driver sees it
    def used_idx(self) -> int:
        return self._r16(self.used + 2)

    def used_flags(self) -> int:
        return self._r16(self.used)

    def avail_event(self) -> int:
        return self._r16(self.used + 4 + 8 * self.size)

    def used_elem(self, slot: int) -> tuple[int, int]:
        return USED_ELEM.unpack_from(self.buf, self.used - BASE + 4 + 8 * (slot % self.size))

    def simple_chain(self, head: int, readable: int = 4, writable: int = 4) -> None:
        """head -> head+1: one readable and one writable buffer in the data area."""
        self.set_desc(head, self.data + 64 * head, readable, 1, head + 1)
        self.set_desc(head + 1, self.data + 64 * head + 32, writable, 2)
