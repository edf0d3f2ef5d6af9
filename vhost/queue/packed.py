"""The packed virtqueue (virtio 1.1+, 2.8, VIRTIO_F_RING_PACKED), sans-IO.

One ring of 16-byte descriptors ``(addr u64, len u32, id u16, flags u16)`` that the driver and
the device both write, plus two 4-byte event suppression areas ``(off_wrap u16, flags u16)``: the
driver's (read here: does the driver want a used-buffer notification) and the device's (written
here: does the device want a kick).  Each side keeps a wrap counter, starting at 1 and flipped
each time its position passes the end of the ring:

* the driver makes a descriptor available with AVAIL (bit 7) = its wrap counter and USED (bit
  15) = the opposite; a descriptor at the device's avail position is available iff AVAIL equals
  the device's avail wrap counter and USED does not (anything else: not available -- a driver
  playing flag games just looks idle);
* a chain is consecutive descriptors linked by NEXT, wrapping at the ring's end; its buffer id
  is in its last descriptor; every descriptor of it must be available (the spec requires the
  flags to be right in all of them, the first one written last);
* the device writes one used element per chain at its used position -- id and len first, then
  the flags with AVAIL = USED = its used wrap counter in one 16-bit store -- and moves on by the
  number of ring descriptors the chain took (1 for an indirect one).  A batch is published by
  writing its first element's flags last (what QEMU does), so the driver sees all of it or none.

Rules checked on every chain (a violation -> :class:`QueueError`, the queue broken until reset,
as the split ring does): the buffer id < queue size and not in flight; a chain no longer than
the ring slots not held by chains in flight (so at most the ring: no endless chain); INDIRECT
only when negotiated, alone (not in a NEXT chain), its table a non-zero multiple of 16 bytes of
at most 32768 descriptors, no INDIRECT inside it (NEXT in the table is ignored: the table is
the chain); no readable piece after a writable one; less than 2**32 bytes in all; each buffer
inside guest memory.

Positions are what SET/GET_VRING_BASE carry: bits 0-14 the avail position, bit 15 the avail wrap
counter, bits 16-30 the used position, bit 31 the used wrap counter.
"""

from __future__ import annotations

import logging
import struct
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING

from guestmem import AccessError, GuestMemory, GuestRegion
from guestmem.dirty_log import DirtyMarker
from vhost.compiled import optional_module
from vhost.messages import VirtioFeature
from vhost.queue.base import (
    CHAIN_HEAD,
    MAX_CHAIN_BYTES,
    DescriptorChain,
    QueueError,
    RingAddresses,
    SimpleChain,
    full_fence,
)
from vhost.queue.inflight import InflightError
from vhost.queue.inflight_packed import PackedInflightQueue, RawDesc

if TYPE_CHECKING:
    from vhost.queue._packed_core import UsedSide

log = logging.getLogger(__name__)

#: A walked chain: readable pieces, writable pieces, their byte counts, the one region holding
#: them all (or None), whether a piece runs through adjacent regions.
Walk = tuple[list[tuple[int, int]], list[tuple[int, int]], int, int, "GuestRegion | None", bool]


class _NotSimple(Exception):
    """A chain longer than :meth:`PackedQueue.peek_simple` was asked to take."""

DESC = struct.Struct("<QIHH")  # addr, len, id, flags
DESC_SIZE = 16
F_NEXT = 1
F_WRITE = 2
F_INDIRECT = 4
F_AVAIL = 1 << 7
F_USED = 1 << 15
# Event suppression flags
EVENT_ENABLE = 0
EVENT_DISABLE = 1
EVENT_DESC = 2
EVENT_SIZE = 4

MAX_QUEUE_SIZE = 32768
#: The compiled used side (and in-flight records) of a packed queue.
COMPILED_MODULE = "vhost.queue._packed_core"
#: SET_VRING_BASE value of a ring nobody used yet: both positions 0, both wrap counters 1.
FRESH_BASE = 0x8000_8000
#: Alignment virtio 2.8 requires of (descriptor ring, driver area, device area).
RING_ALIGNMENT = (16, 4, 4)
RING_PARTS = ("descriptor ring", "driver event area", "device event area")


