"""GuestMemory as the buffers see it: holes, edges, adjacent regions, many regions, hot removal."""

from __future__ import annotations

import gc
import mmap
import threading
import weakref
from collections.abc import Callable

import pytest

from scsi_buffers import (
    PAGE_SIZE,
    AccessError,
    AccessErrorKind,
    GuestMemory,
    PagedRange,
    RequestBuffers,
)


def _kind(fn: Callable[..., object]) -> AccessErrorKind:
    """The kind of the AccessError ``fn()`` raises (``fn`` may bind loop variables as defaults)."""
    with pytest.raises(AccessError) as e:
        fn()
    return e.value.kind


@pytest.fixture
def holey() -> GuestMemory:
    """[0x0000, 0x2000) and [0x4000, 0x6000), with a hole between and nothing past 0x6000."""
    m = GuestMemory()
    m.add_buffer(0, bytearray(b"a" * 0x2000))
    m.add_buffer(0x4000, bytearray(b"b" * 0x2000))
    return m


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (0x2000, 1),  # in the hole
        (0x3FFF, 1),  # last byte of the hole
        (0x1FFF, 2),  # from a region into the hole
        (0x3FFF, 2),  # from the hole into a region
        (0x1000, 0x4000),  # across the whole hole
        (0x6000, 1),  # just past the end
        (0x5FFF, 2),  # running off the end
        (1 << 63, 4096),  # far outside
        ((1 << 64) - 1, 2),  # past 2**64
        (-1, 1),
    ],
)
def test_unmapped_ranges_are_memory_errors(holey: GuestMemory, gpa: int, length: int) -> None:
    assert _kind(lambda: holey.views(gpa, length)) is AccessErrorKind.MEMORY
    assert not holey.is_mapped(gpa, length)


def test_unmapped_pages_through_request_buffers(holey: GuestMemory) -> None:
    for gpns in ([2], [1, 2], [3, 4], [6], [5, 6]):
        b = RequestBuffers(holey, PagedRange(0, len(gpns) * PAGE_SIZE, gpns), True)
        assert _kind(lambda b=b: b.lock(True)) is AccessErrorKind.MEMORY
        assert _kind(lambda b=b: b.reader().read_all()) is AccessErrorKind.MEMORY
    # Non-adjacent pages in different regions are fine: each run is looked up on its own.
    b = RequestBuffers(holey, PagedRange(0, 2 * PAGE_SIZE, [1, 4]), True)
    assert b.reader().read_all() == b"a" * PAGE_SIZE + b"b" * PAGE_SIZE


def test_edges_of_regions_are_mapped(holey: GuestMemory) -> None:
    assert holey.read(0x1FFF, 1) == b"a"
    assert holey.read(0x4000, 1) == b"b"
    assert holey.read(0x5FFF, 1) == b"b"
    assert holey.views(0x2000, 0) == []  # a zero-length access touches nothing
    assert holey.is_mapped(0, 0x2000) and holey.is_mapped(0x4000, 0x2000)


def test_range_spanning_two_adjacent_regions_is_split() -> None:
    m = GuestMemory()
    m.add_buffer(0, bytearray(b"x" * 0x3000))
    m.add_buffer(0x3000, bytearray(b"y" * 0x1000))
    views = m.views(0x2F00, 0x200)
    assert [v.nbytes for v in views] == [0x100, 0x100]
    assert m.read(0x2F00, 0x200) == b"x" * 0x100 + b"y" * 0x100
    b = RequestBuffers(m, PagedRange.linear(0x2000, 0x2000), True)
    b.writer().write(b"z" * 0x2000)
    assert m.read(0x2000, 0x2000) == b"z" * 0x2000
    with b.lock(True) as locked:
        assert [len(p) for p in locked.io_buffers] == [0x1000, 0x1000]
        assert locked.io_buffers[1].address == m.regions[1].host_addr


