"""The fast path: reads and writes in the shapes Linux sends, popped, checked and started in one
step.

The generic path pops a chain (:meth:`SplitQueue.pop_batch`, validating it into a
:class:`DescriptorChain`), then the device parses the header, checks the range, plans the
RequestBuffers, locks them and starts the IO -- about seventy Python calls per request, most of
them general machinery the common request does not need.  Linux's virtio-blk driver sends almost
every request as

    [16-byte header (readable)] [data: one or more runs, all readable or all writable] [1-byte
    status (writable)]

as one indirect descriptor whose table is written in order, or as the same pieces chained
directly in the descriptor table.  The queue finds such chains itself
(:meth:`~vhost.queue.base.Queue.peek_simple`), with the same ring rules its generic pop applies
-- head in range and not in flight, ``next`` links, indirect tables, each piece inside one guest
memory region, readable before writable -- and changes nothing.  The fast path does only the
virtio-blk part: the header is 16 bytes and the status 1, header type IN or OUT matching the
data's direction, the pieces writable where the device writes, the disk range
(:func:`~virtio_blk.request.range_fault`), write permission, no bounce needed, the O_DIRECT
alignment.  Only then does it keep the chain (asking :func:`~vhost.queue.base.simple_chains` for
the next claims it) and, once the pass is recognised, start the IO.

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
the handler's ``finish``, the reference, so every failure is reported exactly as the generic
path reports it (the differential test injects disk errors to check that).

The fast path knows the handler only through :class:`FastPathHost` (what it reads and the
public methods it completes through) and builds :class:`~virtio_blk.blk_request.FastRequest`;
it imports nothing of :mod:`virtio_blk.device`, which builds it.
"""

from __future__ import annotations

from collections.abc import Sized
from time import monotonic_ns
from typing import TYPE_CHECKING, Protocol

from blockdev.ops import OpKind
from guestmem import AccessError
from scsi_buffers import RequestBuffers
from vhost.queue.base import NO_LIMIT, simple_chains
from virtio_blk.blk_request import BlkRequest, FastRequest
from virtio_blk.layout import DataLayout, plan
from virtio_blk.request import HEADER, HEADER_SIZE, T_BARRIER, Limits, ReqType, Status, range_fault

if TYPE_CHECKING:
    from blockdev.engine import Engine
    from guestmem import GuestMemory, GuestRegion, IoBuffer, LockedIoBuffers
    from guestmem.dirty_log import DirtyMarker
    from vhost.queue.base import Queue, SimpleChain

#: Most descriptors of a request the fast path takes (header + data runs + status); a longer
#: chain goes to the generic path.  Linux sends up to seg_max (126) data runs; 1M sequential IO
#: on a fragmented guest reaches dozens.
MAX_PIECES = 130

_TYPE_MASK = ~T_BARRIER & 0xFFFFFFFF
_IN = int(ReqType.IN)
_OUT = int(ReqType.OUT)
_READ = OpKind.READ
_WRITE_OP = OpKind.WRITE
_OK = int(Status.OK)

_unpack_header = HEADER.unpack_from


class FastPathStats(Protocol):
    """The per-queue counters the fast path adds to (the device's ``BlkStats``)."""

    requests: int
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int

    def add_latency(self, kind: int, start_ns: int) -> None: ...


class FastPathHost(Protocol):
    """What the fast path uses of the queue handler that owns it: the state it reads, and the
    public methods it completes through (the generic path's own, so a failure is reported as
    that path reports it)."""

    memory: GuestMemory
    engine: Engine
    limits: Limits
    timing: bool
    direct: bool
    mem_align: int
    dirty: DirtyMarker | None

    @property
    def stats(self) -> FastPathStats: ...

    @property
    def pending(self) -> Sized: ...

    @property
    def writeback(self) -> bool: ...

    def finish(self, req: BlkRequest) -> int: ...

    def record_read(self, req: BlkRequest) -> None: ...

    def put_status(self, status_gpa: int, status: int, used: int) -> int: ...

    def complete_reaped(self) -> list[tuple[int, int]]: ...

    def reaped(self) -> list[BlkRequest]: ...


