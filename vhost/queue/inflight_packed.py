"""In-flight request tracking for the packed ring (``QueueRegionPacked`` in vhost-user.rst).

Why the packed ring needs more than the split one: a used element is written over the ring slot
at the device's used position, which may hold a descriptor of a chain still in flight (chains
complete out of order).  After a crash the ring no longer says what those chains were, so the
region keeps a copy of every descriptor of every chain in flight.  Layout, per queue:

    u64 features; u16 version; u16 desc_num; u16 free_head; u16 old_free_head;
    u16 used_idx; u16 old_used_idx; u8 used_wrap_counter; u8 old_used_wrap_counter; u8 pad[7]
    (29 bytes, the C struct's alignment makes the entries start at 32)
    desc[desc_num] of 32 bytes: u8 inflight; u8 pad; u16 next; u16 last; u16 num;
                                u64 counter; u16 id; u16 flags; u32 len; u64 addr

and queue regions follow each other at a stride of ALIGN_UP(32 * desc_num + 32, 64) bytes (what
DPDK's vhost library uses for the same layout).  ``desc`` is a pool of entries linked into a free
list by ``next``; a chain in flight is ``num`` entries from its head entry along ``next`` to
``last``, each a copy of one ring descriptor; the head entry carries ``inflight`` and
``counter``.

Ordering (what :class:`PackedInflightQueue` does; ``old_*`` are the commit points):

* pop a chain of n descriptors: copy them into the entries from ``free_head`` on, advancing
  ``free_head``; then the head entry's ``num``, ``last``, ``counter`` and ``inflight = 1``; then
  ``old_free_head = free_head`` -- one 16-bit store commits the pop.  A crash before it leaves
  the chain available in the ring (the device had written nothing there) and recovery rolls
  ``free_head`` back: the chain is popped again, not resubmitted.
* publish a batch: push each completed chain's entries on the free list (``desc[last].next =
  free_head; free_head = head``), store the new ``used_idx`` and wrap counter, write the used
  elements into the ring (the first element's flags last: that store publishes the batch), clear
  the heads' ``inflight``, then ``old_free_head``, ``old_used_idx``, ``old_used_wrap_counter``.
  The pushes happen only at publication, so a pop between completing and publishing never reuses
  the entries of a chain whose completion the driver has not seen.
* recover: if (``used_idx``, wrap) differs from the old pair, read the ring descriptor at
  ``old_used_idx``: if its flags are no longer "available in lap ``old_used_wrap_counter``" the
  batch reached the driver, so it is committed (old = new); otherwise rolled back (new = old).
  Every entry on the free list is not in flight; the others whose ``inflight`` is 1 are
  resubmitted in counter order.

The device's ring position after a reconnect comes from here too: the used position is
(``old_used_idx``, wrap), and the avail position is that plus the descriptors of the chains in
flight (they occupy exactly the ring slots between the two).  QEMU 7.2 cannot tell us the
position after a crash (its GET_VRING_BASE failed, so the next SET_VRING_BASE is stale).

The area is the frontend's memory and hostile: :meth:`PackedInflightQueue.plan` validates every
field before anything is written, and counters are ordering keys only (renumbered 0..n-1 on
recovery, as the split tracker does).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vhost.compiled import optional_module
from vhost.queue import inflight
from vhost.queue.inflight import InflightError

HEADER = struct.Struct("<QHHHHHHBB7s")
HEADER_SIZE = inflight.PACKED_HEADER_SIZE
# inflight, pad, next, last, num, counter, id, flags, len, addr
ENTRY = struct.Struct("<BBHHHQHHIQ")
ENTRY_SIZE = inflight.PACKED_ENTRY_SIZE
VERSION = 1
NO_ENTRY = 0xFFFF

# u16 slots of the header (single 16-bit stores through a cast('H') view) and byte offsets
_VERSION = 4
_DESC_NUM = 5
_FREE_HEAD = 6
_OLD_FREE_HEAD = 7
_USED_IDX = 8
_OLD_USED_IDX = 9
_USED_WRAP = 20
_OLD_USED_WRAP = 21

# byte offsets inside an entry
_E_INFLIGHT = 0
_E_NEXT = 2
_E_LAST = 4
_E_NUM = 6
_E_COUNTER = 8
_E_DESC = 16  # id, flags, len, addr
_DESC_PART = struct.Struct("<HHIQ")
_HEAD_PART = struct.Struct("<HHQ")  # last, num, counter (at _E_LAST)

F_AVAIL = 1 << 7
F_USED = 1 << 15
#: A ring descriptor as the ring holds it (addr, len, id, flags): :meth:`popped_many`'s input.
RING_DESC = struct.Struct("<QIHH")

#: The compiled record of pops (:mod:`vhost.queue._packed_core`), when built and allowed.
COMPILED_MODULE = "vhost.queue._packed_core"

#: One ring descriptor as the region stores it: (addr, len, id, flags).
RawDesc = tuple[int, int, int, int]


def queue_stride(queue_size: int) -> int:
    """Bytes per queue region: header plus entries, rounded up to 64."""
    return inflight.queue_stride(queue_size, packed=True)


def area_size(num_queues: int, queue_size: int) -> int:
    return inflight.area_size(num_queues, queue_size, packed=True)


def tracker(area: inflight.InflightArea, index: int, ring_size: int) -> PackedInflightQueue:
    """The packed tracker of queue ``index`` in ``area`` (mapped for packed rings)."""
    if not area.packed:
        raise InflightError("the inflight area was made for split rings")
    return PackedInflightQueue(area.view(index, ring_size), ring_size)


@dataclass
class Recovery:
    """What a queue resumes from: its used position and wrap counter, and the chains to
    resubmit oldest first as (head entry, the chain's descriptors)."""

    used_idx: int
    used_wrap: int
    chains: list[tuple[int, list[RawDesc]]]
    fresh: bool

    @property
    def held(self) -> int:
        """Ring slots the resubmitted chains occupy (between the used and avail positions)."""
        return sum(len(descs) for _, descs in self.chains)


class PackedInflightQueue:
    """One queue's packed region: record pops and publications, plan recovery after a crash."""

    def __init__(self, view: memoryview, size: int) -> None:
        if view.nbytes < HEADER_SIZE + ENTRY_SIZE * size:
            raise InflightError(f"region of {view.nbytes} bytes for a ring of {size}")
        self._view = view
        self._h = view[:HEADER_SIZE].cast("H")
        self.size = size
        self.counter = 0
        self._batch: list[int] = []
        # Our own copies of the links we wrote: while the queue runs the region is only
        # written, never read back (the frontend could change it under us); recovery reads it.
        self._next = [i + 1 if i + 1 < size else NO_ENTRY for i in range(size)]
        self._last = [0] * size
        self._free_head = 0
        core = optional_module(COMPILED_MODULE)
        self._popped_compiled: (
            Callable[[PackedInflightQueue, bytes, list[int], list[int]], int] | None) = (
            None if core is None else core.popped_many)
        #: The compiled publishing and published, which do a plain batch or nothing.
        self._publishing_compiled: Callable[[PackedInflightQueue, int, int], bool] | None = (
            None if core is None else core.publishing)
        self._published_compiled: Callable[[PackedInflightQueue], bool] | None = (
            None if core is None else core.published)

    # ------------------------------------------------------------------ recovery
    def plan(self, ring_flags: Callable[[int], int]) -> Recovery:
        """Validate the region and say what to resume from, writing nothing (InflightError).

        ``ring_flags(i)``: the flags of ring descriptor ``i`` as guest memory holds them now
        (the commit test of a publication cut short).  Checked: version 0 or 1, features 0,
        ``desc_num`` the ring size, the heads and positions in range, wrap counters 0/1, the
        padding zero; the free list in range without a loop; each entry's ``inflight`` 0/1;
        each chain in flight 1..size entries long along ``next`` to its ``last``, sharing no
        entry with the free list or another chain; every entry free or in a chain.
        """
        v = self._view
        h = self._h
        size = self.size
        version = h[_VERSION]
        if version == 0:
            return Recovery(0, 1, [], True)
        features, version, desc_num, free_head, old_free, used, old_used, wrap, old_wrap, pad = (
            HEADER.unpack_from(v, 0))
        if version != VERSION:
            raise InflightError(f"packed inflight region version {version}, we know {VERSION}")
        if features:
            raise InflightError(f"packed inflight region features {features:#x}; none defined")
        if desc_num != size:
            raise InflightError(f"packed inflight region of {desc_num} entries, ring of {size}")
        if any(pad) or any(v[29:HEADER_SIZE]):
            raise InflightError("packed inflight region header padding is not zero")
        for name, value in (("free_head", free_head), ("old_free_head", old_free),
                            ("used_idx", used), ("old_used_idx", old_used)):
            # (the free list is empty -- NO_ENTRY -- while chains hold every entry)
            if value >= size and not (value == NO_ENTRY and name.endswith("free_head")):
                raise InflightError(f"packed inflight region {name} {value} >= ring size {size}")
        if wrap > 1 or old_wrap > 1:
            raise InflightError(f"packed inflight wrap counters {wrap}/{old_wrap} (want 0/1)")
        entries = [ENTRY.unpack_from(v, HEADER_SIZE + i * ENTRY_SIZE) for i in range(size)]
        for i, e in enumerate(entries):
            if e[0] > 1 or e[1] or (e[2] >= size and e[2] != NO_ENTRY):
                raise InflightError(f"packed inflight entry {i}: in flight {e[0]}, padding "
                                    f"{e[1]}, next {e[2]} (want 0/1, 0, an entry)")
        if (used, wrap) != (old_used, old_wrap):
            # A publication was cut short: did its first used element reach the ring?
            flags = ring_flags(old_used)
            avail_flags = F_AVAIL if old_wrap else F_USED
            if flags & (F_AVAIL | F_USED) != avail_flags:
                old_free, old_used, old_wrap = free_head, used, wrap
        free: set[int] = set()
        node = old_free
        while node != NO_ENTRY:
            if node in free:
                raise InflightError(f"packed inflight free list loops at entry {node}")
            free.add(node)
            node = entries[node][2]
        heads = sorted((e[5], i) for i, e in enumerate(entries) if e[0] and i not in free)
        taken: set[int] = set()
        chains: list[tuple[int, list[RawDesc]]] = []
        for _, head in heads:
            num, last = entries[head][4], entries[head][3]
            if not 1 <= num <= size or last >= size:
                raise InflightError(f"packed inflight head entry {head}: num {num}, last {last}")
            descs: list[RawDesc] = []
            node = head
            for k in range(num):
                if node >= size or node in free or node in taken:
                    raise InflightError(f"packed inflight chain at entry {head}: entry {node} "
                                        "is out of range, free or in another chain")
                taken.add(node)
                e = entries[node]
                descs.append((e[9], e[8], e[6], e[7]))
                if k + 1 < num:
                    node = e[2]
            if node != last:
                raise InflightError(f"packed inflight chain at entry {head} ends at {node}, "
                                    f"not at its last entry {last}")
            chains.append((head, descs))
        if len(free) + len(taken) != size:
            # Every entry is free or holds a descriptor of a chain in flight (the chains take
            # the ring slots from the used position on, the free list has one entry for each
            # other slot).  An entry in neither would never come back: a pop would find the free
            # list empty with ring slots still free, and fail in the middle of taking a chain.
            raise InflightError(f"packed inflight region: {size - len(free) - len(taken)} "
                                "entries neither free nor in flight")
        return Recovery(old_used, old_wrap, chains, False)

    def recover(self, ring_flags: Callable[[int], int], used_idx: int, used_wrap: int) -> Recovery:
        """Plan (see :meth:`plan`), then make the region match it: a fresh region (version 0)
        is initialised at the position ``used_idx``/``used_wrap`` the queue starts from;
        otherwise the cut-short update is committed or rolled back, the free list's
        ``inflight`` bits cleared and the resubmitted heads' counters renumbered 0..n-1."""
        rec = self.plan(ring_flags)
        v = self._view
        h = self._h
        size = self.size
        if rec.fresh:
            v[:] = bytes(v.nbytes)
            for i in range(size):
                struct.pack_into("<H", v, HEADER_SIZE + i * ENTRY_SIZE + _E_NEXT,
                                 i + 1 if i + 1 < size else NO_ENTRY)
            h[_DESC_NUM] = size
            h[_USED_IDX] = h[_OLD_USED_IDX] = used_idx
            v[_USED_WRAP] = v[_OLD_USED_WRAP] = used_wrap
            h[_FREE_HEAD] = h[_OLD_FREE_HEAD] = 0
            h[_VERSION] = VERSION
            self.counter = 0
            self._next = [i + 1 if i + 1 < size else NO_ENTRY for i in range(size)]
            self._free_head = 0
            return Recovery(used_idx, used_wrap, [], True)
        if (h[_USED_IDX], v[_USED_WRAP]) != (h[_OLD_USED_IDX], v[_OLD_USED_WRAP]) and (
                rec.used_idx, rec.used_wrap) == (h[_USED_IDX], v[_USED_WRAP]):
            h[_OLD_FREE_HEAD] = h[_FREE_HEAD]  # the batch reached the driver: commit it
            h[_OLD_USED_IDX] = h[_USED_IDX]
            v[_OLD_USED_WRAP] = v[_USED_WRAP]
        # Roll back whatever is newer than the commit point.
        h[_FREE_HEAD] = h[_OLD_FREE_HEAD]
        h[_USED_IDX] = h[_OLD_USED_IDX]
        v[_USED_WRAP] = v[_OLD_USED_WRAP]
        node = h[_FREE_HEAD]
        while node != NO_ENTRY:  # walked without a loop by plan()
            v[HEADER_SIZE + node * ENTRY_SIZE + _E_INFLIGHT] = 0
            node = struct.unpack_from("<H", v, HEADER_SIZE + node * ENTRY_SIZE + _E_NEXT)[0]
        for counter, (head, _) in enumerate(rec.chains):
            struct.pack_into("<Q", v, HEADER_SIZE + head * ENTRY_SIZE + _E_COUNTER, counter)
        self.counter = len(rec.chains)
        self._next = [struct.unpack_from("<H", v, HEADER_SIZE + i * ENTRY_SIZE + _E_NEXT)[0]
                      for i in range(size)]
        self._last = [struct.unpack_from("<H", v, HEADER_SIZE + i * ENTRY_SIZE + _E_LAST)[0]
                      for i in range(size)]
        self._free_head = h[_FREE_HEAD]
        self._batch.clear()
        return rec

    # ------------------------------------------------------------------ hot path
    def popped(self, descs: list[RawDesc]) -> int:
        """Record a chain the device took (its ring descriptors in order); its head entry."""
        v = self._view
        h = self._h
        nxt = self._next
        head = node = self._free_head
        last = head
        for addr, length, buf_id, flags in descs:
            if node == NO_ENTRY:  # the queue never holds more descriptors than the ring
                raise InflightError("packed inflight free list ran out")
            _DESC_PART.pack_into(v, HEADER_SIZE + node * ENTRY_SIZE + _E_DESC, buf_id, flags,
                                 length, addr)
            last = node
            node = nxt[node]
        self._free_head = h[_FREE_HEAD] = node
        self._last[head] = last
        off = HEADER_SIZE + head * ENTRY_SIZE
        _HEAD_PART.pack_into(v, off + _E_LAST, last, len(descs), self.counter)
        self.counter += 1
        v[off + _E_INFLIGHT] = 1
        h[_OLD_FREE_HEAD] = node  # the commit point of the pop
        return head

    def popped_many(self, ring: bytes, counts: Sequence[int], out: list[int]) -> None:
        """:meth:`popped` for each chain of a pass, in order: ``ring`` holds their ring
        descriptors back to back in the ring's own format (:data:`RING_DESC`), ``counts`` how
        many each chain has; each chain's head entry is appended to ``out`` once it is recorded
        (so a caller meeting the InflightError knows which were).  The compiled one
        (:func:`vhost.queue._packed_core.popped_many`), where it runs, records the plain chains
        and this loop whatever it left."""
        done = 0
        compiled = self._popped_compiled
        if compiled is not None and isinstance(counts, list):
            done = compiled(self, ring, counts, out)
            if done == len(counts):
                return
        off = RING_DESC.size * sum(counts[:done])
        for count in counts[done:]:
            end = off + RING_DESC.size * count
            out.append(self.popped(list(RING_DESC.iter_unpack(ring[off:end]))))
            off = end

    def compiled_view(self) -> tuple[memoryview, list[int], list[int], list[int]]:
        """What the compiled code (:mod:`vhost.queue._packed_core`) updates in place of
        :meth:`popped` and :meth:`used`: this queue's region of the area (it takes a slice per
        call, so :meth:`release` works as before), the tracker's own copies of the links,
        ``next`` and ``last`` per entry, and the batch of completed heads (it appends to it as
        :meth:`used` does).  It reads and moves :attr:`counter` and the free list's head
        itself."""
        return self._view, self._next, self._last, self._batch

    def used(self, head: int) -> None:
        """The chain at entry ``head`` is completed (published with the next batch)."""
        self._batch.append(head)

    def publishing(self, used_idx: int, used_wrap: int) -> None:
        """Before the ring is written: the batch's entries back on the free list, the new
        used position stored (not committed: ``old_*`` still hold the previous one).  The
        compiled one (:func:`vhost.queue._packed_core.publishing`) does a plain batch, else
        this code."""
        compiled = self._publishing_compiled
        if compiled is not None and compiled(self, used_idx, used_wrap):
            return
        v = self._view
        h = self._h
        nxt = self._next
        for head in self._batch:
            last = self._last[head]
            nxt[last] = self._free_head
            struct.pack_into("<H", v, HEADER_SIZE + last * ENTRY_SIZE + _E_NEXT, nxt[last])
            self._free_head = h[_FREE_HEAD] = head
        h[_USED_IDX] = used_idx
        v[_USED_WRAP] = used_wrap

    def published(self) -> None:
        """The batch is visible in the ring: clear its heads' bits, then commit (the compiled
        :func:`vhost.queue._packed_core.published` where it runs, for a plain batch)."""
        compiled = self._published_compiled
        if compiled is not None and compiled(self):
            return
        v = self._view
        h = self._h
        for head in self._batch:
            v[HEADER_SIZE + head * ENTRY_SIZE + _E_INFLIGHT] = 0
        self._batch.clear()
        h[_OLD_FREE_HEAD] = self._free_head
        h[_OLD_USED_IDX] = h[_USED_IDX]
        v[_OLD_USED_WRAP] = v[_USED_WRAP]

    def in_flight(self) -> list[int]:
        """Head entries marked in flight (for tests and diagnostics)."""
        v = self._view
        return [i for i in range(self.size) if v[HEADER_SIZE + i * ENTRY_SIZE]]

    def release(self) -> None:
        self._h.release()
        self._view.release()
