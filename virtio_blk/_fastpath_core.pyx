# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The compiled fast path: :class:`virtio_blk.fastpath.FastPath`'s interface, in C.

The pure-Python fast path (:mod:`virtio_blk.fastpath`) spends most of a request's ~7 us in
object churn: a chain tuple, a RequestBuffers, a lock, an IoBuffer, a request, a submission
tuple, a completion tuple.  This module does the same pass -- Linux's request shapes on a split
or a packed ring served by the io_uring engine of a raw image or of a qcow2 image -- with C
structs: per request it walks the chain, checks it, claims it, fills one submission entry (or
does the buffered write / cached read itself with the GIL released, as the Python engines do),
reaps and writes the status byte, and builds no Python object but the ``(head, used length)``
pair the worker publishes (a packed ring's ``head`` is the buffer id) -- and, for a packed ring
with an in-flight area, the list of its ring descriptors that area records.

Rules stay stated once.  This is an implementation of the same interface, and anything it does
not handle exactly as the Python path would is *declined* -- left untouched for the pure-Python
fast path, and after it the generic path, which report every fault:

* the ring rules are those of the ring's Python walker, one C walker per layout:
  :meth:`vhost.queue.split.SplitQueue._simple`'s (:meth:`FastPath._parse`: head in range and not
  in flight, ``next`` links, the indirect table's length and negotiation, readable before
  writable, each piece inside one guest memory region, under 2**32 bytes) and
  :class:`vhost.queue.packed.PackedQueue`'s ``_gather``/``_parse``/``_walk``
  (:meth:`FastPath._walk_packed`: each descriptor's AVAIL/USED bits against the avail wrap
  counter, the chain no longer than the ring slots not held, the buffer id in range and not in
  flight, INDIRECT alone, negotiated, a whole table of 16-byte entries, none nested, readable
  before writable, each piece inside one guest memory region) -- a chain that breaks one, or has
  another shape, ends this pass of the compiled path at its head;
* the virtio-blk rules (:meth:`FastPath._request`, for both walkers) are
  :meth:`virtio_blk.fastpath.FastPath._build`'s (header of 16 bytes and status of 1, type IN or
  OUT matching the data's direction, status and an IN's data in writable memory,
  :func:`virtio_blk.request.range_fault`, write permission, no bounce needed by
  :func:`virtio_blk.layout.plan`'s rule, O_DIRECT alignment);
* on qcow2 the map rule is :meth:`blockdev.qcow2.image.Qcow2Image.map_batch`'s (inside one
  allocated cluster; a write only in place: not shared, compressed or zero, not being
  allocated, no autoclear bit pending, never over metadata) -- the pass ends at the first
  request it does not map, which the Python fast path maps or hands to the general path, and
  each mapped request is counted in the image's in-flight IO until its IO is over (a discard
  waits for that);
* while dirty pages are logged (a migration), the Python fast path serves the whole pass;
* a request that fails or comes back short, one completing while dirty pages are logged or after
  the memory table changed, and every request while a test hook is set, is finished by the Python
  path's own completion (:meth:`FastPath.complete`, hence the device's ``finish``) on a
  request the Python fast path builds for it.

The differential property test (``tests/property/test_fastpath_differential.py``) runs the
generic path, the Python fast path and this one on the same rings and holds all three to the
same guest-visible results, and counts that this one took requests.

Guest memory stays "locked" for the duration of the IO as RequestBuffers' locks keep it: each
request holds a reference to a tuple of slices of the regions it was found in (a region whose
mapping has a live slice is unmapped only when the slice goes), released at completion.

What the compiled path shares with the Python io_uring engine is the ring itself
(:meth:`blockdev.uring.Uring.raw_layout`): its entries carry
:data:`blockdev.uring.EXTERNAL_TAG` in their user data, and each side stashes the other's
completions it meets (:attr:`~blockdev.uring.Uring.stash`,
:attr:`~blockdev.uring.Uring.external_stash`).
"""

from cpython cimport array
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.types cimport off_t
from vhost.queue._le cimport (
    get_u16,
    get_u32,
    get_u64,
    load_acquire_u16,
    load_acquire_u32,
    store_release_u32,
    PyMemoryView_GET_BUFFER,
)

import errno as _errno
import logging
import os

from blockdev.ops import OpKind
from blockdev.qcow2.format import OFFSET_MASK as _PY_OFFSET_MASK
from blockdev.qcow2.format import OFLAG_COPIED as _PY_OFLAG_COPIED
from blockdev.qcow2.image import _FAST_REJECT_READ as _PY_FAST_REJECT_READ
from blockdev.qcow2.image import _FAST_REJECT_WRITE as _PY_FAST_REJECT_WRITE
from blockdev.stats import LATENCY_BOUNDS_NS as _PY_LATENCY_BOUNDS_NS
from blockdev.uring import EXTERNAL_TAG as _PY_EXTERNAL_TAG
from virtio_blk.fastpath import MAX_PIECES as _PY_MAX_PIECES
from virtio_blk.fastpath import FastPath as PyFastPath
from virtio_blk.ops import NATIVE_COUNT_SLOTS as _PY_NATIVE_COUNT_SLOTS
from virtio_blk.ops import NATIVE_KINDS as _PY_NATIVE_KINDS
from virtio_blk.ops import NATIVE_LATENCY_SLOTS as _PY_NATIVE_LATENCY_SLOTS
from virtio_blk.request import HEADER_SIZE as _PY_HEADER_SIZE
from virtio_blk.request import Status
from vhost.queue.base import NO_LIMIT as _PY_NO_LIMIT
from vhost.queue.base import QueueError
from vhost.queue.inflight import InflightError

log = logging.getLogger(__name__)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, off_t offset, int flags)
    ssize_t pwritev(int fd, const iovec *iov, int iovcnt, off_t offset)

cdef extern from "<errno.h>" nogil:
    int errno

cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #ifndef RWF_NOWAIT
    #define RWF_NOWAIT 0x00000008
    #endif
    #define VBC_SYS_IO_URING_ENTER 426
    """
    int RWF_NOWAIT
    int VBC_SYS_IO_URING_ENTER


# ---------------------------------------------------------------------------- constants
cdef enum:
    DESC_F_NEXT = 1
    DESC_F_WRITE = 2
    DESC_F_INDIRECT = 4
    NEXT_WRITE = 3
    MAX_INDIRECT_BYTES = 32768 * 16  # a queue's worth of descriptors at most
    T_IN = 0
    T_OUT = 1
    TYPE_MASK = 0x7FFFFFFF
    SECTOR = 512
    PAGE_MASK = 4095
    # Data runs of a request the compiled path takes (one iovec each); more go the Python way.
    MAX_IOV = 16
    OP_READ = 22
    OP_WRITE = 23
    OP_READV = 1
    OP_WRITEV = 2
    # Packed ring (vhost.queue.packed): the flag bits of a descriptor made available, and the
    # most ring descriptors (or table entries) of a chain this path takes: header, data, status.
    PF_AVAIL_SHIFT = 7
    PF_USED_SHIFT = 15
    MAX_RING = MAX_IOV + 2

