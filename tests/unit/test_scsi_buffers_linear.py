"""RequestBuffers.linear: the one-run buffer whose page list is built only when asked for must
answer every question exactly as the same range built eagerly does."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from scsi_buffers import PAGE_SIZE, AccessError, GuestMemory, PagedRange, RequestBuffers

PAGES = 16


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    """16 pages of guest memory at gpa 0, filled with a known pattern."""
    m = GuestMemory.anonymous(PAGES * PAGE_SIZE)
    m.write(0, bytes((i * 7 + 1) & 0xFF for i in range(PAGES * PAGE_SIZE)))
    try:
        yield m
    finally:
        m.close()


@pytest.mark.parametrize(("gpa", "length"), [(0, 4096), (0x800, 4096), (100, 0), (4096, 1),
                                            (0x1F00, 3 * PAGE_SIZE), (5000, 513)])
@pytest.mark.parametrize("is_write", [False, True])
def test_linear_answers_as_a_linear_paged_range(mem: GuestMemory, gpa: int, length: int,
                                                is_write: bool) -> None:
    lazy = RequestBuffers.linear(mem, gpa, length, is_write)
    eager = RequestBuffers(mem, PagedRange.linear(gpa, length), is_write)
    assert len(lazy) == len(eager) == lazy.length == length
    assert lazy.is_empty == eager.is_empty and lazy.is_write == eager.is_write
    for alignment in (1, 512, 4096):
        assert lazy.is_aligned(alignment) == eager.is_aligned(alignment)
    assert lazy.runs() == eager.runs() == eager.range.ranges()
    with lazy.lock(for_write=is_write) as a, eager.lock(for_write=is_write) as b:
        assert [(p.address, bytes(p.view)) for p in a.io_buffers] == \
            [(p.address, bytes(p.view)) for p in b.io_buffers]
        assert a.length == b.length
    assert lazy.reader().read_all() == eager.reader().read_all()
    assert lazy.range == eager.range and repr(lazy) == repr(eager)
    if length:
        assert lazy.subrange(0, length - 1).range == eager.subrange(0, length - 1).range


def test_linear_checks_the_address_space(mem: GuestMemory) -> None:
    with pytest.raises(ValueError):
        RequestBuffers.linear(mem, -1, 4, False)
    with pytest.raises(ValueError):
        RequestBuffers.linear(mem, (1 << 64) - 2, 4, False)
    with pytest.raises(AccessError):  # unmapped: found when locked, as for any range
        RequestBuffers.linear(mem, PAGES * PAGE_SIZE, 4, False).lock()
    with pytest.raises(AccessError):  # direction checked before any address
        RequestBuffers.linear(mem, 0, 4, False).lock(for_write=True)


def test_lock_in_a_region_is_lock(mem: GuestMemory) -> None:
    region = mem.region_at(0)
    assert region is not None
    for gpa, length in [(0, 4096), (0x800, 4096), (100, 0), (5000, 513)]:
        for is_write in (False, True):
            buffers = RequestBuffers.linear(mem, gpa, length, is_write)
            with buffers.lock_in(region, is_write) as a, buffers.lock(is_write) as b:
                assert [(p.address, bytes(p.view), p.view.readonly) for p in a.io_buffers] == \
                    [(p.address, bytes(p.view), p.view.readonly) for p in b.io_buffers]
    with pytest.raises(AccessError):  # direction first, as lock()
        RequestBuffers.linear(mem, 0, 4, False).lock_in(region, True)
    with pytest.raises(AccessError):  # not in the region (nor in memory): lock() reports it
        RequestBuffers.linear(mem, PAGES * PAGE_SIZE, 4, False).lock_in(region)
