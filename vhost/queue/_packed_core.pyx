# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The per-request bookkeeping of a packed queue, compiled: the in-flight area's records of
pops (:meth:`PackedInflightQueue.popped_many`) and of a publication (``publishing``,
``published``), and the used side -- the plain entries of :meth:`PackedQueue.add_used_many`
and the element loop of :meth:`PackedQueue.publish_used`.

Recording a chain the device took (:meth:`vhost.queue.inflight_packed.PackedInflightQueue
.popped`) is, per descriptor, a struct packed into the entry at the head of the free list, then
the head entry's links, counter and ``inflight`` byte and the commit store -- about 2 us of
Python per request, more than the compiled fast path spends on all the rest of it.  Here it is
a few stores.

Rules stay stated once.  :func:`popped_many` implements the Python method with the same
interface and takes only the plain case: a list of exact int counts, each chain's descriptors
inside ``ring`` (a bytes object), the free list holding the chain's entries, a counter that fits
a u64.  At the first chain that is anything else it stops, having written nothing of that chain,
and returns how many chains it recorded; the Python method does the rest itself, and so states
(and raises) every fault.  Nothing is done when the area's view was released (the Python code
then reports it as it always did).

The stores are the Python code's, in its order: each descriptor's copy ``(id, flags, len,
addr)`` at 16 in its entry along the free list, ``free_head``, the head entry's ``last``,
``num`` and ``counter``, its ``inflight`` byte, then ``old_free_head`` -- the last two release
stores, so the C compiler keeps the order a crash-recovery reader of the area relies on (x86
keeps stores in order).  The tracker's own copies of the links (``_next``, ``_last``) are the
Python lists it keeps, read and written here as the Python code does.

:func:`publishing` and :func:`published` do a whole batch of heads that are entries (their
``last`` too), or nothing; their stores are the Python methods', the commit's three in order and
release.  The used side (:class:`UsedSide`) follows the same pattern: its ``add_used_many`` adds
the plain entries at the start of a batch (an exact ``(int, int)`` whose buffer id is in range
and in flight) and the Python method the rest, with its ValueError; ``write_used`` writes a
whole batch of plain pending elements (id a u16, length a u32, slots 1..size) or nothing, and
only without dirty logging (the Python loop marks the log).  The element stores are the Python
loop's: id and length, then the flags of every element but the first, whose flags store -- the
publication -- stays the caller's, after the in-flight area's ``publishing``.

The differential property tests (``tests/property/test_packed_inflight_differential.py``,
``tests/property/test_packed_used_differential.py``) run this and the Python code on identical
areas and queues and hold them to the same bytes, state and exceptions.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from vhost.queue._le cimport (
    get_u16,
    get_u32,
    get_u64,
    put_u16,
    put_u32,
    put_u64,
    release_u16,
    release_u8,
    small_int,
    Py_buffer,
    PyMemoryView_GET_BUFFER,
    PyTuple_CheckExact,
    PyList_CheckExact,
    PyBytes_CheckExact,
    PyBytes_AS_STRING,
    PyBytes_GET_SIZE,
)

from vhost.queue import inflight as _inflight

cdef enum:
    RING_DESC_SIZE = 16   # the ring's descriptor: addr u64, len u32, id u16, flags u16
    NO_ENTRY = 0xFFFF
    # byte offsets in the header and in an entry (vhost.queue.inflight_packed)
    FREE_HEAD_OFF = 12
    OLD_FREE_HEAD_OFF = 14
    E_LAST = 4
    E_NUM = 6
    E_COUNTER = 8
    E_DESC = 16           # id u16, flags u16, len u32, addr u64

cdef Py_ssize_t HEADER_SIZE = _inflight.PACKED_HEADER_SIZE
cdef Py_ssize_t ENTRY_SIZE = _inflight.PACKED_ENTRY_SIZE
if HEADER_SIZE != 32 or ENTRY_SIZE != 32:
    raise ImportError("the packed in-flight area's layout is not the one compiled here")



cdef object _writable_area(object view, long long size):
    """A slice of the in-flight area's ``view`` to write through (the slice holds the buffer
    while the caller writes; slicing a released view raises), or None when the view was
    released, is read-only or is too short for ``size`` entries -- the Python method then does
    the work and reports the fault as it always did."""
    try:
        area_view = view[:]
    except ValueError:
        return None
    cdef Py_buffer *ab = PyMemoryView_GET_BUFFER(area_view)
    if ab.readonly or ab.len < HEADER_SIZE + ENTRY_SIZE * size:
        return None
    return area_view


