"""PagedRange against a byte-by-byte model: byte k of a range over ``gpns`` lives at guest address
``gpns[k // 4096] * 4096 + k % 4096``.  Every operation must agree with slicing that model."""

from __future__ import annotations

import mmap

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from scsi_buffers import PAGE_SIZE, GuestMemory, PagedRange, PagedRanges, RequestBuffers

PROPS = settings(deadline=None, max_examples=100)


# ---------------------------------------------------------------- model
def model(offset: int, length: int, gpns: list[int] | tuple[int, ...]) -> np.ndarray:
    """Guest address of every byte, in order."""
    k = np.arange(offset, offset + length, dtype=np.int64)
    pages = np.asarray(gpns, dtype=np.int64)
    if length == 0:
        return k
    return pages[k >> 12] * PAGE_SIZE + (k & (PAGE_SIZE - 1))


def model_of(r: PagedRange) -> np.ndarray:
    return model(r.offset, len(r), r.gpns)


def model_runs(addrs: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive addresses."""
    if addrs.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(addrs) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [addrs.size]))
    return [(int(addrs[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def expand(runs: list[tuple[int, int]]) -> np.ndarray:
    if not runs:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(g, g + n, dtype=np.int64) for g, n in runs])


# ---------------------------------------------------------------- strategies
@st.composite
def gpn_lists(draw: st.DrawFn, max_pages: int = 8, max_gpn: int = 40) -> list[int]:
    """Page lists made of short consecutive runs (so merging is exercised) and repeats."""
    out: list[int] = []
    while len(out) < max_pages and draw(st.booleans()):
        start = draw(st.integers(0, max_gpn))
        run = draw(st.integers(1, 3))
        out.extend(range(start, start + run))
    return out[:max_pages]


def interesting(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Integers in [lo, hi], biased to page and sector boundaries and their neighbours."""
    if hi <= lo:
        return st.just(lo)
    edges = st.sampled_from(
        sorted({min(max(lo, v + d), hi) for v in range(0, hi + 1, 512) for d in (-1, 0, 1)}) or [lo]
    )
    return st.one_of(st.integers(lo, hi), edges)


@st.composite
def paged_ranges(draw: st.DrawFn, max_pages: int = 8) -> tuple[int, int, list[int]]:
    gpns = draw(gpn_lists(max_pages=max_pages))
    total = len(gpns) * PAGE_SIZE
    offset = draw(interesting(0, total))
    length = draw(interesting(0, total - offset))
    return offset, length, gpns


# ---------------------------------------------------------------- properties
@PROPS
@given(paged_ranges())
def test_ranges_cover_exactly_the_model_bytes(t: tuple[int, int, list[int]]) -> None:
    offset, length, gpns = t
    r = PagedRange.new(offset, length, gpns)
    assert r is not None
    addrs = model(offset, length, gpns)
    assert r.ranges() == model_runs(addrs)
    assert len(r) == length and r.is_empty == (length == 0)
    assert r.offset == offset % PAGE_SIZE
    touched = [gpns[i] for i in range(offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE))]
    assert list(r.gpns) == (touched if length else [])
    assert np.array_equal(model_of(r), addrs)


@PROPS
@given(st.integers(-5, 40000), st.integers(-5, 40000), st.lists(st.integers(0, 9), max_size=8))
def test_new_is_none_exactly_when_the_window_does_not_fit(
    offset: int, length: int, gpns: list[int]
) -> None:
    fits = offset >= 0 and length >= 0 and offset + length <= len(gpns) * PAGE_SIZE
    assert (PagedRange.new(offset, length, gpns) is not None) == fits


@PROPS
@given(paged_ranges(), st.data())
def test_slicing_agrees_with_the_model(t: tuple[int, int, list[int]], data: st.DataObject) -> None:
    offset, length, gpns = t
    r = PagedRange(offset, length, gpns)
    addrs = model(offset, length, gpns)
    o = data.draw(interesting(0, length), label="o")
    n = data.draw(interesting(0, length - o), label="n")
    assert np.array_equal(model_of(r.subrange(o, n)), addrs[o : o + n])
    assert r.subrange(o, n).ranges() == model_runs(addrs[o : o + n])
    assert np.array_equal(model_of(r.skip(o)), addrs[o:])
    assert np.array_equal(model_of(r.truncate(o)), addrs[:o])
    head, tail = r.split(o)
    assert np.array_equal(model_of(head), addrs[:o])
    assert np.array_equal(model_of(tail), addrs[o:])
    assert r.try_subrange(o, length - o + 1) is None
    assert r.skip(o).truncate(n) == r.subrange(o, n)


