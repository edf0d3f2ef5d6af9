"""virtio_blk.layout as a unit: trim_end/skip_start, and plan()'s coalesce / join / bounce rule.

The rule (design doc, "How virtio-blk uses it"): consecutive data pieces that are contiguous in
guest memory are *coalesced* (a shared page listed once); a piece that starts on a page boundary
right after one that ended on a page boundary is *joined*; anything else starts a new
RequestBuffers, and the request is *bounced* iff such a new range starts at a data offset that is
not a multiple of 512.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scsi_buffers import GuestMemory, PagedRange
from virtio_blk.layout import plan, skip_start, trim_end

PAGE = 4096


@pytest.fixture(scope="module")
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.anonymous(1 << 20)
    yield mem
    mem.close()


def ranges(layout) -> list[PagedRange]:
    return [b.range for b in layout.buffers]


def byte_addresses(pieces: Sequence[tuple[int, int]]) -> list[int]:
    return [a for gpa, n in pieces for a in range(gpa, gpa + n)]


def range_addresses(r: PagedRange) -> list[int]:
    return byte_addresses(r.ranges())


# ---------------------------------------------------------------- trim_end / skip_start
@pytest.mark.parametrize(
    ("pieces", "n", "expected"),
    [
        ([(0x1000, 513)], 1, [(0x1000, 512)]),
        ([(0x1000, 512), (0x3000, 1)], 1, [(0x1000, 512)]),  # the status descriptor goes
        ([(0x1000, 512), (0x3000, 2)], 3, [(0x1000, 511)]),  # across a descriptor boundary
        ([(0x1000, 1)], 1, []),
        ([(0x1000, 4)], 10, []),  # more than there is: nothing left, no error
        ([(0x1000, 4), (0x2000, 4)], 0, [(0x1000, 4), (0x2000, 4)]),
        ([], 1, []),
    ],
)
def test_trim_end(pieces: list[tuple[int, int]], n: int, expected: list[tuple[int, int]]) -> None:
    assert trim_end(pieces, n) == expected


def test_trim_end_does_not_modify_its_input() -> None:
    pieces = [(0x1000, 512), (0x3000, 5)]
    trim_end(pieces, 3)
    assert pieces == [(0x1000, 512), (0x3000, 5)]


@pytest.mark.parametrize(
    ("pieces", "n", "expected"),
    [
        ([(0x1000, 16), (0x2000, 512)], 16, [(0x2000, 512)]),
        ([(0x1000, 528)], 16, [(0x1010, 512)]),  # header and data in one descriptor
        ([(0x1000, 8), (0x2000, 8), (0x3000, 512)], 16, [(0x3000, 512)]),  # 8+8 header
        ([(0x1000, 1), (0x2000, 20)], 16, [(0x200F, 5)]),  # 1+15 header, data after it
        ([(0x1000, 16)], 16, []),
        ([(0x1000, 4)], 16, []),
    ],
)
def test_skip_start(pieces: list[tuple[int, int]], n: int, expected: list[tuple[int, int]]) -> None:
    assert skip_start(pieces, n) == expected


# ---------------------------------------------------------------- plan(): worked examples
def test_single_piece_is_one_linear_range(memory: GuestMemory) -> None:
    layout = plan(memory, [(0x3200, 8192)], guest_writable=True)
    assert not layout.bounce
    assert layout.length == 8192
    assert ranges(layout) == [PagedRange(0x200, 8192, [3, 4, 5])]
    assert layout.buffers[0].is_write


def test_contiguous_mid_sector_pieces_are_coalesced(memory: GuestMemory) -> None:
    # 448+64 and 3952+2704 split points, contiguous in guest memory: one range, no bounce,
    # and the page the pieces share is listed once.
    pieces = [(0x1064, 448), (0x1064 + 448, 64), (0x1064 + 512, 3952), (0x1064 + 4464, 2704)]
    layout = plan(memory, pieces, guest_writable=False)
    assert not layout.bounce
    assert layout.length == 448 + 64 + 3952 + 2704
    assert ranges(layout) == [PagedRange.linear(0x1064, 7168)]
    assert layout.buffers[0].range.gpns == (1, 2)
    assert not layout.buffers[0].is_write


def test_contiguous_piece_starting_on_a_new_page(memory: GuestMemory) -> None:
    layout = plan(memory, [(0x1E00, 0x200), (0x2000, 0x400)], guest_writable=True)
    assert not layout.bounce
    assert ranges(layout) == [PagedRange(0xE00, 0x600, [1, 2])]


def test_page_aligned_pieces_are_joined(memory: GuestMemory) -> None:
    # Three non-contiguous pieces meeting at page boundaries: one range over pages 1, 5, 9, 10.
    pieces = [(0x1000, 4096), (0x5000, 4096), (0x9000, 8192)]
    layout = plan(memory, pieces, guest_writable=True)
    assert not layout.bounce
    assert ranges(layout) == [PagedRange(0, 16384, [1, 5, 9, 10])]


def test_join_keeps_a_partial_first_and_last_page(memory: GuestMemory) -> None:
    # 448 bytes ending a page + 64 starting another (a Windows split that is page-joinable).
    layout = plan(memory, [(0x1E40, 448), (0x7000, 64)], guest_writable=False)
    assert not layout.bounce
    assert ranges(layout) == [PagedRange(0xE40, 512, [1, 7])]
    assert range_addresses(layout.buffers[0].range) == byte_addresses([(0x1E40, 448),
                                                                       (0x7000, 64)])


def test_sector_aligned_gaps_make_separate_ranges_without_bounce(memory: GuestMemory) -> None:
    pieces = [(0x1000, 512), (0x3200, 1024), (0x5007, 2560)]
    layout = plan(memory, pieces, guest_writable=True)
    assert not layout.bounce
    assert ranges(layout) == [PagedRange.linear(a, n) for a, n in pieces]


@pytest.mark.parametrize(
    "pieces",
    [
        [(0x1000, 448), (0x3000, 64)],  # Windows 448+64 in separate pages
        [(0x1000, 3952), (0x3000, 2704)],  # Windows 3952+2704
        [(0x1000, 1000), (0x3000, 24)],  # 1000+24 in separate pages
        [(0x1000, 512), (0x3000, 100), (0x5000, 412)],  # fine first gap, mid-sector second
    ],
)
def test_mid_sector_gap_bounces(memory: GuestMemory, pieces: list[tuple[int, int]]) -> None:
    layout = plan(memory, pieces, guest_writable=True)
    assert layout.bounce
    assert layout.length == sum(n for _, n in pieces)
    # The buffers still describe every byte, in order (the bounce copy scatters through them).
    assert [a for r in ranges(layout) for a in range_addresses(r)] == byte_addresses(pieces)


def test_mid_sector_piece_in_a_coalesced_run_does_not_bounce(memory: GuestMemory) -> None:
    # Only a *new range* at a mid-sector offset bounces; a new range at 512 after a coalesced
    # 100+412 is fine.
    pieces = [(0x1000, 100), (0x1064, 412), (0x3000, 512)]
    layout = plan(memory, pieces, guest_writable=False)
    assert not layout.bounce
    assert ranges(layout) == [PagedRange.linear(0x1000, 512), PagedRange.linear(0x3000, 512)]


def test_zero_length_pieces_are_ignored(memory: GuestMemory) -> None:
    layout = plan(memory, [(0x1000, 448), (0x9000, 0), (0x1000 + 448, 64)], guest_writable=True)
    assert not layout.bounce
    assert ranges(layout) == [PagedRange.linear(0x1000, 512)]


def test_backwards_pieces_are_not_coalesced(memory: GuestMemory) -> None:
    # The second piece ends where the first starts: not contiguous in stream order.
    layout = plan(memory, [(0x1200, 512), (0x1000, 512)], guest_writable=True)
    assert not layout.bounce
    assert ranges(layout) == [PagedRange.linear(0x1200, 512), PagedRange.linear(0x1000, 512)]


# ---------------------------------------------------------------- plan(): the rule, as a property
def model(pieces: Sequence[tuple[int, int]]) -> tuple[int, bool]:
    """(number of ranges, bounce) as the design doc states the rule."""
    count = 0
    bounce = False
    end = None
    stream = 0
    for gpa, n in pieces:
        if n == 0:
            continue
        if end is None:
            count = 1
        elif gpa == end or (end % PAGE == 0 and gpa % PAGE == 0):
            pass
        else:
            count += 1
            bounce = bounce or stream % 512 != 0
        end = gpa + n
        stream += n
    return count, bounce


@st.composite
def piece_lists(draw: st.DrawFn) -> list[tuple[int, int]]:
    count = draw(st.integers(1, 8))
    cursor = draw(st.integers(0, 3 * PAGE))
    out: list[tuple[int, int]] = []
    for _ in range(count):
        how = draw(st.sampled_from(["contiguous", "next_page", "gap", "sector_gap"]))
        if out:
            if how == "next_page":
                cursor = -(-cursor // PAGE) * PAGE + PAGE * draw(st.integers(0, 2))
            elif how == "gap":
                cursor += draw(st.integers(1, 3 * PAGE))
            elif how == "sector_gap":
                cursor += 512 * draw(st.integers(1, 8))
        # The virtqueue drops zero-length descriptors, so plan() never sees one here.
        n = draw(st.one_of(st.integers(1, 3 * PAGE), st.sampled_from([512, 4096, 448, 64])))
        out.append((cursor, n))
        cursor += n
    return out


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(pieces=piece_lists())
def test_plan_matches_the_rule(pieces: list[tuple[int, int]]) -> None:
    mem = GuestMemory.anonymous(64 * PAGE)
    try:
        layout = plan(mem, pieces, guest_writable=True)
        count, bounce = model(pieces)
        assert layout.bounce == bounce
        assert len(layout.buffers) == count
        assert layout.length == sum(n for _, n in pieces)
        # Every byte of every piece, in order, and nothing else.
        got = [a for r in ranges(layout) for a in range_addresses(r)]
        assert got == byte_addresses(pieces)
        assert all(b.is_write for b in layout.buffers)
    finally:
        mem.close()
