"""Fuzz split rings through the generic pop and the fast path, which must agree on every chain.

Input (front to back, :class:`~_common.Reader`; zeros once it runs out): queue size and
features; every descriptor of the table (address picked near a meaningful spot -- a header,
the data areas, the boundary of two adjacent regions, a read-only region, a hole, the rings
themselves, far outside -- length, flags, next); two indirect tables the same way; eight
request headers (type, sector); the heads made available, in up to two batches; avail.idx,
avail flags and used_event overrides.

The same ring is served twice, on two identical copies of everything -- guest memory, image,
in-flight area -- by the real worker pass (:meth:`QueueWorker._service`) of a
:class:`BlkDevice` with the fast path on, and by one with it off (the generic pop and the
device's generic request path: the reference).  After each batch both copies must agree on
every byte of guest memory (used ring, statuses, read data), the image, the queue's state
(broken, its error, next_avail, requests in flight), the in-flight area and the device's
counters.  An exception escaping either pass is a crash too.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import tempfile

import atheris

with atheris.instrument_imports(
    include=["vhost", "guestmem", "blockdev", "virtio_blk", "scsi_buffers"]
):
    from _common import Reader, run

    from blockdev.disk import Disk
    from guestmem import GuestMemory
    from vhost.queue.base import RingAddresses
    from vhost.queue.inflight import InflightArea, create_area
    from vhost.queue.split import DESC, SplitQueue
    from vhost.runner.thread import Notifier, QueueWorker
    from virtio_blk.device import BlkDevice
    from virtio_blk.request import HEADER, T_BARRIER, ReqType

KiB = 1 << 10
A_GPA, A_SIZE = 0, 64 * KiB
B_GPA, B_SIZE = 64 * KiB, 64 * KiB  # adjacent to A
RO_GPA, RO_SIZE = 192 * KiB, 4 * KiB  # read-only; [128 KiB, 192 KiB) is a hole
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000
TABLE_GPA = (0x4000, 0x4800)  # indirect tables, up to 16 entries each
HDR_GPA = tuple(0x6000 + 0x20 * k for k in range(8))
STATUS_GPA = 0x6200
IMAGE_SECTORS = 64
SIZES = (16, 16, 8, 4, 2, 1, 256)
#: Spots addresses are picked near (plus an offset the input chooses).
BASES = (0x8000, 0xA000, *HDR_GPA, STATUS_GPA, B_GPA, B_GPA - 0x800, 0xC000, RO_GPA,
         128 * KiB, *TABLE_GPA, DESC_GPA, AVAIL_GPA, USED_GPA, A_SIZE - 16, B_GPA + B_SIZE - 8,
         1 << 40, (1 << 64) - 4096)
LENGTHS = (16, 1, 512, 4096, 8192, 0, 15, 2, 1024, 448, 3952, 2704, 64, 17, 4097, 8)
TYPES = (ReqType.IN, ReqType.OUT, ReqType.IN, ReqType.OUT, ReqType.FLUSH, ReqType.GET_ID,
         ReqType.DISCARD, ReqType.WRITE_ZEROES, ReqType.IN | T_BARRIER, 99)
SECTORS = (0, 8, 1, 3, 16, IMAGE_SECTORS - 8, IMAGE_SECTORS - 1, IMAGE_SECTORS,
           IMAGE_SECTORS + 8, (1 << 64) - 1, 1 << 63)


def address(r: Reader) -> int:
    s = r.u8()
    if s >= 0xF0:
        return r.u64()
    o = r.u8()
    return BASES[s % len(BASES)] + (o * 512 if o < 0x80 else o - 0x80)


def length(r: Reader) -> int:
    s = r.u8()
    return r.u32() if s >= 0xF0 else LENGTHS[s % len(LENGTHS)]


def descriptor(r: Reader, writes: list[tuple[int, int]], tables: list[tuple[int, int]]) -> bytes:
    """One descriptor; a writable one's range is added to ``writes``, an indirect one's table
    to ``tables``."""
    addr, n = address(r) & ((1 << 64) - 1), length(r)
    f = r.u8()
    flags = r.u16() if f & 0x80 else f & 7
    if flags & 2:
        writes.append((addr, n))
    if flags & 4:
        tables.append((addr, n))
    return DESC.pack(addr, n, flags, r.u8())


_A0 = bytes(i * 7 % 251 for i in range(A_SIZE))
_B0 = bytes(i * 13 % 253 for i in range(B_SIZE))
_RO0 = bytes(i * 3 % 247 for i in range(RO_SIZE))


class Layout:
    """What the input says: the initial contents of A, B and RO, the size, features, batches."""

    def __init__(self, data: bytes) -> None:
        r = Reader(data)
        self.size = SIZES[r.u8() % len(SIZES)]
        bits = r.u8()
        self.features = (1 << 32) | (bits & 1) << 28 | (bits & 2) << 28
        a = bytearray(_A0)
        a[DESC_GPA:USED_GPA + 0x1000] = bytes(USED_GPA + 0x1000 - DESC_GPA)
        writes: list[tuple[int, int]] = []
        ring = [(DESC_GPA, 16 * self.size), (AVAIL_GPA, 6 + 2 * self.size)]
        for i in range(self.size):
            a[DESC_GPA + 16 * i : DESC_GPA + 16 * i + 16] = descriptor(r, writes, ring)
        for gpa in TABLE_GPA:
            for i in range(r.u8() % 17):
                a[gpa + 16 * i : gpa + 16 * i + 16] = descriptor(r, writes, [])
        # A request may read disk data into the ring itself.  The generic path reads every
        # chain of a batch before it starts any, the fast path starts each before it reads the
        # next: where the device writes into descriptors, indirect tables or avail entries it
        # has yet to read, the two legitimately see different rings (both validate what they
        # see).  Such inputs are still run -- no exception may escape -- but not compared.
        self.self_writing = any(addr < lo + n and lo < addr + length
                                for addr, length in writes for lo, n in ring)
        for gpa in HDR_GPA:
            s = r.u8()
            rtype = r.u32() if s >= 0xF0 else int(TYPES[s % len(TYPES)])
            s = r.u8()
            sector = r.u64() if s >= 0xF0 else SECTORS[s % len(SECTORS)] + (s >> 4)
            a[gpa : gpa + 16] = HEADER.pack(rtype, 0, sector & ((1 << 64) - 1))
        a[STATUS_GPA : STATUS_GPA + 64] = b"\xee" * 64
        self.a = bytes(a)
        self.b = _B0
        self.ro = _RO0
        heads = [r.u8() for _ in range(r.u8() % (self.size + 4))]
        cut = r.u8() % (len(heads) + 1)
        self.batches = [heads[:cut], heads[cut:]]
        self.idx_jump = r.u8()  # avail.idx moved by this much more after the last batch
        self.avail_flags = r.u8() & 1
        self.used_event = r.u16()


class Rig:
    """One copy of everything, the device's fast path on or off (made once per process)."""

    def __init__(self, fast: bool) -> None:
        self.maps = [mmap.mmap(-1, A_SIZE), mmap.mmap(-1, B_SIZE), mmap.mmap(-1, RO_SIZE)]
        self.mem = GuestMemory()
        self.mem.add_buffer(A_GPA, self.maps[0])
        self.mem.add_buffer(B_GPA, self.maps[1])
        self.mem.add_buffer(RO_GPA, self.maps[2], readonly=True)
        fd, self.path = tempfile.mkstemp(prefix="fuzz-ring-", suffix=".img",
                                         dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.close(fd)
        self.image0 = bytes(i * 11 % 241 for i in range(IMAGE_SECTORS * 512))
        with open(self.path, "wb") as f:
            f.write(self.image0)
        self.disk = Disk(self.path)
        self.device = BlkDevice(self.disk, engine="inline", fast_path=fast, serial="ring-fuzz",
                                bounce_pages=4, queue_processes=False)
        self.areas: dict[int, InflightArea] = {}
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = Notifier(self.call_fd)
        self.worker: QueueWorker | None = None

    def area(self, size: int) -> InflightArea:
        if size not in self.areas:
            fd, n = create_area(1, size)
            self.areas[size] = InflightArea.map(fd, n, 0, 1, size)
            os.close(fd)
        area = self.areas[size]
        area.mapping[:] = bytes(len(area.mapping))
        return area

    def serve(self, lay: Layout) -> list[dict[str, object]]:
        """Serve the layout's batches; what the guest and the disk can see after each."""
        for m, init in zip(self.maps, (lay.a, lay.b, lay.ro), strict=True):
            m[:] = init
        os.pwrite(self.disk.fd, self.image0, 0)
        area = self.area(lay.size)
        tracker = area.queue(0, lay.size)
        avail = self.maps[0]
        struct.pack_into("<H", avail, AVAIL_GPA, lay.avail_flags)
        struct.pack_into("<H", avail, AVAIL_GPA + 4 + 2 * lay.size, lay.used_event)
        seen = []
        # Counters of this input only (a skipped comparison must not poison the next one).
        self.stats0 = self.device.stats.as_dict()
        self.failed0 = [list(q.failed) for q in self.device.queue_stats]
        vq = SplitQueue(self.mem, lay.size, RingAddresses(DESC_GPA, AVAIL_GPA, USED_GPA),
                       lay.features, index=0, inflight=tracker)
        handler = self.device.create_handler(0, self.mem)
        worker = self.worker
        if worker is None:  # one worker per rig: only its queue and handler change
            worker = self.worker = QueueWorker(vq, handler, self.kick_fd, self.call)
        worker.vq, worker.handler = vq, handler
        try:
            idx = 0
            for i, batch in enumerate(lay.batches):
                for head in batch:
                    struct.pack_into("<H", avail, AVAIL_GPA + 4 + 2 * (idx % lay.size), head)
                    idx += 1
                if i == len(lay.batches) - 1:
                    idx += lay.idx_jump
                struct.pack_into("<H", avail, AVAIL_GPA + 2, idx & 0xFFFF)
                worker._service(kick=True)
                for _ in range(8):  # the inline engine finishes at once; a deferred request
                    if not vq.in_flight_count:  # (bounce pages) is retried on reap
                        break
                    worker._service(kick=False)
                seen.append(self.observe(vq, area))
        finally:
            vq.release()
            handler.close()
        return seen

    def observe(self, vq: SplitQueue, area: InflightArea) -> dict[str, object]:
        return {
            "memory": [bytes(m) for m in self.maps],
            "image": os.pread(self.disk.fd, IMAGE_SECTORS * 512, 0),
            "broken": vq.broken,
            "error": str(vq.error) if vq.error else None,
            "next_avail": vq.next_avail,
            "next_used": vq.next_used,
            "in_flight": vq.in_flight_count,
            "inflight_area": bytes(area.mapping),
            "stats": {k: v - self.stats0[k] for k, v in self.device.stats.as_dict().items()},
            "failed": [[n - n0 for n, n0 in zip(q.failed, q0, strict=True)]
                       for q, q0 in zip(self.device.queue_stats, self.failed0, strict=True)],
        }


RIGS: tuple[Rig, Rig] | None = None


def diff(a: dict[str, object], b: dict[str, object]) -> str:
    out = []
    for key in a:
        if a[key] != b[key]:
            if key in ("memory", "image", "inflight_area"):
                out.append(f"{key} differs")
            else:
                out.append(f"{key}: fast {a[key]!r} vs generic {b[key]!r}")
    return "; ".join(out)


def test_one_input(data: bytes) -> None:
    global RIGS
    if RIGS is None:
        RIGS = (Rig(fast=True), Rig(fast=False))
    fast, ref = RIGS
    lay = Layout(data)
    got, want = fast.serve(lay), ref.serve(lay)
    if lay.self_writing:
        return
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a != b:
            raise AssertionError(f"batch {i}: fast path and generic path disagree: {diff(a, b)}")


if __name__ == "__main__":
    sys.setrecursionlimit(10000)
    run("split_ring", test_one_input)
