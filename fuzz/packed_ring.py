"""Fuzz packed rings (VIRTIO_F_RING_PACKED) through the generic pop and the fast path, which must
agree on every chain; and hostile packed in-flight areas (``QueueRegionPacked``) recovered at
queue start.

Input (front to back, :class:`~_common.Reader`; zeros once it runs out): queue size (powers of
two, and 3 and 5, which have no in-flight area: QEMU only makes one for powers of two) and
features (INDIRECT_DESC, EVENT_IDX); the starting position (avail slot, wrap counter, slots a
previous backend left held); every ring descriptor (address picked near a meaningful spot -- a
header, the data areas, the boundary of two adjacent regions, a read-only region, a hole, the
ring itself, far outside --, length, buffer id, NEXT/WRITE/INDIRECT, and AVAIL/USED as
"available in this lap", "in the other lap", any of the four combinations or raw flags); two
indirect tables the same way; eight request headers (type, sector); the driver and device event
suppression areas (garbage welcome); the in-flight area (fresh, or a header and entries built
field by field: version, features, desc_num, free heads, used positions, wrap counters, padding,
in-flight bits, links, counts, counters, copied descriptors); then the driver's second batch:
ring slots rewritten (a whole descriptor or its flags), as a driver offering the next lap (or
playing flag games) would.

The same ring is served twice, on two identical copies of everything -- guest memory, image,
in-flight area -- by the real worker pass (:meth:`QueueWorker._service`) of a
:class:`BlkDevice` with the fast path on, and by one with it off (the generic pop: the
reference).  A crash is: an exception other than the queue refusing to start with a
``QueueError`` (bad position, bad in-flight area: both copies must refuse alike) escaping the
constructor or a pass; a piece of a popped chain outside guest memory; a chain
:meth:`PackedQueue.peek_simple` finds (on the reference, before each pass) that is not the one
the generic pop then returns, piece for piece; and after each batch any difference between the
copies in guest memory (ring, used elements, statuses, read data), the image, the queue's state
(broken, error, positions and wrap counters, in flight), the in-flight area or the counters.
"""

from __future__ import annotations

import mmap
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports(
    include=["vhost", "guestmem", "blockdev", "virtio_blk", "scsi_buffers"]
):
    from _common import Reader, run

    from blockdev.disk import Disk
    from guestmem import GuestMemory
    from vhost.messages import VirtioFeature
    from vhost.queue import inflight_packed
    from vhost.queue.base import (
        CHAIN_DATA,
        CHAIN_HEAD,
        CHAIN_HEADER,
        CHAIN_TRAILER,
        DescriptorChain,
        QueueError,
        RingAddresses,
        SimpleChain,
    )
    from vhost.queue.inflight import InflightArea, create_area
    from vhost.queue.inflight_packed import ENTRY, ENTRY_SIZE, HEADER, HEADER_SIZE, NO_ENTRY
    from vhost.queue.packed import (
        DESC,
        DESC_SIZE,
        F_AVAIL,
        F_INDIRECT,
        F_USED,
        F_WRITE,
        PackedQueue,
        encode_base,
    )
    from vhost.runner.thread import Notifier, QueueWorker
    from virtio_blk.device import BlkDevice
    from virtio_blk.fastpath import MAX_PIECES
    from virtio_blk.request import HEADER as BLK_HEADER
    from virtio_blk.request import T_BARRIER, ReqType

KiB = 1 << 10
A_GPA, A_SIZE = 0, 64 * KiB
B_GPA, B_SIZE = 64 * KiB, 64 * KiB  # adjacent to A
RO_GPA, RO_SIZE = 192 * KiB, 4 * KiB  # read-only; [128 KiB, 192 KiB) is a hole
DESC_GPA, DRIVER_GPA, DEVICE_GPA = 0x1000, 0x2000, 0x2010  # ring: up to 256 * 16 bytes
TABLE_GPA = (0x4000, 0x4800)  # indirect tables, up to 16 entries each
HDR_GPA = tuple(0x6000 + 0x20 * k for k in range(8))
STATUS_GPA = 0x6200
IMAGE_SECTORS = 64
SIZES = (16, 16, 8, 4, 2, 1, 3, 5, 256)
#: Spots addresses are picked near (plus an offset the input chooses).
BASES = (0x8000, 0xA000, *HDR_GPA, STATUS_GPA, B_GPA, B_GPA - 0x800, 0xC000, RO_GPA,
         128 * KiB, *TABLE_GPA, DESC_GPA, DRIVER_GPA, DEVICE_GPA, A_SIZE - 16,
         B_GPA + B_SIZE - 8, 1 << 40, (1 << 64) - 4096)
