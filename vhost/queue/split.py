"""The split virtqueue (virtio 1.x, 2.7), sans-IO: ring state, descriptor chains, used ring, events.

:class:`SplitQueue` (the split layout of :class:`vhost.queue.base.Queue`) owns one queue's ring
state and reads/writes the rings in guest memory through memoryviews made once when the queue
starts.  It does no IO of its own: the worker decides when to pop, the device decides what a chain
means, and :meth:`SplitQueue.publish_used` says whether the driver wants an interrupt -- the
caller writes the call eventfd.  That keeps every ring rule testable with a bytearray for guest
memory.

Two pops share one statement of the ring rules (:meth:`SplitQueue._pending`,
:meth:`SplitQueue._walk`): the generic
:meth:`SplitQueue.pop_batch`, and :meth:`SplitQueue.peek_simple`, the bounded look the device's
fast path takes requests in Linux's shape with, claimed by :meth:`SplitQueue.claim`.

The guest is hostile.  Everything read from the rings is validated before use and a violation
raises :class:`QueueError`; the worker then stops this queue with a log line (the device is
"broken" until the driver resets it, as QEMU's ``virtio_error`` does).  Checks, in the order a
request meets them: avail.idx running more than a queue size ahead; head >= queue size; a head
already in flight; ``next`` >= table size; chains longer than the table (loops); indirect tables
with length 0 / not a multiple of 16 / nested / with NEXT / not negotiated; a readable descriptor
after a writable one; a chain of 2**32 bytes or more; a buffer not wholly inside guest memory.

Memory ordering: x86 keeps stores in order and loads in order, so the only fence we need is
store->load, in two places (publishing used.idx then reading used_event; publishing avail_event
then re-reading avail.idx).  Acquiring an uncontended ``threading.Lock`` is a locked instruction,
a full fence.  Ring indices are stored with one 16-bit store through a ``cast('H')`` memoryview:
``struct.pack_into`` writes byte by byte and the driver could see a torn index.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Generator
from functools import partial
from typing import TYPE_CHECKING, NoReturn

from guestmem import AccessError, GuestMemory, GuestRegion
from guestmem.dirty_log import DirtyMarker
from vhost.compiled import optional_module
from vhost.messages import VirtioFeature
from vhost.queue.base import (
    CHAIN_HEAD,
    CHAIN_TOKEN,
    MAX_CHAIN_BYTES,
    PASS_AGAIN,
    PASS_CALL,
    PASS_QUIET,
    DescriptorChain,
    QueueError,
    RingAddresses,
    SimpleChain,
    full_fence,
)
from vhost.queue.inflight import COMPILED_MODULE, InflightError, InflightQueue

if TYPE_CHECKING:
    from vhost.queue._split_core import UsedRing

log = logging.getLogger(__name__)

DESC = struct.Struct("<QIHH")
DESC_SIZE = 16
USED_ELEM = struct.Struct("<II")

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

_unpack_desc = DESC.unpack_from
_NEXT_WRITE = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE

MAX_QUEUE_SIZE = 32768
#: An indirect table holds at most a queue's worth of descriptors.
MAX_INDIRECT_BYTES = MAX_QUEUE_SIZE * DESC_SIZE


class _NotSimple(Exception):
    """The chain has more descriptors than :meth:`SplitQueue.peek_simple` may take."""


def validate_size(size: int) -> None:
    """A split queue size must be a power of two in 1..32768 (virtio 2.7)."""
    if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
        raise QueueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of (descriptor table, avail ring, used ring) including the event fields."""
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


#: Alignment virtio 2.7 requires of (descriptor table, avail ring, used ring), in guest
#: physical addresses.
RING_ALIGNMENT = (16, 2, 4)
RING_PARTS = ("descriptor table", "avail ring", "used ring")


def check_ring_alignment(addresses: RingAddresses) -> None:
    """QueueError unless each ring part's guest physical address is aligned as virtio requires."""
    for name, gpa, align in zip(
        RING_PARTS, (addresses.desc, addresses.avail, addresses.used), RING_ALIGNMENT, strict=True
    ):
        if gpa % align:
            raise QueueError(f"{name} at {gpa:#x} is not {align}-byte aligned")