cdef uint64_t MAX_CHAIN_BYTES = 1ULL << 32
# qcow2 L2 entries (blockdev.qcow2: the map rule of Qcow2Image.map_batch)
cdef uint64_t OFFSET_MASK = _PY_OFFSET_MASK
cdef uint64_t OFLAG_COPIED = _PY_OFLAG_COPIED
cdef uint64_t FAST_REJECT_READ = _PY_FAST_REJECT_READ
cdef uint64_t FAST_REJECT_WRITE = _PY_FAST_REJECT_WRITE
cdef uint64_t EXTERNAL_TAG = _PY_EXTERNAL_TAG
cdef uint64_t HEADER_SIZE = _PY_HEADER_SIZE
cdef uint64_t MAX_PIECES = _PY_MAX_PIECES
cdef int STATUS_OK = int(Status.OK)
cdef int STATUS_IOERR = int(Status.IOERR)
cdef int NBOUNDS = len(_PY_LATENCY_BOUNDS_NS)
if NBOUNDS > 31:
    raise ImportError("more latency buckets than the compiled core keeps")
cdef int64_t LATENCY_BOUNDS_NS[31]
for _i, _bound in enumerate(_PY_LATENCY_BOUNDS_NS):
    LATENCY_BOUNDS_NS[_i] = _bound
# The stats' native arrays (virtio_blk.ops.NATIVE_KINDS): where a read's and a write's blocks
# start, and how long each array is.
if _PY_NATIVE_LATENCY_SLOTS != NBOUNDS + 2 or _PY_NATIVE_COUNT_SLOTS != 2:
    raise ImportError("the stats' native blocks are not what the compiled core counts")
cdef Py_ssize_t NATIVE_COUNTS_LEN = _PY_NATIVE_COUNT_SLOTS * len(_PY_NATIVE_KINDS)
cdef Py_ssize_t NATIVE_LATENCY_LEN = _PY_NATIVE_LATENCY_SLOTS * len(_PY_NATIVE_KINDS)
cdef Py_ssize_t COUNTS_READ = _PY_NATIVE_COUNT_SLOTS * _PY_NATIVE_KINDS.index(OpKind.READ)
cdef Py_ssize_t COUNTS_WRITE = _PY_NATIVE_COUNT_SLOTS * _PY_NATIVE_KINDS.index(OpKind.WRITE)
cdef Py_ssize_t LATENCY_READ = _PY_NATIVE_LATENCY_SLOTS * _PY_NATIVE_KINDS.index(OpKind.READ)
cdef Py_ssize_t LATENCY_WRITE = _PY_NATIVE_LATENCY_SLOTS * _PY_NATIVE_KINDS.index(OpKind.WRITE)

cdef struct Sqe:  # struct io_uring_sqe (include/uapi/linux/io_uring.h), 64 bytes
    uint8_t opcode
    uint8_t flags
    uint16_t ioprio
    int32_t fd
    uint64_t off
    uint64_t addr
    uint32_t len
    uint32_t rw_flags
    uint64_t user_data
    uint16_t buf_index
    uint16_t personality
    int32_t splice_fd_in
    uint64_t addr3
    uint64_t pad

cdef struct Cqe:
    uint64_t user_data
    int32_t res
    uint32_t flags

cdef struct Region:
    uint64_t gpa
    uint64_t end
    uintptr_t host
    bint readonly

cdef struct Piece:
    uint64_t addr
    uint64_t length


cdef struct RawDesc:  # a packed ring descriptor as read: what the in-flight area records
    uint64_t addr
    uint32_t length
    uint16_t id
    uint16_t flags


if sizeof(RawDesc) != 16:
    raise ImportError("RawDesc is not the ring's 16-byte descriptor")


cdef struct Slot:
    uint64_t offset       # byte offset in the file (a qcow2 image: the host offset once mapped)
    uint64_t guest_offset # byte offset on the disk, as the request said
    uint64_t status_gpa
    uint8_t *status       # host address of the status byte
    int64_t start_ns
    uint32_t length       # data bytes
    uint16_t niov
    bint into_guest       # a read (IN): the disk fills guest memory


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline uintptr_t _view_address(object view) except? 0:
    return <uintptr_t>PyMemoryView_GET_BUFFER(view).buf


def applicable(handler, vq):
    """Why the compiled path cannot serve this queue (a short reason), or None if it can.

    It serves a split ring (:class:`~vhost.queue.split.SplitQueue`) or a packed one
    (:class:`~vhost.queue.packed.PackedQueue`), or a subclass that keeps its layout's chain
    rules (a queue process's adds a hook when it publishes), whose device reads and writes a
    raw image through the io_uring engine itself, or a qcow2 image through its io_uring engine
    (offsets mapped per pass, as that engine maps them) -- not a filter, a plugin, another
    format or the thread pool, which keep the Python fast path.
    """
    from blockdev.disk import Disk
    from blockdev.engine import UringEngine
    from blockdev.qcow2.disk import Qcow2Disk
    from blockdev.qcow2.uring_engine import MappedUringEngine
    from vhost.queue.packed import PackedQueue
    from vhost.queue.split import SplitQueue

    if isinstance(vq, SplitQueue):
        layout, rules = SplitQueue, ("_simple", "_pending", "claim", "compiled_view")
    elif isinstance(vq, PackedQueue):
        layout, rules = PackedQueue, ("_gather", "_parse", "_walk", "_take", "_mark",
                                      "peek_simple", "claim", "compiled_view", "took",
                                      "held_slots", "inflight_area")
    else:
        return f"a {type(vq).__name__}"
    kind = type(vq)
    if any(getattr(kind, name) is not getattr(layout, name) for name in rules):
        return f"a {kind.__name__} with chain rules of its own"
    engine = handler.engine
    if type(engine) is MappedUringEngine:
        if type(engine.disk) is not Qcow2Disk:
            return f"a {type(engine.disk).__name__}"
        return None
    if type(engine) is not UringEngine:
        return f"the {getattr(engine, 'name', type(engine).__name__)} engine"
    if not isinstance(engine.disk, Disk):
        return f"a {type(engine.disk).__name__}"
    return None