LENGTHS = (16, 1, 512, 4096, 8192, 0, 15, 2, 1024, 448, 3952, 2704, 64, 17, 4097, 8, 32, 48)
TYPES = (ReqType.IN, ReqType.OUT, ReqType.IN, ReqType.OUT, ReqType.FLUSH, ReqType.GET_ID,
         ReqType.DISCARD, ReqType.WRITE_ZEROES, ReqType.IN | T_BARRIER, 99)
SECTORS = (0, 8, 1, 3, 16, IMAGE_SECTORS - 8, IMAGE_SECTORS - 1, IMAGE_SECTORS,
           IMAGE_SECTORS + 8, (1 << 64) - 1, 1 << 63)
U16S = (0, 1, 2, 3, 7, 15, 16, 0x7FFF, 0x8000, 0xFFFE, NO_ENTRY)


def address(r: Reader) -> int:
    s = r.u8()
    if s >= 0xF0:
        return r.u64()
    o = r.u8()
    return BASES[s % len(BASES)] + (o * 512 if o < 0x80 else o - 0x80)


def length(r: Reader) -> int:
    s = r.u8()
    return r.u32() if s >= 0xF0 else LENGTHS[s % len(LENGTHS)]


def small(r: Reader, limit: int) -> int:
    """A u16 field: mostly ``0..limit`` (in range and just beyond), else a boundary or raw."""
    s = r.u8()
    if s < 0xC0:
        return s % (limit + 1)
    if s < 0xF0:
        return U16S[s % len(U16S)]
    return r.u16()


def marks(r: Reader, lap: int) -> int:
    """AVAIL/USED for a slot the driver means for lap ``lap`` (mostly: available in it)."""
    m = r.u8()
    kind = m & 7
    if kind < 4:
        return F_AVAIL if lap else F_USED  # available in the lap
    if kind == 4:
        return F_USED if lap else F_AVAIL  # available in the other lap
    return (0, F_AVAIL | F_USED, F_AVAIL | F_USED)[kind - 5] if not m & 0x80 else r.u16()


def descriptor(r: Reader, size: int, lap: int | None, writes: list[tuple[int, int]],
               tables: list[tuple[int, int]]) -> bytes:
    """One descriptor (``lap``: of the ring, with marks for that lap; None: of a table); a
    writable one's range is added to ``writes``, an indirect one's table to ``tables``."""
    addr, n = address(r) & ((1 << 64) - 1), length(r)
    buf_id = small(r, size)
    f = r.u8()
    flags = f & 7 if not f & 0x80 else r.u16() & ~(F_AVAIL | F_USED)
    if lap is not None:
        flags |= marks(r, lap)
    if flags & F_WRITE:
        writes.append((addr, n))
    if flags & F_INDIRECT:
        tables.append((addr, n))
    return DESC.pack(addr, n, buf_id, flags & 0xFFFF)


