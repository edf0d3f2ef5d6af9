"""In-flight request tracking in shared memory (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), split ring.

The frontend keeps a memfd we filled for it (GET_INFLIGHT_FD) and hands it back on every start
(SET_INFLIGHT_FD), including to a restarted backend.  Per queue it records which heads were popped
and not completed, in pop order, so a backend that crashed can resubmit exactly those requests:
none lost (they were never completed) and none done twice (a completion that reached the used
ring is recognised by ``used_idx``).  Layout, per queue (``QueueRegionSplit`` in vhost-user.rst):

    u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
    desc[desc_num] of 16 bytes: u8 inflight; u8 pad[5]; u16 next; u64 counter

and queue regions follow each other at a stride of ALIGN_UP(16 * desc_num + 16, 64) bytes.

Ordering, split ring, one batch at a time (what :class:`InflightQueue` does):
* pop head i: ``desc[i].counter = counter++``, then ``desc[i].inflight = 1``;
* complete a batch: for each head, ``desc[i].next = last_batch_head; last_batch_head = i``; publish
  used.idx; clear each ``inflight``; then ``used_idx = used.idx``.  A crash between publishing
  used.idx and updating ``used_idx`` leaves ``used.idx - used_idx`` heads on the batch list whose
  ``inflight`` bits are stale; recovery clears them first.

The area is the frontend's memory and as hostile as the rings: recovery validates every field
before it writes anything (:meth:`InflightQueue.recover`), and takes counters as ordering keys
only, renumbering the heads it resubmits from 0 (not continuing from the largest counter, which
may be 2**64 - 1).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from vhost.compiled import optional_module
from vhost.fdkinds import FdKindError, check_mappable

log = logging.getLogger(__name__)

HEADER = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
HEADER_SIZE = 16
DESC_STATE = struct.Struct("<B5xHQ")  # inflight, pad, next, counter
DESC_CHECK = struct.Struct("<B5sHQ")  # the same with the padding, to check it is zero
DESC_STATE_SIZE = 16
VERSION = 1
NO_HEAD = 0xFFFF
#: The compiled used side (:mod:`vhost.queue._split_core`), when built and allowed.
COMPILED_MODULE = "vhost.queue._split_core"

# u16 slots of the header, for single 16-bit stores through a cast('H') view
_VERSION_SLOT = 4
_DESC_NUM_SLOT = 5
_LAST_BATCH_SLOT = 6
_USED_IDX_SLOT = 7


class InflightError(Exception):
    """The shared area is unusable (wrong size or kind of fd, a field we did not write)."""


#: A packed ring's region (``QueueRegionPacked``, :mod:`vhost.queue.inflight_packed`): a
#: 32-byte header and 32-byte entries.
PACKED_HEADER_SIZE = 32
PACKED_ENTRY_SIZE = 32


def queue_stride(queue_size: int, packed: bool = False) -> int:
    """Bytes per queue region: header plus states, rounded up to 64."""
    if packed:
        return (PACKED_ENTRY_SIZE * queue_size + PACKED_HEADER_SIZE + 63) & ~63
    return (DESC_STATE_SIZE * queue_size + HEADER_SIZE + 63) & ~63


def area_size(num_queues: int, queue_size: int, packed: bool = False) -> int:
    return num_queues * queue_stride(queue_size, packed)


def create_area(num_queues: int, queue_size: int, packed: bool = False) -> tuple[int, int]:
    """A zero-filled memfd for GET_INFLIGHT_FD: (fd, size).  The caller owns the fd.

    ``packed``: the features acked before GET_INFLIGHT_FD (QEMU sets them first) include
    VIRTIO_F_RING_PACKED, whose regions are larger.
    """
    size = area_size(num_queues, queue_size, packed)
    fd = os.memfd_create("vhost-inflight", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd, size


@dataclass
class InflightArea:
    """The whole shared area as mapped from SET_INFLIGHT_FD."""

    mapping: mmap.mmap
    num_queues: int
    queue_size: int
    #: Regions of the packed layout (:meth:`view` gives one to a ``PackedInflightQueue``).
    packed: bool = False

    @classmethod
    def map(cls, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
            queue_size: int, packed: bool = False) -> InflightArea:
        """Map the part of ``fd`` the queues use; InflightError for anything that does not fit.

        Only the bytes the queues need are mapped, not all of ``mmap_size``: the frontend may
        announce any size, and a size beyond what we use buys nothing but address space.
        """
        if not num_queues or not queue_size or queue_size & (queue_size - 1):
            raise InflightError(f"{num_queues} queues of size {queue_size}")
        need = area_size(num_queues, queue_size, packed)
        if mmap_size < need:
            raise InflightError(f"area of {mmap_size} bytes, {need} needed for {num_queues} "
                                f"queues of {queue_size}")
        gran = mmap.ALLOCATIONGRANULARITY
        if mmap_offset % gran:
            raise InflightError(f"mmap offset {mmap_offset:#x} is not page aligned")
        try:
            # A memfd (regular file) with the whole announced range inside it: an eventfd, a
            # device or a range past 2**64 or past the end of the file is refused here.
            check_mappable(fd, mmap_offset, mmap_size, "inflight area")
        except FdKindError as exc:
            raise InflightError(str(exc)) from None
        try:
            mapping = mmap.mmap(fd, need, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=mmap_offset)
        except (OSError, ValueError, OverflowError) as exc:
            raise InflightError(f"cannot map the inflight area: {exc}") from exc
        return cls(mapping, num_queues, queue_size, packed)

    def queue(self, index: int, ring_size: int) -> InflightQueue:
        """The split tracker of queue ``index``, whose ring has ``ring_size`` entries."""
        if self.packed:
            raise InflightError("the inflight area was made for packed rings")
        return InflightQueue(self.view(index, ring_size), ring_size)

    def view(self, index: int, ring_size: int) -> memoryview:
        """The region of queue ``index`` (of either layout), whose ring has ``ring_size``
        entries."""
        if index >= self.num_queues:
            raise InflightError(f"queue {index} is beyond the {self.num_queues} in the area")
        if ring_size != self.queue_size:
            raise InflightError(f"ring of {ring_size} entries, area made for {self.queue_size}")
        stride = queue_stride(self.queue_size, self.packed)
        return memoryview(self.mapping)[index * stride : (index + 1) * stride]

    def close(self) -> None:
        try:
            self.mapping.close()
        except BufferError:  # a queue still views it; unmapped with the last view
            log.debug("inflight area still in use; unmapped when released")


class InflightQueue:
    """One queue's region: mark pops and completions, and say what to resubmit after a crash."""

    def __init__(self, view: memoryview, size: int) -> None:
        self._view = view
        self._h = view[:HEADER_SIZE].cast("H")
        self.size = size
        self.counter = 0
        self._batch: list[int] = []
        core = optional_module(COMPILED_MODULE)
        self._popped_compiled: Callable[[InflightQueue, list[int]], int] | None = (
            None if core is None else core.popped_many)

    # ------------------------------------------------------------------ start / recovery
    def check(self, used_idx: int) -> None:
        """Validate the region against the used ring's idx, changing nothing (InflightError).

        The control process calls this before it spawns a queue process, so a bad region is
        refused there, with one log line, and no process is started for nothing; the queue
        process's :meth:`recover` validates again (the area is shared with the frontend).
        """
        self._plan(used_idx)

    def recover(self, used_idx: int) -> list[int]:
        """Heads to resubmit (oldest first), given the used ring's idx now.

        A fresh region (version 0) is initialised and nothing is resubmitted.  Otherwise the
        whole region is validated first (:meth:`_plan`); then the last batch's stale bits are
        cleared and every head still marked in flight comes back.

        Counters are ordering keys and nothing more.  The area is the frontend's memory, so a
        counter may hold any 64-bit value -- 2**64 - 1 included -- and continuing from the
        largest one plus one would overflow the field.  So the resubmitted heads are sorted by
        (counter, head) and renumbered 0..n-1 in that order, here, in the area, and new pops
        continue from n: the order a later recovery sees is the same (the resubmitted ones
        first, oldest first, then the new ones), and a counter stays below the number of pops
        since the last recovery plus the queue size, far from 2**64.
        """
        fresh, stale, pending = self._plan(used_idx)
        h = self._h
        if fresh:
            self._view[:] = bytes(self._view.nbytes)
            h[_DESC_NUM_SLOT] = self.size
            h[_LAST_BATCH_SLOT] = NO_HEAD
            h[_USED_IDX_SLOT] = used_idx
            h[_VERSION_SLOT] = VERSION
            self.counter = 0
            return []
        for head in stale:
            # The last batch reached the used ring but its bits were not cleared: clear them.
            self._set_inflight(head, 0)
        h[_USED_IDX_SLOT] = used_idx
        for counter, head in enumerate(pending):
            struct.pack_into("<Q", self._view, head * DESC_STATE_SIZE + HEADER_SIZE + 8, counter)
        self.counter = len(pending)
        if pending:
            log.info("inflight: %d requests to resubmit", len(pending))
        return pending

    def _plan(self, used_idx: int) -> tuple[bool, list[int], list[int]]:
        """(fresh, heads of the last batch to clear, heads to resubmit oldest first).

        Every field is checked against what this module writes, and anything else refused with
        InflightError: ``features`` 0 (none are defined), ``version`` 0 or 1, ``desc_num`` the
        ring's size, ``last_batch_head`` a head or NO_HEAD, ``used_idx`` at most a queue size
        behind the used ring, the last batch's list of heads as long as the part of it the
        used ring published (no loop, no end before it); per entry ``inflight`` 0 or 1, the
        padding zero, ``next`` a head or NO_HEAD.  ``counter`` may be anything (see
        :meth:`recover`).  Read only: nothing is written until all of it passed.
        """
        h = self._h
        size = self.size
        version = h[_VERSION_SLOT]
        if version == 0:
            return True, [], []
        if version != VERSION:
            raise InflightError(f"inflight region version {version}, we know {VERSION}")
        features = HEADER.unpack_from(self._view, 0)[0]
        if features:
            raise InflightError(f"inflight region features {features:#x}; none are defined")
        if h[_DESC_NUM_SLOT] != size:
            raise InflightError(f"inflight region of {h[_DESC_NUM_SLOT]} entries for a ring of "
                                f"{size}")
        last = h[_LAST_BATCH_SLOT]
        if last >= size and last != NO_HEAD:
            raise InflightError(f"inflight region last batch head {last} >= queue size {size}")
        states = [DESC_CHECK.unpack_from(self._view, HEADER_SIZE + i * DESC_STATE_SIZE)
                  for i in range(size)]
        for i, (flag, pad, nxt, _) in enumerate(states):
            if flag > 1 or any(pad) or (nxt >= size and nxt != NO_HEAD):
                raise InflightError(f"inflight region entry {i}: in flight {flag}, padding "
                                    f"{pad.hex()}, next {nxt} (want 0/1, zeros, a head)")
        stale = (used_idx - h[_USED_IDX_SLOT]) & 0xFFFF
        if stale > size:
            raise InflightError(f"used.idx {used_idx} is {stale} past the tracked "
                                f"{h[_USED_IDX_SLOT]}")
        batch: list[int] = []
        cleared: set[int] = set()
        head = last
        while len(batch) < stale:
            if head == NO_HEAD:
                raise InflightError(f"the last batch lists {len(batch)} heads; the used ring "
                                    f"published {stale}")
            if head in cleared:
                raise InflightError(f"the last batch's list of heads loops at head {head}")
            batch.append(head)
            cleared.add(head)
            head = states[head][2]
        pending = sorted((counter, i) for i, (flag, _, _, counter) in enumerate(states)
                         if flag and i not in cleared)
        return False, batch, [i for _, i in pending]

    # ------------------------------------------------------------------ hot path
    def popped(self, head: int) -> None:
        off = head * DESC_STATE_SIZE + HEADER_SIZE
        struct.pack_into("<Q", self._view, off + 8, self.counter)
        self.counter += 1
        self._view[off] = 1

    def popped_many(self, heads: list[int]) -> None:
        """:meth:`popped` for each of ``heads``, in order: one call for a pass's claims (the
        compiled one, :func:`vhost.queue._split_core.popped_many`, where it runs; it does the
        plain heads and this loop whatever it left)."""
        done = 0
        compiled = self._popped_compiled
        if compiled is not None:
            done = compiled(self, heads)
            if done == len(heads):
                return
        for head in heads[done:]:
            self.popped(head)

    def compiled_view(self) -> tuple[memoryview, list[int]]:
        """What the compiled used side (:mod:`vhost.queue._split_core`) updates in place of
        :meth:`used` and :meth:`popped`: this queue's region of the area (it takes a slice per
        call, so :meth:`release` works as before) and the list of the heads of the batch not yet
        :meth:`published` (it appends to it as :meth:`used` does).  It reads and moves
        :attr:`counter` itself."""
        return self._view, self._batch

    def used(self, head: int) -> None:
        """``head`` is in the used ring (not yet published): link it into the batch."""
        h = self._h
        struct.pack_into("<H", self._view, head * DESC_STATE_SIZE + HEADER_SIZE + 6,
                         h[_LAST_BATCH_SLOT])
        h[_LAST_BATCH_SLOT] = head
        self._batch.append(head)

    def published(self, used_idx: int) -> None:
        """The batch is visible in used.idx: clear its bits, then record the new idx."""
        view = self._view
        for head in self._batch:
            view[head * DESC_STATE_SIZE + HEADER_SIZE] = 0
        self._batch.clear()
        self._h[_USED_IDX_SLOT] = used_idx

    # ------------------------------------------------------------------ helpers
    def _state(self, head: int) -> tuple[int, int, int]:
        return DESC_STATE.unpack_from(self._view, head * DESC_STATE_SIZE + HEADER_SIZE)

    def _set_inflight(self, head: int, value: int) -> None:
        self._view[head * DESC_STATE_SIZE + HEADER_SIZE] = value

    def in_flight(self) -> list[int]:
        return [i for i in range(self.size) if self._state(i)[0]]

    def release(self) -> None:
        self._h.release()
        self._view.release()