def test_509_regions() -> None:
    """The vhost-user slot limit: every region found, every hole refused, no IndexError."""
    n = 509
    backing = bytearray(n * PAGE_SIZE)
    m = GuestMemory()
    for i in range(n):  # one page each, every other page of guest space
        m.add_buffer(2 * i * PAGE_SIZE, backing, offset=i * PAGE_SIZE, size=PAGE_SIZE)
    assert len(m) == n
    for i in range(n):
        gpa = 2 * i * PAGE_SIZE
        m.write(gpa + PAGE_SIZE - 2, bytes([i & 0xFF, 0x5A]))
        assert m.region_at(gpa) is m.regions[i]
        assert m.region_at(gpa + PAGE_SIZE) is None
        assert _kind(lambda gpa=gpa: m.views(gpa + PAGE_SIZE, 1)) is AccessErrorKind.MEMORY
        assert _kind(lambda gpa=gpa: m.views(gpa + 1, PAGE_SIZE)) is AccessErrorKind.MEMORY
    for i in range(n):
        assert backing[(i + 1) * PAGE_SIZE - 2] == i & 0xFF
    gpns = [2 * i for i in range(n)]
    b = RequestBuffers(m, PagedRange(0, n * PAGE_SIZE, gpns), True)
    with b.lock(True) as locked:
        assert len(locked.io_buffers) == n
    assert _kind(lambda: m.views(2 * n * PAGE_SIZE, 1)) is AccessErrorKind.MEMORY


def test_add_and_remove_at_run_time() -> None:
    m = GuestMemory()
    b = RequestBuffers(m, PagedRange(0, PAGE_SIZE, [0x10]), True)
    assert _kind(lambda: b.lock(False)) is AccessErrorKind.MEMORY
    m.add_buffer(0x10000, bytearray(PAGE_SIZE))
    b.writer().write(b"hello")
    assert m.read(0x10000, 5) == b"hello"
    with pytest.raises(ValueError, match="overlaps"):
        m.add_buffer(0x10800, bytearray(PAGE_SIZE))
    removed = m.remove_region(0x10000)
    assert _kind(lambda: b.reader().read(1)) is AccessErrorKind.MEMORY
    with pytest.raises(KeyError):
        m.remove_region(0x10000)
    removed.close()
    m.add_buffer(0x10000, bytearray(b"n" * PAGE_SIZE))  # re-added with fresh contents
    assert b.reader().read(3) == b"nnn"


def test_removed_mapping_stays_valid_while_viewed_then_goes() -> None:
    mm = mmap.mmap(-1, 2 * PAGE_SIZE)
    alive = weakref.ref(mm)
    m = GuestMemory()
    m.add_buffer(0x20000, mm)
    b = RequestBuffers(m, PagedRange.linear(0x21000, 16), True)
    locked = b.lock(True)  # an in-flight IO holds a view

    region = m.remove_region(0x20000)
    region.close()  # cannot unmap yet: the IO still views it
    assert not mm.closed
    assert _kind(lambda: b.lock(True)) is AccessErrorKind.MEMORY  # new IO does not see it
    view = locked.io_vecs()[0]
    view[:4] = b"late"  # the in-flight IO still writes valid memory
    assert mm[PAGE_SIZE : PAGE_SIZE + 4] == b"late"

    locked.close()
    del view, region, mm
    gc.collect()
    assert alive() is None  # last view gone: the mapping is unmapped


def test_region_close_unmaps_when_not_viewed() -> None:
    mm = mmap.mmap(-1, PAGE_SIZE)
    m = GuestMemory()
    m.add_buffer(0, mm)
    with RequestBuffers(m, PagedRange(0, 10, [0]), True).lock(True):
        pass
    m.remove_region(0).close()
    assert mm.closed


def test_replace_swaps_the_whole_table() -> None:
    m = GuestMemory.from_buffer(bytearray(b"o" * PAGE_SIZE))
    fresh = GuestMemory.from_buffer(bytearray(b"n" * PAGE_SIZE), gpa=0x5000)
    old = m.replace(fresh)
    assert len(old) == 1 and len(fresh) == 0
    assert m.read(0x5000, 1) == b"n"
    assert _kind(lambda: m.read(0, 1)) is AccessErrorKind.MEMORY


def test_concurrent_translation_during_add_remove() -> None:
    """Workers keep translating while regions come and go: only MEMORY errors, never a crash."""
    m = GuestMemory()
    m.add_buffer(0, bytearray(PAGE_SIZE))
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        b = RequestBuffers(m, PagedRange(0, 2 * PAGE_SIZE, [0, 8]), True)
        try:
            while not stop.is_set():
                try:
                    with b.lock(True) as locked:
                        for v in locked.io_vecs():
                            v[:1] = b"w"
                except AccessError as exc:
                    assert exc.kind is AccessErrorKind.MEMORY
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(300):
        m.add_buffer(8 * PAGE_SIZE, mmap.mmap(-1, PAGE_SIZE))
        m.remove_region(8 * PAGE_SIZE).close()
    stop.set()
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive()
    assert errors == []