@PROPS
@given(paged_ranges())
def test_is_aligned_agrees_with_checking_every_run(t: tuple[int, int, list[int]]) -> None:
    offset, length, gpns = t
    r = PagedRange(offset, length, gpns)
    mem = GuestMemory()
    b = RequestBuffers(mem, r, True)
    for shift in range(14):
        a = 1 << shift
        # Brute force over per-page pieces: each must start and end on a multiple of `a`
        # (and the start of an empty range counts too); nothing beyond a page can be aligned,
        # as a piece never spans more than one page of the guest's choosing.
        pieces_ok = all(
            gpa % a == 0 and n % a == 0
            for run_gpa, run_len in r.ranges()
            for gpa, n in _per_page(run_gpa, run_len)
        )
        brute = a <= PAGE_SIZE and r.offset % a == 0 and pieces_ok
        assert b.is_aligned(a) == brute, (a, r)


def _per_page(gpa: int, length: int) -> list[tuple[int, int]]:
    out = []
    end = gpa + length
    while gpa < end:
        nxt = min(end, (gpa // PAGE_SIZE + 1) * PAGE_SIZE)
        out.append((gpa, nxt - gpa))
        gpa = nxt
    return out


@PROPS
@given(paged_ranges(max_pages=4), paged_ranges(max_pages=4))
def test_join_is_concatenation_when_expressible(
    t1: tuple[int, int, list[int]], t2: tuple[int, int, list[int]]
) -> None:
    a, b = PagedRange(*t1), PagedRange(*t2)
    joined = a.try_join(b)
    a_end = (a.offset + len(a)) % PAGE_SIZE
    expressible = (
        a.is_empty
        or b.is_empty
        or (a_end == 0 and b.offset == 0)
        or (a_end == b.offset and a.gpns[-1] == b.gpns[0])
    )
    assert (joined is not None) == expressible
    if joined is not None:
        assert np.array_equal(model_of(joined), np.concatenate((model_of(a), model_of(b))))


@PROPS
@given(st.lists(paged_ranges(max_pages=3), max_size=4), st.data())
def test_paged_ranges_skip_truncate_agree_with_the_model(
    ts: list[tuple[int, int, list[int]]], data: st.DataObject
) -> None:
    members = [PagedRange(*t) for t in ts]
    multi = PagedRanges(members)
    addrs = np.concatenate([model_of(m) for m in members] + [np.zeros(0, dtype=np.int64)])
    assert len(multi) == addrs.size
    skip = data.draw(interesting(0, len(multi)), label="skip")
    keep = data.draw(interesting(0, len(multi) - skip), label="keep")
    cut = multi.skip(skip).truncate(keep)
    assert np.array_equal(expand(cut.ranges()), addrs[skip : skip + keep])
    assert len(cut) == keep


@PROPS
@given(paged_ranges())
def test_guest_and_host_alignment_agree_where_page_offsets_are_kept(
    t: tuple[int, int, list[int]],
) -> None:
    """``RequestBuffers.is_aligned`` (guest addresses) and ``LockedIoBuffers.is_aligned`` (the
    host pieces O_DIRECT sees) are one rule in two views: they must agree on guest memory whose
    regions keep page offsets, here two adjacent page-aligned mappings."""
    offset, length, gpns = t
    top = max(gpns, default=0) + 1
    low = max(1, top // 2)  # the region boundary falls inside some ranges
    mem = GuestMemory.anonymous(low * PAGE_SIZE)
    if top > low:
        mem.add_buffer(low * PAGE_SIZE, mmap.mmap(-1, (top - low) * PAGE_SIZE))
    b = RequestBuffers(mem, PagedRange(offset, length, gpns), True)
    with b.lock(for_write=True) as locked:
        for shift in range(14):
            a = 1 << shift
            # An empty range has no host pieces: only its guest offset can be misaligned.
            expect = b.is_aligned(a) if length else True
            assert locked.is_aligned(a) == expect, (a, offset, length)
    mem.close()