def popped_many(tracker, ring, counts, out):
    """:meth:`vhost.queue.inflight_packed.PackedInflightQueue.popped` for the plain chains at
    the start of ``counts`` (see :meth:`~vhost.queue.inflight_packed.PackedInflightQueue
    .popped_many`), each head entry appended to ``out``: how many were recorded (the caller
    records the rest)."""
    if not (PyList_CheckExact(counts) and PyList_CheckExact(out) and PyBytes_CheckExact(ring)):
        return 0
    cdef Py_ssize_t n = len(<list>counts)
    if n == 0:
        return 0
    view, nxt_obj, last_obj, _ = tracker.compiled_view()
    if not (PyList_CheckExact(nxt_obj) and PyList_CheckExact(last_obj)):
        return 0
    cdef list nxt = nxt_obj
    cdef list lasts = last_obj
    cdef long long size = tracker.size
    if len(nxt) != size or len(lasts) != size:
        return 0
    cdef long long free = 0, start = 0
    if not small_int(tracker._free_head, &free) or not small_int(tracker.counter, &start):
        return 0
    if start < 0 or not (0 <= free < size or free == NO_ENTRY):
        return 0
    area_view = _writable_area(view, size)
    if area_view is None:
        return 0
    cdef uint8_t *area = <uint8_t *>PyMemoryView_GET_BUFFER(area_view).buf
    cdef const uint8_t *src = <const uint8_t *>PyBytes_AS_STRING(ring)
    cdef Py_ssize_t ring_len = PyBytes_GET_SIZE(ring)
    cdef Py_ssize_t off = 0
    cdef Py_ssize_t i = 0
    cdef long long count = 0, k, node, head, last
    cdef uint64_t counter = <uint64_t>start
    cdef uint8_t *e
    cdef const uint8_t *d
    cdef bint ok
    try:
        while i < n:
            if not small_int((<list>counts)[i], &count) or not 0 < count <= size:
                break
            if count > (ring_len - off) // RING_DESC_SIZE or counter >= 0x7FFFFFFFFFFFFFFF:
                break
            # The free list must hold the chain's entries, every link an entry or the end
            # (else the Python code raises: nothing of this chain is written here).
            node = free
            ok = True
            for k in range(count):
                if not 0 <= node < size:  # (NO_ENTRY: the list ran out)
                    ok = False
                    break
                if not small_int(nxt[node], &node) or not (0 <= node < size
                                                            or node == NO_ENTRY):
                    ok = False
                    break
            if not ok:
                break
            head = node = free
            last = head
            for k in range(count):
                d = src + off + k * RING_DESC_SIZE
                e = area + HEADER_SIZE + ENTRY_SIZE * node + E_DESC
                put_u16(e, get_u16(d + 12))      # id
                put_u16(e + 2, get_u16(d + 14))  # flags
                put_u32(e + 4, get_u32(d + 8))   # len
                put_u64(e + 8, get_u64(d))       # addr
                last = node
                small_int(nxt[node], &node)
            free = node
            put_u16(area + FREE_HEAD_OFF, <uint16_t>node)
            lasts[head] = last
            e = area + HEADER_SIZE + ENTRY_SIZE * head
            put_u16(e + E_LAST, <uint16_t>last)
            put_u16(e + E_NUM, <uint16_t>count)
            put_u64(e + E_COUNTER, counter)
            counter += 1
            release_u8(e, 1)
            release_u16(area + OLD_FREE_HEAD_OFF, <uint16_t>node)
            (<list>out).append(head)
            off += count * RING_DESC_SIZE
            i += 1
    finally:
        tracker._free_head = free
        tracker.counter = <long long>counter
    return i


# ---------------------------------------------------------------------------- the used side
cdef enum:
    F_WRITE = 2
    F_AVAIL_USED = 0x8080


