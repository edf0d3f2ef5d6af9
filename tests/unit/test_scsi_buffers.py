"""RequestBuffers, readers/writers, locking and the zero-copy route, OwnedRequestBuffers."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import tempfile
from collections.abc import Iterator

import pytest

from scsi_buffers import (
    PAGE_SIZE,
    AccessError,
    AccessErrorKind,
    AtomicIoVec,
    GuestMemory,
    IoBuffer,
    LockedIoBuffers,
    OwnedRequestBuffers,
    PagedRange,
    RequestBuffers,
    gather,
    scatter,
)

PAGES = 16


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    """16 pages of guest memory at gpa 0, filled with a known pattern."""
    m = GuestMemory.anonymous(PAGES * PAGE_SIZE)
    m.write(0, pattern(PAGES * PAGE_SIZE))
    yield m
    m.close()


@pytest.fixture
def tmpfile() -> Iterator[int]:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    yield fd
    os.close(fd)


class SpyMemory(GuestMemory):
    """Guest memory that records every translation asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, int]] = []

    def views(self, gpa: int, length: int, *, for_write: bool = False) -> list[memoryview]:
        self.calls.append(("views", gpa, length))
        return super().views(gpa, length, for_write=for_write)

    def io_pieces(
        self, gpa: int, length: int, *, for_write: bool = False
    ) -> list[tuple[memoryview, int]]:
        self.calls.append(("io_pieces", gpa, length))
        return super().io_pieces(gpa, length, for_write=for_write)


# ---------------------------------------------------------------- is_aligned (design doc)
def test_is_aligned_examples(mem: GuestMemory) -> None:
    b = RequestBuffers(mem, PagedRange(512, 8192, [10, 11, 12]), True)
    assert b.is_aligned(1)
    assert b.is_aligned(512)
    assert not b.is_aligned(1024)
    assert not b.is_aligned(4096)
    sub = RequestBuffers(mem, PagedRange(512, 8192, [10, 20, 12]), True).subrange(3584, 1024)
    assert sub.is_aligned(512)
    whole = RequestBuffers(mem, PagedRange(0, 8192, [1, 2]), True)
    assert whole.is_aligned(4096)
    assert not whole.is_aligned(8192)  # nothing is aligned beyond a page