def validate_size(size: int) -> None:
    """A packed queue size is 1..32768 (need not be a power of two: virtio 2.8)."""
    if not 0 < size <= MAX_QUEUE_SIZE:
        raise QueueError(f"packed queue size {size} is not in 1..{MAX_QUEUE_SIZE}")


def encode_base(avail: int, avail_wrap: int, used: int, used_wrap: int) -> int:
    """The SET/GET_VRING_BASE value of these positions (see the module docstring)."""
    return (avail & 0x7FFF) | (avail_wrap & 1) << 15 | (used & 0x7FFF) << 16 | (used_wrap & 1) << 31


def decode_base(base: int) -> tuple[int, int, int, int]:
    """(avail position, avail wrap, used position, used wrap) of a SET_VRING_BASE value."""
    return base & 0x7FFF, base >> 15 & 1, base >> 16 & 0x7FFF, base >> 31 & 1


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event: ``event`` lies in ``[old, new)`` (16-bit arithmetic)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class PackedQueue:
    """State of one packed virtqueue and the device side's operations on it (the
    :class:`vhost.queue.base.Queue` interface)."""

    layout = "packed"

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        addresses: RingAddresses,
        features: int,
        base: int = FRESH_BASE,
        index: int = 0,
        inflight: PackedInflightQueue | None = None,
    ) -> None:
        validate_size(size)
        self.index = index
        self.memory = memory
        self.size = size
        self.addresses = addresses
        self.event_idx = bool(features & VirtioFeature.RING_EVENT_IDX)
        self.indirect = bool(features & VirtioFeature.RING_INDIRECT_DESC)
        parts = (addresses.desc, addresses.avail, addresses.used)
        lengths = (DESC_SIZE * size, EVENT_SIZE, EVENT_SIZE)
        views = []
        for name, gpa, align, length in zip(RING_PARTS, parts, RING_ALIGNMENT, lengths,
                                            strict=True):
            if gpa % align:
                raise QueueError(f"{name} at {gpa:#x} is not {align}-byte aligned")
            try:
                views.append(memory.view(gpa, length, for_write=name != "driver event area"))
            except AccessError as exc:
                raise QueueError(f"{name} at {gpa:#x}+{length:#x}: {exc}") from exc
        self._desc = views[0]
        self._desc_h = views[0].cast("H")  # flags of slot i: [8*i + 7]; id: [8*i + 6]
        self._desc_w = views[0].cast("I")  # len of slot i: [4*i + 2]
        self._driver_event = views[1].cast("H")  # [0] off_wrap, [1] flags
        self._device_event = views[2].cast("H")
        avail, avail_wrap, used, used_wrap = decode_base(base)
        #: Chains popped and not completed, by buffer id: the ring slots each holds (0: none).
        #: An array of u16 (a chain holds at most the ring, 32768 slots), not a list: the
        #: compiled walker (:meth:`compiled_view`) reads and sets it without the GIL.
        self._slots = array("H", bytes(2 * size))
        #: Their head entries in the in-flight area.
        self._entry = [0] * size
        self.in_flight_count = 0
        self.broken = False
        self.error: QueueError | None = None
        self.dirty: DirtyMarker | None = None
        self.used_log_addr = addresses.used
        self._inflight = inflight
        self._replay: list[tuple[int, list[RawDesc]]] = []
        #: Chains resubmitted from the in-flight area so far (logged once all are: the count the
        #: kill -9 tests and operators read, the same line as the split ring's).
        self._replayed = 0
        if inflight is not None:
            try:
                rec = inflight.recover(self._ring_flags, used, used_wrap)
            except InflightError as exc:
                raise QueueError(f"inflight area: {exc}") from exc
            if not rec.fresh:
                # The region knows where the ring is; SET_VRING_BASE may be stale (QEMU 7.2
                # after a backend crash).  The chains in flight fill the slots from used on.
                if (rec.used_idx, rec.used_wrap) != (used, used_wrap):
                    log.info("queue %d: used position %d/%d from the inflight area (the frontend "
                             "said %d/%d)", index, rec.used_idx, rec.used_wrap, used, used_wrap)
                used, used_wrap = rec.used_idx, rec.used_wrap
                avail, avail_wrap = used + rec.held, used_wrap
                if avail >= size:
                    avail, avail_wrap = avail - size, avail_wrap ^ 1
                self._replay = rec.chains
                if rec.chains:
                    log.info("queue %d: resubmitting %d requests from before the restart; avail "
                             "continues at %d/%d", index, len(rec.chains), avail, avail_wrap)
        if avail >= size or used >= size:
            raise QueueError(f"vring base {encode_base(avail, avail_wrap, used, used_wrap):#x}: "
                             f"a position beyond the ring of {size}")
        held = avail - used + (0 if avail_wrap == used_wrap else size)
        if not 0 <= held <= size:
            raise QueueError(f"vring base: avail {avail}/{avail_wrap} is not within a ring ahead "
                             f"of used {used}/{used_wrap}")
        self.next_avail = avail
        self.avail_wrap = avail_wrap
        self.next_used = used
        self.used_wrap = used_wrap
        #: Ring slots between the used and the avail position: the chains in flight (and any a
        #: previous backend lost, which stay there until the driver resets the ring).
        self._held = held
        if held and not self._replay:
            log.warning("queue %d: %d ring slots were in flight at the hand-over and nothing "
                        "tracks them", index, held)
        #: Completed (id, len, slots), not yet published.
        self._pending: list[tuple[int, int, int]] = []
        #: Used-buffer notifications: descriptors published since the last one was decided.
        self._since_signal = 0
        self._signalled = False
        self._peeked: tuple[SimpleChain, list[RawDesc]] | None = None
        # The guest memory region the last piece lay in, and the table it was found in.
        self._regions: tuple[GuestRegion, ...] | None = None
        self._region: GuestRegion | None = None
        self._lo = self._hi = 0
        self._published = 0  # used elements published (ring_state)
        #: The compiled used side (vhost.queue._packed_core) where it was built and the
        #: environment allows it (vhost.compiled): the plain entries of add_used_many and
        #: publish_used's loop.  None: the Python code does every entry.
        self._used_core: UsedSide | None = None
        core = optional_module(COMPILED_MODULE)
        if core is not None:
            try:
                self._used_core = core.UsedSide(self)
            except ValueError as exc:  # (not for a queue this class made) the Python loop
                log.debug("queue %d: the Python used side runs: %s", index, exc)

    # ------------------------------------------------------------------ state
    def vring_base(self) -> int:
        return encode_base(self.next_avail, self.avail_wrap, self.next_used, self.used_wrap)

    def ring_state(self) -> dict[str, int]:
        """Positions as ``last_avail_idx``/``avail_wrap`` and ``used_pos``/``used_wrap``;
        ``used_idx`` is the used half of the vring base counted from a fresh ring (position 0
        in lap 1 gives 0), so it is non-zero once the ring completed something (but for a
        multiple of two whole laps, when the worker's start-up call is spared: harmless)."""
        return {"last_avail_idx": self.next_avail, "avail_wrap": self.avail_wrap,
                "used_pos": self.next_used, "used_wrap": self.used_wrap,
                "used_idx": (self.next_used | self.used_wrap << 15) ^ 0x8000,
                "in_flight": self.in_flight_count, "size": self.size,
                "broken": int(self.broken)}

    @property
    def replay_pending(self) -> bool:
        return bool(self._replay)

    def compiled_view(self) -> tuple[memoryview, array[int], list[int], int, bool]:
        """What a compiled walker of this ring (:mod:`virtio_blk._fastpath_core`) reads and
        updates: the descriptor ring, the ring slots each buffer id in flight holds (set as it
        claims, as :meth:`_take` does), the head entries of the in-flight area by buffer id,
        the size, and whether INDIRECT_DESC was negotiated.

        It applies the rules of :meth:`_gather`, :meth:`_parse` and :meth:`_walk` (declining,
        not reporting, what breaks one), and claims as :meth:`_take` does: it moves
        :attr:`next_avail`, :attr:`avail_wrap`, :attr:`in_flight_count` and the slots held
        (:meth:`took`), and records each chain in :attr:`inflight_area` itself."""
        return self._desc, self._slots, self._entry, self.size, self.indirect

    @property
    def inflight_area(self) -> PackedInflightQueue | None:
        """The in-flight area of this queue (crash recovery), if the frontend gave one."""
        return self._inflight

    @property
    def held_slots(self) -> int:
        """Ring slots between the used and the avail position (chains in flight, or completed
        and not yet published): a chain may take at most the rest of the ring."""
        return self._held

    def took(self, chains: int, slots: int, pos: int, wrap: int) -> None:
        """A compiled walker claimed ``chains`` chains holding ``slots`` ring slots (their
        ids' :attr:`_slots` and entries already set): the avail position is now ``pos`` in lap
        ``wrap`` -- the end of :meth:`_take`, once for a pass."""
        self.in_flight_count += chains
        self._held += slots
        self.next_avail = pos
        self.avail_wrap = wrap

    def _ring_flags(self, slot: int) -> int:
        return int(self._desc_h[8 * slot + 7])

    # ------------------------------------------------------------------ avail side
    def has_avail(self) -> bool:
        flags = self._desc_h[8 * self.next_avail + 7]
        wrap = self.avail_wrap
        return bool(flags >> 7 & 1 == wrap and flags >> 15 & 1 != wrap)

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None; raises QueueError on a ring violation."""
        chains = self.pop_batch(1)
        if self.error is not None and not chains:
            raise self.error
        return chains[0] if chains else None

    def pop_batch(self, limit: int | None = None) -> list[DescriptorChain]:
        if self.broken:
            return []
        self._peeked = None
        out: list[DescriptorChain] = []
        try:
            while self._replay and (limit is None or len(out) < limit):
                entry, descs = self._replay[0]
                buf_id, walk = self._parse(descs, "inflight area")
                self._replay.pop(0)
                self._mark(buf_id, len(descs), entry)
                out.append(DescriptorChain(buf_id, *walk[:4]))
                self._replayed += 1
                if not self._replay:
                    log.info("queue %d: resubmitted %d in-flight requests", self.index,
                             self._replayed)
            if self._replay:
                return out
            while limit is None or len(out) < limit:
                ring_descs = self._gather()
                if ring_descs is None:
                    break
                buf_id, walk = self._parse(ring_descs, "ring")
                self._take(buf_id, ring_descs)
                out.append(DescriptorChain(buf_id, *walk[:4]))
        except QueueError as exc:
            self.broken = True
            self.error = exc
        return out

    def _gather(self) -> list[RawDesc] | None:
        """The descriptors of the chain at the avail position, or None if none is available.

        Reads only.  The head's flags are read first: the driver writes them last.
        """
        desc_h = self._desc_h
        pos = self.next_avail
        wrap = self.avail_wrap
        flags = desc_h[8 * pos + 7]
        if flags >> 7 & 1 != wrap or flags >> 15 & 1 == wrap:
            return None
        room = self.size - self._held
        unpack = DESC.unpack_from
        desc = self._desc
        out: list[RawDesc] = []
        while True:
            if len(out) == room:
                raise QueueError(f"chain at ring slot {self.next_avail} is longer than the "
                                 f"{room} slots not in flight")
            if out:
                flags = desc_h[8 * pos + 7]
                if flags >> 7 & 1 != wrap or flags >> 15 & 1 == wrap:
                    raise QueueError(f"chain at ring slot {self.next_avail}: descriptor at slot "
                                     f"{pos} is not marked available (flags {flags:#x})")
            out.append(unpack(desc, pos * DESC_SIZE))
            pos += 1
            if pos == self.size:
                pos = 0
                wrap ^= 1
            if not out[-1][3] & F_NEXT:
                return out

    def _parse(self, descs: Sequence[RawDesc], source: str, max_pieces: int = MAX_QUEUE_SIZE
               ) -> tuple[int, Walk]:
        """(buffer id, the chain walked: see :meth:`_walk`) of a chain's ring descriptors;
        QueueError for any rule broken (module docstring).  Over ``max_pieces`` descriptors
        (in the ring or the table): :class:`_NotSimple` before reading them."""
        buf_id = descs[-1][2]
        if buf_id >= self.size:
            raise QueueError(f"{source}: buffer id {buf_id} >= queue size {self.size}")
        if self._slots[buf_id]:
            raise QueueError(f"{source}: buffer id {buf_id} made available again while in flight")
        first = descs[0]
        if first[3] & F_INDIRECT:
            if len(descs) != 1:
                raise QueueError(f"{source}: indirect descriptor in a chain (buffer id {buf_id})")
            if not self.indirect:
                raise QueueError("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")
            addr, length = first[0], first[1]
            if length == 0 or length % DESC_SIZE:
                raise QueueError(f"indirect table of {length} bytes (not a non-zero multiple of "
                                 "16)")
            count = length // DESC_SIZE
            if count > MAX_QUEUE_SIZE:
                raise QueueError(f"indirect table of {count} descriptors")
            if count > max_pieces:
                raise _NotSimple
            table: memoryview | bytes
            region = self._region
            if (region is not None and self._lo <= addr and addr + length <= self._hi
                    and self.memory.regions is self._regions):
                table, base = region.view, addr - self._lo  # (in the region of the last piece)
            else:
                try:
                    views = self.memory.views(addr, length)
                except AccessError as exc:
                    raise QueueError(f"indirect table {addr:#x}+{length:#x}: {exc}") from exc
                table, base = views[0] if len(views) == 1 else b"".join(views), 0
            return buf_id, self._walk(list(DESC.iter_unpack(table[base : base + length])),
                                      buf_id, "nested indirect descriptor")
        if len(descs) > max_pieces:
            raise _NotSimple
        return buf_id, self._walk(descs, buf_id, "indirect descriptor in a chain")

    def _walk(self, descs: Sequence[RawDesc], buf_id: int, indirect_rule: str) -> Walk:
        """``(readable, writable, readable bytes, writable bytes, region, spans)`` of the pieces
        ``descs`` (from the ring or an indirect table) -- zero-length ones dropped, every piece
        checked to lie in guest memory, no readable piece after a writable one, less than 2**32
        bytes; ``region``: the one guest memory region holding every piece, or None; ``spans``:
        a piece runs through adjacent regions.

        The region the last piece lay in is remembered across chains (most requests' pieces
        share one); a change of the memory table forgets it.
        """
        memory = self.memory
        regions = memory.regions
        if regions is not self._regions:
            self._regions = regions
            self._region = None
            self._lo = self._hi = 0
        region = self._region
        lo, hi = self._lo, self._hi
        whole = True
        spans = False
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        rlen = wlen = 0
        for k, (addr, length, _, flags) in enumerate(descs):
            if flags & F_INDIRECT:
                raise QueueError(f"buffer id {buf_id}: {indirect_rule}")
            if flags & F_WRITE:
                if not length:
                    continue
                writable.append((addr, length))
                wlen += length
            else:
                if writable:
                    raise QueueError(f"buffer id {buf_id}: readable descriptor after writable")
                if not length:
                    continue
                readable.append((addr, length))
                rlen += length
            if not (lo <= addr and addr + length <= hi):
                found = memory.region_at(addr)
                if found is not None and addr + length <= found.gpa + found.size:
                    if len(readable) + len(writable) > 1:
                        whole = False  # (an earlier piece lay in another region)
                    region = found
                    lo, hi = found.gpa, found.gpa + found.size
                elif memory.is_mapped(addr, length):  # spans adjacent regions
                    whole = False
                    spans = True
                else:
                    raise QueueError(f"descriptor {k} of buffer id {buf_id}: buffer "
                                     f"{addr:#x}+{length:#x} is not in guest memory")
            if rlen + wlen >= MAX_CHAIN_BYTES:
                raise QueueError(f"buffer id {buf_id}: chain of 2**32 bytes or longer")
        self._region = region
        self._lo, self._hi = lo, hi
        return readable, writable, rlen, wlen, region if whole else None, spans

    def _take(self, buf_id: int, descs: list[RawDesc]) -> None:
        """Mark the chain ``descs`` (at the avail position) in flight and move past it."""
        slots = len(descs)
        if self._inflight is not None:
            try:
                self._entry[buf_id] = self._inflight.popped(descs)
            except InflightError as exc:
                raise QueueError(f"inflight area: {exc}") from exc
        self._slots[buf_id] = slots
        self.in_flight_count += 1
        pos = self.next_avail + slots
        if pos >= self.size:
            pos -= self.size
            self.avail_wrap ^= 1
        self.next_avail = pos
        self._held += slots

    def _mark(self, buf_id: int, slots: int, entry: int) -> None:
        self._slots[buf_id] = slots
        self._entry[buf_id] = entry
        self.in_flight_count += 1

    # ------------------------------------------------------------------ the fast path's pop
    def peek_simple(self, max_pieces: int) -> SimpleChain | None:
        """See :meth:`vhost.queue.base.Queue.peek_simple`: the same walk and checks as the
        generic pop (:meth:`_gather`, :meth:`_parse`), then the shape."""
        self._peeked = None
        if self.broken or self._replay:
            return None
        try:
            descs = self._gather()
            if descs is None:
                return None
            buf_id, (readable, writable, rlen, wlen, region, spans) = self._parse(
                descs, "ring", max_pieces)
        except (QueueError, _NotSimple):
            return None  # the generic pop reports it (or takes a long chain)
        if spans:
            return None  # a piece runs through two regions: the generic path handles it
        # The split ring's shapes (vhost.queue.split.SplitQueue.peek_simple).
        if len(readable) == 1 and len(writable) >= 2:  # [header] [data, writable...] [trailer]
            into_guest = True
            data = writable[:-1]
            trailer, trailer_len = writable[-1]
            data_len = wlen - trailer_len
        elif len(writable) == 1 and len(readable) >= 2:  # [header] [data, readable...] [trailer]
            into_guest = False
            data = readable[1:]
            trailer, trailer_len = writable[0]
            data_len = rlen - readable[0][1]
        else:
            return None
        hdr, hdr_len = readable[0]
        # (region: the one holding every piece, or None: the device looks each one up)
        chain: SimpleChain = (buf_id, hdr, hdr_len, data, data_len, into_guest, trailer,
                              trailer_len, len(descs), region)
        self._peeked = (chain, descs)
        return chain

    def claim(self, chain: SimpleChain) -> None:
        peeked = self._peeked
        if peeked is None or peeked[0] is not chain:
            raise ValueError("claim() of a chain peek_simple() did not just return")
        self._peeked = None
        self._take(chain[CHAIN_HEAD], peeked[1])

    # ------------------------------------------------------------------ used side
    def add_used(self, head: int, length: int) -> None:
        self.add_used_many([(head, length)])

    def add_used_many(self, done: list[tuple[int, int]]) -> None:
        """Return each ``(buffer id, length)`` of a batch to the driver (published by
        :meth:`publish_used`); a buffer id not in flight raises ValueError, the entries before
        it added.  The compiled implementation (:func:`vhost.queue._packed_core.add_used_many`),
        where it runs, adds the plain entries; :meth:`_add_used_python` whatever it left, and
        states the rules."""
        core = self._used_core
        if core is not None:
            added = core.add_used_many(self, done)
            if added == len(done):
                return
            done = done[added:]
        self._add_used_python(done)

    def _add_used_python(self, done: list[tuple[int, int]]) -> None:
        """:meth:`add_used_many` in Python: every entry, every rule."""
        slots = self._slots
        size = self.size
        inflight = self._inflight
        pending = self._pending
        for buf_id, length in done:
            if not 0 <= buf_id < size or not slots[buf_id]:
                raise ValueError(f"buffer id {buf_id} is not in flight")
            pending.append((buf_id, length, slots[buf_id]))
            slots[buf_id] = 0
            self.in_flight_count -= 1
            if inflight is not None:
                inflight.used(self._entry[buf_id])

    def publish_used(self) -> bool:
        """Write the completed chains' used elements and publish them (the first element's
        flags last); True if the driver wants a notification (virtio 2.8.10/2.8.21.3)."""
        pending = self._pending
        dirty = self.dirty
        if not pending:
            if dirty is not None:
                dirty.commit()  # device event area written since the last publication
            return False
        size = self.size
        desc_h = self._desc_h
        desc_w = self._desc_w
        pos = first = self.next_used
        wrap = self.used_wrap
        first_flags = 0
        count = 0
        log_base = self.addresses.desc
        core = self._used_core
        written = core.write_used(self, pending) if core is not None and dirty is None else None
        if written is not None:  # the compiled loop (no dirty log to mark) did it
            pos, wrap, count, first_flags = written
        else:
            for k, (buf_id, length, slots) in enumerate(pending):
                flags = (F_AVAIL | F_USED if wrap else 0) | (F_WRITE if length else 0)
                desc_h[8 * pos + 6] = buf_id
                desc_w[4 * pos + 2] = length
                if k:
                    desc_h[8 * pos + 7] = flags
                else:
                    first_flags = flags
                if dirty is not None:
                    dirty.record(log_base + DESC_SIZE * pos, DESC_SIZE)
                count += slots
                pos += slots
                if pos >= size:
                    pos -= size
                    wrap ^= 1
        inflight = self._inflight
        if inflight is not None:
            inflight.publishing(pos, wrap)
        if dirty is not None:
            dirty.commit()
        desc_h[8 * first + 7] = first_flags  # one 16-bit store publishes the batch
        if dirty is not None:
            dirty.mark(log_base + DESC_SIZE * first + 14, 2)
        self.next_used = pos
        self.used_wrap = wrap
        self._held -= count
        self._published += len(pending)
        pending.clear()
        if inflight is not None:
            inflight.published()
        self._since_signal += count
        full_fence()
        return self._should_notify()

    def _should_notify(self) -> bool:
        """The driver event area's verdict on the descriptors published since the last one."""
        flags = self._driver_event[1]
        if flags == EVENT_DISABLE:
            return False
        if flags != EVENT_DESC or not self.event_idx:
            # ENABLE (or DESC without EVENT_IDX, or a value the spec does not define: notify)
            self._since_signal = 0
            return True
        count = self._since_signal
        self._since_signal = 0
        if not self._signalled or count >= self.size:
            self._signalled = True
            return True
        off_wrap = self._driver_event[0]
        event = off_wrap & 0x7FFF
        if off_wrap >> 15 != self.used_wrap:
            event -= self.size  # the event lies in the previous lap
        new = self.next_used
        return need_event(event & 0xFFFF, new, (new - count) & 0xFFFF)

    # ------------------------------------------------------------------ kick suppression
    def disable_notifications(self) -> None:
        if not self.event_idx:
            self._device_event[1] = EVENT_DISABLE
            if self.dirty is not None:
                self.dirty.record(self.used_log_addr + 2, 2)

    def enable_notifications(self) -> bool:
        ev = self._device_event
        if self.event_idx:
            ev[0] = self.next_avail | self.avail_wrap << 15
            ev[1] = EVENT_DESC  # off_wrap before flags (x86 keeps stores in order)
            if self.dirty is not None:
                self.dirty.record(self.used_log_addr, EVENT_SIZE)
        else:
            ev[1] = EVENT_ENABLE
            if self.dirty is not None:
                self.dirty.record(self.used_log_addr + 2, 2)
        full_fence()
        return self.has_avail()

    def release(self) -> None:
        if self._used_core is not None:  # its slices of the ring and the slots first
            self._used_core.release()
            self._used_core = None
        if self._inflight is not None:
            self._inflight.release()
            self._inflight = None
        for name in ("_desc_h", "_desc_w", "_driver_event", "_device_event", "_desc"):
            view = getattr(self, name, None)
            if isinstance(view, memoryview):
                view.release()