cdef class UsedSide:
    """The used side of one :class:`~vhost.queue.packed.PackedQueue`, compiled: made once when
    the queue starts, dropped by its ``release``.  It holds what does not change while the
    queue runs -- a slice of the descriptor ring's view, a view of the slots array (which pins
    it), the queue's pending list, its in-flight entries per id and the in-flight area's batch
    list, the size -- so a call reads no attribute of the queue (looking them up per call cost
    more than the Python loop saves for a batch of one)."""

    cdef object _ring        # slice of the queue's descriptor-ring view
    cdef object _slots       # memoryview of the queue's slots array
    cdef list _pending
    cdef list _entry
    cdef list _batch         # the in-flight area's batch, or None
    cdef uint8_t *ring
    cdef uint16_t *slots
    cdef long long size

    def __init__(self, queue):
        size = queue.size
        if not 0 < size <= 32768:
            raise ValueError(f"queue size {size}")
        self.size = size
        pending, entry = queue._pending, queue._entry
        if not (PyList_CheckExact(pending) and PyList_CheckExact(entry)) or len(entry) != size:
            raise ValueError("the pending list or the entries are not lists of the ring")
        self._pending = pending
        self._entry = entry
        self._batch = None
        inflight = queue._inflight
        if inflight is not None:
            batch = inflight.compiled_view()[3]
            if not PyList_CheckExact(batch):
                raise ValueError("the in-flight area's batch is not a list")
            self._batch = batch
        self._ring = queue._desc[:]
        cdef Py_buffer *rb = PyMemoryView_GET_BUFFER(self._ring)
        if rb.readonly or rb.len < RING_DESC_SIZE * size:
            raise ValueError("the descriptor ring is read-only or too short")
        self.ring = <uint8_t *>rb.buf
        self._slots = memoryview(queue._slots)
        cdef Py_buffer *sb = PyMemoryView_GET_BUFFER(self._slots)
        if sb.readonly or sb.len < 2 * size:
            raise ValueError("the slots are read-only or too short")
        self.slots = <uint16_t *>sb.buf

    def release(self):
        """Let go of the views (the queue is releasing its own): nothing is written after."""
        self.ring = NULL
        self.slots = NULL
        self.size = 0
        for view in (self._ring, self._slots):
            if view is not None:
                view.release()
        self._ring = self._slots = None
        self._pending = self._entry = self._batch = None

    def add_used_many(self, queue, done):
        """:meth:`vhost.queue.packed.PackedQueue.add_used_many` for the plain entries at the
        start of ``done`` -- an exact ``(int, int)`` tuple whose buffer id is in range and in
        flight --: how many were added (the Python method adds the rest, and raises what it
        raises); ``in_flight_count`` moved on by that many here."""
        if not PyList_CheckExact(done) or self.size == 0:
            return 0
        cdef Py_ssize_t n = len(<list>done)
        cdef Py_ssize_t i = 0
        cdef long long buf_id = 0, length = 0
        cdef long long size = self.size
        cdef uint16_t *slots = self.slots
        cdef list pending = self._pending
        cdef list batch = self._batch
        cdef list entry = self._entry
        cdef tuple item
        try:
            while i < n:
                obj = (<list>done)[i]
                if not PyTuple_CheckExact(obj) or len(<tuple>obj) != 2:
                    break
                item = <tuple>obj
                if not small_int(item[0], &buf_id) or not 0 <= buf_id < size:
                    break
                if not small_int(item[1], &length) or not slots[buf_id]:
                    break
                pending.append((item[0], item[1], slots[buf_id]))
                slots[buf_id] = 0
                i += 1
                if batch is not None:
                    batch.append(entry[buf_id])
        finally:
            queue.in_flight_count -= i
        return i

    def write_used(self, queue, pending):
        """The element loop of :meth:`vhost.queue.packed.PackedQueue.publish_used` (without
        dirty logging) for a plain batch -- each ``(buffer id, length, slots)`` exact ints, the
        id a u16, the length a u32, the slots 1..size --: id and length of each element, then
        its flags (but for the first element's: the caller publishes the batch with that
        store), each at the used position, moving by its slots and flipping the wrap counter at
        the ring's end.  ``(position, wrap, slots in all, the first element's flags)``, or None
        -- nothing written -- for any other batch (the Python loop then does it, and raises
        what it raises)."""
        if not PyList_CheckExact(pending) or self.size == 0:
            return None
        cdef Py_ssize_t n = len(<list>pending)
        cdef long long size = self.size
        cdef long long pos = 0, wrap = 0
        if n == 0:
            return None
        if not small_int(queue.next_used, &pos) or not small_int(queue.used_wrap, &wrap):
            return None
        if not 0 <= pos < size or not 0 <= wrap <= 1:
            return None
        cdef Py_ssize_t i
        cdef long long buf_id = 0, length = 0, nslots = 0
        cdef tuple item
        for i in range(n):  # all plain, or nothing written
            obj = (<list>pending)[i]
            if not PyTuple_CheckExact(obj) or len(<tuple>obj) != 3:
                return None
            item = <tuple>obj
            if not (small_int(item[0], &buf_id) and small_int(item[1], &length)
                    and small_int(item[2], &nslots)):
                return None
            if not (0 <= buf_id <= 0xFFFF and 0 <= length <= 0xFFFFFFFF and 0 < nslots <= size):
                return None
        cdef long long count = 0
        cdef uint16_t flags, first_flags = 0
        cdef uint8_t *d
        for i in range(n):
            item = <tuple>(<list>pending)[i]
            small_int(item[0], &buf_id)
            small_int(item[1], &length)
            small_int(item[2], &nslots)
            flags = (F_AVAIL_USED if wrap else 0) | (F_WRITE if length else 0)
            d = self.ring + RING_DESC_SIZE * pos
            put_u16(d + 12, <uint16_t>buf_id)
            put_u32(d + 8, <uint32_t>length)
            if i:
                release_u16(d + 14, flags)
            else:
                first_flags = flags
            count += nslots
            pos += nslots
            if pos >= size:
                pos -= size
                wrap ^= 1
        return (pos, wrap, count, first_flags)


