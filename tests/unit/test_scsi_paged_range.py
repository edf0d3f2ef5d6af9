"""PagedRange / PagedRanges: the worked examples of the design doc, and the edges around them."""

from __future__ import annotations

import pickle

import pytest

from scsi_buffers import MAX_GPN, InvalidGpnError, PagedRange, PagedRanges


def _runs(r: PagedRange | PagedRanges) -> list[tuple[int, int]]:
    """Runs as (start, end) pairs, the shape the reference's test writes them in."""
    return [(gpa, gpa + n) for gpa, n in r.ranges()]


# ---------------------------------------------------------------- worked examples (design doc)
def test_example_one_run_over_consecutive_pages() -> None:
    r = PagedRange.new(512, 8192, [10, 11, 12])
    assert r is not None
    assert r.offset == 512
    assert len(r) == 8192
    assert r.gpns == (10, 11, 12)
    assert r.ranges() == [(0xA200, 8192)]


def test_example_discontiguous_pages_and_subrange() -> None:
    r = PagedRange.new(512, 8192, [10, 20, 12])
    assert r is not None
    assert r.ranges() == [(0xA200, 3584), (0x14000, 4096), (0xC000, 512)]
    sub = r.subrange(3584, 1024)
    assert sub.offset == 0
    assert sub.gpns == (20,)
    assert sub.ranges() == [(0x14000, 1024)]


def test_example_too_long_for_its_pages_is_invalid() -> None:
    assert PagedRange.new(512, 8192, [10, 11]) is None
    with pytest.raises(ValueError, match="does not fit"):
        PagedRange(512, 8192, [10, 11])


def test_example_offset_past_the_first_page() -> None:
    r = PagedRange.new(5000, 100, [10, 11])
    assert r is not None
    assert r.offset == 904
    assert r.gpns == (11,)
    assert r.ranges() == [(0xB388, 100)]


def test_example_one_byte_too_far_is_invalid() -> None:
    assert PagedRange.new(1, 4096, [1]) is None


def test_example_two_ranges_joined_skip_truncate() -> None:
    """The reference's multi-range example: the boundary between the two is mid-page on both
    sides, so it takes a PagedRanges (a single PagedRange cannot say it)."""
    a = PagedRange(0x123, 0x2012, [0x11, 0x22, 0x33])
    b = PagedRange(0x456, 0x2017, [0x111, 0x112, 0x222])
    assert a.try_join(b) is None
    multi = PagedRanges([a, b]).skip(0x100).truncate(0x2F29)
    assert len(multi) == 0x2F29
    assert _runs(multi) == [
        (0x11223, 0x12000),
        (0x22000, 0x23000),
        (0x33000, 0x33135),
        (0x111456, 0x11246D),
    ]


# ---------------------------------------------------------------- construction
def test_zero_length_is_valid_anywhere_inside() -> None:
    for off in (0, 1, 4095, 4096, 8192):
        r = PagedRange.new(off, 0, [1, 2])
        assert r is not None and r.is_empty
        assert r.ranges() == []
        assert r.gpns == ()
    assert PagedRange.new(8193, 0, [1, 2]) is None
    assert PagedRange.new(0, 0, []) is not None


def test_negative_offset_or_length_is_invalid() -> None:
    assert PagedRange.new(-1, 10, [1]) is None
    assert PagedRange.new(0, -1, [1]) is None
    with pytest.raises(ValueError):
        PagedRange(-1, 10, [1])


def test_gpns_may_be_any_iterable_and_are_kept_as_a_tuple() -> None:
    r = PagedRange(0, 8192, iter([3, 4]))
    assert r.gpns == (3, 4)
    assert isinstance(r.gpns, tuple)


def test_linear() -> None:
    r = PagedRange.linear(0x800, 4096)
    assert r.gpns == (0, 1)
    assert r.offset == 0x800
    assert r.ranges() == [(0x800, 4096)]
    assert PagedRange.linear(0x1000, 4096).gpns == (1,)
    assert PagedRange.linear(0x1FFF, 2).gpns == (1, 2)
    assert PagedRange.linear(0x1234, 0).is_empty
    big = PagedRange.linear(0x3000, 5 * 4096 + 1)
    assert big.gpns == tuple(range(3, 9))
    assert big.ranges() == [(0x3000, 5 * 4096 + 1)]
    with pytest.raises(ValueError):
        PagedRange.linear(-1, 1)
    with pytest.raises(ValueError):
        PagedRange.linear((1 << 64) - 1, 2)
    top = PagedRange.linear((1 << 64) - 1, 1)
    assert top.ranges() == [((1 << 64) - 1, 1)]


def test_empty() -> None:
    e = PagedRange.empty()
    assert len(e) == 0 and e.is_empty and e.gpns == () and e.ranges() == []