@pytest.mark.parametrize("bad", [0, -4, 3, 513, 4095])
def test_is_aligned_wants_a_power_of_two(mem: GuestMemory, bad: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        RequestBuffers(mem, PagedRange(0, 512, [1]), True).is_aligned(bad)


# ---------------------------------------------------------------- reader / writer
def test_reader_consumes_from_the_front(mem: GuestMemory) -> None:
    r = RequestBuffers(mem, PagedRange(4000, 200, [3, 9]), False).reader()
    expect = mem.read(3 * PAGE_SIZE + 4000, 96) + mem.read(9 * PAGE_SIZE, 104)
    assert len(r) == r.remaining == 200
    assert r.read(10) == expect[:10]
    r.skip(5)
    buf = bytearray(100)
    assert r.read_into(buf) == 100
    assert bytes(buf) == expect[15:115]
    assert r.read_all() == expect[115:]
    assert len(r) == 0
    assert r.read(0) == b""


def test_reader_over_request_fails_and_consumes_nothing(mem: GuestMemory) -> None:
    r = RequestBuffers(mem, PagedRange(0, 100, [1]), False).reader()
    r.read(40)
    buf = bytearray(b"x" * 61)
    with pytest.raises(AccessError) as e:
        r.read_into(buf)
    assert e.value.kind is AccessErrorKind.OUT_OF_RANGE
    assert (e.value.have, e.value.want) == (60, 61)
    assert buf == b"x" * 61
    with pytest.raises(AccessError):
        r.skip(61)
    assert len(r) == 60
    assert r.read(60) == mem.read(PAGE_SIZE + 40, 60)


def test_writer_writes_fills_and_skips(mem: GuestMemory) -> None:
    b = RequestBuffers(mem, PagedRange(4090, 20, [2, 5]), True)
    w = b.writer()
    assert len(w) == 20
    w.write(b"abc")
    w.skip(2)
    w.fill(0xEE, 5)
    w.write(memoryview(bytearray(b"0123456789")))
    assert len(w) == 0
    got = b.reader().read_all()
    original = mem.read(2 * PAGE_SIZE + 4090, 6) + mem.read(5 * PAGE_SIZE, 14)
    assert got == b"abc" + original[3:5] + b"\xee" * 5 + b"0123456789"
    with pytest.raises(AccessError) as e:
        w.write(b"x")
    assert e.value.kind is AccessErrorKind.OUT_OF_RANGE
    with pytest.raises(ValueError):
        b.writer().fill(256, 1)


def test_writer_over_request_touches_nothing(mem: GuestMemory) -> None:
    b = RequestBuffers(mem, PagedRange(0, 10, [4]), True)
    before = mem.read(4 * PAGE_SIZE, PAGE_SIZE)
    with pytest.raises(AccessError):
        b.writer().write(b"y" * 11)
    with pytest.raises(AccessError):
        b.writer().fill(1, 11)
    assert mem.read(4 * PAGE_SIZE, PAGE_SIZE) == before


def test_unmapped_page_is_a_memory_error_and_touches_nothing(mem: GuestMemory) -> None:
    b = RequestBuffers(mem, PagedRange(0, 2 * PAGE_SIZE, [3, PAGES + 1]), True)
    before = mem.read(3 * PAGE_SIZE, PAGE_SIZE)
    for op in (
        lambda: b.writer().write(bytes(2 * PAGE_SIZE)),
        lambda: b.reader().read_all(),
        lambda: b.lock(True),
        lambda: b.writer().fill(0, 2 * PAGE_SIZE),
    ):
        with pytest.raises(AccessError) as e:
            op()
        assert e.value.kind is AccessErrorKind.MEMORY
    assert mem.read(3 * PAGE_SIZE, PAGE_SIZE) == before


def test_invalid_gpn_is_a_memory_error(mem: GuestMemory) -> None:
    b = RequestBuffers(mem, PagedRange(0, 10, [1 << 60]), True)
    with pytest.raises(AccessError) as e:
        b.lock(False)
    assert e.value.kind is AccessErrorKind.MEMORY
    with pytest.raises(AccessError):
        b.reader().read(1)


# ---------------------------------------------------------------- read-only behaviour
def test_read_only_writer_has_length_zero_and_refuses(mem: GuestMemory) -> None:
    b = RequestBuffers(mem, PagedRange(0, 4096, [0]), False)
    before = mem.read(0, 4096)
    w = b.writer()
    assert len(w) == 0
    for op in (lambda: w.write(b"\1" * 4096), lambda: w.fill(1, 4096), lambda: w.write(b"x")):
        with pytest.raises(AccessError) as e:
            op()
        assert e.value.kind is AccessErrorKind.READ_ONLY
    w.write(b"")  # a zero-length write succeeds
    w.fill(7, 0)
    assert mem.read(0, 4096) == before
    assert b.reader().read(4096) == before  # reading is always allowed


def test_lock_for_write_on_read_only_raises_before_touching_memory() -> None:
    spy = SpyMemory()
    spy.add_buffer(0, bytearray(4 * PAGE_SIZE))
    b = RequestBuffers(spy, PagedRange(0, 8192, [0, 1]), False)
    with pytest.raises(AccessError) as e:
        b.lock(for_write=True)
    assert e.value.kind is AccessErrorKind.READ_ONLY
    assert spy.calls == []
    # ...even when the pages are not mapped at all: direction is checked first.
    with pytest.raises(AccessError) as e:
        RequestBuffers(spy, PagedRange(0, 10, [999]), False).lock(True)
    assert e.value.kind is AccessErrorKind.READ_ONLY
    assert spy.calls == []
    with b.lock(for_write=False) as locked:
        assert spy.calls == [("io_pieces", 0, 8192)]
        assert all(v.readonly for v in locked.io_vecs())


def test_read_only_region_refuses_writes() -> None:
    m = GuestMemory.from_buffer(bytes(2 * PAGE_SIZE))
    b = RequestBuffers(m, PagedRange(0, 100, [1]), True)
    with pytest.raises(AccessError) as e:
        b.writer().write(b"x")
    assert e.value.kind is AccessErrorKind.READ_ONLY
    with pytest.raises(AccessError) as e:
        b.lock(True)
    assert e.value.kind is AccessErrorKind.READ_ONLY
    with b.lock(False) as locked:
        assert len(locked) == 100


# ---------------------------------------------------------------- subrange
def test_subrange_keeps_memory_and_direction(mem: GuestMemory) -> None:
    b = RequestBuffers(mem, PagedRange(100, 9000, [1, 2, 3]), True)
    s = b.subrange(4000, 100)
    assert s.guest_memory is mem and s.is_write
    assert s.range.ranges() == [(0x2004, 100)]
    with pytest.raises(ValueError):
        b.subrange(8000, 1001)
    assert b.subrange(9000, 0).is_empty


# ---------------------------------------------------------------- lock / LockedIoBuffers
def test_lock_one_io_buffer_per_run(mem: GuestMemory) -> None:
    b = RequestBuffers(mem, PagedRange(512, 4 * PAGE_SIZE - 1024, [5, 6, 9, 10]), True)
    with b.lock(True) as locked:
        assert isinstance(locked, LockedIoBuffers)
        pieces = locked.io_buffers
        assert [len(p) for p in pieces] == [2 * PAGE_SIZE - 512, 2 * PAGE_SIZE - 512]
        assert len(locked) == locked.length == 4 * PAGE_SIZE - 1024
        base = mem.regions[0].host_addr
        assert pieces[0].address == base + 5 * PAGE_SIZE + 512
        assert pieces[1].address == base + 9 * PAGE_SIZE
        assert all(isinstance(p, IoBuffer) for p in pieces)
        vecs = locked.io_vecs()
        assert [v.nbytes for v in vecs] == [len(p) for p in pieces]
        vecs[0][:3] = b"XYZ"
        assert mem.read(5 * PAGE_SIZE + 512, 3) == b"XYZ"


def test_locked_buffers_close_and_refuse_use(mem: GuestMemory) -> None:
    locked = RequestBuffers(mem, PagedRange(0, 100, [1]), True).lock(True)
    view = locked.io_vecs()[0]
    locked.close()
    locked.close()  # idempotent
    assert locked.closed
    with pytest.raises(ValueError):
        view[0]  # the view itself has been released
    for use in (locked.io_vecs, locked.iovec_array, lambda: locked.io_buffers):
        with pytest.raises(ValueError, match="closed"):
            use()
    with pytest.raises(ValueError), locked:
        pass


def test_empty_lock(mem: GuestMemory) -> None:
    with RequestBuffers(mem, PagedRange(0, 0, [1]), True).lock(True) as locked:
        assert locked.io_vecs() == [] and len(locked) == 0 and len(locked.iovec_array()) == 0


def test_atomic_io_vec_is_struct_iovec() -> None:
    assert ctypes.sizeof(AtomicIoVec) == 2 * ctypes.sizeof(ctypes.c_void_p)
    assert AtomicIoVec.iov_base.offset == 0
    assert AtomicIoVec.iov_len.offset == ctypes.sizeof(ctypes.c_void_p)
    v = AtomicIoVec(0x1000, 42)
    assert v.address == 0x1000 and len(v) == 42
    assert AtomicIoVec().address == 0


def test_iovec_array_matches_io_buffers(mem: GuestMemory) -> None:
    with RequestBuffers(mem, PagedRange(8, 8192, [1, 7, 8]), True).lock(True) as locked:
        arr = locked.iovec_array()
        assert [(e.address, e.iov_len) for e in arr] == [
            (p.address, len(p)) for p in locked.io_buffers
        ]
        assert locked.io_buffers[0].as_iovec().iov_len == len(locked.io_buffers[0])


# ---------------------------------------------------------------- zero-copy route
def test_zero_copy_preadv_into_guest_memory(mem: GuestMemory, tmpfile: int) -> None:
    data = pattern(3 * PAGE_SIZE, seed=99)
    os.pwrite(tmpfile, b"\0" * 100 + data, 0)
    b = RequestBuffers(mem, PagedRange(0, 3 * PAGE_SIZE, [5, 2, 3]), True)
    with b.lock(for_write=True) as locked:
        assert len(locked.io_vecs()) == 2
        assert os.preadv(tmpfile, locked.io_vecs(), 100) == 3 * PAGE_SIZE
    assert mem.read(5 * PAGE_SIZE, PAGE_SIZE) == data[:PAGE_SIZE]
    assert mem.read(2 * PAGE_SIZE, 2 * PAGE_SIZE) == data[PAGE_SIZE:]


def test_zero_copy_pwritev_from_guest_memory(mem: GuestMemory, tmpfile: int) -> None:
    b = RequestBuffers(mem, PagedRange(1000, 5000, [4, 11]), False)
    with b.lock(for_write=False) as locked:
        assert os.pwritev(tmpfile, locked.io_vecs(), 512) == 5000
    assert os.pread(tmpfile, 5000, 512) == b.reader().read_all()


def test_zero_copy_across_two_adjacent_regions(tmpfile: int) -> None:
    m = GuestMemory()
    m.add_buffer(0, mmap.mmap(-1, 2 * PAGE_SIZE))
    m.add_buffer(2 * PAGE_SIZE, mmap.mmap(-1, 2 * PAGE_SIZE))
    data = pattern(2 * PAGE_SIZE, seed=5)
    os.pwrite(tmpfile, data, 0)
    b = RequestBuffers(m, PagedRange.linear(PAGE_SIZE + 0x800, 2 * PAGE_SIZE), True)
    with b.lock(True) as locked:
        assert [len(p) for p in locked.io_buffers] == [0x800, PAGE_SIZE + 0x800]
        assert os.preadv(tmpfile, locked.io_vecs(), 0) == 2 * PAGE_SIZE
    assert m.read(PAGE_SIZE + 0x800, 2 * PAGE_SIZE) == data
    with b.lock(False) as locked:
        assert os.pwritev(tmpfile, locked.io_vecs(), 3 * PAGE_SIZE) == 2 * PAGE_SIZE
    assert os.pread(tmpfile, 2 * PAGE_SIZE, 3 * PAGE_SIZE) == data
    m.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="raw libc preadv")