cdef class FastPath:
    """The compiled fast path of one split or packed queue served by io_uring (see the module
    docstring):
    the interface of :class:`virtio_blk.fastpath.FastPath` -- ``drain``, ``complete``,
    ``complete_reaped``, ``taken``, ``vq`` -- with that class serving what this one declines."""

    cdef readonly object handler
    cdef readonly object vq
    cdef readonly object engine
    cdef readonly object python
    #: Requests this compiled path started (the Python fast path counts its own).
    cdef public long taken
    #: Tests: called with each request the compiled path finishes (built by the Python fast
    #: path, its result set), before completion -- the Python tests' fault injection seam.
    cdef public object result_hook
    #: Tests: when a list, the head of every request this path starts is appended.
    cdef public object record
    cdef object memory
    cdef object ring
    cdef object stats
    cdef object disk
    # ring views (slices we hold, so the mapping outlives a release of the queue's own views)
    cdef object _keep
    cdef const uint8_t *desc
    cdef uint16_t *avail
    cdef uint32_t size
    cdef uint32_t mask
    cdef bint indirect_ok
    cdef object in_flight       # the queue's bytearray (split)
    # packed ring
    cdef bint packed
    cdef uint16_t *pslots        # the queue's ring slots held per buffer id (0: not in flight)
    cdef list pentry             # the queue's in-flight area entries per buffer id
    cdef RawDesc *raw            # per buffer id: its ring descriptors (pslots of them)
    # guest memory
    cdef object _regions         # the table (tuple of GuestRegion) the snapshot was made of
    cdef object _pins            # slices of each region's view, held by in-flight requests
    cdef Region *reg
    cdef int nreg
    cdef int last
    # requests
    cdef Slot *slots
    cdef iovec *iov
    cdef uint64_t *piece_gpa
    cdef list pins               # per head: the pin tuple its request holds
    cdef uint16_t *batch
    # io_uring (the Python engine's ring, see blockdev.uring.Uring.raw_layout)
    cdef int ring_fd
    cdef uint32_t *sq_head
    cdef uint32_t *sq_tail
    cdef uint32_t sq_mask
    cdef uint32_t sq_entries
    cdef Sqe *sqes
    cdef uint32_t *cq_head
    cdef uint32_t *cq_tail
    cdef uint32_t cq_mask
    cdef Cqe *cqes
    cdef int fd
    # fixed for the handler's life (read once, not in every pass)
    cdef object _waiting         # the handler's deque of requests waiting for bounce pages
    cdef bint timing             # latency accounting (the device's, when the handler was made)
    # per pass
    cdef object _limits
    cdef bint direct
    cdef uint64_t align_mask
    cdef uint64_t capacity
    cdef uint32_t lbs
    cdef uint64_t max_transfer
    cdef bint read_only
    cdef bint writeback
    cdef bint settings_stale     # the write cache mode changed: read it at the next pass
    cdef bint bypass
    # a qcow2 image (the MappedUringEngine's): offsets are mapped per pass, IO counted in flight
    cdef object image
    cdef object _lock_acquire    # the image's lock (one for its life), its methods bound once
    cdef object _lock_release
    cdef object _map_state       # the image's map_state, count_in and leave, bound once
    cdef object _count_in
    cdef object _leave
    cdef long left_now           # mapped IO finished without the ring, not yet counted out
    cdef uint64_t cluster_size   # (fixed for an image)
    cdef uint64_t cluster_bits
    cdef uint64_t l2_bits
    # counters: the stats' native arrays (BlkStats.native_counts, native_latency), added to
    # here as each request completes and read by whoever reads the stats -- nothing to flush
    cdef object _native          # views of the two arrays (they cannot be resized meanwhile)
    cdef int64_t *native_counts
    cdef int64_t *native_latency

    def __cinit__(self):
        self.slots = NULL
        self.iov = NULL
        self.piece_gpa = NULL
        self.reg = NULL
        self.batch = NULL
        self.raw = NULL

    def __init__(self, handler, vq):
        self.handler = handler
        self.vq = vq
        self.engine = handler.engine
        self.python = PyFastPath(handler, vq)
        self.taken = 0
        self.result_hook = None
        self.record = None
        self.memory = handler.memory
        self.stats = handler.stats
        counts = memoryview(self.stats.native_counts)
        latency = memoryview(self.stats.native_latency)
        if (counts.format != "q" or latency.format != "q" or len(counts) != NATIVE_COUNTS_LEN
                or len(latency) != NATIVE_LATENCY_LEN):
            raise ValueError("the stats' native arrays are not of the compiled core's layout")
        self._native = (counts, latency)
        self.native_counts = <int64_t *>_view_address(self._native[0])
        self.native_latency = <int64_t *>_view_address(self._native[1])
        self._waiting = handler.pending  # (one deque: only appended to and emptied)
        self.timing = handler.timing
        self.disk = self.engine.disk
        self.fd = self.disk.fd
        self.packed = vq.layout == "packed"
        if self.packed:
            desc, slots, entries, size, indirect = vq.compiled_view()
            # (the view of the array keeps its buffer where it is: it cannot be resized)
            self._keep = (desc[:], memoryview(slots))
            self.pslots = <uint16_t *>_view_address(self._keep[1])
            self.pentry = entries
            self.in_flight = None
            self.raw = <RawDesc *>malloc(sizeof(RawDesc) * size * MAX_RING)
            if not self.raw:
                raise MemoryError()
        else:
            desc, avail, in_flight, size, indirect = vq.compiled_view()
            self._keep = (desc[:], avail[:])
            self.avail = <uint16_t *>_view_address(self._keep[1])
            self.in_flight = in_flight
        self.desc = <const uint8_t *>_view_address(self._keep[0])
        self.size = size
        self.mask = size - 1
        self.indirect_ok = indirect
        self.slots = <Slot *>malloc(sizeof(Slot) * size)
        self.iov = <iovec *>malloc(sizeof(iovec) * size * MAX_IOV)
        self.piece_gpa = <uint64_t *>malloc(sizeof(uint64_t) * size * MAX_IOV)
        self.batch = <uint16_t *>malloc(sizeof(uint16_t) * size)
        if not self.slots or not self.iov or not self.piece_gpa or not self.batch:
            raise MemoryError()
        self.pins = [None] * size
        self._regions = None
        self._pins = None
        self.nreg = 0
        self.last = 0
        self._limits = None
        self.settings_stale = True
        self.direct = handler.direct  # (the storage's, fixed while it is open)
        self.align_mask = handler.mem_align - 1 if handler.direct else 0
        # qcow2's engine does what the raw engine's bypass does, at host offsets (its writes
        # as pwritev, a lone read tried from the page cache first).
        self.image = getattr(self.engine, "qcow2", None)
        if self.image is not None:
            self.image = self.image.image
            # (a ``with`` on the lock property every pass: a property call and two method
            # lookups more than these two calls)
            lock = self.image.lock
            self._lock_acquire = lock.acquire
            self._lock_release = lock.release
            self._map_state = self.image.map_state
            self._count_in = self.image.count_in
            self._leave = self.image.leave
            self.cluster_size = self.image.cluster_size
            self.cluster_bits = self.image.cluster_bits
            self.l2_bits = self.image.l2_bits
        self.bypass = self.engine.bypass or self.image is not None
        self.left_now = 0
        self.ring = self.engine.ring
        layout = self.ring.raw_layout()
        self.ring_fd = layout["fd"]
        self.sq_head = <uint32_t *><uintptr_t>layout["sq_head"]
        self.sq_tail = <uint32_t *><uintptr_t>layout["sq_tail"]
        self.sq_mask = layout["sq_mask"]
        self.sq_entries = layout["sq_entries"]
        self.sqes = <Sqe *><uintptr_t>layout["sqes"]
        self.cq_head = <uint32_t *><uintptr_t>layout["cq_head"]
        self.cq_tail = <uint32_t *><uintptr_t>layout["cq_tail"]
        self.cq_mask = layout["cq_mask"]
        self.cqes = <Cqe *><uintptr_t>layout["cqes"]

    def __dealloc__(self):
        free(self.slots)
        free(self.iov)
        free(self.piece_gpa)
        free(self.reg)
        free(self.batch)
        free(self.raw)

    # ------------------------------------------------------------------ guest memory
    cdef int _snapshot(self) except -1:
        """Take the current memory table: the regions' bounds and host addresses, and a slice
        of each region's view (what in-flight requests hold, as their locks)."""
        regions = self.memory.regions
        cdef int n = len(regions)
        cdef Region *reg = <Region *>malloc(sizeof(Region) * (n if n else 1))
        if reg == NULL:
            raise MemoryError()
        pins = []
        cdef int i = 0
        try:
            for region in regions:
                pins.append(region.view[:])  # ValueError: removed meanwhile (caller declines)
                reg[i].gpa = region.gpa
                reg[i].end = region.gpa + region.size
                reg[i].host = region.host_addr
                reg[i].readonly = region.readonly
                i += 1
        except BaseException:
            free(reg)
            raise
        free(self.reg)
        self.reg = reg
        self.nreg = n
        self.last = 0
        self._pins = tuple(pins)
        self._regions = regions
        return 0

    cdef inline int _find(self, uint64_t addr, uint64_t n) noexcept nogil:
        """The region holding all of ``[addr, addr+n)`` (n > 0), or -1."""
        cdef Region *r = &self.reg[self.last]
        if self.nreg and r.gpa <= addr and addr < r.end and n <= r.end - addr:
            return self.last
        cdef int i
        for i in range(self.nreg):
            r = &self.reg[i]
            if r.gpa <= addr and addr < r.end and n <= r.end - addr:
                self.last = i
                return i
        return -1

    cdef inline uint8_t *_host(self, int region, uint64_t gpa) noexcept nogil:
        return <uint8_t *>(self.reg[region].host + (gpa - self.reg[region].gpa))

    # ------------------------------------------------------------------ recognition
    cdef bint _parse(self, uint16_t head) noexcept nogil:
        """Check the split ring's chain at ``head`` with the ring's rules (see
        :meth:`vhost.queue.split.SplitQueue._simple`), then :meth:`_request`; False (nothing
        changed) for anything the compiled path does not take."""
        if head >= self.size:
            return False
        cdef const uint8_t *table = self.desc
        cdef uint64_t count = self.size
        cdef const uint8_t *d = table + (<uint64_t>head << 4)
        cdef uint64_t addr = get_u64(d)
        cdef uint64_t length = get_u32(d + 8)
        cdef uint16_t flags = get_u16(d + 12)
        cdef uint16_t nxt = get_u16(d + 14)
        cdef int r
        if flags == DESC_F_INDIRECT:  # one indirect table holding the whole chain
            if not self.indirect_ok or length & 15 or length == 0 or length > MAX_INDIRECT_BYTES:
                return False
            r = self._find(addr, length)
            if r < 0:
                return False
            table = self._host(r, addr)
            count = length >> 4
            addr = get_u64(table)
            length = get_u32(table + 8)
            flags = get_u16(table + 12)
            nxt = get_u16(table + 14)
        cdef uint64_t limit = MAX_PIECES if MAX_PIECES < count else count
        # The header: readable, 16 bytes.
        if flags != DESC_F_NEXT or length != HEADER_SIZE or nxt >= count or limit < 3:
            return False
        cdef uint64_t hdr = addr
        # The data: one direction, each run non-empty.
        d = table + (<uint64_t>nxt << 4)
        addr = get_u64(d)
        length = get_u32(d + 8)
        cdef uint16_t data_flags = get_u16(d + 12)
        nxt = get_u16(d + 14)
        if data_flags != DESC_F_NEXT and data_flags != NEXT_WRITE:
            return False
        cdef Piece data[MAX_IOV]
        cdef int ndata = 0
        cdef uint64_t read = 2
        flags = data_flags
        while flags == data_flags:
            if length == 0 or nxt >= count or read == limit or ndata == MAX_IOV:
                return False
            data[ndata].addr = addr
            data[ndata].length = length
            ndata += 1
            d = table + (<uint64_t>nxt << 4)
            addr = get_u64(d)
            length = get_u32(d + 8)
            flags = get_u16(d + 12)
            nxt = get_u16(d + 14)
            read += 1
        # The status: one writable byte, the end of the chain.
        if flags != DESC_F_WRITE or length != 1:
            return False
        return self._request(head, hdr, data, ndata, data_flags == NEXT_WRITE, addr)

    cdef int _walk_packed(self, uint32_t *pos, int *wrap, uint32_t room,
                          uint16_t *out_id) noexcept nogil:
        """The packed ring's chain at ``*pos`` (lap ``*wrap``): 0 if none is available there, 1
        if this path takes it -- checked with the ring's rules (:meth:`vhost.queue.packed
        .PackedQueue._gather`, ``_parse``, ``_walk``) and :meth:`_request`'s, its buffer id set
        in flight, its ring descriptors kept for the in-flight area, ``*pos``/``*wrap`` moved
        past it -- else -1, nothing changed.  ``room``: the ring slots no chain holds."""
        cdef RawDesc ring[MAX_RING]
        cdef uint32_t nring = 0
        cdef uint32_t p = pos[0]
        cdef int w = wrap[0]
        cdef const uint8_t *d
        cdef uint16_t flags
        while True:
            d = self.desc + (<uint64_t>p << 4)
            # (acquire: the driver writes the flags last, so the rest is read after them)
            flags = load_acquire_u16(d + 14)
            if (flags >> PF_AVAIL_SHIFT) & 1 != w or (flags >> PF_USED_SHIFT) & 1 == w:
                return 0 if nring == 0 else -1  # (a chain running into a slot not made
                                                 # available: the generic pop reports it)
            if nring == room or nring == MAX_RING:
                return -1  # longer than the free slots (an error) or than this path takes
            ring[nring].addr = get_u64(d)
            ring[nring].length = get_u32(d + 8)
            ring[nring].id = get_u16(d + 12)
            ring[nring].flags = flags
            nring += 1
            p += 1
            if p == self.size:
                p = 0
                w ^= 1
            if not flags & DESC_F_NEXT:
                break
        cdef uint16_t buf_id = ring[nring - 1].id
        if buf_id >= self.size or self.pslots[buf_id]:
            return -1  # out of range, or made available again while in flight
        # The pieces: the ring descriptors, or the one indirect table's entries (NEXT in a table
        # means nothing: the table is the chain).
        cdef Piece pieces[MAX_RING]
        cdef uint16_t pflags[MAX_RING]
        cdef uint32_t npieces, k
        cdef uint64_t length
        cdef const uint8_t *table
        cdef int r
        if ring[0].flags & DESC_F_INDIRECT:
            length = ring[0].length
            if nring != 1 or not self.indirect_ok:
                return -1
            if length == 0 or length & 15 or length > MAX_INDIRECT_BYTES:
                return -1
            npieces = <uint32_t>(length >> 4)
            if npieces > MAX_RING:
                return -1
            r = self._find(ring[0].addr, length)
            if r < 0:
                return -1
            table = self._host(r, ring[0].addr)
            for k in range(npieces):
                pieces[k].addr = get_u64(table + (k << 4))
                pieces[k].length = get_u32(table + (k << 4) + 8)
                pflags[k] = get_u16(table + (k << 4) + 14)
        else:
            npieces = nring
            for k in range(nring):
                pieces[k].addr = ring[k].addr
                pieces[k].length = ring[k].length
                pflags[k] = ring[k].flags
        # Linux's shape: [header] [data...] [status], readable before writable, no piece empty
        # (the generic walk drops empty ones: that chain is the Python paths'), no INDIRECT.
        cdef uint32_t nread = 0, nwrite = 0
        for k in range(npieces):
            if pflags[k] & DESC_F_INDIRECT or pieces[k].length == 0:
                return -1
            if pflags[k] & DESC_F_WRITE:
                nwrite += 1
            elif nwrite:
                return -1
            else:
                nread += 1
        cdef bint into_guest
        if nread == 1 and nwrite >= 2:
            into_guest = True
        elif nwrite == 1 and nread >= 2:
            into_guest = False
        else:
            return -1
        if pieces[0].length != HEADER_SIZE or pieces[npieces - 1].length != 1:
            return -1
        if not self._request(buf_id, pieces[0].addr, &pieces[1], npieces - 2, into_guest,
                             pieces[npieces - 1].addr):
            return -1
        memcpy(&self.raw[<uint64_t>buf_id * MAX_RING], ring, sizeof(RawDesc) * nring)
        self.pslots[buf_id] = <uint16_t>nring
        pos[0] = p
        wrap[0] = w
        out_id[0] = buf_id
        return 1

    cdef bint _request(self, uint16_t head, uint64_t hdr, const Piece *data, int ndata,
                       bint into_guest, uint64_t status) noexcept nogil:
        """The device's rules for a chain of either ring (see :meth:`virtio_blk.fastpath
        .FastPath._build`): a 16-byte header in memory whose type matches the data's direction,
        data runs in memory (writable for an IN) that :func:`virtio_blk.layout.plan` would not
        bounce and O_DIRECT can take, a status byte in writable memory, the range; the slot of
        ``head`` filled.  False for anything else (the slot is not in use: no harm done)."""
        cdef int r = self._find(hdr, HEADER_SIZE)
        if r < 0:
            return False
        cdef const uint8_t *h = self._host(r, hdr)
        cdef uint32_t req_type = get_u32(h) & TYPE_MASK
        cdef uint64_t sector = get_u64(h + 8)
        if req_type != <uint32_t>(T_IN if into_guest else T_OUT):
            return False
        if not into_guest and (self.read_only or not self.writeback):
            return False  # refused, or write-through: the Python paths answer it
        cdef Slot *slot = &self.slots[head]
        cdef iovec *iov = &self.iov[<uint64_t>head * MAX_IOV]
        cdef uint64_t *gpas = &self.piece_gpa[<uint64_t>head * MAX_IOV]
        cdef uint64_t data_len = 0
        cdef uint64_t end = 0
        cdef uint64_t addr, length
        cdef int k
        for k in range(ndata):
            addr = data[k].addr
            length = data[k].length
            r = self._find(addr, length)
            if r < 0 or (into_guest and self.reg[r].readonly):
                return False
            if k:
                # plan()'s rule: a break that is neither contiguous nor a page join starts a
                # new RequestBuffers, and one after a partial sector needs a bounce buffer.
                if addr != end and (end & PAGE_MASK or addr & PAGE_MASK) and data_len % SECTOR:
                    return False
            iov[k].iov_base = self._host(r, addr)
            iov[k].iov_len = length
            if self.direct and (<uintptr_t>iov[k].iov_base | length) & self.align_mask:
                return False
            gpas[k] = addr
            data_len += length
            end = addr + length
        r = self._find(status, 1)
        if r < 0 or self.reg[r].readonly:
            return False
        if HEADER_SIZE + data_len + 1 >= MAX_CHAIN_BYTES:
            return False
        # range_fault(), the one statement of the rule, as C.
        if data_len % SECTOR or data_len % self.lbs or data_len > self.max_transfer:
            return False
        if sector % (self.lbs // SECTOR):
            return False
        if sector > self.capacity or (data_len >> 9) > self.capacity - sector:
            return False
        slot.offset = slot.guest_offset = sector << 9
        slot.status_gpa = status
        slot.status = self._host(r, status)
        slot.length = <uint32_t>data_len
        slot.niov = <uint16_t>ndata
        slot.into_guest = into_guest
        return True

    def settings_changed(self):
        """The device's write cache mode changed (:meth:`BlkQueueHandler.settings_changed`):
        read it again before the next request this path checks.  (Reading it every pass -- a
        Python property -- cost as much as a tenth of a pass at one request per kick.)"""
        self.settings_stale = True

    cdef int _pass_settings(self) except -1:
        """What may change between passes: the limits (a resize replaces them, and they are
        immutable: read again only then) and the write cache mode (read again only once the
        device said it changed, :meth:`settings_changed`)."""
        handler = self.handler
        limits = handler.limits
        if limits is not self._limits:
            self.capacity = limits.capacity
            self.lbs = limits.logical_block_size
            self.max_transfer = limits.max_transfer
            self.read_only = limits.read_only
            self._limits = limits
        if self.settings_stale:
            # (cleared before the read: a change meanwhile is read at the next pass)
            self.settings_stale = False
            self.writeback = handler.writeback
        return 0

    # ------------------------------------------------------------------ the pass
    def drain(self, int limit=_PY_NO_LIMIT):
        """Start the available requests in the shapes this path takes, at most ``limit`` (the
        pass's, which the worker decides: :data:`~vhost.queue.base.PASS_LIMIT`), then hand the
        rest of the pass to the Python fast path; ``(head, used length)`` of those already
        finished."""
        handler = self.handler
        if self._waiting:  # requests wait for bounce pages: the generic path keeps the order
            return []
        vq = self.vq
        if vq.broken or vq.replay_pending:
            return []
        if handler.dirty is not None or self.ring.fd != self.ring_fd:
            return self.python.drain(limit)
        if self.memory.regions is not self._regions:
            try:
                self._snapshot()
            except ValueError:  # a region went away meanwhile: the Python paths report it
                self._regions = None
                return self.python.drain(limit)
        self._pass_settings()
        if self.packed:
            return self._drain_packed(limit)
        cdef uint16_t next_avail = vq.next_avail
        cdef uint16_t pending = <uint16_t>(self.avail[1] - next_avail)
        if pending > self.size:
            return []  # the generic pop reports it (and stops the queue)
        if pending > limit:
            pending = limit  # the rest waits for the next pass
        cdef char *in_flight = PyByteArray_AS_STRING(self.in_flight)
        cdef uint16_t head
        cdef int n = 0, i
        cdef bint declined = False
        with nogil:
            while n < pending:
                head = self.avail[2 + ((next_avail + n) & self.mask)]
                if head >= self.size or in_flight[head] or not self._parse(head):
                    declined = True
                    break
                in_flight[head] = 1
                self.batch[n] = head
                n += 1
        cdef int mapped
        if n and self.image is not None:
            mapped = self._map(n)
            for i in range(mapped, n):  # left for the Python paths, from the first unmapped
                in_flight[self.batch[i]] = 0
            if mapped < n:
                declined = True
                n = mapped
        done = []
        if n:
            self._claim(n, next_avail)
            self._start(n, done)
        if declined:
            done += self.python.drain(limit - n)
        return done

    cdef int _map(self, int n) except -1:
        """qcow2: the host offsets of the pass's first requests, as
        :meth:`blockdev.qcow2.image.Qcow2Image.map_batch` maps them (inside one allocated
        cluster; a write: one it may write in place, not being allocated, with no autoclear bit
        pending, not metadata), counted in the image's in-flight IO; how many, from the first
        (the rest are left untouched for the Python paths, in order)."""
        cdef int k = 0
        cdef Slot *slot
        cdef uint64_t cs = self.cluster_size
        cdef uint64_t mask = cs - 1
        cdef uint64_t l2_mask = (1ULL << self.l2_bits) - 1
        cdef uint64_t size, file_end, offset, within, g, idx, l2_off, e, host
        cdef uint64_t table_start, table_end, l1_start, l1_end, last_l2 = 0
        cdef bint writing, no_writes
        cdef array.array l1, table
        self._lock_acquire()
        try:
            state = self._map_state()
            if state is None:
                return 0  # a discard drains in-flight IO: count in no more
            try:
                (l1, cache, busy, no_writes, file_end, size, load, l1_start, l1_end,
                 l2_offsets, blocks, table_start, table_end) = state
                if l1.ob_descr.itemsize != 8:
                    return 0
                while k < n:
                    slot = &self.slots[self.batch[k]]
                    offset = slot.guest_offset
                    within = offset & mask
                    writing = not slot.into_guest
                    if within + slot.length > cs or offset + slot.length > size:
                        break
                    g = offset >> self.cluster_bits
                    idx = g >> self.l2_bits
                    if idx >= <uint64_t>len(l1):
                        break
                    l2_off = l1.data.as_ulonglongs[idx] & OFFSET_MASK
                    if not l2_off or (writing and (no_writes or (busy and g in busy))):
                        break
                    if l2_off != last_l2:  # (random IO mostly stays in one table)
                        t = cache.get(l2_off)  # a hit skips the LRU update, as map_batch's
                        if t is None:
                            t = load(l2_off)
                        table = t
                        if table.ob_descr.itemsize != 8:
                            break
                        last_l2 = l2_off
                    if (g & l2_mask) >= <uint64_t>len(table):
                        break
                    e = table.data.as_ulonglongs[g & l2_mask] ^ OFLAG_COPIED
                    host = e & OFFSET_MASK
                    if (e & (FAST_REJECT_WRITE if writing else FAST_REJECT_READ)
                            or not host or host & mask or host + cs > file_end):
                        break
                    # Qcow2Image._protected: never write guest data over metadata.
                    if writing:
                        py_host = host
                        if (l1_start <= host < l1_end or py_host in l2_offsets
                                or py_host in blocks or table_start <= host < table_end):
                            break
                    slot.offset = host + within
                    k += 1
            except Exception:  # bad metadata or a bug: the Python paths report it, per request
                pass
            if k:
                self._count_in(k)
        finally:
            self._lock_release()
        return k

    cdef int _claim(self, int n, uint16_t next_avail) except -1:
        """The pass's chains are in flight (the queue's count, the in-flight area), avail moved
        on; each holds the memory table's pins."""
        vq = self.vq
        vq.next_avail = (next_avail + n) & 0xFFFF
        vq.in_flight_count += n
        inflight = vq.inflight_area
        pins = self._pins
        cdef list per_head = self.pins
        cdef int i
        cdef list heads = None  # (a list of the heads only for those that take one)
        if inflight is not None or self.record is not None:
            heads = [self.batch[i] for i in range(n)]
        if inflight is not None:
            inflight.popped_many(heads)  # (in C too, where the queue layer's core is built)
        for i in range(n):
            per_head[self.batch[i]] = pins
        self.taken += n
        self.stats.requests += n
        if self.record is not None:
            self.record.extend(heads)
        return 0

    cdef list _drain_packed(self, int limit):
        """:meth:`drain`'s pass over a packed ring: the chains from the avail position on that
        :meth:`_walk_packed` takes, claimed, started; the rest of the pass the Python fast
        path's."""
        vq = self.vq
        cdef uint32_t start_pos = vq.next_avail
        cdef int start_wrap = vq.avail_wrap
        cdef uint32_t held = vq.held_slots
        if start_pos >= self.size or held > self.size:
            return self.python.drain(limit)  # (never: the queue keeps them in range)
        cdef uint32_t pos = start_pos
        cdef int wrap = start_wrap
        cdef uint32_t room = self.size - held
        cdef uint16_t buf_id
        cdef int n = 0, got = 0
        with nogil:
            while n < limit:  # the rest waits for the next pass
                got = self._walk_packed(&pos, &wrap, room, &buf_id)
                if got <= 0:
                    break
                room -= self.pslots[buf_id]
                self.batch[n] = buf_id
                n += 1
        cdef int mapped, k
        if n and self.image is not None:
            mapped = self._map(n)
            if mapped < n:  # left for the Python paths, from the first unmapped
                for k in range(mapped, n):
                    self.pslots[self.batch[k]] = 0
                n = mapped
                got = -1
        done = []
        if n:
            n = self._claim_packed(n, start_pos, start_wrap)
            self._start(n, done)
        if got < 0 and not vq.broken:
            done += self.python.drain(limit - n)
        return done

    cdef int _claim_packed(self, int n, uint32_t pos, int wrap) except -1:
        """The pass's ``n`` chains (their ids' slots already set) in flight: recorded in the
        in-flight area in one call (:meth:`vhost.queue.inflight_packed.PackedInflightQueue
        .popped_many`, with their ring descriptors as the walk read them), the queue's count and
        avail position moved on (:meth:`vhost.queue.packed.PackedQueue.took`), as ``_take``
        does for each; each holds the memory table's pins.  How many were claimed: all, unless
        the in-flight area refused one (then, as the Python claim's QueueError does, the queue
        stops, with a log line, and that chain and the rest stay available)."""
        vq = self.vq
        inflight = vq.inflight_area
        cdef list entries = self.pentry
        cdef list per_head = self.pins
        pins = self._pins
        cdef int i, k
        cdef uint16_t buf_id
        cdef uint32_t slots = 0, nslots
        cdef char *dst
        cdef list counts
        cdef list recorded
        if inflight is not None:
            for i in range(n):
                slots += self.pslots[self.batch[i]]
            ring = PyBytes_FromStringAndSize(NULL, slots * sizeof(RawDesc))
            dst = PyBytes_AS_STRING(ring)
            counts = []
            for i in range(n):
                buf_id = self.batch[i]
                nslots = self.pslots[buf_id]
                # (RawDesc is the ring's own little-endian descriptor: addr, len, id, flags)
                memcpy(dst, &self.raw[<uint64_t>buf_id * MAX_RING], sizeof(RawDesc) * nslots)
                dst += sizeof(RawDesc) * nslots
                counts.append(nslots)
            recorded = []
            try:
                inflight.popped_many(ring, counts, recorded)
            except InflightError as exc:
                for k in range(len(recorded), n):
                    self.pslots[self.batch[k]] = 0
                n = len(recorded)
                vq.broken = True
                vq.error = QueueError(f"inflight area: {exc}")
                log.error("queue %d: %s; the queue is stopped", self.handler.index, vq.error)
            for i in range(n):
                entries[self.batch[i]] = recorded[i]
            slots = 0
        for i in range(n):
            buf_id = self.batch[i]
            nslots = self.pslots[buf_id]
            per_head[buf_id] = pins
            slots += nslots
            pos += nslots
            if pos >= self.size:
                pos -= self.size
                wrap ^= 1
        vq.took(n, slots, pos, wrap)
        self.taken += n
        self.stats.requests += n
        if self.record is not None:
            self.record.extend([self.batch[i] for i in range(n)])
        return n

    cdef int _start(self, int n, list done) except -1:
        """Start the pass's requests: buffered writes and a lone cached read right here (as the
        Python engine's ``bypass`` does), the rest through the ring with one enter; then reap
        what finished."""
        cdef bint timing = self.timing
        cdef int64_t now = _now_ns() if timing else 0  # (0: not timed)
        cdef int i, reads = 0
        cdef uint16_t head
        cdef Slot *slot
        cdef ssize_t res
        cdef int err
        cdef uint32_t queued = 0
        cdef uint32_t tail = self.ring._tail
        cdef uint32_t python_pending = self.ring._pending
        cdef Sqe *sqe
        cdef iovec *iov
        for i in range(n):
            self.slots[self.batch[i]].start_ns = now
            if self.slots[self.batch[i]].into_guest:
                reads += 1
        for i in range(n):
            head = self.batch[i]
            slot = &self.slots[head]
            iov = &self.iov[<uint64_t>head * MAX_IOV]
            if self.bypass and not slot.into_guest:
                with nogil:
                    res = pwritev(self.fd, iov, slot.niov, slot.offset)
                    err = errno
                self.left_now += 1
                self._finish(head, res if res >= 0 else -err, done)
                continue
            if self.bypass and reads == 1 and slot.into_guest and self.engine.nowait:
                with nogil:
                    res = preadv2(self.fd, iov, slot.niov, slot.offset, RWF_NOWAIT)
                    err = errno
                if res == slot.length:
                    self.left_now += 1
                    self._finish(head, res, done)
                    continue
                if res < 0 and err != _errno.EAGAIN:
                    if err == _errno.EOPNOTSUPP or err == _errno.EINVAL:
                        log.info("%s: preadv(RWF_NOWAIT) unsupported (%s); reads go to "
                                 "io_uring", getattr(self.disk, "path", "disk"),
                                 os.strerror(err))
                        self.engine.nowait = False
                    else:
                        self.left_now += 1
                        self._finish(head, -err, done)
                        continue
                # not all cached, or short: the ring reads it
            if ((tail - load_acquire_u32(self.sq_head)) & 0xFFFFFFFF) >= self.sq_entries:
                tail = self._enter(tail, queued + python_pending, queued)
                queued = python_pending = 0
                if ((tail - load_acquire_u32(self.sq_head)) & 0xFFFFFFFF) >= self.sq_entries:
                    raise OSError(0, "io_uring submission queue full")
            sqe = &self.sqes[tail & self.sq_mask]
            sqe.flags = 0
            sqe.ioprio = 0
            sqe.fd = self.fd
            sqe.off = slot.offset
            if slot.niov == 1:
                sqe.opcode = OP_READ if slot.into_guest else OP_WRITE
                sqe.addr = <uint64_t><uintptr_t>iov[0].iov_base
                sqe.len = slot.length
            else:
                sqe.opcode = OP_READV if slot.into_guest else OP_WRITEV
                sqe.addr = <uint64_t><uintptr_t>iov
                sqe.len = slot.niov
            sqe.rw_flags = 0
            sqe.user_data = EXTERNAL_TAG | head
            sqe.buf_index = 0
            sqe.personality = 0
            sqe.splice_fd_in = 0
            sqe.addr3 = 0
            sqe.pad = 0
            tail += 1
            queued += 1
        if queued or python_pending:
            self._enter(tail, queued + python_pending, queued)
        if self.left_now:  # qcow2: finished without the ring, out of the image's IO in flight
            left, self.left_now = self.left_now, 0
            if self.image is not None:
                self._leave(left)
        self._reap(done)
        return 0

    cdef uint32_t _enter(self, uint32_t tail, uint32_t to_submit,
                         uint32_t ours) except? 0xFFFFFFFF:
        """Publish the submission tail and enter the kernel once (the Python ring's own prepared
        entries, if any, go with ``ours``); the tail."""
        store_release_u32(self.sq_tail, tail)
        self.ring._tail = tail
        self.ring._pending = 0
        self.ring.external_in_flight += ours
        cdef long ret
        cdef int err
        while True:
            with nogil:
                ret = syscall(VBC_SYS_IO_URING_ENTER, self.ring_fd, to_submit, 0, 0, NULL, 0)
                err = errno
            if ret >= 0 or err != _errno.EINTR:
                break
        if ret < 0:
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
        return tail

    cdef int _reap(self, list done) except -1:
        """Complete the ring's finished entries of this path; stash the Python engine's."""
        cdef uint32_t head = self.cq_head[0]
        cdef uint32_t tail = load_acquire_u32(self.cq_tail)
        cdef Cqe *cqe
        cdef uint64_t ud
        cdef int32_t res
        cdef long ours = 0
        stash = None  # (the Python engine's entries are rare here: looked up when met)
        while head != tail:
            cqe = &self.cqes[head & self.cq_mask]
            ud = cqe.user_data
            res = cqe.res
            head += 1
            if ud & EXTERNAL_TAG:
                self.ring.external_in_flight -= 1
                ours += 1
                self._finish(<uint16_t>(ud & 0xFFFF), res, done)
            else:
                if stash is None:
                    stash = self.ring.stash
                stash.append((ud, res))
            if head == tail:  # (more may have come meanwhile)
                store_release_u32(self.cq_head, head)
                tail = load_acquire_u32(self.cq_tail)
        store_release_u32(self.cq_head, head)
        if ours and self.ring.external_reaped is not None:  # (the stash's were, when stashed)
            self.ring.external_reaped(ours)
        self._take_external_stash(done)
        return 0

    cdef int _take_external_stash(self, list done) except -1:
        """Complete this path's entries the engine's own reap met (and stashed)."""
        external = self.ring.external_stash
        if external:
            self.ring.external_stash = []
            self.ring.external_in_flight -= len(external)
            for ud, res in external:
                self._finish(<uint16_t>(ud & 0xFFFF), res, done)
        return 0

    # ------------------------------------------------------------------ completion
    cdef int _finish(self, uint16_t head, long res, list done) except -1:
        """A request of this path is done with ``res`` (bytes, or -errno): its status, counters
        and used length -- here when it moved all its bytes, else by the Python completion."""
        cdef Slot *slot = &self.slots[head]
        if head >= self.size or not (self.pslots[head] if self.packed
                                     else PyByteArray_AS_STRING(self.in_flight)[head]):
            log.error("queue %d: io_uring completion for head %d not in flight: ignored",
                      self.handler.index, head)
            return 0
        handler = self.handler
        if (res != slot.length or self.result_hook is not None or handler.dirty is not None
                or self.memory.regions is not self._regions):
            done.append((head, self._finish_in_python(head, res)))
            self.pins[head] = None
            return 0
        slot.status[0] = STATUS_OK
        self.pins[head] = None
        # (counted with the GIL held, as every reader reads: see BlkStats)
        cdef int64_t *counts = self.native_counts + (COUNTS_READ if slot.into_guest
                                                     else COUNTS_WRITE)
        counts[0] += 1
        counts[1] += slot.length
        if slot.start_ns:  # timed: BlkStats.add_latency's total and bucket
            self._count_latency(LATENCY_READ if slot.into_guest else LATENCY_WRITE,
                                _now_ns() - slot.start_ns)
        done.append((head, slot.length + 1 if slot.into_guest else 1))
        return 0

    cdef object _finish_in_python(self, uint16_t head, long res):
        """The Python path's completion of a request of this path (a failure, a short transfer,
        dirty logging, a changed memory table): the request as the Python fast path builds it,
        its result as the engine reports one, then :meth:`FastPath.complete`."""
        cdef Slot *slot = &self.slots[head]
        cdef uint64_t *gpas = &self.piece_gpa[<uint64_t>head * MAX_IOV]
        cdef iovec *iov = &self.iov[<uint64_t>head * MAX_IOV]
        data = [(gpas[i], iov[i].iov_len) for i in range(slot.niov)]
        # Built from what this path read (the header is not read again: the guest may have
        # changed it), with the Python path's checks against the memory table of now.
        req = self.python.request_for(head, slot.status_gpa, slot.guest_offset >> 9, data,
                                      slot.length, slot.into_guest, None)
        if req is None:  # its memory went away meanwhile: nothing more can be done for it
            self.stats.errors += 1
            return self.handler.put_status(slot.status_gpa, STATUS_IOERR, 1)
        req.start_ns = slot.start_ns
        if self.image is not None:  # a short transfer is resumed at the host offset
            req.offset = slot.offset
            self.engine.set_result(req, res)
            req.offset = slot.guest_offset
        else:
            self.engine.set_result(req, res)
        if self.result_hook is not None:
            self.result_hook(req)
        return self.python.complete(req)

    cdef inline void _count_latency(self, Py_ssize_t block, int64_t ns) noexcept:
        """What :meth:`BlkStats.add_latency` adds (its total and its bisect_left bucket), into
        the native latency block starting at ``block``."""
        cdef int lo = 0, hi = NBOUNDS, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if LATENCY_BOUNDS_NS[mid] < ns:
                lo = mid + 1
            else:
                hi = mid
        cdef int64_t *lat = self.native_latency + block
        lat[0] += ns
        lat[1 + lo] += 1

    def complete(self, req):
        """A request the Python fast path started (see :meth:`virtio_blk.fastpath.FastPath
        .complete`)."""
        return self.python.complete(req)

    def complete_reaped(self):
        """Everything the ring (and the engine) finished: this path's requests here, the rest
        as the Python fast path completes them."""
        done = []
        if self.ring.fd == self.ring_fd:
            self._reap(done)
        done += self.python.complete_reaped()
        # This path's entries the engine's reap met meanwhile (it stashes them for us).
        self._take_external_stash(done)
        return done