def inflight_region(r: Reader, size: int) -> bytes | None:
    """The queue's in-flight region as the input builds it; None: a fresh (zeroed) one."""
    mode = r.u8()
    if mode < 0x60:
        return None
    out = bytearray(HEADER_SIZE + ENTRY_SIZE * size)
    version = (1, 1, 1, 0, 2, 0xFFFF)[mode % 6]
    features = 0 if mode < 0xF0 else r.u64()
    desc_num = size if not mode & 0x10 else small(r, size)
    free_head, old_free = small(r, size), small(r, size)
    used, old_used = small(r, size), small(r, size)
    wrap, old_wrap = r.u8() % 3, r.u8() % 3
    pad = bytes(7) if not mode & 0x20 else r.take(7).ljust(7, b"\0")
    HEADER.pack_into(out, 0, features, version, desc_num, free_head, old_free, used, old_used,
                     wrap, old_wrap, pad)
    for i in range(size):
        s = r.u8()
        if s & 0x80:  # built by hand
            inflight_bit = s & 3
            nxt, last, num = small(r, size), small(r, size), small(r, size)
            counter = r.u8()
            d = DESC.unpack(descriptor(r, size, None, [], []))
            ENTRY.pack_into(out, HEADER_SIZE + i * ENTRY_SIZE, inflight_bit, 0, nxt, last, num,
                            counter, d[2], d[3], d[1], d[0])
        else:  # on a free list i -> i + 1
            ENTRY.pack_into(out, HEADER_SIZE + i * ENTRY_SIZE, 0, 0,
                            i + 1 if i + 1 < size else NO_ENTRY, 0, 0, 0, 0, 0, 0, 0)
    return bytes(out)


_A0 = bytes(i * 7 % 251 for i in range(A_SIZE))
_B0 = bytes(i * 13 % 253 for i in range(B_SIZE))
_RO0 = bytes(i * 3 % 247 for i in range(RO_SIZE))


class Layout:
    """What the input says: the initial contents of A, B and RO, the size, features, start
    position, in-flight region, and the second batch's rewrites."""

    def __init__(self, data: bytes) -> None:
        r = Reader(data)
        self.size = size = SIZES[r.u8() % len(SIZES)]
        bits = r.u8()
        self.features = int(VirtioFeature.VERSION_1 | VirtioFeature.RING_PACKED) \
            | (int(VirtioFeature.RING_INDIRECT_DESC) if bits & 1 else 0) \
            | (int(VirtioFeature.RING_EVENT_IDX) if bits & 2 else 0)
        avail, wrap = r.u8() % size, bits >> 2 & 1
        held = 0 if not bits & 8 else r.u8() % (size + 1)
        used, used_wrap = avail - held, wrap
        if used < 0:
            used, used_wrap = used + size, wrap ^ 1
        self.base = encode_base(avail, wrap, used, used_wrap)
        if bits & 0x80:  # a raw SET_VRING_BASE value (positions beyond the ring, ...)
            self.base = r.u32()
        a = bytearray(_A0)
        a[DESC_GPA:0x3000] = bytes(0x3000 - DESC_GPA)
        writes: list[tuple[int, int]] = []
        ring = [(DESC_GPA, DESC_SIZE * size)]
        lap = [wrap if i >= avail else wrap ^ 1 for i in range(size)]
        for i in range(size):
            a[DESC_GPA + 16 * i : DESC_GPA + 16 * i + 16] = descriptor(r, size, lap[i], writes,
                                                                       ring)
        for gpa in TABLE_GPA:
            for i in range(r.u8() % 17):
                a[gpa + 16 * i : gpa + 16 * i + 16] = descriptor(r, size, None, writes, [])
        for gpa in HDR_GPA:
            s = r.u8()
            rtype = r.u32() if s >= 0xF0 else int(TYPES[s % len(TYPES)])
            s = r.u8()
            sector = r.u64() if s >= 0xF0 else SECTORS[s % len(SECTORS)] + (s >> 4)
            a[gpa : gpa + 16] = BLK_HEADER.pack(rtype, 0, sector & ((1 << 64) - 1))
        a[STATUS_GPA : STATUS_GPA + 64] = b"\xee" * 64
        a[DRIVER_GPA : DRIVER_GPA + 4] = r.take(4).ljust(4, b"\0")  # off_wrap, flags
        a[DEVICE_GPA : DEVICE_GPA + 4] = r.take(4).ljust(4, b"\0")
        self.region = inflight_region(r, size) if size & (size - 1) == 0 else None
        self.fresh_area = size & (size - 1) == 0 and self.region is None
        # The driver's second batch: slots rewritten for the next lap (or flag games).
        self.rewrites: list[tuple[int, bytes]] = []
        for _ in range(r.u8() % (size + 3)):
            slot = r.u8() % size
            next_lap = lap[slot] ^ 1 if r.u8() & 1 else lap[slot]
            if r.u8() & 1:
                self.rewrites.append((slot, descriptor(r, size, next_lap, writes, ring)))
            else:
                self.rewrites.append((slot, marks(r, next_lap).to_bytes(2, "little")))
        # A request may read disk data into the ring itself.  The generic path reads every
        # chain of a batch before it starts any, the fast path starts each before it reads the
        # next: where the device writes into descriptors or indirect tables it has yet to read,
        # the two legitimately see different rings (both validate what they see).  Such inputs
        # are still run -- no exception may escape -- but not compared.
        self.self_writing = any(addr < lo + n and lo < addr + length
                                for addr, length in writes for lo, n in ring)
        self.a = bytes(a)