def test_raw_preadv_through_iovec_array(mem: GuestMemory, tmpfile: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.preadv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_long]
    libc.preadv.restype = ctypes.c_ssize_t
    data = pattern(6000, seed=3)
    os.pwrite(tmpfile, data, 0)
    b = RequestBuffers(mem, PagedRange(3000, 6000, [12, 1, 2]), True)
    with b.lock(True) as locked:
        arr = locked.iovec_array()
        n = libc.preadv(tmpfile, ctypes.addressof(arr), len(arr), 0)
        assert n == 6000, ctypes.get_errno()
    assert b.reader().read_all() == data


# ---------------------------------------------------------------- gather / scatter
def test_gather_and_scatter_mid_sector_split(mem: GuestMemory) -> None:
    pieces_out = [
        RequestBuffers(mem, PagedRange.linear(0x1040, 448), False),
        RequestBuffers(mem, PagedRange.linear(0x5010, 64), False),
    ]
    out = bytearray(600)
    assert gather(pieces_out, out) == 512
    assert bytes(out[:512]) == mem.read(0x1040, 448) + mem.read(0x5010, 64)
    assert out[512:] == bytes(88)

    pieces_in = [
        RequestBuffers(mem, PagedRange.linear(0x2FF0, 1000), True),
        RequestBuffers(mem, PagedRange.linear(0x7000, 24), True),
    ]
    src = pattern(1024, seed=42)
    assert scatter(src, pieces_in) == 1024
    assert mem.read(0x2FF0, 1000) == src[:1000]
    assert mem.read(0x7000, 24) == src[1000:]