class SplitQueue:
    """One split virtqueue: the :class:`vhost.queue.base.Queue` of the split layout."""

    layout = "split"

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        addresses: RingAddresses,
        features: int,
        next_avail: int = 0,
        next_used: int | None = None,
        index: int = 0,
        inflight: InflightQueue | None = None,
    ) -> None:
        validate_size(size)
        self.index = index
        self.memory = memory
        self.size = size
        self.addresses = addresses
        self.event_idx = bool(features & VirtioFeature.RING_EVENT_IDX)
        self.indirect = bool(features & VirtioFeature.RING_INDIRECT_DESC)
        check_ring_alignment(addresses)
        views = []
        for name, gpa, length in zip(
            RING_PARTS, (addresses.desc, addresses.avail, addresses.used), ring_sizes(size),
            strict=True,
        ):
            try:
                views.append(memory.view(gpa, length, for_write=name == "used ring"))
            except AccessError as exc:
                raise QueueError(f"{name} at {gpa:#x}+{length:#x}: {exc}") from exc
        self._desc = views[0]
        self._avail = views[1].cast("H")
        self._used_bytes = views[2]
        self._used = views[2].cast("H")
        self._mask = size - 1
        self._used_event_slot = 2 + size  # in avail, as u16 index
        self._avail_event_slot = 2 + 4 * size  # in used, as u16 index
        self.next_avail = next_avail & 0xFFFF
        # The used index the device publishes next; it starts from what the ring says (a queue
        # restarted after GET_VRING_BASE continues where it was).
        self.next_used = (self._used[1] if next_used is None else next_used) & 0xFFFF
        self._published_used = self.next_used
        self._signalled_used: int | None = None
        self._in_flight = bytearray(size)
        self.in_flight_count = 0
        self.broken = False
        self.error: QueueError | None = None
        # Live migration: while the frontend logs dirty pages, the marker of this queue (set and
        # cleared by the control thread with one store; None costs the hot path one check) and
        # the guest address the used ring is logged at (VHOST_VRING_F_LOG's log_guest_addr).
        self.dirty: DirtyMarker | None = None
        # The region the last piece of a chain lay in (see _walk), and the memory table it is
        # from: a new table forgets it.
        self._regions: tuple[GuestRegion, ...] = ()
        self._region: GuestRegion | None = None
        self._lo = self._hi = 0
        self.used_log_addr = addresses.used
        # Crash recovery (INFLIGHT_SHMFD): heads a previous backend popped and never completed
        # come back first, oldest first; the avail ring continues after all of them.
        #: The in-flight area of this queue (crash recovery), if the frontend gave one.
        #: (Plain attributes, this and :attr:`replay_pending`, not properties: the compiled
        #: fast path reads them in every pass, and a property is a Python call from C.)
        self.inflight_area: InflightQueue | None = inflight
        self._replay: list[int] = []
        #: Heads from before a restart are still to be resubmitted (they come first): whether
        #: ``_replay`` is not empty, set wherever it changes.
        self.replay_pending = False
        if inflight is not None:
            try:
                self._replay = inflight.recover(self._used[1])
            except InflightError as exc:
                raise QueueError(f"inflight area: {exc}") from exc
            self.replay_pending = bool(self._replay)
            if self._replay:
                self.next_avail = (self._used[1] + len(self._replay)) & 0xFFFF
                log.info("queue %d: resubmitting %d requests from before the restart; avail "
                         "continues at %d", index, len(self._replay), self.next_avail)
        # The compiled used side (vhost.queue._split_core) where it was built and the
        # environment allows it (vhost.compiled); None: the Python loop does every entry.
        self._used_core: UsedRing | None = None
        core = optional_module(COMPILED_MODULE)
        if core is not None:
            try:
                self._used_core = core.UsedRing(self)
            except ValueError as exc:  # (not for a queue this class made) the Python loop
                log.debug("queue %d: the Python used side runs: %s", index, exc)

    def ring_state(self) -> dict[str, int]:
        """Where this queue is, for a diagnostics query from another thread (reads only).

        ``last_avail_idx``: the next avail entry the device takes; ``used_idx``: the used index
        it last published; ``in_flight``: chains popped and not completed; ``guest_avail_idx``
        and ``guest_used_idx``: the two indices as guest memory holds them now.  After a
        migration, a destination whose ``last_avail_idx`` differs from the source's final one,
        or a ``guest_used_idx`` that is not ``used_idx``, shows where completions went wrong.
        ValueError once the queue is released (it stopped meanwhile).
        """
        return {"last_avail_idx": self.next_avail, "used_idx": self._published_used,
                "in_flight": self.in_flight_count, "guest_avail_idx": int(self._avail[1]),
                "guest_used_idx": int(self._used[1]), "size": self.size,
                "broken": int(self.broken)}

    # ------------------------------------------------------------------ avail side
    def avail_idx(self) -> int:
        return self._avail[1]

    def has_avail(self) -> bool:
        """The driver made a chain available that was not popped yet."""
        return self._avail[1] != self.next_avail

    def vring_base(self) -> int:
        """GET_VRING_BASE's value: the next avail index."""
        return self.next_avail

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None; raises QueueError on a ring violation."""
        chains = self.pop_batch(1)
        if self.error is not None and not chains:
            raise self.error
        return chains[0] if chains else None

    def pop_batch(self, limit: int | None = None) -> list[DescriptorChain]:
        """Every chain the driver has made available (up to ``limit``), in ring order.

        A ring violation marks the queue broken and records :attr:`error`; the chains popped
        before it are still returned (they are in flight and must be completed), nothing after.
        """
        if self.broken:
            return []
        if self._avail[1] == self.next_avail and not self._replay:
            # The common case after the fast path took every chain: one load, no list.
            return []
        out: list[DescriptorChain] = []
        if self._replay:
            self._pop_replay(out)
            if self.broken:
                return out
        try:
            pending = self._pending()
            if limit is not None and pending > limit:
                pending = limit
            avail = self._avail
            mask = self._mask
            for _ in range(pending):
                out.append(self._take(avail[2 + (self.next_avail & mask)], "avail ring"))
                self.next_avail = (self.next_avail + 1) & 0xFFFF
        except QueueError as exc:
            self.broken = True
            self.error = exc
        return out

    def _pop_replay(self, out: list[DescriptorChain]) -> None:
        """Chains of the heads to resubmit, validated like new ones (their memory may differ).

        Their in-flight entries are left as recovery renumbered them: marking them popped
        again would give them newer counters than the heads still waiting here, and a crash
        in between would then resubmit them out of order.

        Once all are handed over, one line says how many: the count operators and the kill -9
        tests read to know that recovery resubmitted something (and not only that it meant to).
        """
        start = len(out)
        try:
            while self._replay:
                out.append(self._take(self._replay.pop(0), "inflight area", tracked=True))
        except QueueError as exc:
            self.broken = True
            self.error = exc
            return
        finally:
            self.replay_pending = bool(self._replay)
        log.info("queue %d: resubmitted %d in-flight requests", self.index, len(out) - start)

    def _take(self, head: int, source: str, tracked: bool = False) -> DescriptorChain:
        """Validate ``head`` (from ``source``) and its chain, and mark it in flight (in the
        in-flight area too, unless ``tracked``: it is marked there already).

        A chain in Linux's shape is walked by :meth:`_simple`, the walker the fast path's
        :meth:`peek_simple` uses; any other by :meth:`_walk`, which reports what is wrong."""
        simple = self._simple(head, MAX_QUEUE_SIZE)
        if simple is not None:
            _, hdr, hdr_len, data, data_len, into_guest, status, status_len, _, _ = simple
            header = [(hdr, hdr_len)]
            trailer = [(status, status_len)]
            if into_guest:
                readable, writable = header, data + trailer
                rlen, wlen = hdr_len, data_len + status_len
            else:
                readable, writable = header + data, trailer
                rlen, wlen = hdr_len + data_len, status_len
        else:
            readable, writable, rlen, wlen, _ = self._walk(head, MAX_QUEUE_SIZE, source)
        self._in_flight[head] = 1
        self.in_flight_count += 1
        if self.inflight_area is not None and not tracked:
            self.inflight_area.popped(head)
        return DescriptorChain(head, readable, writable, rlen, wlen)

    def compiled_view(self) -> tuple[memoryview, memoryview, bytearray, int, bool]:
        """What a compiled walker of this ring (:mod:`virtio_blk._fastpath_core`) reads and
        updates: the descriptor table and avail ring views, the in-flight flags (one byte per
        head, which it sets as it claims, as :meth:`claim` does), the size, and whether
        INDIRECT_DESC was negotiated.  It applies :meth:`_simple`'s rules, and moves
        :attr:`next_avail` and :attr:`in_flight_count` and records each claim in
        :attr:`inflight_area` itself."""
        return self._desc, self._avail, self._in_flight, self.size, self.indirect

    # ------------------------------------------------------------------ the bounded simple pop
    def peek_simple(self, max_pieces: int) -> SimpleChain | None:
        """The next available chain if it is a simple one (see :data:`SimpleChain`) of at most
        ``max_pieces`` descriptors, else None.  Changes nothing.

        It looks at the ring with the generic pop's rules (:meth:`_pending`, then
        :meth:`_simple` -- the walker the generic pop tries first -- or :meth:`_walk`), so
        whatever it returns the generic pop would have accepted with the same pieces; a chain
        that breaks a rule gives None here and is reported by the generic pop.
        """
        if self.broken or self._replay:
            return None
        next_avail = self.next_avail
        try:
            if not self._pending():
                return None
        except QueueError:
            return None
        head = self._avail[2 + (next_avail & self._mask)]
        return self._simple(head, max_pieces) or self._peek_walked(head, max_pieces)

    def simple_chains(self, max_pieces: int) -> Generator[SimpleChain, None, None]:
        """:meth:`peek_simple` for a whole pass (see :func:`vhost.queue.base.simple_chains`):
        each chain available now while it is simple, in ring order; asking for the next one
        claims the one before (what :meth:`claim` does, inline: a call per request spared).

        The same looks as :meth:`peek_simple`, without its per-chain call and count of the
        pending chains: they are counted once (:meth:`_pending`); those made available later
        wait for the next pass.  (Nothing in between breaks the queue or adds heads to
        resubmit: only the generic pop does.)
        """
        if self.broken or self._replay:
            return
        try:
            pending = self._pending()
        except QueueError:
            return
        avail = self._avail
        mask = self._mask
        simple = self._simple
        in_flight = self._in_flight
        inflight = self.inflight_area
        for _ in range(pending):
            next_avail = self.next_avail
            head = avail[2 + (next_avail & mask)]
            chain = simple(head, max_pieces) or self._peek_walked(head, max_pieces)
            if chain is None:
                return
            yield chain
            # Asked for the next: the consumer keeps this one.  (Not if it popped meanwhile.)
            if self.next_avail != next_avail or in_flight[head]:
                raise ValueError(f"queue {self.index} moved during a pass of simple chains")
            in_flight[head] = 1
            self.in_flight_count += 1
            if inflight is not None:
                inflight.popped(head)
            self.next_avail = (next_avail + 1) & 0xFFFF

    def _peek_walked(self, head: int, max_pieces: int) -> SimpleChain | None:
        """:meth:`peek_simple` for a chain :meth:`_simple` does not take (zero-length or
        spanning pieces, an indirect table after direct descriptors, a broken rule): the full
        walk, then the shape."""
        try:
            readable, writable, rlen, wlen, spread = self._walk(head, max_pieces, "avail ring")
        except (QueueError, _NotSimple):
            return None
        if spread & 2:
            return None
        region = None if spread else self._region
        if len(readable) == 1:  # [header] [data, writable...] [trailer]
            if len(writable) < 2:
                return None
            header, header_len = readable[0]
            trailer, trailer_len = writable.pop()
            return (head, header, header_len, writable, wlen - trailer_len, True,
                    trailer, trailer_len, self.next_avail, region)
        if len(writable) != 1 or not readable:  # [header] [data, readable...] [trailer]
            return None
        header, header_len = readable.pop(0)
        trailer, trailer_len = writable[0]
        return (head, header, header_len, readable, rlen - header_len, False,
                trailer, trailer_len, self.next_avail, region)

    def claim(self, chain: SimpleChain) -> None:
        """Take ``chain``, the one :meth:`peek_simple` just returned: in flight (in the in-flight
        area too), avail advanced.  ValueError if it is not the next avail entry (``token``
        holds the avail index it was found at)."""
        head = chain[CHAIN_HEAD]
        if chain[CHAIN_TOKEN] != self.next_avail or self._in_flight[head]:
            raise ValueError(f"chain at head {head} is not the one peek_simple found next")
        self._in_flight[head] = 1
        self.in_flight_count += 1
        if self.inflight_area is not None:
            self.inflight_area.popped(head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF

    # ------------------------------------------------------------------ chain rules
    # Stated once, here; both pops call them.
    def _pending(self) -> int:
        """How many chains the driver made available that were not popped: never more than
        the queue size."""
        avail_idx = self._avail[1]
        pending = (avail_idx - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise QueueError(
                f"avail.idx {avail_idx} is {pending} ahead of last_avail {self.next_avail}, "
                f"more than the queue size {self.size}"
            )
        return pending

    def _simple(self, head: int, max_pieces: int) -> SimpleChain | None:
        """The chain at ``head`` if it has Linux's shape exactly -- a header (flags NEXT), data
        runs with one flags value (NEXT, or NEXT|WRITE), a trailer (WRITE), either directly in
        the descriptor table or as the whole of one indirect table -- with at most
        ``max_pieces`` descriptors, no empty piece and every piece inside one memory region;
        else None, and the caller walks it with :meth:`_walk`, which states every rule and
        reports what is wrong.

        Both pops try it first (:meth:`_take`, :meth:`peek_simple`), so it is how the chains
        nearly every request arrives in are checked -- by the generic pop as by the fast path.
        Each rule :meth:`_walk` applies holds here by the stricter shape, or is tested: head in
        range and not in flight, ``next`` inside the table, no more descriptors than the table
        (and ``max_pieces``) holds, the indirect table's length a non-zero multiple of 16 and
        at most a queue's worth and INDIRECT_DESC negotiated, readable before writable, under
        2**32 bytes, each piece inside guest memory.  Whatever it returns, :meth:`_walk` would
        have returned the same pieces (a property test holds them so).  It changes nothing but
        the remembered region (a cache).  (The hot path of every request: no list but the
        data's, no exception, no call but the region lookups when a piece leaves the
        remembered region.)
        """
        if head >= self.size or self._in_flight[head]:
            return None
        memory = self.memory
        if memory.regions is not self._regions:
            self._new_table()
        unpack = _unpack_desc
        table: memoryview = self._desc
        base = 0
        count = self.size
        addr, length, flags, nxt = unpack(table, head << 4)
        lo = self._lo
        hi = self._hi
        if flags == VIRTQ_DESC_F_INDIRECT:  # one indirect table holding the whole chain
            if (not self.indirect or length & (DESC_SIZE - 1)
                    or not 0 < length <= MAX_INDIRECT_BYTES):
                return None
            if not (lo <= addr and addr + length <= hi):
                region = memory.region_at(addr)
                if region is None or addr + length > region.gpa + region.size:
                    return None
                lo, hi = self._remember(region)
            table = self._region.view  # type: ignore[union-attr]
            base = addr - lo
            count = length >> 4
            addr, length, flags, nxt = unpack(table, base)
        # No more descriptors than the table holds (or the caller takes).
        limit = max_pieces if max_pieces < count else count
        # The header: readable, in memory (the first piece may move the remembered region).
        if flags != VIRTQ_DESC_F_NEXT or not length or nxt >= count or limit < 3:
            return None
        header = addr
        header_len = length
        if not (lo <= addr and addr + length <= hi):
            region = memory.region_at(addr)
            if region is None or addr + length > region.gpa + region.size:
                return None
            lo, hi = self._remember(region)
        spread = False
        # The data: one direction, each run non-empty and in memory.
        addr, length, data_flags, nxt = unpack(table, base + (nxt << 4))
        if data_flags != VIRTQ_DESC_F_NEXT and data_flags != _NEXT_WRITE:
            return None
        data: list[tuple[int, int]] = []
        data_len = 0
        read = 2
        flags = data_flags
        while flags == data_flags:
            if not length or nxt >= count or read == limit:
                return None
            if not (lo <= addr and addr + length <= hi):
                region = memory.region_at(addr)
                if region is None or addr + length > region.gpa + region.size:
                    return None
                lo, hi = self._remember(region)
                spread = True
            data.append((addr, length))
            data_len += length
            addr, length, flags, nxt = unpack(table, base + (nxt << 4))
            read += 1
        # The trailer: writable, the end of the chain.
        if flags != VIRTQ_DESC_F_WRITE or not length:
            return None
        if not (lo <= addr and addr + length <= hi):
            region = memory.region_at(addr)
            if region is None or addr + length > region.gpa + region.size:
                return None
            self._remember(region)
            spread = True
        if header_len + data_len + length >= MAX_CHAIN_BYTES:
            return None
        return (head, header, header_len, data, data_len, data_flags != VIRTQ_DESC_F_NEXT,
                addr, length, self.next_avail, None if spread else self._region)

    def _walk(self, head: int, max_pieces: int, source: str
              ) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int, int, int]:
        """The chain at ``head`` (from ``source``) with every rule checked: ``(readable, writable,
        readable bytes, writable bytes, spread)``; ``spread`` 0: every piece lies in the
        remembered region (``self._region``), 1: each lies in one region, 2: some piece spans
        adjacent regions.

        QueueError on a broken rule; :class:`_NotSimple` (for :meth:`peek_simple`) once more
        than ``max_pieces`` descriptors were read.  The region the last piece lay in is
        remembered across chains (most requests' pieces share one); a change of the memory
        table forgets it.  (The hot path of every request: kept to the fewest steps.)
        """
        # The head: it indexes the descriptor table, and is not in flight already.
        if head >= self.size:
            raise QueueError(f"{source} head {head} >= queue size {self.size}")
        if self._in_flight[head]:
            raise QueueError(f"{source} head {head} made available again while still in flight")
        memory = self.memory
        if memory.regions is not self._regions:
            self._new_table()
        table: memoryview | bytes = self._desc
        base = 0
        table_len = self.size
        unpack = DESC.unpack_from
        lo = self._lo  # bounds of the region the last piece was found in
        hi = self._hi
        spread = 0
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        rlen = wlen = 0
        idx = head
        in_indirect = False
        while True:  # once for the descriptor table, once more for an indirect table
            # A chain has at most as many descriptors as its table: more is a loop.
            for _ in range(max_pieces if max_pieces < table_len else table_len):
                addr, length, flags, nxt = unpack(table, base + (idx << 4))
                if flags & VIRTQ_DESC_F_INDIRECT:
                    break
                if length:
                    if not (lo <= addr and addr + length <= hi):  # most pieces share a region
                        region = memory.region_at(addr)
                        if region is not None and addr + length <= region.gpa + region.size:
                            lo, hi = self._remember(region)
                            if readable or writable:  # the pieces before lie elsewhere
                                spread |= 1
                        elif memory.is_mapped(addr, length):  # spans adjacent regions
                            spread = 2
                        else:
                            raise QueueError(
                                f"descriptor {idx} of head {head}: buffer {addr:#x}+{length:#x} "
                                "is not in guest memory"
                            )
                    if flags & VIRTQ_DESC_F_WRITE:
                        writable.append((addr, length))
                        wlen += length
                    elif writable:
                        raise QueueError(
                            f"chain at head {head}: readable descriptor after writable")
                    else:
                        readable.append((addr, length))
                        rlen += length
                elif not flags & VIRTQ_DESC_F_WRITE and writable:
                    raise QueueError(f"chain at head {head}: readable descriptor after writable")
                if not flags & VIRTQ_DESC_F_NEXT:
                    # (Checked once at the end: no descriptor is 2**32 bytes, the count is
                    # bounded.)
                    if rlen + wlen >= MAX_CHAIN_BYTES:
                        raise QueueError(f"chain at head {head} is 2**32 bytes or longer")
                    return readable, writable, rlen, wlen, spread
                idx = nxt
                if idx >= table_len:
                    raise QueueError(
                        f"chain at head {head}: next {idx} >= table size {table_len}")
            else:
                if max_pieces < table_len:
                    raise _NotSimple
                raise QueueError(f"chain at head {head} loops (more than {table_len} descriptors)")
            # An indirect descriptor: its rules (stated here, in the loop: every request of a
            # driver with INDIRECT_DESC passes them), then its table.
            if (in_indirect or flags & VIRTQ_DESC_F_NEXT or length & (DESC_SIZE - 1)
                    or not 0 < length <= MAX_INDIRECT_BYTES or not self.indirect):
                self._indirect_fault(length, flags, in_indirect)
            if lo <= addr and addr + length <= hi:
                table = self._region.view  # type: ignore[union-attr]
                base = addr - lo
            else:
                table, base = self._indirect_table(addr, length)
                lo = self._lo
                hi = self._hi
                if readable or writable:  # direct pieces before it may lie elsewhere
                    spread |= 1
            table_len = length >> 4
            in_indirect = True
            idx = 0

    def _new_table(self) -> None:
        """The memory table changed: forget the remembered region (it may be gone)."""
        self._regions = self.memory.regions
        self._region = None
        self._lo = self._hi = 0

    def _remember(self, region: GuestRegion) -> tuple[int, int]:
        """Remember ``region`` as the one the next pieces are looked for in first."""
        self._region = region
        self._lo = lo = region.gpa
        self._hi = hi = region.gpa + region.size
        return lo, hi

    def _indirect_table(self, addr: int, length: int) -> tuple[memoryview | bytes, int]:
        """An indirect table not in the remembered region: ``(table, its offset in it)``."""
        region = self.memory.region_at(addr)
        if region is not None and addr + length <= region.gpa + region.size:
            self._remember(region)
            return region.view, addr - region.gpa
        try:
            views = self.memory.views(addr, length)
        except AccessError as exc:
            raise QueueError(f"indirect table {addr:#x}+{length:#x}: {exc}") from exc
        return b"".join(views), 0

    def _indirect_fault(self, length: int, flags: int, in_indirect: bool) -> NoReturn:
        """Which rule of an indirect descriptor was broken (see :meth:`_walk`)."""
        if not self.indirect:
            raise QueueError("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")
        if in_indirect:
            raise QueueError("nested indirect descriptor")
        if flags & VIRTQ_DESC_F_NEXT:
            raise QueueError("indirect descriptor with NEXT set")
        if length == 0 or length % DESC_SIZE:
            raise QueueError(f"indirect table of {length} bytes (not a non-zero multiple of 16)")
        raise QueueError(f"indirect table of {length // DESC_SIZE} descriptors")

    # ------------------------------------------------------------------ used side
    def add_used(self, head: int, length: int) -> None:
        """Return ``head`` to the driver with ``length`` bytes written (not yet published)."""
        self.add_used_many([(head, length)])

    def add_used_many(self, done: list[tuple[int, int]]) -> None:
        """Return each ``head`` of a batch of ``(head, length)`` to the driver, in order (not yet
        published).

        One call per worker pass instead of one per request; the batch is then published by
        :meth:`publish_used` with one used.idx store, one dirty-log pass over the entries and one
        notify decision, as any batch is.  A head not in flight raises ValueError, the entries
        before it added.

        The compiled implementation (:class:`vhost.queue._split_core.UsedRing`), where it runs,
        adds the plain entries; :meth:`_add_used_python` adds whatever it left and states
        the rules (a differential property test holds the two to the same results).
        """
        core = self._used_core
        if core is not None:
            next_used = self.next_used
            added = core.add_used_many(self, done, next_used)
            if added:
                self.next_used = (next_used + added) & 0xFFFF
                self.in_flight_count -= added
            if added == len(done):
                return
            done = done[added:]
        self._add_used_python(done)

    def _add_used_python(self, done: list[tuple[int, int]]) -> None:
        """:meth:`add_used_many` in Python: every entry, every rule."""
        in_flight = self._in_flight
        size = self.size
        used = self._used_bytes
        mask = self._mask
        pack = USED_ELEM.pack_into
        inflight = self.inflight_area
        for head, length in done:
            if not 0 <= head < size or not in_flight[head]:
                raise ValueError(f"head {head} is not in flight")
            in_flight[head] = 0
            self.in_flight_count -= 1
            idx = self.next_used
            pack(used, 4 + 8 * (idx & mask), head, length)
            self.next_used = (idx + 1) & 0xFFFF
            if inflight is not None:
                inflight.used(head)

    def publish_used(self) -> bool:
        """Publish used entries added since the last call; True if the driver wants a call.

        One used.idx store per batch; with EVENT_IDX the interrupt is suppressed unless used_event
        lies in the batch just published (virtio 2.7.10).
        """
        new = self.next_used
        old = self._published_used
        dirty = self.dirty
        if new == old:
            if dirty is not None:
                dirty.commit()  # used flags / avail_event written since the last publish
            return False
        if dirty is not None:  # the entries and everything the device wrote, before used.idx
            self._record_used(dirty, old, new)
            dirty.commit()
        self._used[1] = new  # one 16-bit store; element writes before it are ordered on x86
        if dirty is not None:
            dirty.mark(self.used_log_addr + 2, 2)
        self._published_used = new
        if self.inflight_area is not None:
            self.inflight_area.published(new)
        full_fence()
        if self.event_idx:
            used_event = self._avail[self._used_event_slot]
            prev = self._signalled_used
            self._signalled_used = new
            if prev is None:
                return True
            return ((new - used_event - 1) & 0xFFFF) < ((new - prev) & 0xFFFF)
        return not self._avail[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def _record_used(self, dirty: DirtyMarker, old: int, new: int) -> None:
        """Record the used elements ``old..new`` (ring indices, maybe wrapping) as written."""
        count = (new - old) & 0xFFFF
        start = old & self._mask
        first = min(count, self.size - start)
        base = self.used_log_addr + 4
        dirty.record(base + 8 * start, 8 * first)
        if count > first:
            dirty.record(base, 8 * (count - first))

    # ------------------------------------------------------------------ kick suppression
    def disable_notifications(self) -> None:
        """Ask the driver not to kick while we are draining the ring anyway."""
        if not self.event_idx:
            self._used[0] = VIRTQ_USED_F_NO_NOTIFY
            if self.dirty is not None:
                self.dirty.record(self.used_log_addr, 2)

    def enable_notifications(self) -> bool:
        """Ask for a kick on the next buffer; True if buffers arrived meanwhile (drain again)."""
        if self.event_idx:
            self._used[self._avail_event_slot] = self.next_avail
            if self.dirty is not None:  # committed by the publish that ends every worker pass
                self.dirty.record(self.used_log_addr + 2 * self._avail_event_slot, 2)
        else:
            self._used[0] = 0
            if self.dirty is not None:
                self.dirty.record(self.used_log_addr, 2)
        full_fence()
        return self._avail[1] != self.next_avail

    # ------------------------------------------------------------------ the end of a pass
    def end_pass(self, done: list[tuple[int, int]]) -> int:
        """The pass's completions ``done`` added (:meth:`add_used_many`), then
        :meth:`enable_notifications`, then -- unless chains arrived meanwhile
        (:data:`~vhost.queue.base.PASS_AGAIN`: nothing published, the worker drains again) --
        :meth:`publish_used`: :data:`~vhost.queue.base.PASS_CALL` if the driver wants a call,
        else :data:`~vhost.queue.base.PASS_QUIET`.

        The statement of the rule (:func:`vhost.queue.base.pass_ender`'s contract); the
        compiled ``UsedRing.end_pass`` does the same in one call, and hands the pass to this
        method while dirty pages are logged.
        """
        if done:
            self.add_used_many(done)
        if self.enable_notifications():
            return PASS_AGAIN
        return PASS_CALL if self.publish_used() else PASS_QUIET

    def pass_ender(self) -> Callable[[list[tuple[int, int]]], int]:
        """What the worker calls at the end of each pass (:func:`vhost.queue.base.pass_ender`):
        the compiled end of a pass where the compiled used side runs, else :meth:`end_pass`.

        A subclass that changes :meth:`enable_notifications` or :meth:`publish_used` (or
        :meth:`end_pass`) gets its own methods: the compiled code implements these ones.
        """
        cls = type(self)
        compiled = self.compiled_pass_end()
        if (compiled is None or cls.end_pass is not SplitQueue.end_pass
                or cls.add_used_many is not SplitQueue.add_used_many
                or cls.publish_used is not SplitQueue.publish_used
                or cls.enable_notifications is not SplitQueue.enable_notifications):
            return self.end_pass
        return compiled

    def compiled_pass_end(self) -> Callable[[list[tuple[int, int]]], int] | None:
        """The compiled :meth:`end_pass` of this queue (it implements SplitQueue's methods,
        whatever a subclass changed), or None where the compiled used side does not run."""
        core = self._used_core
        return None if core is None else partial(core.end_pass, self)

    def release(self) -> None:
        """Drop the ring views so guest memory can be unmapped."""
        if self._used_core is not None:  # its slices of the used ring and in-flight area first
            self._used_core.release()
            self._used_core = None
        if self.inflight_area is not None:
            self.inflight_area.release()
            self.inflight_area = None
        for name in ("_desc", "_avail", "_used", "_used_bytes"):
            view = getattr(self, name, None)
            if isinstance(view, memoryview):
                view.release()