# ---------------------------------------------------------------------------- publication
cdef enum:
    USED_IDX_OFF = 16
    OLD_USED_IDX_OFF = 18
    USED_WRAP_OFF = 20
    OLD_USED_WRAP_OFF = 21
    E_NEXT = 2


def publishing(tracker, used_idx, used_wrap):
    """:meth:`vhost.queue.inflight_packed.PackedInflightQueue.publishing` for a plain batch --
    every head an entry whose ``last`` is one, the free list's head an entry or the end, the
    position a u16 and the wrap counter a byte --: True, done; False, nothing done (the Python
    method does it, and raises what it raises)."""
    cdef long long idx = 0, wrap = 0, free = 0, head = 0, last = 0
    if not small_int(used_idx, &idx) or not small_int(used_wrap, &wrap):
        return False
    if not 0 <= idx <= 0xFFFF or not 0 <= wrap <= 0xFF:
        return False
    view, nxt_obj, last_obj, batch_obj = tracker.compiled_view()
    if not (PyList_CheckExact(nxt_obj) and PyList_CheckExact(last_obj)
            and PyList_CheckExact(batch_obj)):
        return False
    cdef list nxt = nxt_obj
    cdef list lasts = last_obj
    cdef list batch = batch_obj
    cdef long long size = tracker.size
    if len(nxt) != size or len(lasts) != size:
        return False
    if not small_int(tracker._free_head, &free) or not (0 <= free < size or free == NO_ENTRY):
        return False
    cdef Py_ssize_t i, n = len(batch)
    for i in range(n):  # all plain, or nothing done
        if not small_int(batch[i], &head) or not 0 <= head < size:
            return False
        if not small_int(lasts[head], &last) or not 0 <= last < size:
            return False
    area_view = _writable_area(view, size)
    if area_view is None:
        return False
    cdef uint8_t *area = <uint8_t *>PyMemoryView_GET_BUFFER(area_view).buf
    try:
        for i in range(n):
            head_obj = batch[i]
            small_int(head_obj, &head)
            small_int(lasts[head], &last)
            nxt[last] = free
            put_u16(area + HEADER_SIZE + ENTRY_SIZE * last + E_NEXT, <uint16_t>free)
            free = head
            put_u16(area + FREE_HEAD_OFF, <uint16_t>free)
    finally:
        tracker._free_head = free
    put_u16(area + USED_IDX_OFF, <uint16_t>idx)
    area[USED_WRAP_OFF] = <uint8_t>wrap
    return True


def published(tracker):
    """:meth:`vhost.queue.inflight_packed.PackedInflightQueue.published` for a batch of heads
    that are all entries: True, done; False, nothing done (the Python method does it)."""
    view, _, _, batch_obj = tracker.compiled_view()
    if not PyList_CheckExact(batch_obj):
        return False
    cdef list batch = batch_obj
    cdef long long size = tracker.size
    cdef long long free = 0, head = 0
    if not small_int(tracker._free_head, &free) or not 0 <= free <= 0xFFFF:
        return False
    cdef Py_ssize_t i, n = len(batch)
    for i in range(n):
        if not small_int(batch[i], &head) or not 0 <= head < size:
            return False
    area_view = _writable_area(view, size)
    if area_view is None:
        return False
    cdef uint8_t *area = <uint8_t *>PyMemoryView_GET_BUFFER(area_view).buf
    for i in range(n):
        small_int(batch[i], &head)
        area[HEADER_SIZE + ENTRY_SIZE * head] = 0
    batch.clear()
    # The commit: free list, used position, wrap counter (release: after the bits cleared).
    release_u16(area + OLD_FREE_HEAD_OFF, <uint16_t>free)
    release_u16(area + OLD_USED_IDX_OFF, get_u16(area + USED_IDX_OFF))
    release_u8(area + OLD_USED_WRAP_OFF, area[USED_WRAP_OFF])
    return True