def test_scatter_checks_everything_first(mem: GuestMemory) -> None:
    before = mem.read(0, PAGES * PAGE_SIZE)
    ok = RequestBuffers(mem, PagedRange.linear(0x1000, 10), True)
    ro = RequestBuffers(mem, PagedRange.linear(0x2000, 10), False)
    bad = RequestBuffers(mem, PagedRange.linear(PAGES * PAGE_SIZE, 10), True)
    with pytest.raises(AccessError) as e:
        scatter(bytes(20), [ok, ro])
    assert e.value.kind is AccessErrorKind.READ_ONLY
    with pytest.raises(AccessError) as e:
        scatter(bytes(20), [ok, bad])
    assert e.value.kind is AccessErrorKind.MEMORY
    with pytest.raises(AccessError) as e:
        scatter(bytes(19), [ok, ok])
    assert e.value.kind is AccessErrorKind.OUT_OF_RANGE
    assert mem.read(0, PAGES * PAGE_SIZE) == before
    with pytest.raises(AccessError) as e:
        gather([ok, ok], bytearray(19))
    assert e.value.kind is AccessErrorKind.OUT_OF_RANGE
    with pytest.raises(TypeError):
        gather([ok], b"read-only destination")


# ---------------------------------------------------------------- OwnedRequestBuffers
def test_owned_linear_counts_pages_from_the_offset() -> None:
    o = OwnedRequestBuffers.linear(0x800, 4096, True)
    assert o.gpns == (0, 1)
    assert o.offset == 0x800 and len(o) == 4096 and o.is_write
    assert OwnedRequestBuffers.linear(0x1000, 4096, False).gpns == (1,)
    assert OwnedRequestBuffers.linear(0x1FFF, 2, False).gpns == (1, 2)


def test_owned_constructors(mem: GuestMemory) -> None:
    o = OwnedRequestBuffers.new([3, 4])
    assert (o.offset, len(o), o.is_write) == (0, 8192, True)
    b = o.buffer(mem)
    assert isinstance(b, RequestBuffers) and b.range.ranges() == [(0x3000, 8192)]
    u = OwnedRequestBuffers.new_unaligned([3, 9], 100, 5000, False)
    assert u.gpns == (3, 9) and u.offset == 100
    assert u.buffer(mem).range.ranges() == [(0x3064, 3996), (0x9000, 1004)]
    assert not u.buffer(mem).is_write
    assert u.range == PagedRange(100, 5000, [3, 9])


@pytest.mark.parametrize(
    ("gpns", "offset", "length"), [([1], 1, 4096), ([1, 2], 0, 8193), ([1], -1, 1), ([], 0, 1)]
)
def test_owned_invalid_triple_raises(gpns: list[int], offset: int, length: int) -> None:
    with pytest.raises(ValueError, match="do not fit"):
        OwnedRequestBuffers.new_unaligned(gpns, offset, length)