# ---------------------------------------------------------------- slicing
def test_skip_truncate_split() -> None:
    r = PagedRange(100, 10000, [1, 2, 3])
    assert r.skip(0) == r
    assert r.skip(10000).is_empty
    s = r.skip(4000)
    assert s.offset == 4 and s.gpns == (2, 3) and len(s) == 6000
    t = r.truncate(3996)
    assert t.gpns == (1,) and t.ranges() == [(0x1064, 3996)]
    head, tail = r.split(3996)
    assert head == t and tail.offset == 0 and tail.gpns == (2, 3)
    for bad in (-1, 10001):
        with pytest.raises(ValueError):
            r.skip(bad)
        with pytest.raises(ValueError):
            r.truncate(bad)
        with pytest.raises(ValueError):
            r.split(bad)
        assert r.try_split(bad) is None


def test_subrange_bounds() -> None:
    r = PagedRange(0, 4096, [7])
    assert r.subrange(4096, 0).is_empty
    assert r.try_subrange(1, 4096) is None
    assert r.try_subrange(-1, 1) is None
    with pytest.raises(ValueError, match="invalid subrange"):
        r.subrange(4000, 97)


def test_range_is_a_value() -> None:
    a = PagedRange(5000, 100, [10, 11])
    b = PagedRange(904, 100, [11])
    assert a == b and hash(a) == hash(b)
    assert a != PagedRange(904, 100, [12])
    assert PagedRange(0, 0, [1]) == PagedRange.empty()
    assert pickle.loads(pickle.dumps(a)) == a
    assert "offset=904" in repr(a)
    with pytest.raises(AttributeError):
        a.offset = 3  # type: ignore[misc]


# ---------------------------------------------------------------- joining
def test_join_page_aligned_boundary() -> None:
    a = PagedRange(0x800, 0x800, [1])  # ends at a page end
    b = PagedRange(0, 0x1000 + 10, [7, 8])  # starts at a page start
    j = a.join(b)
    assert j.gpns == (1, 7, 8)
    assert j.offset == 0x800 and len(j) == 0x1800 + 10
    assert j.ranges() == [(0x1800, 0x800), (0x7000, 0x100A)]


def test_join_contiguous_inside_a_shared_page() -> None:
    a = PagedRange.linear(0x1100, 0x200)  # ends at 0x1300, inside page 1
    b = PagedRange.linear(0x1300, 0x1000)  # starts there, in the same page
    j = a.join(b)
    assert j.gpns == (1, 2)
    assert j.ranges() == [(0x1100, 0x1200)]


def test_join_refused_mid_page() -> None:
    a = PagedRange.linear(0x1100, 0x200)
    assert a.try_join(PagedRange.linear(0x5300, 0x100)) is None  # same in-page offset, other page
    assert a.try_join(PagedRange.linear(0x1400, 0x100)) is None  # same page, gap
    with pytest.raises(ValueError, match="cannot join"):
        PagedRange.linear(0x1000, 0x1000).join(PagedRange.linear(0x5100, 0x100))


def test_join_with_empty_and_concat() -> None:
    a = PagedRange.linear(0x1100, 0x200)
    assert a.join(PagedRange.empty()) == a
    assert PagedRange.empty().join(a) == a
    c = PagedRange.concat(
        [
            PagedRange.linear(0x1F00, 0x100),
            PagedRange.linear(0x9000, 0x1000),
            PagedRange.linear(0x3000, 0x10),
        ]
    )
    assert c.ranges() == [(0x1F00, 0x100), (0x9000, 0x1000), (0x3000, 0x10)]
    assert PagedRange.concat([]).is_empty


# ---------------------------------------------------------------- invalid page numbers
def test_gpn_overflowing_64_bits_is_reported_by_ranges() -> None:
    assert PagedRange(0, 4096, [MAX_GPN]).ranges() == [(MAX_GPN << 12, 4096)]
    with pytest.raises(InvalidGpnError):
        PagedRange(0, 4096, [MAX_GPN + 1]).ranges()
    with pytest.raises(InvalidGpnError):
        PagedRange(0, 8192, [MAX_GPN, MAX_GPN + 1]).ranges()  # a consecutive run past the top
    with pytest.raises(InvalidGpnError):
        PagedRange(0, 8192, [1, -1]).ranges()
    # An invalid page outside the window is never looked at.
    assert PagedRange(0, 4096, [1, MAX_GPN + 5]).ranges() == [(0x1000, 4096)]
    assert issubclass(InvalidGpnError, ValueError)


# ---------------------------------------------------------------- PagedRanges
def test_paged_ranges_basics() -> None:
    a = PagedRange.linear(0x1000, 0x10)
    b = PagedRange.linear(0x5008, 0x8)
    m = PagedRanges.of(a, PagedRange.empty(), b)
    assert len(m) == 0x18 and not m.is_empty
    assert m.paged_ranges() == (a, b)
    assert m.skip(0x10).paged_ranges() == (b,)
    assert m.skip(0x14).ranges() == [(0x500C, 4)]
    assert m.truncate(4).ranges() == [(0x1000, 4)]
    assert m.truncate(0).is_empty
    assert m == PagedRanges([a, b])
    with pytest.raises(ValueError):
        m.skip(0x19)
    with pytest.raises(ValueError):
        m.truncate(-1)
