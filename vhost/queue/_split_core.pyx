# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The used side of a split queue, compiled: :meth:`SplitQueue.add_used_many`,
:meth:`SplitQueue.end_pass` and :meth:`InflightQueue.popped_many` in C.

Returning a batch of requests is, per head, a handful of Python operations -- a range and
in-flight check, a flag cleared, a struct packed into the used ring, the index moved on, and
the in-flight area's batch linked (:meth:`vhost.queue.inflight.InflightQueue.used`); here it is
a few stores.  (``benchmarks.hotpath --fast-path on --batches 32`` under callgrind, with the
compiled fast path: 12,300 instructions a request with the Python loop, 9,700 with this.)

Rules stay stated once.  :meth:`UsedRing.add_used_many` and :func:`popped_many` implement the
Python methods they speed up, with the same interface, and take only the plain case: an exact
``(int, int)`` tuple whose head is in range and in flight and whose length fits the used
element's u32 (for :func:`popped_many`: an int head whose entry lies inside the area, a counter
below 2**64).  At the first entry that is anything else they stop and return how many entries
they did; the Python method does the rest itself, and so states (and raises) every fault: the
same ValueError for a head out of range or not in flight, the entries before it added.  Nothing
is done either when a view was released (the Python code then reports it as it always did).

The stores are the Python code's, in its order: the used element as two little-endian u32
``(id, len)`` at ``4 + 8 * (idx & mask)``; in the in-flight area (``QueueRegionSplit``) a head's
``next`` before ``last_batch_head`` names it, and a popped head's ``counter`` before its
``inflight`` byte (release stores, so the C compiler keeps the order a crash-recovery reader of
the area relies on; x86 keeps stores in order).

Pointers come from slices of the memoryviews (``PyMemoryView_GET_BUFFER(slice).buf``), so the
views' owners can still ``release()`` theirs: :class:`UsedRing` holds its slices while its queue
runs and the queue's ``release()`` releases them first; :func:`popped_many` takes one per call
(slicing a released view raises: nothing is written through a view its owner let go).
The differential property test (``tests/property/test_split_used_differential.py``) runs this
and the Python code on identical queues and holds them to the same bytes, state and exceptions.

The end of a worker pass (:meth:`UsedRing.end_pass`) is the one queue call of a pass at batch 1
that is not the device's: enable notifications, fence, re-check avail.idx, publish used.idx,
fence, the need_event decision.  As Python, two method calls and two lock round trips for the
fences (``benchmarks.hotpath --fast-path on --batches 1`` under callgrind: 38,800 instructions a
request before, 34,400 with this); here a few loads and stores and two ``mfence``.  Its
differential test is ``tests/property/test_split_end_pass_differential.py``.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from vhost.queue._le cimport (
    full_fence,
    get_u16,
    load_u16,
    put_u16,
    put_u32,
    put_u64,
    release_u16,
    release_u8,
    small_int,
    store_u16,
    Py_buffer,
    PyMemoryView_GET_BUFFER,
    PyLong_CheckExact,
    PyTuple_CheckExact,
    PyList_CheckExact,
    PyByteArray_CheckExact,
    PyByteArray_GET_SIZE,
)

from vhost.queue.base import PASS_AGAIN, PASS_CALL, PASS_QUIET


cdef enum:
    # vhost.queue.inflight's layout (QueueRegionSplit): a 16-byte header, 16 bytes per head
    HEADER_SIZE = 16
    STATE_SIZE = 16
    LAST_BATCH_OFF = 12  # u16 last_batch_head
    NEXT_OFF = 6         # u16 next, in a head's entry
    COUNTER_OFF = 8      # u64 counter, in a head's entry
    USED_RING_OFF = 4    # flags, idx, then the elements
    USED_ELEM_SIZE = 8
    USED_IDX_OFF = 14    # u16 used_idx, in the header
    AVAIL_F_NO_INTERRUPT = 1


# (typed: a bare literal past the C int range would make Cython compare as Python objects)
cdef long long U32_MAX = 0xFFFFFFFF
cdef uint64_t U64_MAX = 0xFFFFFFFFFFFFFFFF



cdef inline object _slice(object view):
    """A slice of ``view`` (keeps its buffer alive for this call), or None once it was
    released."""
    try:
        return view[:]
    except ValueError:
        return None


