"""PagedRange: one contiguous byte stream laid over a list of guest pages.

A storage request names its data as guest page numbers (gpns) plus a byte window into the flat space
those pages make when laid end to end: page ``i`` of the list covers bytes
``[i*4096, (i+1)*4096)``.  Only the first and last page the window touches may be partial; every
interior page is used whole.  That is the whole model, and it is why the type is cheap: a range is
two integers and a shared tuple, and every sub-range, skip or split is a new pair of integers over
the same tuple.

Construction policy (the design doc lets us choose):

* :meth:`PagedRange.new` returns ``None`` for a window that does not fit its page list.  The device
  turns guest-supplied descriptors into ranges on the hot path and answers a bad one with an IO
  error status, so a cheap ``None`` check beats an exception there.
* Calling the class directly, ``PagedRange(offset, length, gpns)``, raises ``ValueError`` instead,
  for code that treats a bad range as a bug.

Page numbers are not checked at construction (that would cost O(pages) on every request); a gpn
whose byte address does not fit 64 bits is reported when the range is turned into addresses, by
:meth:`PagedRange.ranges`, as :class:`InvalidGpnError`.

:class:`PagedRanges` strings several ranges into one logical stream with no constraint at the
joins, for the cases where ranges cannot be merged into one (:meth:`PagedRange.join`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from guestmem import PAGE_SHIFT, PAGE_SIZE

__all__ = ["MAX_GPN", "InvalidGpnError", "PagedRange", "PagedRanges"]

_PAGE_MASK = PAGE_SIZE - 1

#: The largest guest page number whose bytes all have 64-bit addresses.
MAX_GPN = (1 << (64 - PAGE_SHIFT)) - 1


class InvalidGpnError(ValueError):
    """A guest page number whose byte address does not fit in 64 bits (or is negative)."""

    def __init__(self, gpn: Any) -> None:
        super().__init__(f"guest page number {gpn!r} is not a valid 64-bit page")
        self.gpn = gpn


class PagedRange:
    """An immutable byte window ``[start, end)`` over the flat space of ``gpns``.

    Immutable the way :class:`fractions.Fraction` is: private slots and no method that changes
    them (a ``__setattr__`` guard would double the construction cost on the hot path).  Every
    "mutation" (skip, truncate, split, join) returns a new range.

    ``start``/``end`` index the flat space of the *whole* tuple the range was built on, so
    sub-ranges share that tuple instead of copying it.  Properties that describe the guest bytes
    (``offset``, ``gpns``, ``ranges()``) only ever look at the pages actually touched.

    Equality and hashing compare the bytes described (first-page offset, length, pages touched),
    not the bookkeeping: ``new(5000, 100, [10, 11]) == new(904, 100, [11])``.
    """

    __slots__ = ("_end", "_gpns", "_start")

    PAGE_SIZE = PAGE_SIZE

    _start: int
    _end: int
    _gpns: tuple[int, ...]

    def __init__(self, offset: int, length: int, gpns: Iterable[int]) -> None:
        gpns = gpns if type(gpns) is tuple else tuple(gpns)
        if offset < 0 or length < 0 or offset + length > len(gpns) * PAGE_SIZE:
            raise ValueError(
                f"range {offset}+{length} does not fit {len(gpns)} pages "
                f"({len(gpns) * PAGE_SIZE} bytes)"
            )
        self._start = offset
        self._end = offset + length
        self._gpns = gpns

    # ------------------------------------------------------------------ construction
    @classmethod
    def new(cls, offset: int, length: int, gpns: Iterable[int]) -> PagedRange | None:
        """The range of ``length`` bytes from ``offset`` into ``gpns``, or None if it does not fit.

        ``offset`` may exceed a page (``new(5000, 100, [10, 11])`` starts 904 bytes into page 11);
        a zero length is valid anywhere inside (or at the end of) the page list.
        """
        gpns = gpns if type(gpns) is tuple else tuple(gpns)
        if offset < 0 or length < 0 or offset + length > len(gpns) * PAGE_SIZE:
            return None
        return _make(offset, offset + length, gpns)

    @classmethod
    def empty(cls) -> PagedRange:
        """The empty range (no pages)."""
        return _EMPTY

    @classmethod
    def linear(cls, gpa: int, length: int) -> PagedRange:
        """The range covering the guest physical bytes ``[gpa, gpa+length)``.

        This is how a descriptor ``(addr, len)`` becomes a range: its pages are consecutive, and
        their count comes from ``gpa % 4096 + length``, so a range that crosses one more page
        boundary than its length suggests (``linear(0x800, 4096)``) gets both pages.
        Raises ``ValueError`` for a negative address or length, or one past 2**64.
        """
        if gpa < 0 or length < 0 or gpa + length > 1 << 64:
            raise ValueError(f"guest range {gpa:#x}+{length:#x} is outside the 64-bit space")
        offset = gpa & _PAGE_MASK
        first = gpa >> PAGE_SHIFT
        count = (offset + length + _PAGE_MASK) >> PAGE_SHIFT
        if count == 1:
            gpns: tuple[int, ...] = (first,)
        elif count == 2:
            gpns = (first, first + 1)
        else:
            gpns = tuple(range(first, first + count))
        return _make(offset, offset + length, gpns)

    # ------------------------------------------------------------------ value
    @property
    def start(self) -> int:
        """Byte offset of the window into the flat space of the underlying page tuple."""
        return self._start

    @property
    def end(self) -> int:
        """One past the window's last byte, in the same flat space as :attr:`start`."""
        return self._end

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def length(self) -> int:
        """Byte length (also ``len(range)``)."""
        return self._end - self._start

    @property
    def is_empty(self) -> bool:
        return self._end == self._start

    @property
    def offset(self) -> int:
        """Offset of the first byte into the first page touched (``start % 4096``)."""
        return self._start & _PAGE_MASK

    @property
    def gpns(self) -> tuple[int, ...]:
        """The page numbers the window touches, in order; ``()`` when it is empty.

        (The reference returns the page an empty mid-page window sits in; an empty window touches
        no page, and saying so keeps ``gpns`` equal to "pages with a byte in the range".)
        """
        start, end = self._start, self._end
        if start == end:
            return ()
        return self._gpns[start >> PAGE_SHIFT : (end + _PAGE_MASK) >> PAGE_SHIFT]

    def _key(self) -> tuple[int, int, tuple[int, ...]]:
        if self._start == self._end:
            return (0, 0, ())
        return (self._start & _PAGE_MASK, self._end - self._start, self.gpns)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PagedRange):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"PagedRange(offset={self.offset}, length={len(self)}, gpns={list(self.gpns)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PagedRange, (self.offset, len(self), self.gpns))

    # ------------------------------------------------------------------ slicing
    def try_subrange(self, offset: int, length: int) -> PagedRange | None:
        """Bytes ``[offset, offset+length)`` of this range, or None if they are not all in it."""
        if offset < 0 or length < 0 or offset + length > self._end - self._start:
            return None
        start = self._start + offset
        return _make(start, start + length, self._gpns)

    def subrange(self, offset: int, length: int) -> PagedRange:
        """Bytes ``[offset, offset+length)`` of this range; ``ValueError`` if out of range."""
        sub = self.try_subrange(offset, length)
        if sub is None:
            raise ValueError(f"invalid subrange: {offset} + {length} > {len(self)}")
        return sub

    def skip(self, n: int) -> PagedRange:
        """This range without its first ``n`` bytes; ``ValueError`` if ``n`` exceeds the length."""
        if n < 0 or n > self._end - self._start:
            raise ValueError(f"cannot skip {n} bytes of a {len(self)}-byte range")
        return _make(self._start + n, self._end, self._gpns)

    def truncate(self, n: int) -> PagedRange:
        """The first ``n`` bytes of this range; ``ValueError`` if ``n`` exceeds the length."""
        if n < 0 or n > self._end - self._start:
            raise ValueError(f"cannot truncate a {len(self)}-byte range to {n} bytes")
        return _make(self._start, self._start + n, self._gpns)

    def try_split(self, offset: int) -> tuple[PagedRange, PagedRange] | None:
        """``(first offset bytes, the rest)``, or None if ``offset`` is outside the range."""
        if offset < 0 or offset > self._end - self._start:
            return None
        mid = self._start + offset
        return _make(self._start, mid, self._gpns), _make(mid, self._end, self._gpns)

    def split(self, offset: int) -> tuple[PagedRange, PagedRange]:
        """``(first offset bytes, the rest)``; ``ValueError`` if ``offset`` is outside the range."""
        parts = self.try_split(offset)
        if parts is None:
            raise ValueError(f"cannot split a {len(self)}-byte range at {offset}")
        return parts

    # ------------------------------------------------------------------ joining
    def try_join(self, other: PagedRange) -> PagedRange | None:
        """One range for this range's bytes followed by ``other``'s, or None if none can say it.

        Two cases can be expressed, because a range has no holes inside a page:

        * the boundary is page-aligned on both sides (this range ends at a page end, ``other``
          starts at a page start): the page lists are simply concatenated;
        * the two are contiguous inside one shared page (this range ends in page P at byte b,
          ``other`` starts in the same page P at byte b): P is listed once.

        An empty side joins with anything.
        """
        if self._start == self._end:
            return other
        if other._start == other._end:
            return self
        mine, theirs = self.gpns, other.gpns
        tail = self._end & _PAGE_MASK
        head = other._start & _PAGE_MASK
        if tail == 0 and head == 0:
            gpns = mine + theirs
        elif tail == head and mine[-1] == theirs[0]:
            gpns = mine + theirs[1:]
        else:
            return None
        start = self._start & _PAGE_MASK
        return _make(start, start + len(self) + len(other), gpns)

    def join(self, other: PagedRange) -> PagedRange:
        """Like :meth:`try_join`, raising ``ValueError`` when the boundary cannot be expressed."""
        joined = self.try_join(other)
        if joined is None:
            raise ValueError(
                f"cannot join {self!r} and {other!r}: the boundary is neither page-aligned on "
                "both sides nor contiguous within one page"
            )
        return joined

    @classmethod
    def concat(cls, ranges: Iterable[PagedRange]) -> PagedRange:
        """Join every range in order (:meth:`join`); the empty range for none."""
        out = _EMPTY
        for r in ranges:
            out = out.join(r)
        return out

    # ------------------------------------------------------------------ addresses
    def ranges(self) -> list[tuple[int, int]]:
        """The ``(gpa, length)`` runs of the range, merging consecutive page numbers into one run.

        Returned as a list, built whole: an invalid page anywhere raises
        :class:`InvalidGpnError` before the caller has acted on any run.
        """
        start, end = self._start, self._end
        if start == end:
            return []
        gpns = self._gpns
        first = start >> PAGE_SHIFT
        last = (end + _PAGE_MASK) >> PAGE_SHIFT  # exclusive
        if last - first == 1:  # the 4k-request case: one page
            gpn = gpns[first]
            if not 0 <= gpn <= MAX_GPN:
                raise InvalidGpnError(gpn)
            return [((gpn << PAGE_SHIFT) | (start & _PAGE_MASK), end - start)]
        out = []
        i = first
        pos = start
        while i < last:
            gpn = gpns[i]
            j = i + 1
            while j < last and gpns[j] == gpn + (j - i):
                j += 1
            if gpn < 0 or gpn + (j - i - 1) > MAX_GPN:
                raise InvalidGpnError(gpn if gpn < 0 else gpn + (j - i - 1))
            run_end = min(j << PAGE_SHIFT, end)
            out.append(((gpn << PAGE_SHIFT) + (pos & _PAGE_MASK), run_end - pos))
            pos = run_end
            i = j
        return out


