"""The fast path: reads and writes in the shapes Linux sends, popped, checked and started in one
step.

The generic path pops a chain (:meth:`VirtQueue.pop_batch`, validating it into a
:class:`DescriptorChain`), then the device parses the header, checks the range, plans the
RequestBuffers, locks them and starts the IO -- about seventy Python calls per request, most of
them general machinery the common request does not need.  Linux's virtio-blk driver sends almost
every request as

    [16-byte header (readable)] [data: one or more runs, all readable or all writable] [1-byte
    status (writable)]

as one indirect descriptor whose table is written in order (``next = i + 1``), or as the same
pieces chained directly in the descriptor table.  For such a head the fast path does every check
either path would do -- head in range and not in flight, descriptor flags and ``next`` links, each
piece inside one guest memory region (writable where the device writes), header type IN or OUT,
the disk range (:func:`~virtio_blk.request.check_range`), write permission, no bounce needed, the
O_DIRECT alignment -- *before* it changes any state.  Only then does it claim the head
(:meth:`VirtQueue.claim`) and start the IO.

Anything else -- a FLUSH, a malformed chain, a request the device must fail, one that needs a
bounce buffer, pieces spanning regions, a ring with requests waiting for bounce pages or heads to
resubmit after a restart -- ends the fast path for this pass at that head, untouched: the generic
path pops it and everything after it, and reports every fault exactly as it always did.  So the
generic path stays the reference, and a differential property test
(``tests/property/test_fastpath_differential.py``) checks that enabling the fast path changes
nothing a guest or the disk can observe.

What stays shared: the data of every request is still a :class:`RequestBuffers` (built cheaply for
one run, through :func:`~virtio_blk.layout.plan` for several) locked with
:meth:`RequestBuffers.lock`, so the request carries the same ``layout`` and ``locks`` the generic
path gives it; completion is the device's own ``_finish`` (statistics, status byte, dirty-page
marks, release), reached through the same ``reap`` -- the fast path only fuses pop, parse,
validate and submit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guestmem import AccessError
from scsi_buffers import PagedRange, RequestBuffers
from vhost.virtqueue import (
    DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VirtQueue,
)

from .engine import OpKind
from .layout import DataLayout, plan
from .request import HEADER, HEADER_SIZE, T_BARRIER, ReqType, RequestError, check_range

if TYPE_CHECKING:
    from guestmem import GuestMemory, GuestRegion, LockedIoBuffers

    from .device import BlkQueueHandler, BlkRequest

#: Most descriptors of a request the fast path takes (header + data runs + status); a longer
#: chain goes to the generic path.  Linux sends up to seg_max (126) data runs; 1M sequential IO
#: on a fragmented guest reaches dozens.
MAX_PIECES = 130

_NEXT = VIRTQ_DESC_F_NEXT
_WRITE = VIRTQ_DESC_F_WRITE
_INDIRECT = VIRTQ_DESC_F_INDIRECT
_TYPE_MASK = ~T_BARRIER & 0xFFFFFFFF
_IN = int(ReqType.IN)
_OUT = int(ReqType.OUT)

_unpack_desc = DESC.unpack_from
_unpack_header = HEADER.unpack_from


class FastPath:
    """The fused pop-and-start of one queue's common requests (see the module docstring)."""

    def __init__(self, handler: BlkQueueHandler, vq: VirtQueue) -> None:
        from .device import BlkRequest  # device imports this module

        self._request = BlkRequest
        self.handler = handler
        self.vq = vq
        self.memory: GuestMemory = handler.memory
        self.desc, self.avail, self.in_flight = vq.ring_tables()
        self.size = vq.size
        self.indirect = vq.indirect
        # The region the last piece was found in (most pieces share one): its bounds.  Only a
        # hint for the lookup: every piece is still checked against the current table.
        self._region: GuestRegion | None = None
        #: Requests started here (the rest went the generic way): for tests and benchmarks.
        self.taken = 0

    def drain(self) -> list[tuple[int, int]]:
        """Start every available request the fast path recognises, up to the first it does not.

        Returns ``(head, used length)`` of those already finished (a batched engine is flushed
        and reaped here, as :meth:`BlkQueueHandler.submit_batch` does).
        """
        vq = self.vq
        handler = self.handler
        if vq.broken or vq.replay_pending or handler.pending:
            return []
        avail = self.avail
        pending = (avail[1] - vq.next_avail) & 0xFFFF
        if not pending or pending > vq.size:
            return []
        if self._region is not None and self._region not in self.memory.regions:
            self._region = None  # the memory table changed: forget the removed region
        submit = handler._submit
        stats = handler.stats
        take = self._take
        mask = vq.size - 1
        done: list[tuple[int, int]] = []
        started = 0
        for _ in range(pending):
            head = avail[2 + (vq.next_avail & mask)]
            req = take(head)
            if req is None:
                break
            vq.claim(head)
            stats.requests += 1
            started += 1
            used = submit(req)
            if used is not None:
                done.append((head, used))
        if started:
            self.taken += started
            engine = handler.engine
            if engine.batched:
                engine.flush()
                finish = handler._finish
                done.extend((req.head, finish(req)) for req in handler._reap())
        return done

    # ------------------------------------------------------------------ recognition
    def _find(self, addr: int, n: int) -> GuestRegion | None:
        """The region holding all of ``[addr, addr+n)``, or None; remembered for the next."""
        region = self._region
        if region is not None and region.gpa <= addr and addr + n <= region.gpa + region.size:
            return region
        region = self.memory.region_at(addr)
        if region is None or addr + n > region.gpa + region.size:
            return None
        self._region = region
        return region

    def _take(self, head: int) -> BlkRequest | None:
        """A request ready to submit for ``head``, or None (nothing changed) to hand over."""
        if head >= self.size or self.in_flight[head]:
            return None
        table = self.desc
        hdr_addr, hdr_len, hdr_flags, nxt = _unpack_desc(table, head << 4)
        count = 0  # entries in an indirect table (0: a direct chain)
        base = 0
        if hdr_flags & _INDIRECT:
            # One table written in order: entry i chains to i + 1, the last one ends.
            length = hdr_len
            if hdr_flags & _NEXT or not self.indirect or length & 15:
                return None
            count = length >> 4
            if not 3 <= count <= MAX_PIECES:
                return None
            region = self._find(hdr_addr, length)
            if region is None:
                return None
            table = region.view
            base = hdr_addr - region.gpa
            try:
                hdr_addr, hdr_len, hdr_flags, nxt = _unpack_desc(table, base)
            except ValueError:  # the region went away meanwhile
                return None
        if hdr_len != HEADER_SIZE or hdr_flags != _NEXT:
            return None
        # Data descriptors up to the one that ends the chain, which must be the status byte.
        data: list[tuple[int, int]] = []
        data_flags = -1
        i = 1
        size = self.size
        while True:
            if count:
                if nxt != i or i == count:
                    return None
                try:
                    addr, n, flags, nxt = _unpack_desc(table, base + (i << 4))
                except ValueError:
                    return None
            else:
                if nxt >= size or i == MAX_PIECES:
                    return None
                addr, n, flags, nxt = _unpack_desc(table, nxt << 4)
            if not flags & _NEXT:
                break
            if flags != data_flags:
                if data_flags >= 0 or flags & ~(_NEXT | _WRITE):
                    return None
                data_flags = flags
            if not n:
                return None
            data.append((addr, n))
            i += 1
        if n != 1 or flags != _WRITE or (count and i != count - 1) or not data:
            return None
        status_gpa = addr
        # Everything the descriptors point at lies in guest memory, writable where written.
        region = self._find(hdr_addr, HEADER_SIZE)
        if region is None:
            return None
        try:
            req_type, _, sector = _unpack_header(region.view, hdr_addr - region.gpa)
        except ValueError:  # the region went away meanwhile
            return None
        req_type &= _TYPE_MASK
        into_guest = data_flags == _NEXT | _WRITE
        if req_type != (_IN if into_guest else _OUT):
            return None
        handler = self.handler
        limits = handler.limits
        if not into_guest and limits.read_only:
            return None
        region = self._find(status_gpa, 1)
        if region is None or region.readonly:
            return None
        length = 0
        for addr, n in data:
            region = self._find(addr, n)
            if region is None or (into_guest and region.readonly):
                return None
            length += n
        try:
            check_range(sector, length, limits)
        except RequestError:
            return None
        memory = self.memory
        if len(data) == 1:
            layout = DataLayout([RequestBuffers(memory, PagedRange.linear(data[0][0], length),
                                                into_guest)], length, False)
        else:
            layout = plan(memory, data, guest_writable=into_guest)
            if layout.bounce:
                return None
        return self._request_for(head, status_gpa, sector, length, layout, into_guest)

    def _request_for(self, head: int, status_gpa: int, sector: int, length: int,
                     layout: DataLayout, into_guest: bool) -> BlkRequest | None:
        """Lock the data's RequestBuffers into a request; None if O_DIRECT would need a bounce."""
        locks: list[LockedIoBuffers] = []
        try:
            for buffers in layout.buffers:
                locks.append(buffers.lock(for_write=into_guest))
        except AccessError:  # a region removed meanwhile: let the generic path report it
            for lock in locks:
                lock.close()
            return None
        handler = self.handler
        if handler.direct and not all(lock.is_aligned(handler.mem_align) for lock in locks):
            for lock in locks:
                lock.close()
            return None
        req = self._request(OpKind.READ if into_guest else OpKind.WRITE, head, status_gpa,
                            sector, length)
        req.layout = layout
        req.locks = locks
        req.buffers = (locks[0].io_buffers if len(locks) == 1
                       else [p for lock in locks for p in lock.io_buffers])
        if not into_guest:
            req.sync = not handler.device.writeback
        return req