cdef class UsedRing:
    """The used side of one :class:`~vhost.queue.split.SplitQueue`, compiled: made once when
    the queue starts (:meth:`SplitQueue.__init__`), dropped by its :meth:`release`.

    It holds what does not change while the queue runs -- slices of the used ring's view and of
    the in-flight area's (:meth:`~vhost.queue.inflight.InflightQueue.compiled_view`), a view of
    the in-flight flags (which pins the bytearray: it cannot be resized under the pointer), the
    area's batch list, the size -- so a call reads no attribute of the queue: looking them up per
    call cost more than the Python loop saves for a batch of one.
    """

    cdef object _used        # slice of the queue's used-ring view
    cdef object _avail       # slice of the queue's avail-ring view (u16 fields)
    cdef object _flags       # memoryview of the queue's in-flight bytearray
    cdef object _area        # slice of the in-flight area's view, or None
    cdef list _batch         # the in-flight area's batch (InflightQueue.used appends to it)
    cdef uint8_t *ring
    cdef uint16_t *avail
    cdef uint8_t *flags
    cdef uint8_t *area
    cdef long long size
    cdef uint32_t mask
    cdef bint event_idx

    def __init__(self, queue):
        size = queue.size
        if size <= 0 or size & (size - 1) or size > 32768:
            raise ValueError(f"queue size {size}")
        self.size = size
        self.mask = <uint32_t>(size - 1)
        self._used = queue._used_bytes[:]
        cdef Py_buffer *ub = PyMemoryView_GET_BUFFER(self._used)
        if ub.readonly or ub.len < USED_RING_OFF + USED_ELEM_SIZE * size:
            raise ValueError("the used ring view is read-only or too short")
        self.ring = <uint8_t *>ub.buf
        # (the avail ring's u16 fields: flags, idx, the entries, used_event)
        self._avail = queue._avail[:]
        cdef Py_buffer *vb = PyMemoryView_GET_BUFFER(self._avail)
        if vb.len < 2 * (3 + size):
            raise ValueError("the avail ring view is too short")
        self.avail = <uint16_t *>vb.buf
        self.event_idx = queue.event_idx
        in_flight = queue._in_flight
        if not PyByteArray_CheckExact(in_flight) or PyByteArray_GET_SIZE(in_flight) < size:
            raise ValueError("the in-flight flags are not a bytearray of the queue size")
        self._flags = memoryview(in_flight)
        self.flags = <uint8_t *>PyMemoryView_GET_BUFFER(self._flags).buf
        self.area = NULL
        self._area = None
        self._batch = None
        cdef Py_buffer *ab
        inflight = queue.inflight_area
        if inflight is not None:
            view, batch = inflight.compiled_view()
            if not PyList_CheckExact(batch):
                raise ValueError("the in-flight area's batch is not a list")
            self._area = view[:]
            ab = PyMemoryView_GET_BUFFER(self._area)
            if ab.readonly or ab.len < HEADER_SIZE + STATE_SIZE * size:
                raise ValueError("the in-flight area is read-only or too short")
            self.area = <uint8_t *>ab.buf
            self._batch = batch

    def release(self):
        """Let go of the views (the queue is releasing its own): nothing is written after."""
        self.ring = self.flags = self.area = NULL
        self.avail = NULL
        self.size = 0
        for view in (self._used, self._avail, self._flags, self._area):
            if view is not None:
                view.release()
        self._used = self._avail = self._flags = self._area = None
        self._batch = None

    def add_used_many(self, queue, done, uint16_t next_used):
        """:meth:`vhost.queue.split.SplitQueue.add_used_many` for the plain entries at the start
        of ``done``, the first at used index ``next_used``: how many were added.  The caller
        moves ``next_used`` and ``in_flight_count`` on by that many and adds the rest itself
        (and reports what is wrong with them).  Should an append to the batch fail
        (MemoryError), the queue's two fields are set here before the error propagates, so
        they agree with what was written.
        """
        return self._add(queue, done, next_used)

    cdef Py_ssize_t _add(self, queue, done, uint16_t next_used) except -1:
        """:meth:`add_used_many`, callable from C."""
        if not PyList_CheckExact(done) or self.size == 0:
            return 0
        cdef Py_ssize_t n = len(<list>done)
        cdef Py_ssize_t i = 0
        cdef long long head = 0, length = 0
        cdef long long size = self.size
        cdef uint8_t *flags = self.flags
        cdef uint8_t *area = self.area
        cdef uint8_t *entry
        cdef tuple item
        try:
            while i < n:
                obj = (<list>done)[i]
                if not PyTuple_CheckExact(obj) or len(<tuple>obj) != 2:
                    break
                item = <tuple>obj
                head_obj = item[0]
                if (not small_int(head_obj, &head) or not small_int(item[1], &length)
                        or head < 0 or head >= size or not flags[head]
                        or length < 0 or length > U32_MAX):
                    break
                flags[head] = 0
                entry = self.ring + USED_RING_OFF + USED_ELEM_SIZE * (next_used & self.mask)
                put_u32(entry, <uint32_t>head)
                put_u32(entry + 4, <uint32_t>length)
                next_used = <uint16_t>(next_used + 1)
                i += 1
                if area != NULL:
                    # InflightQueue.used: link the head into the batch, then name it the last
                    put_u16(area + HEADER_SIZE + STATE_SIZE * head + NEXT_OFF,
                                get_u16(area + LAST_BATCH_OFF))
                    release_u16(area + LAST_BATCH_OFF, <uint16_t>head)
                    self._batch.append(head_obj)
        except BaseException:
            queue.next_used = next_used
            queue.in_flight_count -= i
            raise
        return i

    def end_pass(self, queue, done):
        """:meth:`vhost.queue.split.SplitQueue.end_pass` of ``queue`` (the queue this was made
        for): the entries of ``done`` added, then ask for a kick on the next buffer, fence,
        re-check avail.idx (``PASS_AGAIN``), else publish the used entries, fence, and say
        whether the driver wants a call (``PASS_CALL`` / ``PASS_QUIET``).

        :meth:`~SplitQueue.add_used_many` as that method dispatches it (the plain entries here,
        the rest by its Python loop, which raises for a bad one), then the stores and loads of
        :meth:`~SplitQueue.enable_notifications` and :meth:`~SplitQueue.publish_used`, in their
        order, with their two store->load fences (here ``mfence`` instead of a locked
        instruction), and the same updates of the queue's fields and of the in-flight area
        (:meth:`InflightQueue.published`).  While dirty pages are logged (a migration), and once
        the views were released, the Python method runs instead: it states the logging, and
        reports a released view as it always did.
        """
        if self.ring == NULL or queue.dirty is not None:
            return queue.end_pass(done)
        cdef uint16_t next_used = 0
        cdef Py_ssize_t added
        cdef bint known = False  # next_used is the queue's (not read again below)
        if done:
            next_used = queue.next_used
            added = self._add(queue, done, next_used)
            if added:
                next_used = <uint16_t>(next_used + added)
                queue.next_used = next_used
                queue.in_flight_count -= added
            if added != len(done):
                queue._add_used_python(done[added:])  # (moves next_used on itself)
            else:
                known = True
        cdef long long size = self.size
        cdef uint16_t next_avail = queue.next_avail
        # enable_notifications: avail_event (EVENT_IDX) or the used ring's flags, then the
        # driver's avail.idx after the fence (virtio 2.7.10: buffers it made available while
        # notifications were off get no kick).
        if self.event_idx:
            store_u16(<uint16_t *>self.ring + 2 + 4 * size, next_avail)
        else:
            store_u16(<uint16_t *>self.ring, 0)
        full_fence()
        if load_u16(self.avail + 1) != next_avail:
            return PASS_AGAIN
        # publish_used
        cdef uint16_t new = next_used if known else queue.next_used
        cdef uint16_t old = queue._published_used
        if new == old:
            return PASS_QUIET
        release_u16(self.ring + 2, new)  # one 16-bit store, after the elements
        queue._published_used = new
        if self.area != NULL and not self._published(new):
            queue.inflight_area.published(new)
        full_fence()
        cdef uint16_t used_event
        if self.event_idx:
            used_event = load_u16(self.avail + 2 + size)
            prev = queue._signalled_used
            queue._signalled_used = new
            if prev is None:
                return PASS_CALL
            if <uint16_t>(new - used_event - 1) < <uint16_t>(new - <uint16_t>prev):
                return PASS_CALL
            return PASS_QUIET
        if load_u16(self.avail) & AVAIL_F_NO_INTERRUPT:
            return PASS_QUIET
        return PASS_CALL

    cdef bint _published(self, uint16_t used_idx) except -1:
        """:meth:`InflightQueue.published`: the batch's in-flight bytes cleared, the batch
        emptied, then the used index recorded; False (nothing done) if an entry of the batch is
        not a head in range -- which no code adds (add_used checked each) -- for the Python
        method to do (and report)."""
        cdef list batch = self._batch
        cdef long long head = 0
        for obj in batch:
            if not small_int(obj, &head) or head < 0 or head >= self.size:
                return False
        for obj in batch:
            small_int(obj, &head)
            self.area[HEADER_SIZE + STATE_SIZE * head] = 0
        del batch[:]
        release_u16(self.area + USED_IDX_OFF, used_idx)  # (after the bytes it covers)
        return True


