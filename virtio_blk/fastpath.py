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
the disk range (:func:`~virtio_blk.request.range_fault`), write permission, no bounce needed, the
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
one run with :meth:`RequestBuffers.linear`, through :func:`~virtio_blk.layout.plan` for several)
locked with :meth:`RequestBuffers.lock`, so the request carries the same ``layout`` and ``locks``
the generic path gives it.

Completion is fused too (:meth:`FastPath.complete`): a fast-path request that read or wrote all
its bytes has its locks released, its statistics counted, its pages marked in the dirty log and
its status byte written in one step.  Anything else -- an IO error, a short transfer -- goes to
the device's ``_finish``, the reference, so every failure is reported exactly as the generic path
reports it (the differential test injects disk errors to check that).
"""

from __future__ import annotations

from time import monotonic_ns
from typing import TYPE_CHECKING

from blockdev.engine import OpKind
from guestmem import AccessError
from scsi_buffers import RequestBuffers
from vhost.queue.split import (
    DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VirtQueue,
)
from virtio_blk.layout import DataLayout, plan
from virtio_blk.request import HEADER, HEADER_SIZE, T_BARRIER, ReqType, Status, range_fault

if TYPE_CHECKING:
    from guestmem import GuestMemory, GuestRegion, IoBuffer, LockedIoBuffers
    from virtio_blk.device import BlkQueueHandler, BlkRequest

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
_READ = OpKind.READ
_WRITE_OP = OpKind.WRITE
_OK = int(Status.OK)

_unpack_desc = DESC.unpack_from
_unpack_header = HEADER.unpack_from


class FastPath:
    """The fused pop-and-start, and completion, of one queue's common requests (see the module
    docstring)."""

    def __init__(self, handler: BlkQueueHandler, vq: VirtQueue) -> None:
        from virtio_blk.device import FastRequest  # device imports this module

        self._request = FastRequest
        self.handler = handler
        self.vq = vq
        self.memory: GuestMemory = handler.memory
        self.desc, self.avail, self.in_flight = vq.ring_tables()
        self.size = vq.size
        self.indirect = vq.indirect
        # The region the last piece was found in (most pieces share one) and its bounds.  Only a
        # hint for the lookup: every piece is still checked against the current table.
        self._region: GuestRegion | None = None
        self._lo = self._hi = 0
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
        region = self._region
        if region is not None and region not in self.memory.regions:
            self._forget()  # the memory table changed: forget the removed region
        engine = handler.engine
        submit = engine.submit
        complete = self.complete
        take = self._take
        build = self._build
        unpack = _unpack_desc
        desc = self.desc
        claim = vq.claim
        in_flight = self.in_flight
        size = vq.size
        mask = size - 1
        timing = handler.timing
        done: list[tuple[int, int]] = []
        started = 0
        try:
            for _ in range(pending):
                head = avail[2 + (vq.next_avail & mask)]
                # The head check of _take, inline: a head in flight or out of range ends the pass
                # here without a call (the generic pop reports it).
                if head >= size or in_flight[head]:
                    break
                # The commonest shape, recognised inline: a direct chain of header (16 bytes,
                # readable), one data run (all readable or all writable) and the status byte
                # (1 byte, writable) -- what _take accepts for it, without its loop.  Any other
                # head goes through _take.
                hdr_addr, hdr_len, flags, nxt = unpack(desc, head << 4)
                req = None
                if hdr_len == HEADER_SIZE and flags == _NEXT and nxt < size:
                    addr, n, flags, nxt = unpack(desc, nxt << 4)
                    if (flags == _NEXT or flags == _NEXT | _WRITE) and n and nxt < size:
                        status_gpa, one, status_flags, _ = unpack(desc, nxt << 4)
                        if one == 1 and status_flags == _WRITE:
                            req = build(head, hdr_addr, [(addr, n)], status_gpa, flags != _NEXT)
                            if req is None:
                                break
                if req is None:
                    req = take(head)
                    if req is None:
                        break
                claim(head)
                started += 1
                if timing:
                    req.start_ns = monotonic_ns()
                if submit(req):
                    done.append((head, complete(req)))
        finally:
            if started:
                handler.stats.requests += started
                self.taken += started
        if started and engine.batched:
            engine.submit_batch()
            done += handler.complete_reaped()
        return done

    # ------------------------------------------------------------------ completion
    def complete(self, req: BlkRequest) -> int:
        """Finish a fast-path request that is done: the used length (see the module docstring).

        A request that moved all its bytes is finished here in one step -- what
        :meth:`BlkQueueHandler._finish` would do for it (release, latency, dirty pages, counters,
        status byte); anything else goes to ``_finish`` itself.
        """
        handler = self.handler
        length = req.length
        if req.result != length:  # an error or a short transfer: the reference reports it
            return handler._finish(req)
        for lock in req.locks:
            lock.close()
        stats = handler.stats
        kind = req.kind
        if handler.timing:
            stats.add_latency(kind, req.start_ns)
        if kind == _READ:
            if handler.dirty is not None:
                handler._record_read(req)
            stats.reads += 1
            stats.bytes_read += length
            used = length + 1
        else:
            stats.writes += 1
            stats.bytes_written += length
            used = 1
        return handler._put_status(req.status_gpa, _OK, used)

    # ------------------------------------------------------------------ recognition
    def _forget(self) -> None:
        self._region = None
        self._lo = self._hi = 0

    def _find(self, addr: int, n: int) -> GuestRegion | None:
        """The region holding all of ``[addr, addr+n)``, or None; remembered for the next."""
        region = self._region
        if region is not None and self._lo <= addr and addr + n <= self._hi:
            return region
        region = self.memory.region_at(addr)
        if region is None or addr + n > region.gpa + region.size:
            return None
        self._region = region
        self._lo = region.gpa
        self._hi = region.gpa + region.size
        return region

    def _take(self, head: int) -> BlkRequest | None:
        """A request, locked and ready to submit, for ``head`` (checked in range and not in
        flight by the caller), or None (nothing changed) to hand over."""
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
        return self._build(head, hdr_addr, data, addr, data_flags == _NEXT | _WRITE)

    def _build(self, head: int, hdr_addr: int, data: list[tuple[int, int]], status_gpa: int,
               into_guest: bool) -> BlkRequest | None:
        """The checks after the descriptors' shape, and the locked request (or None).

        ``data``: the data runs, non-empty, each of non-zero length; ``into_guest``: they are
        writable (an IN request); the header's 16 bytes and the 1-byte status are at
        ``hdr_addr`` and ``status_gpa``.
        """
        # Everything the descriptors point at lies in guest memory, writable where written.
        # (The remembered region's bounds are tested inline: most pieces lie in it.)
        if self._lo <= hdr_addr and hdr_addr + HEADER_SIZE <= self._hi:
            region = self._region
        else:
            region = self._find(hdr_addr, HEADER_SIZE)
        if region is None:
            return None
        try:
            req_type, _, sector = _unpack_header(region.view, hdr_addr - region.gpa)
        except ValueError:  # the region went away meanwhile
            return None
        req_type &= _TYPE_MASK
        if req_type != (_IN if into_guest else _OUT):
            return None
        handler = self.handler
        limits = handler.limits
        if not into_guest and limits.read_only:
            return None
        lo = self._lo
        hi = self._hi
        if lo <= status_gpa < hi:
            region = self._region
        else:
            region = self._find(status_gpa, 1)
            lo = self._lo
            hi = self._hi
        if region is None or region.readonly:
            return None
        length = 0
        for addr, n in data:
            if not (lo <= addr and addr + n <= hi):  # not in the last region: look it up
                region = self._find(addr, n)
                if region is None:
                    return None
                lo = self._lo
                hi = self._hi
            if into_guest and self._region.readonly:  # type: ignore[union-attr]
                return None
            length += n
        if range_fault(sector, length, limits) is not None:
            return None
        memory = self.memory
        if len(data) == 1:
            buffers = RequestBuffers.linear(memory, data[0][0], length, into_guest)
            try:  # the data's region was just looked up: it is the remembered one
                lock = buffers.lock_in(self._region, into_guest)  # type: ignore[arg-type]
            except AccessError:  # a region removed meanwhile: let the generic path report it
                return None
            return self._locked_request(head, status_gpa, sector, length,
                                        DataLayout([buffers], length, False), [lock], into_guest)
        layout = plan(memory, data, guest_writable=into_guest)
        if layout.bounce:
            return None
        locks: list[LockedIoBuffers] = []
        try:
            for buffers in layout.buffers:
                locks.append(buffers.lock(for_write=into_guest))
        except AccessError:  # a region removed meanwhile: let the generic path report it
            for lock in locks:
                lock.close()
            return None
        return self._locked_request(head, status_gpa, sector, length, layout, locks, into_guest)

    def _locked_request(self, head: int, status_gpa: int, sector: int, length: int,
                        layout: DataLayout, locks: list[LockedIoBuffers],
                        into_guest: bool) -> BlkRequest | None:
        """The request for the data's locked RequestBuffers; None (locks released) if O_DIRECT
        would need a bounce."""
        handler = self.handler
        if handler.direct and not all(lock.is_aligned(handler.mem_align) for lock in locks):
            for lock in locks:
                lock.close()
            return None
        pieces: list[IoBuffer] = (locks[0].io_buffers if len(locks) == 1
                                  else [p for lock in locks for p in lock.io_buffers])
        return self._request(_READ if into_guest else _WRITE_OP, head, status_gpa, sector,
                             length, layout, locks, pieces,
                             not into_guest and not handler.device.writeback)
