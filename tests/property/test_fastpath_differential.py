"""The fast path changes nothing a guest or the disk can observe: a differential property test.

Hypothesis lays out a ring of requests -- well-formed and malformed, direct and indirect, data in
one run or several, pieces across a region boundary, in a hole or in a read-only region, splits
that need bouncing, buffers O_DIRECT cannot take, bad headers and types, sectors past the end --
and the same ring is served twice, on two identical copies of everything (guest memory, image,
in-flight area): once with the fast path on, once by the generic path alone.  Compared after each
pass: the used ring (ids and lengths), every byte of guest memory (statuses, read data, GET_ID
strings, the rings), the image, the queue's broken state and error, the in-flight area, the
device's counters (failures per kind, how many requests were timed) and -- when the scenario
logs dirty pages, as during a live migration -- every bit of the dirty-page log.

The disk may fail too: a scenario can make the engine report EIO for the reads and writes at some
offsets (after doing the IO, so the image is the same either way), and both paths must then
report the same failures -- statuses, used lengths, counters, dirty pages -- which is how the
fast path's fused completion is checked against the device's generic ``_finish`` on errors.

Both cores run it (:mod:`virtio_blk.core`): the pure-Python fast path and the compiled one
(:mod:`virtio_blk._fastpath_core`, which serves split rings on io_uring and hands the rest to
the Python one) -- the three implementations held to one result, and the floors check that the
compiled core itself took every shape it serves.

With the inline engine every request finishes as it is started, so both runs complete in ring
order and the comparison is byte for byte.  With io_uring the generic path completes a batch's
immediate errors before its reaped IO, so the order of used entries (and the batch links of the
in-flight area, which follow it) may legitimately differ: there the used entries are compared as
a multiset and the in-flight area by what recovery reads from it (heads in flight, pop order).
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import select
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from blockdev.disk import Disk
from blockdev.engine import Engine, IoOp
from blockdev.ops import OpKind
from blockdev.qcow2.disk import Qcow2Disk
from guestmem import GuestMemory
from guestmem.dirty_log import DirtyLog, DirtyMarker
from vhost.messages import VirtioFeature
from vhost.queue import inflight_packed
from vhost.queue.base import Queue, RingAddresses
from vhost.queue.inflight import InflightArea, create_area
from vhost.queue.packed import DESC as PACKED_DESC
from vhost.queue.packed import F_AVAIL, F_USED, FRESH_BASE, PackedQueue
from vhost.queue.split import (
    DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    SplitQueue,
)
from vhost.runner.thread import Notifier, QueueWorker
from vhost_frontend import DriverRing
from vhost_frontend.packed import PackedDriverRing
from virtio_blk import core as cores
from virtio_blk.device import BlkDevice, BlkQueueHandler
from virtio_blk.request import HEADER, T_BARRIER, ReqType

QSIZE = 16
A_GPA, A_SIZE = 0, 1 << 20  # ring, tables, headers, statuses, data
B_GPA, B_SIZE = 1 << 20, 1 << 20  # adjacent to A: pieces may straddle the boundary
RO_GPA, RO_SIZE = 4 << 20, 64 << 10  # read-only; [2 MiB, 4 MiB) is a hole
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000
IMAGE_SECTORS = 2048
FEATURES = int(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX
               | VirtioFeature.RING_INDIRECT_DESC)
PACKED = int(VirtioFeature.RING_PACKED)
#: The ring layouts every property runs over.
LAYOUTS = ("split", "packed")
#: The fast path's cores every property runs with.  Where the compiled core was not built (no C
#: compiler), its cases are skipped; CI checks it is built (.ci/run).
CORES = ("python", "compiled")

#: Where a piece lies: region A or B, across their boundary, the read-only region, the hole
#: between regions, past the end of guest memory.
PLACES = ("A",) * 10 + ("B", "B", "AB", "RO", "HOLE", "END")
ALIGNS = ("page",) * 4 + ("sector", "sector", "odd")
LENGTHS = (512,) * 2 + (4096,) * 6 + (8192, 1024, 448, 64, 3952, 2704, 1, 0)
MUTATIONS = (None,) * 40 + (
    "header_15", "header_split", "status_2", "status_merged", "status_ro", "data_wrong_way",
    "extra_flag", "next_oob", "loop", "indirect_next", "indirect_len", "indirect_nested",
    "indirect_shuffled", "zero_piece", "no_data", "wrong_wrap",
)
TYPES = (ReqType.IN,) * 8 + (ReqType.OUT,) * 8 + (
    ReqType.FLUSH, ReqType.GET_ID, ReqType.DISCARD, 99, ReqType.IN | T_BARRIER,
)


@dataclass
class Req:
    rtype: int
    sector: int
    pieces: list[tuple[int, str, str]]  # (length, place, alignment)
    indirect: bool
    mutation: str | None


@dataclass
class Scenario:
    requests: list[Req]
    ring_fault: str | None
    seed: int
    engine: str
    direct: bool
    read_only: bool
    bounce_pages: int
    batches: list[int] = field(default_factory=list)
    dirty_log: bool = False
    #: Reads and writes at 4k pages ``offset // 4096`` divisible by this fail with EIO (0: none).
    eio: int = 0


sectors = st.one_of(
    st.integers(0, 255).map(lambda s: s & ~7),
    st.integers(0, 255),
    st.sampled_from([IMAGE_SECTORS - 8, IMAGE_SECTORS - 1, IMAGE_SECTORS, IMAGE_SECTORS + 8,
                     3, (1 << 64) - 1]),
)
pieces = st.lists(st.tuples(st.sampled_from(LENGTHS), st.sampled_from(PLACES),
                            st.sampled_from(ALIGNS)), min_size=1, max_size=4)
any_request = st.builds(Req, st.sampled_from(TYPES), sectors, pieces, st.booleans(),
                        st.sampled_from(MUTATIONS))
#: What Linux sends: the fast path's shapes (most of a real ring).
linux_request = st.builds(
    Req, st.sampled_from((ReqType.IN, ReqType.OUT)), st.integers(0, 200).map(lambda s: s & ~7),
    st.lists(st.tuples(st.sampled_from((512, 4096, 4096, 8192)), st.sampled_from(("A", "B")),
                       st.sampled_from(("page", "sector"))), min_size=1, max_size=3),
    st.booleans(), st.none())
requests = st.one_of(linux_request, linux_request, any_request)
scenarios = st.builds(
    Scenario,
    st.lists(requests, min_size=1, max_size=10),
    st.sampled_from((None,) * 20 + ("dup_head", "head_oob", "avail_jump")),
    st.integers(0, 1 << 30),
    st.sampled_from(("inline", "io_uring")),
    st.booleans(),
    st.sampled_from((False,) * 4 + (True,)),
    st.sampled_from((2, 64)),
    st.lists(st.integers(1, 10), min_size=1, max_size=3),
    st.booleans(),
    st.sampled_from((0, 0, 0, 1, 2, 3)),
)


def inject_eio(engine: Engine, modulus: int) -> Callable[[IoOp], None]:
    """Make ``engine`` report EIO for the reads and writes whose 4k page number is a multiple
    of ``modulus``, whether they finish in ``submit`` or come back from ``reap``.

    The IO itself still happens, so guest memory and the image are what a disk that failed
    after moving the bytes leaves: the same in both runs.  Returns the function that fails an
    op, for the compiled core's ``result_hook`` (its requests do not go through ``submit``).
    """
    submit, reap = engine.submit, engine.reap

    def fail(op: IoOp) -> None:
        if op.kind in (OpKind.READ, OpKind.WRITE) and (op.offset >> 12) % modulus == 0:
            op.result = OSError(errno.EIO, "injected disk failure")

    def failing_submit(op: IoOp) -> bool:
        finished = submit(op)
        if finished:
            fail(op)
        return finished

    def failing_reap() -> list[IoOp]:
        ops = reap()
        for op in ops:
            fail(op)
        return ops

    engine.submit = failing_submit  # type: ignore[method-assign]
    engine.reap = failing_reap  # type: ignore[method-assign]
    return fail


def compiled_core_or_skip(core: str) -> None:
    if core == "compiled" and cores.compiled_module() is None:
        pytest.skip("the compiled core is not built here")


def record_fast_heads(engine: Engine, heads: list[int]) -> None:
    """Note in ``heads`` the head of every request the fast path hands ``engine``.

    The fast path submits its own request class (``fast`` is True) straight to the engine, so
    this sees exactly what it took, whichever way it recognised it.
    """
    submit = engine.submit

    def noting_submit(op: IoOp) -> bool:
        if getattr(op, "fast", False):
            heads.append(op.head)  # type: ignore[attr-defined]
        return submit(op)

    engine.submit = noting_submit  # type: ignore[method-assign]


class Allocator:
    """Bump allocation in each place, with the alignment asked for."""

    def __init__(self) -> None:
        self.next = {"A": 0x10000, "B": B_GPA + 0x1000, "RO": RO_GPA + 0x100,
                     "HOLE": 3 << 20, "END": RO_GPA + RO_SIZE + 0x1000}
        self.ab = A_GPA + A_SIZE - 0x3000

    def take(self, place: str, length: int, align: str) -> int:
        if place == "AB":  # straddles the A/B boundary
            gpa = self.ab
            self.ab -= 0x4000
            return gpa + 0x2F00 - (length // 2)
        gpa = self.next[place]
        if align == "page":
            gpa = (gpa + 4095) & ~4095
        elif align == "sector":
            gpa = ((gpa + 511) & ~511) + 512
        else:
            gpa += 3
        end = gpa + max(length, 1) + 64
        if place == "RO":
            end = min(end, RO_GPA + RO_SIZE - 1)
        self.next[place] = end
        return gpa


class Layout:
    """Guest memory writes and descriptors that make the scenario's ring.

    Split: descriptors in the table (``descs``), heads published in the avail ring.  Packed:
    each head's chain (``chains``: what the split table chains from it, in order) is written at
    the driver's ring position when it is published, with the head as its buffer id -- so both
    layouts complete the same ids.  Mutations about ``next`` links have packed meanings: "loop"
    sets NEXT on a chain's last descriptor (it runs on into the slot after it), "next_oob" puts
    a buffer id past the ring in it; an indirect table is written in the layout's format.
    "wrong_wrap" is the packed ring's own: a direct chain's last descriptor has AVAIL and USED
    both set (not available in either lap) while the head is available (split: no change).
    """

    def __init__(self, sc: Scenario, layout: str = "split") -> None:
        self.packed = layout == "packed"
        self.writes: list[tuple[int, bytes]] = []
        self.descs: list[tuple[int, int, int, int, int]] = []  # index, addr, len, flags, next
        #: Packed: each head's chain as (addr, len, flags, buffer id), in ring order.
        self.chains: dict[int, list[tuple[int, int, int, int]]] = {}
        #: Guest memory holding indirect tables (their format differs between the layouts).
        self.tables: list[tuple[int, int]] = []
        self.heads: list[int] = []
        #: The request laid at each head (a head is laid once; a ring fault may repeat it).
        self.requests: dict[int, Req] = {}
        self.alloc = Allocator()
        self.rng = random.Random(sc.seed)
        self.next_desc = 0
        self.ordered = sc.engine == "inline"
        self.extents: list[tuple[int, int, bool]] = []
        self.fresh = IMAGE_SECTORS // 2
        for req in sc.requests:
            head = self._lay(req)
            if head is not None:
                self.heads.append(head)
                self.requests[head] = req
        if sc.ring_fault == "dup_head" and self.heads:
            self.heads.insert(len(self.heads) // 2 + 1, self.heads[0])
        elif sc.ring_fault == "head_oob":
            self.heads.insert(len(self.heads) // 2, QSIZE + 3)
        self.avail_jump = sc.ring_fault == "avail_jump"

    def _small(self, n: int) -> int:
        return self.alloc.take("A", n, "odd")

    def _sector(self, req: Req) -> int:
        """io_uring may run the IOs of one batch in any order (as may any disk): there, a write
        never overlaps another request's sectors, so the image and the data read are
        determined."""
        sector = req.sector
        if self.ordered:
            return sector
        end = sector + (sum(n for n, _, _ in req.pieces) + 511) // 512
        writes = req.rtype == ReqType.OUT
        if any(s < end and sector < e and (writes or w) for s, e, w in self.extents):
            sector = self.fresh
            self.fresh += 64
            end = sector + 64
        self.extents.append((sector, end, writes))
        return sector

    def _lay(self, req: Req) -> int | None:
        m = req.mutation
        hdr = self.alloc.take("A", 16, "sector")
        self.writes.append((hdr, HEADER.pack(req.rtype & 0xFFFFFFFF, 0, self._sector(req))))
        writable_data = (req.rtype & ~T_BARRIER) in (ReqType.IN, ReqType.GET_ID)
        if m == "data_wrong_way":
            writable_data = not writable_data
        chain: list[tuple[int, int, int]] = []  # addr, len, flags (without NEXT)
        if m == "header_split":
            chain += [(hdr, 8, 0), (hdr + 8, 8, 0)]
        else:
            chain.append((hdr, 15 if m == "header_15" else 16, 0))
        for length, place, align in ([] if m == "no_data" else req.pieces):
            gpa = self.alloc.take(place, length, align)
            if not writable_data and place in ("A", "B", "AB") and length:
                self.writes.append((gpa, self.rng.randbytes(length)))
            chain.append((gpa, length, VIRTQ_DESC_F_WRITE if writable_data else 0))
        if m == "zero_piece":
            chain.insert(1, (self._small(4), 0, VIRTQ_DESC_F_WRITE if writable_data else 0))
        status = self.alloc.take("RO", 1, "odd") if m == "status_ro" else self._small(2)
        self.writes.append((status, b"\xee\xee"))
        if m == "status_merged" and len(chain) > 1 and chain[-1][2]:
            addr, length, flags = chain[-1]
            chain[-1] = (addr, length + 1, flags)
        else:
            chain.append((status, 2 if m == "status_2" else 1, VIRTQ_DESC_F_WRITE))
        if m == "extra_flag":
            addr, length, flags = chain[0]
            chain[0] = (addr, length, flags | 0x8)
        if req.indirect:
            return self._indirect(chain, m)
        return self._direct(chain, m)

    def _alloc_descs(self, n: int) -> list[int] | None:
        if self.next_desc + n > QSIZE:
            return None
        ids = list(range(self.next_desc, self.next_desc + n))
        self.next_desc += n
        return ids

    def _direct(self, chain: list[tuple[int, int, int]], m: str | None) -> int | None:
        ids = self._alloc_descs(len(chain))
        if ids is None:
            return None
        if self.packed:
            buf_id = QSIZE + 1 if m == "next_oob" else ids[0]
            self.chains[ids[0]] = [
                (addr, length, flags | (VIRTQ_DESC_F_NEXT if i + 1 < len(chain) or m == "loop"
                                        else 0), buf_id)
                for i, (addr, length, flags) in enumerate(chain)]
            if m == "wrong_wrap" and len(chain) > 1:
                addr, length, flags, _ = self.chains[ids[0]][-1]
                self.chains[ids[0]][-1] = (addr, length, flags | F_AVAIL | F_USED, buf_id)
            return ids[0]
        for i, (addr, length, flags) in enumerate(chain):
            last = i + 1 == len(chain)
            nxt = 0 if last else ids[i + 1]
            f = flags | (0 if last else VIRTQ_DESC_F_NEXT)
            if m == "next_oob" and i == 0:
                nxt = QSIZE + 1
            if m == "loop" and last:
                f |= VIRTQ_DESC_F_NEXT
                nxt = ids[0]
            self.descs.append((ids[i], addr, length, f, nxt))
        return ids[0]

    def _indirect(self, chain: list[tuple[int, int, int]], m: str | None) -> int | None:
        ids = self._alloc_descs(1)
        if ids is None:
            return None
        n = len(chain)
        order = list(range(n))
        if m == "indirect_shuffled" and n > 2:  # a valid chain, but not in table order
            order = [0, *range(n - 1, 0, -1)]
        table = [b""] * n
        for pos, i in enumerate(order):
            addr, length, flags = chain[i]
            last = pos + 1 == n
            slot_next = order[pos + 1] if not last else 0
            f = flags | (0 if last else VIRTQ_DESC_F_NEXT)
            if m == "indirect_nested" and pos == 1:
                f |= VIRTQ_DESC_F_INDIRECT
            if m == "loop" and last:
                f |= VIRTQ_DESC_F_NEXT
                slot_next = order[0]
            if m == "next_oob" and pos == 0:
                slot_next = n + 2
            table[i] = (addr, length, f, slot_next)  # type: ignore[call-overload]
        if self.packed:  # (addr, len, id, flags), in the order the table chains them
            raw = b"".join(PACKED_DESC.pack(table[i][0], table[i][1], 0, table[i][2])
                           for i in order)
        else:
            raw = b"".join(DESC.pack(*d) for d in table)
        gpa = self.alloc.take("A", len(raw), "page")
        self.writes.append((gpa, raw))
        self.tables.append((gpa, len(raw)))
        flags = VIRTQ_DESC_F_INDIRECT | (VIRTQ_DESC_F_NEXT if m == "indirect_next" else 0)
        length = len(raw) + (8 if m == "indirect_len" else 0)
        self.descs.append((ids[0], gpa, length, flags, 0))
        self.chains[ids[0]] = [(gpa, length, flags, QSIZE + 1 if m == "next_oob" else ids[0])]
        return ids[0]


class Rig:
    """One copy of everything, served by a queue worker with the fast path on or off."""

    def __init__(self, sc: Scenario, layout: Layout, image: bytes, tmp: str,
                 fast: bool, name: str = "", core: str = "python", fmt: str = "raw") -> None:
        """``image``: the file's bytes, a raw image or (``fmt`` "qcow2") a qcow2 one."""
        self.mem = GuestMemory()
        self.maps = [mmap.mmap(-1, A_SIZE), mmap.mmap(-1, B_SIZE), mmap.mmap(-1, RO_SIZE)]
        self.mem.add_buffer(A_GPA, self.maps[0])
        self.mem.add_buffer(B_GPA, self.maps[1])
        self.mem.add_buffer(RO_GPA, self.maps[2], readonly=True)
        for gpa, data in layout.writes:
            for region, m in zip((A_GPA, B_GPA, RO_GPA), self.maps, strict=True):
                lo, hi = region, region + len(m)
                for i, byte in enumerate(data):  # raw: may straddle regions, or lie in a hole
                    if lo <= gpa + i < hi:
                        m[gpa + i - lo] = byte
        self.path = os.path.join(tmp, name or ("fast.img" if fast else "ref.img"))
        with open(self.path, "wb") as f:
            f.write(image)
        self.disk: Disk | Qcow2Disk
        if fmt == "qcow2":
            self.disk = Qcow2Disk(self.path, read_only=sc.read_only)
        else:
            self.disk = Disk(self.path, read_only=sc.read_only, direct=sc.direct)
        self.device = BlkDevice(self.disk, engine=sc.engine, bounce_pages=sc.bounce_pages,
                                fast_path=fast, serial="differential")
        addresses = RingAddresses(DESC_GPA, AVAIL_GPA, USED_GPA)
        self.layout = layout
        self.packed = layout.packed
        self.vq: Queue
        if self.packed:
            self.pdriver = PackedDriverRing(self.mem, QSIZE, addresses, event_idx=True)
            fd, size = create_area(1, QSIZE, packed=True)
            self.inflight = InflightArea.map(fd, size, 0, 1, QSIZE, packed=True)
            os.close(fd)
            self.vq = PackedQueue(self.mem, QSIZE, addresses, FEATURES | PACKED, FRESH_BASE,
                                  index=0, inflight=inflight_packed.tracker(self.inflight, 0,
                                                                            QSIZE))
        else:
            self.driver = DriverRing(self.mem, QSIZE, addresses, event_idx=True)
            for index, addr, length, flags, nxt in layout.descs:
                self.driver.write_desc(index, addr, length, flags, nxt)
            fd, size = create_area(1, QSIZE)
            self.inflight = InflightArea.map(fd, size, 0, 1, QSIZE)
            os.close(fd)
            self.vq = SplitQueue(self.mem, QSIZE, addresses, FEATURES, index=0,
                                 inflight=self.inflight.queue(0, QSIZE))
        #: Packed: the used elements the driver read, in order, and chains still out.
        self.used_log: list[tuple[int, int]] = []
        self.outstanding = 0
        handler = self.device.create_handler(0, self.mem)
        assert isinstance(handler, BlkQueueHandler)
        self.handler = handler
        # The engine that runs is the one asked for (no silent fallback to another).
        assert self.handler.engine.name == sc.engine, self.handler.engine.name
        fail = inject_eio(self.handler.engine, sc.eio) if sc.eio else None
        #: Heads of the requests the fast path started (FastRequest: ``fast`` is True), in
        #: order (a head the driver makes available again may be taken again); and of those
        #: the compiled core started itself.
        self.fast_heads: list[int] = []
        self.compiled_heads: list[int] = []
        record_fast_heads(self.handler.engine, self.fast_heads)
        self.core = core
        if fast:
            with mock.patch.dict(os.environ, {cores.ENV: core}):
                fp = self.handler._fast = cores.make_fast_path(self.handler, self.vq)
            if not isinstance(fp, cores.FastPath):  # the compiled core serves this queue
                fp.record = self.compiled_heads  # type: ignore[attr-defined]
                fp.result_hook = fail  # type: ignore[attr-defined]
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.worker = QueueWorker(self.vq, self.handler, self.kick_fd, Notifier(self.call_fd))
        self.log: DirtyLog | None = None
        if sc.dirty_log:  # as during a migration: the ring and the device mark one log
            self.log_fd = os.memfd_create("differential-log", os.MFD_CLOEXEC)
            size = (RO_GPA + RO_SIZE) // 4096 // 8 + 8 & ~7  # bits for every page, in u64s
            os.ftruncate(self.log_fd, size)
            self.log = DirtyLog(self.log_fd, size)
            self.vq.dirty = self.handler.dirty = DirtyMarker(self.log)

    def taken(self) -> int:
        """Requests the fast path took, whichever core (the compiled one counts its own and
        its Python fallback's)."""
        fp = self.handler._fast
        if fp is None:
            return 0
        python = getattr(fp, "python", None)
        return fp.taken + (python.taken if python is not None else 0)

    def publish(self, heads: list[int], jump: bool) -> None:
        if not self.packed:
            self.driver.publish(*heads)
            if jump:
                self.driver.set_avail_idx(self.driver.avail_idx + QSIZE + 5)
            return
        d = self.pdriver
        for head in heads:
            # A head with no chain of its own is the "head_oob" fault: a lone descriptor whose
            # buffer id is past the ring.
            chain = self.layout.chains.get(head, [(A_GPA + 0x8000, 1, VIRTQ_DESC_F_WRITE, head)])
            if len(chain) > d.free_slots:
                continue  # the ring is full (a head published twice): the driver waits
            d.add_raw([(a, n, f) for a, n, f, _ in chain], chain[-1][3])
            self.outstanding += 1
        if jump and d.free_slots:  # a chain whose NEXT runs into a slot never made available
            d.add_raw([(A_GPA + 0x8000, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT)], 0)

    def _take_packed_used(self) -> None:
        """Read the used elements the device wrote (packed), as a driver does: at its used
        position, moving by the slots the buffer's chain took."""
        d = self.pdriver
        while self.outstanding:
            _, length, buf_id, flags = d.read_desc(d.used_pos)
            if flags >> 7 & 1 != d.used_wrap or flags >> 15 & 1 != d.used_wrap:
                break
            self.used_log.append((buf_id, length))
            self.outstanding -= 1
            slots = len(self.layout.chains[buf_id])
            d.free_slots += slots
            d.used_pos += slots
            if d.used_pos >= QSIZE:
                d.used_pos -= QSIZE
                d.used_wrap ^= 1
        d.set_used_event(d.used_pos, d.used_wrap)

    def serve(self) -> None:
        """One worker pass, then passes on completions until nothing is in flight."""
        self.worker._service(kick=True)
        deadline = time.monotonic() + 10
        while self.vq.in_flight_count and time.monotonic() < deadline:
            fd = self.handler.completion_fd
            if fd is not None:
                select.select([fd], [], [], 0.01)
            self.worker._service(kick=False)
        if self.packed:
            self._take_packed_used()

    def used(self) -> list[tuple[int, int]]:
        if self.packed:
            return list(self.used_log)
        return [self.driver.used_elem(i) for i in range(self.driver.used_idx())]

    def ring_bytes(self) -> tuple[int, int]:
        """Where the device writes its used side: the used ring, or (packed) the descriptor
        ring (with the event areas after it)."""
        return (DESC_GPA, 0x4000) if self.packed else (USED_GPA, 0x4000)

    def in_flight(self) -> object:
        """What a recovery would resubmit, in order: heads and counters (split), buffer ids
        (packed: which entries hold them depends on the completion order)."""
        view = self.inflight.view(0, QSIZE)
        if self.packed:
            tracker = inflight_packed.PackedInflightQueue(view, QSIZE)
            try:
                rec = tracker.plan(lambda slot: self.pdriver.read_desc(slot)[3])
                return [descs[-1][2] for _, descs in rec.chains]
            finally:
                tracker.release()
        view.release()
        split_tracker = self.inflight.queue(0, QSIZE)
        try:
            heads = split_tracker.in_flight()
            return heads, [split_tracker._state(i)[2] for i in heads]
        finally:
            split_tracker.release()

    def image(self) -> bytes:
        """The disk's contents: the file of a raw image, what a qcow2 image reads as."""
        if isinstance(self.disk, Qcow2Disk):
            data = bytearray(IMAGE_SECTORS * 512)
            self.disk.readv([memoryview(data)], 0)
            return bytes(data)
        with open(self.path, "rb") as f:
            return f.read()

    def file(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def close(self) -> None:
        (self.pdriver if self.packed else self.driver).release()
        self.vq.release()
        self.handler.close()
        self.worker.call.close()
        # The worker's own wake-up eventfd (its thread never ran: stop() would close it).
        os.close(self.worker._wake_fd)
        os.close(self.kick_fd)
        self.inflight.close()
        if self.log is not None:
            self.vq.dirty = self.handler.dirty = None
            self.log.close()
            os.close(self.log_fd)
        self.disk.close()
        self.mem.close()


def observable(rig: Rig, ordered: bool) -> dict[str, object]:
    used = rig.used()
    inflight = bytes(rig.inflight.mapping)
    lo, hi = rig.ring_bytes()
    return {
        "used_count": len(used),
        "used": used if ordered else sorted(used),
        "memory": [bytes(m) for m in rig.maps] if ordered else None,
        "memory_outside_used_ring": [bytes(rig.maps[0][:lo]), bytes(rig.maps[0][hi:]),
                                     bytes(rig.maps[1]), bytes(rig.maps[2])],
        "image": rig.image(),
        # qcow2: the file too -- where data went (in place, or copied on write) and metadata
        "file": rig.file() if isinstance(rig.disk, Qcow2Disk) else None,
        # ... and its IO in flight, which only ever counts a pass's IO: none between passes
        "qcow2_io_in_flight": rig.disk.image._inflight if isinstance(rig.disk, Qcow2Disk)
        else None,
        "broken": rig.vq.broken,
        "error": str(rig.vq.error) if rig.vq.error else None,
        "vring_base": rig.vq.vring_base(),
        "in_flight_count": rig.vq.in_flight_count,
        "inflight_area": inflight if ordered else None,
        "inflight_heads": rig.in_flight(),
        "stats": rig.device.stats.as_dict(),
        # Failures per kind, and how many requests were timed (not the times themselves).
        # (read as a reader reads them: the compiled core's counts are in its native arrays)
        "failed": [q.failed for q in rig.device.fresh_queue_stats()],
        "timed": [[sum(h) for h in q.latency] for q in rig.device.fresh_queue_stats()],
        "dirty_pages": bytes(rig.log._words) if rig.log is not None else None,
    }


#: The qcow2 images' cluster size: 16 of them in the disk, a request of 4 KiB or two crosses
#: one now and then.
CLUSTER = 64 << 10


def hole_clusters(seed: int) -> set[int]:
    """The clusters :func:`qcow2_image` leaves unallocated for ``seed``: about a quarter."""
    rng = random.Random(seed)
    return {c for c in range(IMAGE_SECTORS * 512 // CLUSTER) if rng.random() < 0.25}


#: What else :func:`qcow2_image` puts in the image, by seed: nothing (three times in eleven),
#: an internal snapshot (no cluster may be written in place: copy-on-write), compressed
#: clusters, a zero cluster, an L2 entry pointing at metadata -- the L1 table, an L2 table, the
#: refcount table or a refcount block (reads may see it, a write must fail) -- or an autoclear
#: feature bit (the first write clears it first, so none may go the fast way before).
QCOW2_EXTRAS = ("plain", "plain", "plain", "snapshot", "compressed", "zero", "corrupt:l1",
                "corrupt:l2", "corrupt:reftable", "corrupt:refblock", "autoclear")


def qcow2_image(raw: bytes, seed: int, tmp: str) -> bytes:
    """A qcow2 image of ``raw`` with :func:`hole_clusters` left unallocated (they read as
    zeros: the raw data there is zeroed first), as qemu-img converts it: allocated clusters the
    fast paths map, holes they leave to the general path (which allocates on a write); and
    the :data:`QCOW2_EXTRAS` the seed picks, which no fast path may write in place."""
    data = bytearray(raw)
    for c in hole_clusters(seed):
        data[c * CLUSTER : (c + 1) * CLUSTER] = bytes(CLUSTER)
    src, dst = os.path.join(tmp, "source.raw"), os.path.join(tmp, "source.qcow2")
    with open(src, "wb") as f:
        f.write(data)
    extra = QCOW2_EXTRAS[seed % len(QCOW2_EXTRAS)]
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o",
                    f"cluster_size={CLUSTER}", *(["-c"] if extra == "compressed" else []),
                    src, dst], check=True)
    if extra == "snapshot":
        subprocess.run(["qemu-img", "snapshot", "-q", "-c", "before", dst], check=True)
    if extra == "autoclear":  # version 3's autoclear_features, at byte 88: "bitmaps"
        with open(dst, "r+b") as f:
            f.seek(88)
            f.write((1).to_bytes(8, "big"))
    allocated = [c for c in range(len(data) // CLUSTER) if c not in hole_clusters(seed)]
    if extra == "zero" and allocated:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                        f"write -z {allocated[0] * CLUSTER} {CLUSTER}", dst],
                       check=True, stdout=subprocess.DEVNULL)
    if extra.startswith("corrupt:") and allocated:
        with open(dst, "r+b") as f:
            header = f.read(56)
            l1_offset, refcount_table = (int.from_bytes(header[i : i + 8], "big")
                                         for i in (40, 48))
            f.seek(l1_offset)
            l2_offset = int.from_bytes(f.read(8), "big") & 0x00FF_FFFF_FFFF_FE00
            f.seek(refcount_table)
            refcount_block = int.from_bytes(f.read(8), "big")
            target = {"corrupt:l1": l1_offset, "corrupt:l2": l2_offset,
                      "corrupt:reftable": refcount_table,
                      "corrupt:refblock": refcount_block}[extra]
            assert target and target % CLUSTER == 0, (extra, target)
            f.seek(l2_offset + 8 * allocated[-1])
            f.write(((1 << 63) | target).to_bytes(8, "big"))
    with open(dst, "rb") as f:
        return f.read()


def serve_both(sc: Scenario, ring: str = "split", core: str = "python",
               inspect: Callable[[Rig, Rig], None] | None = None,
               begin: Callable[[], None] | None = None, fmt: str = "raw",
               ) -> tuple[Layout, set[int], list[str], set[int]]:
    """Serve ``sc``'s ring (of layout ``ring``) with the fast path (of ``core``) on and off,
    comparing everything observable after each batch; the layout, the heads the fast path
    took, events for Hypothesis' report, and the heads the compiled core took itself.
    ``begin()`` is called once both are set up, ``inspect(fast, ref)`` looks at both runs at
    the end.  ``fmt`` "qcow2": both serve the same qcow2 image (:func:`qcow2_image`)."""
    layout = Layout(sc, ring)
    image = random.Random(sc.seed ^ 0x5A5A).randbytes(IMAGE_SECTORS * 512)
    with tempfile.TemporaryDirectory() as tmp:
        if fmt == "qcow2":
            image = qcow2_image(image, sc.seed, tmp)
        fast = Rig(sc, layout, image, tmp, fast=True, core=core, fmt=fmt)
        ref = Rig(sc, layout, image, tmp, fast=False, fmt=fmt)
        try:
            if begin is not None:
                begin()
            heads = layout.heads
            start = 0
            for i, n in enumerate([*sc.batches, len(heads)]):
                batch = heads[start : start + n]
                start += len(batch)
                last = i == len(sc.batches)
                for rig in (fast, ref):
                    rig.publish(batch, jump=layout.avail_jump and last)
                    rig.serve()
                ordered = sc.engine == "inline"
                assert observable(fast, ordered) == observable(ref, ordered)
                if start >= len(heads):
                    break
            assert not ref.fast_heads, "the reference run went through the fast path"
            if inspect is not None:
                inspect(fast, ref)
            taken = fast.taken()
            assert taken == len(fast.fast_heads) + len(fast.compiled_heads)
            share = "none" if not taken else "all" if taken == len(heads) else "some"
            events = [f"{ring} ring, {core} core: fast path took {share}",
                      f"compiled core took {'some' if fast.compiled_heads else 'none'}",
                      f"queue broken: {ref.vq.broken}",
                      f"disk failures: {'some' if ref.device.stats.errors and sc.eio else 'none'}"]
            return (layout, set(fast.fast_heads) | set(fast.compiled_heads), events,
                    set(fast.compiled_heads))
        finally:
            fast.close()
            ref.close()


#: What the fast path must be seen taking: each shape of request Linux sends, and each setting
#: it must keep working under.  A fast path that declines any of them (or is switched off)
#: still passes the differential comparison -- the generic path serves the request the same
#: way -- so only this floor notices.
SHAPES = ("direct chain", "indirect table", "one data run", "several data runs", "read", "write",
          "O_DIRECT", "dirty logging", "inline engine", "io_uring engine")


def shapes_of(sc: Scenario, req: Req) -> set[str]:
    """The :data:`SHAPES` a request the fast path took shows."""
    shapes = {"indirect table" if req.indirect else "direct chain",
              "several data runs" if len(req.pieces) > 1 else "one data run",
              "read" if req.rtype == ReqType.IN else "write", f"{sc.engine} engine"}
    if sc.direct:  # taken under O_DIRECT: its buffers were aligned (else it bounces)
        shapes.add("O_DIRECT")
    if sc.dirty_log:
        shapes.add("dirty logging")
    return shapes


def record_shapes(sc: Scenario, served: tuple[Layout, set[int], list[str], set[int]],
                  seen: set[str], seen_compiled: set[str]) -> None:
    """What :func:`serve_both` returned for ``sc``: its events for Hypothesis' report, the
    :data:`SHAPES` the fast path took into ``seen``, those the compiled core took itself (and
    "a disk failure" when the disk failed some) into ``seen_compiled``."""
    layout, taken, events, compiled = served
    for text in events:
        event(text)
    for head in taken:
        seen.update(shapes_of(sc, layout.requests[head]))
    for head in compiled:
        seen_compiled.update(shapes_of(sc, layout.requests[head]))
        if sc.eio:
            seen_compiled.add("a disk failure")


def _page(place: str = "A", length: int = 4096) -> tuple[int, str, str]:
    return (length, place, "page")


def shape_scenario(shape: str, engine: str) -> Scenario:
    """A ring of well-formed requests, all in ``shape`` (reads and writes, on ``engine``): the
    fast path must take every one."""
    IN, OUT = ReqType.IN, ReqType.OUT
    one = [Req(IN, 0, [_page()], False, None), Req(OUT, 16, [_page("B")], False, None),
           Req(IN, 32, [(512, "A", "sector")], True, None),
           Req(OUT, 48, [_page("A", 8192)], True, None)]
    several = [Req(IN, 64, [_page(), _page("B"), (512, "A", "sector")], False, None),
               Req(OUT, 80, [_page("B"), _page()], True, None),
               Req(IN, 96, [_page(), (1024, "B", "sector")], True, None),
               Req(OUT, 112, [_page(), _page("B"), _page()], False, None)]
    requests = {
        "direct chain": [r for r in one + several if not r.indirect],
        "indirect table": [r for r in one + several if r.indirect],
        "one data run": one,
        "several data runs": several,
        "read": [r for r in one + several if r.rtype == IN],
        "write": [r for r in one + several if r.rtype == OUT],
    }.get(shape, one[:2] + several[:2])
    if shape == "O_DIRECT":  # whole, page-aligned pages: nothing O_DIRECT would bounce
        requests = [Req(r.rtype, r.sector, [_page(place) for _, place, _ in r.pieces],
                        r.indirect, None) for r in one + several]
    return Scenario(requests, None, 7, engine, shape == "O_DIRECT", False, 64, [len(requests)],
                    dirty_log=shape == "dirty logging")


#: One ring per shape and engine: explicit examples of the property, and the per-shape test.
SHAPE_SCENARIOS = [(shape, engine, shape_scenario(shape, engine))
                   for shape in SHAPES if not shape.endswith(" engine")
                   for engine in ("inline", "io_uring")]


#: (ring, core) pairs the properties run over: every ring layout with every core.
RINGS_AND_CORES = [("split", "python"), ("packed", "python"), ("split", "compiled"),
                   ("packed", "compiled")]


def compiled_serves(sc: Scenario, ring: str) -> bool:
    """Whether the compiled core itself is meant to take ``sc``'s well-formed requests: a split
    or packed ring, io_uring, no dirty logging (the Python fast path runs while pages are
    logged)."""
    return ring in LAYOUTS and sc.engine == "io_uring" and not sc.dirty_log


@pytest.mark.parametrize(("ring", "core"), RINGS_AND_CORES)
@pytest.mark.parametrize(("shape", "engine", "sc"), SHAPE_SCENARIOS,
                         ids=[f"{shape}-{engine}" for shape, engine, _ in SHAPE_SCENARIOS])
def test_fast_path_takes_every_request_of_each_shape(shape: str, engine: str, sc: Scenario,
                                                     ring: str, core: str) -> None:
    """Each shape, on each engine, ring layout and core: the fast path takes every request,
    and serves each as the generic path does -- the compiled core itself where it serves."""
    compiled_core_or_skip(core)
    layout, taken, _, compiled = serve_both(sc, ring, core)
    assert layout.heads and all(shape in shapes_of(sc, r) for r in sc.requests)
    missed = [(head, layout.requests[head]) for head in layout.heads if head not in taken]
    assert not missed, f"the fast path declined {shape} requests on {engine}: {missed}"
    if core == "compiled" and compiled_serves(sc, ring):
        missed = [(head, layout.requests[head]) for head in layout.heads
                  if head not in compiled]
        assert not missed, f"the compiled core declined {shape} requests: {missed}"


@pytest.mark.parametrize(("ring", "core"), RINGS_AND_CORES)
def test_fast_path_is_invisible(ring: str, core: str) -> None:
    """The property, over Hypothesis' rings of each layout and core; then the floor: every one
    of :data:`SHAPES` was taken by the fast path in at least one example (the explicit ones
    guarantee each) -- and with the compiled core, every shape it serves by that core
    itself."""
    compiled_core_or_skip(core)
    seen: set[str] = set()
    seen_compiled: set[str] = set()

    @settings(deadline=None, max_examples=150 if ring == "split" else 100,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(scenarios)
    # A head made available twice in one batch, the first time in the fast path's shape: it must
    # still be in flight when the generic pop meets it again (the queue stops), not be served
    # twice.
    @example(Scenario([Req(ReqType.IN, 0, [(512, "A", "page")], False, None)], "dup_head", 0,
                      "inline", False, False, 2, [2]))
    # The disk fails some of the fast path's reads and writes (io_uring, dirty logging on): the
    # fused completion must hand them to the reference and report them exactly as it does.
    @example(Scenario([Req(ReqType.IN, 0, [(4096, "A", "page")], False, None),
                       Req(ReqType.IN, 8, [(4096, "A", "page")], True, None),
                       Req(ReqType.OUT, 16, [(4096, "B", "page")], False, None),
                       Req(ReqType.OUT, 24, [(4096, "A", "sector")], True, None)],
                      None, 1, "io_uring", False, False, 64, [4], True, 2))
    # Reads and writes in the fast path's shape past the end of the disk, or running over it:
    # IOERR, and the image neither read past nor grown.
    @example(Scenario([Req(ReqType.OUT, IMAGE_SECTORS, [(4096, "A", "page")], False, None),
                       Req(ReqType.OUT, IMAGE_SECTORS - 4, [(4096, "B", "page")], True, None),
                       Req(ReqType.IN, IMAGE_SECTORS - 4, [(4096, "A", "page")], True, None),
                       Req(ReqType.IN, (1 << 64) - 8, [(4096, "A", "page")], False, None)],
                      None, 4, "io_uring", False, False, 64, [4]))
    # Reads into read-only guest memory, in the fast path's shape otherwise: IOERR, the memory
    # untouched.
    @example(Scenario([Req(ReqType.IN, 0, [(4096, "RO", "page")], False, None),
                       Req(ReqType.IN, 8, [(4096, "A", "page"), (4096, "RO", "page")], True,
                           None),
                       Req(ReqType.OUT, 16, [(4096, "RO", "page")], True, None)],
                      None, 5, "io_uring", False, False, 64, [3]))
    # Faults after requests each core takes (io_uring: the compiled core's too), one per ring
    # rule: a data piece past the end of guest memory; an IN whose data is in read-only memory;
    # (packed) a chain's descriptor not available in the driver's lap -- the wrong wrap bit;
    # a buffer id past the ring (split: a next link past the table); an indirect descriptor
    # in a chain (its NEXT set).  The fast paths decline each, the generic path reports it.
    @example(Scenario([Req(ReqType.IN, 0, [(4096, "A", "page")], False, None),
                       Req(ReqType.OUT, 8, [(4096, "A", "page"), (4096, "END", "page")], False,
                           None),
                       Req(ReqType.IN, 16, [(4096, "B", "page")], False, None)],
                      None, 6, "io_uring", False, False, 64, [3]))
    @example(Scenario([Req(ReqType.OUT, 0, [(4096, "A", "page")], True, None),
                       Req(ReqType.IN, 8, [(4096, "RO", "page")], False, None),
                       Req(ReqType.IN, 16, [(4096, "B", "page")], True, None)],
                      None, 8, "io_uring", False, False, 64, [3]))
    @example(Scenario([Req(ReqType.IN, 0, [(4096, "A", "page")], False, None),
                       Req(ReqType.OUT, 8, [(4096, "B", "page")], False, "wrong_wrap"),
                       Req(ReqType.IN, 16, [(4096, "A", "page")], True, None)],
                      None, 9, "io_uring", False, False, 64, [3]))
    @example(Scenario([Req(ReqType.IN, 0, [(4096, "A", "page")], True, None),
                       Req(ReqType.IN, 8, [(4096, "B", "page")], False, "next_oob"),
                       Req(ReqType.OUT, 16, [(4096, "A", "page")], False, None)],
                      None, 10, "io_uring", False, False, 64, [3]))
    @example(Scenario([Req(ReqType.OUT, 0, [(4096, "A", "page")], False, None),
                       Req(ReqType.IN, 8, [(4096, "A", "page")], True, "indirect_next"),
                       Req(ReqType.IN, 16, [(4096, "B", "page")], False, None)],
                      None, 11, "io_uring", False, False, 64, [3]))
    # The same without dirty logging: the compiled core's own requests fail, and it must hand
    # them to the Python completion, which reports them as the reference does.
    @example(Scenario([Req(ReqType.IN, 0, [(4096, "A", "page")], False, None),
                       Req(ReqType.IN, 8, [(4096, "A", "page")], True, None),
                       Req(ReqType.OUT, 16, [(4096, "B", "page")], False, None),
                       Req(ReqType.OUT, 24, [(4096, "A", "sector")], True, None)],
                      None, 1, "io_uring", False, False, 64, [4], False, 2))
    def served_alike(sc: Scenario) -> None:
        served = serve_both(sc, ring, core)
        record_shapes(sc, served, seen, seen_compiled)

    for _, _, sc in SHAPE_SCENARIOS:
        served_alike = example(sc)(served_alike)
    served_alike()
    never = [shape for shape in SHAPES if shape not in seen]
    assert not never, f"the fast path never took: {never}"
    if core == "compiled":
        expected = [*SHAPES, "a disk failure"]
        never = [shape for shape in expected if shape not in seen_compiled
                 and shape not in ("inline engine", "dirty logging")]
        assert not never, f"the compiled core never took: {never}"


# ---------------------------------------------------------------- split and packed alike
#: Mutations whose meaning differs between the layouts (a split ``next`` loop is an error, a
#: packed chain with NEXT on its end runs on into the next slot).
LAYOUT_SPECIFIC = ("loop", "wrong_wrap")


def device_visible(rig: Rig, ordered: bool) -> dict[str, object]:
    """What the guest and the disk see, leaving out the rings themselves and the indirect
    tables (each layout writes its own format there)."""
    outside = bytearray(rig.maps[0][0x4000:])
    for gpa, length in rig.layout.tables:
        outside[gpa - 0x4000 : gpa - 0x4000 + length] = bytes(length)
    dirty = None
    if rig.log is not None:
        words = bytearray(rig.log._words)
        words[0] &= ~0xF  # pages 0-3: where each layout keeps its rings
        dirty = bytes(words)
    used = rig.used()
    return {
        "used": used if ordered else sorted(used),
        "memory": [bytes(outside), bytes(rig.maps[1]), bytes(rig.maps[2])],
        "image": rig.image(),
        "broken": rig.vq.broken,
        "in_flight_count": rig.vq.in_flight_count,
        "stats": rig.device.stats.as_dict(),
        # (read as a reader reads them: the compiled core's counts are in its native arrays)
        "failed": [q.failed for q in rig.device.fresh_queue_stats()],
        "timed": [[sum(h) for h in q.latency] for q in rig.device.fresh_queue_stats()],
        "dirty_pages": dirty,
    }


def serve_split_and_packed(sc: Scenario) -> tuple[int, int]:
    """Serve ``sc`` on a split and a packed ring (fast path on), comparing what the guest and
    the disk see after each batch; how many requests each one's fast path took."""
    image = random.Random(sc.seed ^ 0x5A5A).randbytes(IMAGE_SECTORS * 512)
    with tempfile.TemporaryDirectory() as tmp:
        split = Rig(sc, Layout(sc, "split"), image, tmp, fast=True, name="split.img")
        packed = Rig(sc, Layout(sc, "packed"), image, tmp, fast=True, name="packed.img")
        try:
            heads = split.layout.heads
            assert heads == packed.layout.heads
            start = 0
            for n in [*sc.batches, len(heads)]:
                batch = heads[start : start + n]
                start += len(batch)
                for rig in (split, packed):
                    rig.publish(batch, jump=False)
                    rig.serve()
                ordered = sc.engine == "inline"
                assert device_visible(split, ordered) == device_visible(packed, ordered)
                if start >= len(heads):
                    break
            return len(split.fast_heads), len(packed.fast_heads)
        finally:
            split.close()
            packed.close()


def test_split_and_packed_rings_serve_alike() -> None:
    """The same requests, well-formed or not, laid in a split ring and in a packed ring: the
    guest and the disk see the same results -- statuses, data, used ids and lengths, errors
    that stop the queue, counters, dirty pages.  Both fast paths are seen at work."""
    taken = [0, 0]
    neutral = scenarios.filter(lambda sc: sc.ring_fault is None and not any(
        r.mutation in LAYOUT_SPECIFIC for r in sc.requests))

    @settings(deadline=None, max_examples=60,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
    @given(neutral)
    def alike(sc: Scenario) -> None:
        split, packed = serve_split_and_packed(sc)
        taken[0] += split
        taken[1] += packed

    for _, _, sc in SHAPE_SCENARIOS[:4]:
        alike = example(sc)(alike)
    alike()
    assert taken[0] and taken[1], f"fast path requests taken (split, packed): {taken}"


# ---------------------------------------------------------------- qcow2
#: Hypothesis' rings on a qcow2 image: mostly Linux's requests, mostly io_uring (where the
#: compiled core maps offsets itself), never O_DIRECT (qcow2 is not opened with it).
qcow2_scenarios = st.builds(
    Scenario,
    st.lists(st.one_of(linux_request, linux_request, linux_request, any_request),
             min_size=1, max_size=10),
    st.sampled_from((None,) * 20 + ("dup_head", "head_oob", "avail_jump")),
    st.integers(0, 1 << 30),
    st.sampled_from(("io_uring", "io_uring", "inline")),
    st.just(False),
    st.sampled_from((False,) * 4 + (True,)),
    st.sampled_from((2, 64)),
    st.lists(st.integers(1, 10), min_size=1, max_size=3),
    st.sampled_from((False, False, False, True)),
    st.sampled_from((0, 0, 0, 1, 2, 3)),
)


def qcow2_mix(extra: str = "plain") -> Scenario:
    """4 KiB reads and writes on io_uring, on an image with the :data:`QCOW2_EXTRAS` ``extra``
    (the first seed that has it and a hole): a read and a write in an allocated cluster, a
    write and a read in the last one (its entry points at metadata, with "corrupt:..."), a read
    and a write in the first one (zero, with "zero"), a write into a hole, and a read in the
    allocated cluster again; the first two in a pass of their own."""
    seed = next(s for s in range(1000) if QCOW2_EXTRAS[s % len(QCOW2_EXTRAS)] == extra
                and 0 < len(hole_clusters(s)) <= IMAGE_SECTORS * 512 // CLUSTER - 3)
    holes = sorted(hole_clusters(seed))
    per = CLUSTER // 512
    allocated = [c * per for c in range(IMAGE_SECTORS // per) if c not in holes]
    IN, OUT = ReqType.IN, ReqType.OUT
    first, second, last, hole = allocated[0], allocated[1], allocated[-1], holes[-1] * per
    requests = [Req(IN, second, [_page()], True, None),
                Req(OUT, second + 8, [_page("B")], True, None),
                Req(OUT, last, [_page()], True, None),
                Req(IN, last + 8, [_page()], False, None),
                Req(IN, first, [_page()], False, None),
                Req(OUT, first + 8, [_page()], True, None),
                Req(OUT, hole, [_page()], True, None),
                Req(IN, second + 16, [_page()], False, None)]
    # Two passes: the first (a read and an in-place write) alone shows what it changed.
    return Scenario(requests, None, seed, "io_uring", False, False, 64, [2])


@pytest.mark.parametrize("ring", LAYOUTS)
@pytest.mark.parametrize("core", CORES)
def test_fast_path_is_invisible_on_qcow2(core: str, ring: str) -> None:
    """The property on a qcow2 image whose clusters are allocated or holes: each core's fast
    path -- the compiled one maps offsets itself, restating
    :meth:`blockdev.qcow2.image.Qcow2Image.map_batch` in C -- serves every ring as the generic
    path does.  The floor: every shape of :data:`SHAPES` but O_DIRECT was taken by the fast
    path; with the compiled core, by the compiled core itself (on io_uring, and a disk failure
    too), and the Python fast path took some it left (a hole, a cluster crossed, what followed
    them in the pass)."""
    compiled_core_or_skip(core)
    seen: set[str] = set()
    seen_compiled: set[str] = set()
    python_took = [0]

    @settings(deadline=None, max_examples=60,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(qcow2_scenarios)
    @example(replace(qcow2_mix(), eio=2))  # the disk fails some: the Python completion
    def served_alike(sc: Scenario) -> None:
        served = serve_both(sc, ring, core, fmt="qcow2")
        record_shapes(sc, served, seen, seen_compiled)
        _, taken, _, compiled = served
        python_took[0] += len(taken - compiled)

    for _, _, sc in SHAPE_SCENARIOS:
        if not sc.direct:
            served_alike = example(sc)(served_alike)
    for extra in set(QCOW2_EXTRAS):  # what may not be written in place, each with writes
        served_alike = example(qcow2_mix(extra))(served_alike)
    served_alike()
    expected = [shape for shape in SHAPES if shape != "O_DIRECT"]
    never = [shape for shape in expected if shape not in seen]
    assert not never, f"the fast path never took: {never}"
    assert python_took[0], "the Python fast path took nothing"
    if core == "compiled":
        never = [shape for shape in [*expected, "a disk failure"] if shape not in seen_compiled
                 and shape not in ("inline engine", "dirty logging")]
        assert not never, f"the compiled core never took: {never}"


@pytest.mark.parametrize("ring", LAYOUTS)
def test_the_compiled_core_maps_allocated_clusters_and_leaves_holes(ring: str) -> None:
    """One pass on qcow2: the compiled core takes the requests in allocated clusters up to the
    first it cannot map (a write into a hole: it allocates, the general path's work), and the
    Python fast path takes that one and everything after it, in order (it maps the last one
    itself)."""
    compiled_core_or_skip("compiled")
    layout, taken, _, compiled = serve_both(qcow2_mix(), ring, "compiled", fmt="qcow2")
    heads = layout.heads
    assert compiled == set(heads[:6])
    assert taken == set(heads)  # the rest by the Python fast path (which maps them itself)
