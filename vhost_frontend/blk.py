"""A virtio-blk *driver* on top of the vhost-user frontend: builds requests with any layout.

:class:`BlkDriver` plays the guest's virtio-blk driver against a backend reached through
:class:`vhost_frontend.Frontend`.  A request is two byte streams -- the device-readable one
(16-byte header, then the OUT data or the DISCARD/WRITE_ZEROES segments) and the device-writable
one (the IN/GET_ID data, then the status byte) -- each cut into descriptors at any points and
placed anywhere in guest memory, in a direct or an indirect chain.  Device-writable memory is
poisoned before the request goes out, so a test can see exactly which bytes the device wrote.

Placement helpers put every piece in fresh pages followed by a guard page, so two pieces are
never accidentally contiguous (or joinable at a page boundary) unless a test asks for it.

Example::

    drv = BlkDriver(frontend, queue, memory)
    res = drv.read(8, 4096, data=drv.pieces([448, 3648], offsets=[3648, 0]))
    assert res.status == Status.OK and res.used == 4097
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from guestmem import PAGE_SIZE as PAGE
from vhost_frontend.client import Frontend
from vhost_frontend.errors import FrontendError
from vhost_frontend.memory import FrontendMemory
from vhost_frontend.packed import PackedDriverQueue
from vhost_frontend.ring import DriverQueue
from virtio_blk.request import HEADER, SEGMENT, ReqType

# The wire format is the device's own (virtio_blk.request): one place declares it.
T_IN = int(ReqType.IN)
T_OUT = int(ReqType.OUT)
T_FLUSH = int(ReqType.FLUSH)
T_GET_ID = int(ReqType.GET_ID)
T_DISCARD = int(ReqType.DISCARD)
T_WRITE_ZEROES = int(ReqType.WRITE_ZEROES)

#: What device-writable memory holds before the device writes it.
POISON = 0xA5
#: What the status byte holds before the device writes it (no valid status has this value).
STATUS_POISON = 0xEE

Piece = tuple[int, int]  # (gpa, length)


def header(req_type: int, sector: int = 0, reserved: int = 0) -> bytes:
    """The 16-byte virtio_blk_req header."""
    return HEADER.pack(req_type, reserved, sector)


def segment(sector: int, num_sectors: int, flags: int = 0) -> bytes:
    """One 16-byte virtio_blk_discard_write_zeroes segment."""
    return SEGMENT.pack(sector, num_sectors, flags)


def split_at(total: int, cuts: Sequence[int]) -> list[int]:
    """Lengths of the pieces of ``total`` bytes cut at the (sorted, distinct) offsets ``cuts``."""
    points = [0, *sorted(set(c for c in cuts if 0 < c < total)), total]
    return [b - a for a, b in itertools.pairwise(points)]


@dataclass
class BlkResult:
    """What came back for one request."""

    head: int
    status: int  # the status byte as the device left it (STATUS_POISON if untouched)
    used: int  # the used length the device reported
    data: bytes  # device-writable bytes before the status byte, as they are after completion


@dataclass
class PendingRequest:
    """A request made available to the device and not yet completed."""

    head: int
    writable: list[Piece]
    status_gpa: int | None
    descriptors: list[tuple[int, int, bool]] = field(default_factory=list)


class BlkDriver:
    """Places virtio-blk requests on one queue of a connected, started backend."""

    def __init__(self, frontend: Frontend, queue: DriverQueue | PackedDriverQueue,
                 memory: FrontendMemory,
                 timeout: float = 10.0) -> None:
        self.frontend = frontend
        self.queue = queue
        self.mem = memory
        self.timeout = timeout
        self._completed: dict[int, int] = {}

    # ------------------------------------------------------------------ guest memory
    def alloc(self, size: int, offset: int = 0, region: int | None = None) -> int:
        """A fresh guest address ``offset`` bytes into a page, with ``size`` bytes after it,
        followed by at least one untouched guard page."""
        pages = -(-(offset + size) // PAGE) + 1
        base = self.mem.alloc(pages * PAGE, PAGE, region)
        return base + offset

    def pieces(self, lengths: Sequence[int], *, offsets: int | Sequence[int] = 0,
               contiguous: bool = False, region: int | None = None) -> list[Piece]:
        """Guest pieces of the given lengths.

        ``contiguous``: one after the other from ``offsets`` (an int) into a fresh page.
        Otherwise each piece gets fresh pages of its own, starting ``offsets[i]`` (or
        ``offsets`` when an int) into its first page, with a guard page after it.
        """
        if contiguous:
            start = offsets if isinstance(offsets, int) else offsets[0]
            gpa = self.alloc(sum(lengths), start, region)
            out = []
            for n in lengths:
                out.append((gpa, n))
                gpa += n
            return out
        offs = [offsets] * len(lengths) if isinstance(offsets, int) else list(offsets)
        if len(offs) != len(lengths):
            raise ValueError("one offset per piece")
        return [(self.alloc(n, o, region), n) for n, o in zip(lengths, offs, strict=True)]

    def fill(self, pieces: Sequence[Piece], data: bytes) -> None:
        """Write ``data`` across ``pieces`` in order (it must be exactly as long)."""
        if sum(n for _, n in pieces) != len(data):
            raise ValueError(f"{len(data)} bytes for pieces of {sum(n for _, n in pieces)}")
        pos = 0
        for gpa, n in pieces:
            self.mem.write(gpa, data[pos : pos + n])
            pos += n

    def gather(self, pieces: Sequence[Piece]) -> bytes:
        """The bytes of ``pieces`` in order."""
        return b"".join(self.mem.read(gpa, n) for gpa, n in pieces)

    # ------------------------------------------------------------------ raw chains
    def start_chain(self, readable: Sequence[Piece], writable: Sequence[Piece], *,
                    indirect: bool = False, poison: bool = True,
                    kick: bool = True) -> PendingRequest:
        """Make the chain ``readable`` then ``writable`` available (contents already placed);
        device-writable memory is poisoned first (unless ``poison`` is false), and the last
        writable byte set to STATUS_POISON."""
        writable = list(writable)
        status_gpa = None
        if poison:
            for gpa, n in writable:
                self.mem.write(gpa, bytes([POISON]) * n)
        if writable:
            last_gpa, last_n = writable[-1]
            status_gpa = last_gpa + last_n - 1
            self.mem.write(status_gpa, bytes([STATUS_POISON]))
        descs = [(a, n, False) for a, n in readable] + [(a, n, True) for a, n in writable]
        if kick:
            head = self.frontend.submit(self.queue, descs, indirect=indirect)
        else:  # publish only: a later kick() hands a whole batch to the device at once
            head = self.queue.add_chain(descs, indirect)
        return PendingRequest(head, writable, status_gpa, descs)

    def kick(self) -> None:
        """Notify the device (after requests were started with ``kick=False``)."""
        self.queue.kick()

    def wait(self, pending: Sequence[PendingRequest],
             timeout: float | None = None) -> list[BlkResult]:
        """Wait for every request of ``pending`` (any completion order); results in that order."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        heads = [p.head for p in pending]
        if len(set(heads)) != len(heads):
            raise ValueError("two pending requests with one head")
        while any(h not in self._completed for h in heads):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [h for h in heads if h not in self._completed]
                raise FrontendError(f"requests {missing} not completed in time")
            for head, used in self.queue.wait_used(1, remaining):
                if head in self._completed:
                    raise FrontendError(f"head {head} completed twice")
                self._completed[head] = used
        out = []
        for p in pending:
            used = self._completed.pop(p.head)
            raw = self.gather(p.writable)
            status = raw[-1] if raw else STATUS_POISON
            out.append(BlkResult(p.head, status, used, raw[:-1]))
        return out

    def run_chain(self, readable: Sequence[Piece], writable: Sequence[Piece], *,
                  indirect: bool = False, poison: bool = True,
                  timeout: float | None = None) -> BlkResult:
        """:meth:`start_chain` and wait for it."""
        pending = self.start_chain(readable, writable, indirect=indirect, poison=poison)
        return self.wait([pending], timeout)[0]

    # ------------------------------------------------------------------ requests
    def start(self, req_type: int, sector: int = 0, *, out: bytes = b"", in_len: int = 0,
              header_split: Sequence[int] = (16,), out_pieces: Sequence[Piece] | None = None,
              in_pieces: Sequence[Piece] | None = None, status_with_data: bool = False,
              header_with_data: bool = False, indirect: bool = False,
              reserved: int = 0, kick: bool = True) -> PendingRequest:
        """Place one request and make it available.

        ``out`` goes device-readable after the header, in ``out_pieces`` (default: one fresh
        piece); ``in_len`` device-writable bytes go before the status byte, in ``in_pieces``
        (default: one fresh piece).  ``header_split`` cuts the header into descriptors.
        ``status_with_data``: the status byte is the byte right after the last IN piece, in the
        same descriptor.  ``header_with_data``: the header sits right before the first OUT
        byte, in the same descriptor (``header_split`` is ignored then).
        """
        hdr = header(req_type, sector, reserved)
        if out_pieces is None:
            out_pieces = self.pieces([len(out)], offsets=16 if header_with_data else 0) \
                if out else []
        else:
            out_pieces = list(out_pieces)
        self.fill(out_pieces, out)
        if header_with_data:
            if not out_pieces:
                raise ValueError("header_with_data needs OUT data")
            gpa, n = out_pieces[0]
            self.mem.write(gpa - 16, hdr)
            readable = [(gpa - 16, n + 16), *out_pieces[1:]]
        else:
            hdr_pieces = self.pieces(list(header_split))
            self.fill(hdr_pieces, hdr)
            readable = hdr_pieces + list(out_pieces)
        if in_pieces is None:
            in_pieces = self.pieces([in_len]) if in_len else []
        else:
            in_pieces = list(in_pieces)
        if sum(n for _, n in in_pieces) != in_len:
            raise ValueError("in_pieces do not add up to in_len")
        if status_with_data:
            if not in_pieces:
                raise ValueError("status_with_data needs IN data")
            gpa, n = in_pieces[-1]
            writable = [*in_pieces[:-1], (gpa, n + 1)]
        else:
            writable = [*in_pieces, (self.alloc(1, PAGE - 1), 1)]
        return self.start_chain(readable, writable, indirect=indirect, kick=kick)

    def request(self, req_type: int, sector: int = 0, **kwargs: object) -> BlkResult:
        """:meth:`start` one request and wait for it."""
        timeout = kwargs.pop("timeout", None)
        pending = self.start(req_type, sector, **kwargs)  # type: ignore[arg-type]
        return self.wait([pending], timeout)[0]  # type: ignore[arg-type]

    def read(self, sector: int, length: int, *, pieces: Sequence[Piece] | None = None,
             **kwargs: object) -> BlkResult:
        """VIRTIO_BLK_T_IN of ``length`` bytes into ``pieces`` (default: one fresh piece)."""
        return self.request(T_IN, sector, in_len=length, in_pieces=pieces, **kwargs)

    def write(self, sector: int, data: bytes, *, pieces: Sequence[Piece] | None = None,
              **kwargs: object) -> BlkResult:
        """VIRTIO_BLK_T_OUT of ``data`` from ``pieces`` (default: one fresh piece)."""
        return self.request(T_OUT, sector, out=data, out_pieces=pieces, **kwargs)

    def flush(self, **kwargs: object) -> BlkResult:
        return self.request(T_FLUSH, 0, **kwargs)

    def get_id(self, length: int = 20, **kwargs: object) -> BlkResult:
        return self.request(T_GET_ID, 0, in_len=length, **kwargs)

    def discard(self, *segments: tuple[int, int] | tuple[int, int, int],
                **kwargs: object) -> BlkResult:
        """VIRTIO_BLK_T_DISCARD of ``(sector, num_sectors[, flags])`` segments."""
        payload = b"".join(segment(*s) for s in segments)
        return self.request(T_DISCARD, 0, out=payload, **kwargs)

    def write_zeroes(self, *segments: tuple[int, int] | tuple[int, int, int],
                     **kwargs: object) -> BlkResult:
        """VIRTIO_BLK_T_WRITE_ZEROES of ``(sector, num_sectors[, flags])`` segments."""
        payload = b"".join(segment(*s) for s in segments)
        return self.request(T_WRITE_ZEROES, 0, out=payload, **kwargs)