_new = object.__new__


def _make(start: int, end: int, gpns: tuple[int, ...]) -> PagedRange:
    """Build a range without validation (callers have checked); the hot-path constructor."""
    r = _new(PagedRange)
    r._start = start
    r._end = end
    r._gpns = gpns
    return r


_EMPTY = _make(0, 0, ())


class PagedRanges:
    """Several :class:`PagedRange` read as one byte stream, with no constraint at the joins.

    A single range cannot express a boundary that is mid-page on either side (two descriptors at
    arbitrary addresses); this type can, so it is what skip/truncate over a whole descriptor list
    use.  Immutable: :meth:`skip` and :meth:`truncate` return new values.  Empty members are
    dropped.  Runs are never merged across members (each member's :meth:`PagedRange.ranges`).
    """

    __slots__ = ("_length", "_ranges")

    def __init__(self, ranges: Iterable[PagedRange] = ()) -> None:
        kept = tuple(r for r in ranges if not r.is_empty)
        self._ranges: tuple[PagedRange, ...] = kept
        self._length: int = sum(len(r) for r in kept)

    def __len__(self) -> int:
        return self._length

    @property
    def length(self) -> int:
        return self._length

    @property
    def is_empty(self) -> bool:
        return self._length == 0

    def paged_ranges(self) -> tuple[PagedRange, ...]:
        """The member ranges (none empty), in order."""
        return self._ranges

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PagedRanges):
            return NotImplemented
        return self._ranges == other._ranges

    def __hash__(self) -> int:
        return hash(self._ranges)

    def __repr__(self) -> str:
        return f"PagedRanges({list(self._ranges)!r})"

    def skip(self, n: int) -> PagedRanges:
        """The stream without its first ``n`` bytes; ``ValueError`` if ``n`` exceeds the length."""
        if n < 0 or n > self._length:
            raise ValueError(f"cannot skip {n} bytes of a {self._length}-byte range list")
        out: list[PagedRange] = []
        for r in self._ranges:
            if n >= len(r):
                n -= len(r)
                continue
            out.append(r.skip(n) if n else r)
            n = 0
        return PagedRanges(out)

    def truncate(self, n: int) -> PagedRanges:
        """The first ``n`` bytes of the stream; ``ValueError`` if ``n`` exceeds the length."""
        if n < 0 or n > self._length:
            raise ValueError(f"cannot truncate a {self._length}-byte range list to {n} bytes")
        out: list[PagedRange] = []
        for r in self._ranges:
            if n == 0:
                break
            take = min(n, len(r))
            out.append(r.truncate(take) if take < len(r) else r)
            n -= take
        return PagedRanges(out)

    def ranges(self) -> list[tuple[int, int]]:
        """Every member's ``(gpa, length)`` runs, in order."""
        out: list[tuple[int, int]] = []
        for r in self._ranges:
            out.extend(r.ranges())
        return out

    @classmethod
    def of(cls, *ranges: PagedRange | Sequence[PagedRange]) -> PagedRanges:
        """Convenience: ``PagedRanges.of(a, b)`` or ``PagedRanges.of([a, b])``."""
        flat: list[PagedRange] = []
        for r in ranges:
            if isinstance(r, PagedRange):
                flat.append(r)
            else:
                flat.extend(r)
        return cls(flat)