def same_chain(simple: SimpleChain, chain: DescriptorChain) -> bool:
    """The chain peek_simple found is the generic pop's, piece for piece."""
    head, header, header_len, data, data_len, into_guest, status, status_len, _, _ = simple
    hdr = [(header, header_len)]
    trailer = [(status, status_len)]
    if into_guest:
        readable, writable = hdr, data + trailer
    else:
        readable, writable = hdr + data, trailer
    return (head == chain.head and readable == chain.readable and writable == chain.writable
            and data_len + header_len + status_len == chain.readable_len + chain.writable_len)


class Rig:
    """One copy of everything, the device's fast path on or off (made once per process)."""

    def __init__(self, fast: bool) -> None:
        self.fast = fast
        self.maps = [mmap.mmap(-1, A_SIZE), mmap.mmap(-1, B_SIZE), mmap.mmap(-1, RO_SIZE)]
        self.mem = GuestMemory()
        self.mem.add_buffer(A_GPA, self.maps[0])
        self.mem.add_buffer(B_GPA, self.maps[1])
        self.mem.add_buffer(RO_GPA, self.maps[2], readonly=True)
        fd, self.path = tempfile.mkstemp(prefix="fuzz-packed-", suffix=".img",
                                         dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.close(fd)
        self.image0 = bytes(i * 11 % 241 for i in range(IMAGE_SECTORS * 512))
        with open(self.path, "wb") as f:
            f.write(self.image0)
        self.disk = Disk(self.path)
        self.device = BlkDevice(self.disk, engine="inline", fast_path=fast, serial="packed-fuzz",
                                bounce_pages=4, queue_processes=False)
        self.areas: dict[int, InflightArea] = {}
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = Notifier(self.call_fd)
        self.worker: QueueWorker | None = None

    def area(self, size: int) -> InflightArea:
        if size not in self.areas:
            fd, n = create_area(1, size, packed=True)
            self.areas[size] = InflightArea.map(fd, n, 0, 1, size, packed=True)
            os.close(fd)
        return self.areas[size]

    def serve(self, lay: Layout) -> list[dict[str, object]]:
        """Serve the layout's two batches; what the guest and the disk can see after each (or
        the queue's refusal to start)."""
        for m, init in zip(self.maps, (lay.a, _B0, _RO0), strict=True):
            m[:] = init
        os.pwrite(self.disk.fd, self.image0, 0)
        area = None
        tracker = None
        if lay.size & (lay.size - 1) == 0:
            area = self.area(lay.size)
            area.mapping[:] = bytes(len(area.mapping))
            if lay.region is not None:
                area.mapping[: len(lay.region)] = lay.region
            tracker = inflight_packed.tracker(area, 0, lay.size)
        self.stats0 = self.device.stats.as_dict()
        self.failed0 = [list(q.failed) for q in self.device.queue_stats]
        try:
            vq = PackedQueue(self.mem, lay.size, RingAddresses(DESC_GPA, DRIVER_GPA, DEVICE_GPA),
                             lay.features, lay.base, index=0, inflight=tracker)
        except QueueError as exc:  # a position or in-flight area refused: a clean refusal
            if tracker is not None:
                tracker.release()
            return [{"refused": str(exc),
                     "inflight_area": bytes(area.mapping) if area else b""}]
        handler = self.device.create_handler(0, self.mem)
        worker = self.worker
        if worker is None:  # one worker per rig: only its queue and handler change
            worker = self.worker = QueueWorker(vq, handler, self.kick_fd, self.call)
        worker.vq, worker.handler = vq, handler
        pops: list[list[DescriptorChain]] = []
        generic_pop = vq.pop_batch

        def recording_pop(limit: int | None = None) -> list[DescriptorChain]:
            chains = generic_pop(limit)
            pops.append(chains)
            return chains

        vq.pop_batch = recording_pop  # type: ignore[method-assign]
        seen = []
        ring = self.maps[0]
        try:
            for batch in range(2):
                if batch:
                    for slot, data in lay.rewrites:
                        if len(data) == 2:  # the driver flips the slot's AVAIL/USED only
                            at = DESC_GPA + 16 * slot + 14
                            flags = int.from_bytes(ring[at : at + 2], "little")
                            flags = flags & ~(F_AVAIL | F_USED) | int.from_bytes(data, "little")
                            ring[at : at + 2] = flags.to_bytes(2, "little")
                        else:
                            ring[DESC_GPA + 16 * slot : DESC_GPA + 16 * slot + 16] = data
                pops.clear()
                peeked = None if self.fast else vq.peek_simple(MAX_PIECES)
                self.pass_(worker, vq)
                self.check_pops(pops, peeked, lay.self_writing)
                seen.append(self.observe(vq, area))
        finally:
            vq.release()
            handler.close()
        return seen

    @staticmethod
    def pass_(worker: QueueWorker, vq: PackedQueue) -> None:
        worker._service(kick=True)
        for _ in range(8):  # the inline engine finishes at once; a deferred request (bounce
            if not vq.in_flight_count:  # pages) is retried on reap
                break
            worker._service(kick=False)

    def check_pops(self, pops: list[list[DescriptorChain]], peeked: SimpleChain | None,
                   self_writing: bool) -> None:
        """Every piece popped lies in guest memory; the chain peek_simple found is the first
        one the generic pop returned (the reference rig peeks before its pass)."""
        for chains in pops:
            for chain in chains:
                for addr, n in chain.readable + chain.writable:
                    if not self.mem.is_mapped(addr, n):
                        raise AssertionError(f"buffer id {chain.head}: piece {addr:#x}+{n:#x} "
                                             "is outside guest memory")
        if peeked is not None and not self_writing:
            first = next((c for chains in pops for c in chains), None)
            if first is None or not same_chain(peeked, first):
                raise AssertionError(f"peek_simple found buffer id {peeked[CHAIN_HEAD]} "
                                     f"({peeked[CHAIN_HEADER]:#x}, {peeked[CHAIN_DATA]}, "
                                     f"{peeked[CHAIN_TRAILER]:#x}), "
                                     f"the generic pop returned {describe(first)}")

    def observe(self, vq: PackedQueue, area: InflightArea | None) -> dict[str, object]:
        return {
            "memory": [bytes(m) for m in self.maps],
            "image": os.pread(self.disk.fd, IMAGE_SECTORS * 512, 0),
            "broken": vq.broken,
            "error": str(vq.error) if vq.error else None,
            "ring_state": vq.ring_state(),
            "inflight_area": bytes(area.mapping) if area else b"",
            "stats": {k: v - self.stats0[k] for k, v in self.device.stats.as_dict().items()},
            "failed": [[n - n0 for n, n0 in zip(q.failed, q0, strict=True)]
                       for q, q0 in zip(self.device.queue_stats, self.failed0, strict=True)],
        }


def describe(chain: DescriptorChain | None) -> str:
    if chain is None:
        return "nothing"
    return f"buffer id {chain.head} ({chain.readable}, {chain.writable})"


RIGS: tuple[Rig, Rig] | None = None


def diff(a: dict[str, object], b: dict[str, object]) -> str:
    out = []
    for key in a.keys() | b.keys():
        if a.get(key) != b.get(key):
            if key in ("memory", "image", "inflight_area"):
                out.append(f"{key} differs")
            else:
                out.append(f"{key}: fast {a.get(key)!r} vs generic {b.get(key)!r}")
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
    run("packed_ring", test_one_input)
