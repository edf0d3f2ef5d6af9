"""Descriptor pieces -> RequestBuffers: coalesce what is contiguous, join at page boundaries,
and decide when a request must be bounced.

A data area arrives as a list of ``(gpa, length)`` pieces, one per descriptor.  The scsi_buffers
model can only describe a byte stream whose interior pages are whole (:class:`PagedRange`), so:

* a piece that starts exactly where the previous one ended is *coalesced* into the same range
  (a page they share is listed once);
* a piece that starts on a page boundary right after one that ended on a page boundary is
  *joined* into the same range (its pages are appended);
* anything else starts a new range -- a new :class:`RequestBuffers`.  Where such a boundary falls
  at a multiple of 512 bytes into the data, the ranges are simply issued together (one
  ``preadv`` with all their pieces).  Where it falls mid-sector (a Windows guest's 448+64 or
  3952+2704, UEFI's and SeaBIOS's odd splits) the request is *bounced*: served through one
  page-aligned buffer, gathered before a write, scattered after a read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from guestmem import PAGE_SIZE, GuestMemory
from scsi_buffers import PagedRange, RequestBuffers
from virtio_blk.request import SECTOR_SIZE

_PAGE_MASK = PAGE_SIZE - 1


@dataclass(slots=True)
class DataLayout:
    """The data area of one request as RequestBuffers, and whether it needs a bounce buffer."""

    buffers: list[RequestBuffers]
    length: int
    bounce: bool


def trim_end(pieces: Sequence[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """``pieces`` without their last ``n`` bytes (the status byte after an IN's data)."""
    if pieces and pieces[-1][1] == n:  # the usual layout: the status has its own descriptor
        return list(pieces[:-1])
    out = list(pieces)
    while n and out:
        gpa, length = out[-1]
        if length <= n:
            out.pop()
            n -= length
        else:
            out[-1] = (gpa, length - n)
            n = 0
    return out


def skip_start(pieces: Sequence[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """``pieces`` without their first ``n`` bytes (the header before an OUT's data)."""
    if pieces and pieces[0][1] == n:  # the usual layout: the header has its own descriptor
        return list(pieces[1:])
    out = []
    for gpa, length in pieces:
        if n >= length:
            n -= length
            continue
        out.append((gpa + n, length - n))
        n = 0
    return out


def plan(memory: GuestMemory, pieces: Sequence[tuple[int, int]],
         guest_writable: bool) -> DataLayout:
    """Build the RequestBuffers for a request's data pieces.

    ``guest_writable``: the device writes these pieces -- an IN request, whose data a disk
    read fills.  (It becomes the model's ``RequestBuffers.is_write``, a name easy to misread
    next to virtio's IN/OUT, which is why it is not used here.)
    """
    is_write = guest_writable
    if len(pieces) == 1:  # the common case: one descriptor of data
        gpa, n = pieces[0]
        return DataLayout([RequestBuffers.linear(memory, gpa, n, is_write)], n, False)
    buffers: list[RequestBuffers] = []
    bounce = False
    stream = 0  # bytes of data before the current piece
    start = -1  # byte offset of the current range in its first page
    length = 0
    gpns: list[int] = []
    end = -1  # guest address one past the current range
    for gpa, n in pieces:
        if n == 0:
            continue
        first = gpa >> 12
        last = (gpa + n - 1) >> 12
        if gpa == end:  # contiguous: coalesce
            gpns.extend(range(first + 1 if first == gpns[-1] else first, last + 1))
            length += n
        elif end >= 0 and not end & _PAGE_MASK and not gpa & _PAGE_MASK:  # page boundary: join
            gpns.extend(range(first, last + 1))
            length += n
        else:
            if end >= 0:
                buffers.append(RequestBuffers(memory, PagedRange(start, length, gpns), is_write))
                if stream % SECTOR_SIZE:
                    bounce = True
            start = gpa & _PAGE_MASK
            length = n
            gpns = list(range(first, last + 1))
        end = gpa + n
        stream += n
    if end >= 0:
        buffers.append(RequestBuffers(memory, PagedRange(start, length, gpns), is_write))
    return DataLayout(buffers, stream, bounce)