class FastPath:
    """The fused pop-and-start, and completion, of one queue's common requests (see the module
    docstring)."""

    def __init__(self, handler: FastPathHost, vq: Queue) -> None:
        self.handler = handler
        self.vq = vq
        self.memory: GuestMemory = handler.memory
        # The region the last piece was found in (most pieces share one) and its bounds.  Only a
        # hint for the lookup: every piece is still checked against the current table.
        self._region: GuestRegion | None = None
        self._lo = self._hi = 0
        #: Requests started here (the rest went the generic way): for tests and benchmarks.
        self.taken = 0

    def drain(self, limit: int = NO_LIMIT) -> list[tuple[int, int]]:
        """Start the available requests the fast path recognises, up to the first it does not
        and at most ``limit`` (the pass's, which the worker decides:
        :data:`~vhost.queue.base.PASS_LIMIT`).

        Returns ``(head, used length)`` of those already finished (a batched engine is flushed
        and reaped here, as the handler's ``submit_batch`` does).
        """
        handler = self.handler
        if handler.pending:  # requests wait for bounce pages: the generic path keeps the order
            return []
        vq = self.vq
        region = self._region
        if region is not None and region not in self.memory.regions:
            self._forget()  # the memory table changed: forget the removed region
        engine = handler.engine
        submit = engine.submit
        complete = self.complete
        build = self._build
        timing = handler.timing
        # Every chain recognised first, then every request started: asking simple_chains for
        # the next chain claims the one before, so only once the pass has stopped (at a chain
        # declined, or at the last) are all of them claimed -- and a request is never started
        # before its chain is in flight.
        reqs: list[BlkRequest] = []
        for chain in simple_chains(vq, MAX_PIECES):
            if len(reqs) >= limit:
                break  # the pass is full: asking for this chain kept the one before, not it
            req = build(chain)
            if req is None:
                break  # left where it is, for the generic path
            reqs.append(req)
        if not reqs:
            return []
        done: list[tuple[int, int]] = []
        started = 0
        try:
            for req in reqs:
                started += 1
                if timing:
                    req.start_ns = monotonic_ns()
                if submit(req):
                    done.append((req.head, complete(req)))
        finally:
            handler.stats.requests += started
            self.taken += started
        if engine.batched:
            engine.submit_batch()
            done += handler.complete_reaped()
        return done

    def settings_changed(self) -> None:
        """The device's write cache mode changed: nothing to do here, this path reads it per
        request (the compiled one keeps it between passes and reads it again only then)."""

    # ------------------------------------------------------------------ completion
    def complete_reaped(self) -> list[tuple[int, int]]:
        """Finish every request the engine has finished: ``(head, used length)`` of each --
        this path's by :meth:`complete`, the generic path's by the handler's ``finish``."""
        finish = self.handler.finish
        complete = self.complete
        return [(req.head, complete(req) if req.fast else finish(req))
                for req in self.handler.reaped()]

    def complete(self, req: BlkRequest) -> int:
        """Finish a fast-path request that is done: the used length (see the module docstring).

        A request that moved all its bytes is finished here in one step -- what the handler's
        ``finish`` would do for it (release, latency, dirty pages, counters, status byte);
        anything else goes to ``finish`` itself.
        """
        handler = self.handler
        length = req.length
        if req.result != length:  # an error or a short transfer: the reference reports it
            return handler.finish(req)
        for lock in req.locks:
            lock.close()
        stats = handler.stats
        kind = req.kind
        if handler.timing:
            stats.add_latency(kind, req.start_ns)
        if kind == _READ:
            if handler.dirty is not None:
                handler.record_read(req)
            stats.reads += 1
            stats.bytes_read += length
            used = length + 1
        else:
            stats.writes += 1
            stats.bytes_written += length
            used = 1
        return handler.put_status(req.status_gpa, _OK, used)

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

    def _build(self, chain: SimpleChain) -> BlkRequest | None:
        """The virtio-blk checks of a simple chain, and the locked request (or None: nothing
        changed, the generic path takes the chain).

        The queue checked the ring rules and that each piece lies in one memory region; here:
        the header's 16 bytes and the 1-byte status, the header type matching the data's
        direction, the pieces writable where the device writes, the range, write permission.
        """
        (head, header, header_len, data, length, into_guest, trailer, trailer_len, _,
         region) = chain
        if header_len != HEADER_SIZE or trailer_len != 1:
            return None
        if region is not None and not region.readonly:
            # The usual request: every piece in one writable region, which the queue found.
            try:
                req_type, _, sector = _unpack_header(region.view, header - region.gpa)
            except ValueError:  # the region went away meanwhile
                return None
        else:
            found = self._look_up(header, trailer, data, into_guest)
            if found is None:
                return None
            req_type, sector, region = found
        if req_type & _TYPE_MASK != (_IN if into_guest else _OUT):
            return None
        return self.request_for(head, trailer, sector, data, length, into_guest, region)

    def request_for(self, head: int, status_gpa: int, sector: int, data: list[tuple[int, int]],
                    length: int, into_guest: bool, region: GuestRegion | None
                    ) -> BlkRequest | None:
        """The locked request of a chain whose header said IN (``into_guest``) or OUT at
        ``sector``, or None: write permission, the range, the RequestBuffers and their locks, no
        bounce, the O_DIRECT alignment.  ``region``: the one writable region holding every
        piece, if the caller found one (else each piece is looked up).

        The compiled fast path hands back here the requests it finishes the Python way, with
        the sector it read (the header is not read twice: the guest may have changed it).
        """
        handler = self.handler
        limits = handler.limits
        if not into_guest and limits.read_only:
            return None
        if range_fault(sector, length, limits) is not None:
            return None
        memory = self.memory
        if region is None:
            region = self._data_region(status_gpa, data, into_guest)
            if region is None:
                return None
        if len(data) == 1:
            buffers = RequestBuffers.linear(memory, data[0][0], length, into_guest)
            try:
                lock = buffers.lock_in(region, into_guest)
            except AccessError:  # a region removed meanwhile: let the generic path report it
                return None
            # (_locked_request for one lock, inline: the commonest request.)
            if handler.direct and not lock.is_aligned(handler.mem_align):
                lock.close()
                return None
            return FastRequest(_READ if into_guest else _WRITE_OP, head, status_gpa,
                               sector, length, DataLayout([buffers], length, False), [lock],
                               lock.io_buffers, not into_guest and not handler.writeback)
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

    def _look_up(self, hdr_addr: int, status_gpa: int, data: list[tuple[int, int]],
                 into_guest: bool) -> tuple[int, int, GuestRegion] | None:
        """For pieces in several regions (or a read-only one): each looked up, the status and
        an IN's data writable; ``(header type, sector, the last data piece's region)`` or
        None."""
        region = self._find(hdr_addr, HEADER_SIZE)
        if region is None:
            return None
        try:
            req_type, _, sector = _unpack_header(region.view, hdr_addr - region.gpa)
        except ValueError:  # the region went away meanwhile
            return None
        region = self._data_region(status_gpa, data, into_guest)
        if region is None:
            return None
        return req_type, sector, region

    def _data_region(self, status_gpa: int, data: list[tuple[int, int]],
                     into_guest: bool) -> GuestRegion | None:
        """The status and each data piece looked up, the status and an IN's data writable: the
        last data piece's region, or None."""
        region = self._find(status_gpa, 1)
        if region is None or region.readonly:
            return None
        for addr, n in data:
            region = self._find(addr, n)
            if region is None or (into_guest and region.readonly):
                return None
        return region  # (data is never empty)

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
        return FastRequest(_READ if into_guest else _WRITE_OP, head, status_gpa, sector, length,
                           layout, locks, pieces, not into_guest and not handler.writeback)