def popped_many(inflight, heads):
    """:meth:`vhost.queue.inflight.InflightQueue.popped` for the plain heads at the start of
    ``heads``, in order: how many were marked (the caller marks the rest)."""
    if not PyList_CheckExact(heads):
        return 0
    cdef Py_ssize_t n = len(<list>heads)
    if n == 0:
        return 0
    start = inflight.counter
    if not PyLong_CheckExact(start) or start < 0 or start >= 2 ** 64:
        return 0
    cdef uint64_t counter = start
    view, _ = inflight.compiled_view()
    area_view = _slice(view)
    if area_view is None:
        return 0
    cdef Py_buffer *ab = PyMemoryView_GET_BUFFER(area_view)
    if ab.readonly:
        return 0
    cdef uint8_t *area = <uint8_t *>ab.buf
    cdef long long limit = (ab.len - HEADER_SIZE) // STATE_SIZE  # entries wholly inside
    cdef Py_ssize_t i = 0
    cdef long long head = 0
    cdef uint8_t *entry
    cdef bint exhausted = False  # the last counter was 2**64 - 1: the next does not fit
    try:
        while i < n:
            if exhausted or not small_int((<list>heads)[i], &head) or not 0 <= head < limit:
                break
            entry = area + HEADER_SIZE + STATE_SIZE * head
            put_u64(entry + COUNTER_OFF, counter)
            release_u8(entry, 1)
            if counter == U64_MAX:
                exhausted = True
            counter += 1
            i += 1
    finally:
        inflight.counter = start + i
    return i
