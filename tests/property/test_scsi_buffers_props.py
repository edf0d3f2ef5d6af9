"""RequestBuffers properties and a fuzz test in the spirit of the reference crate's fuzzer.

Guest memory here is carved out of larger host buffers with guard bytes on both sides that are
*not* registered as guest memory: whatever the inputs, no access may ever change a guard byte.
"""

from __future__ import annotations

import numpy as np
from hypothesis import event, given, settings
from hypothesis import strategies as st

from scsi_buffers import (
    MAX_GPN,
    PAGE_SIZE,
    AccessError,
    AccessErrorKind,
    GuestMemory,
    OwnedRequestBuffers,
    PagedRange,
    RequestBuffers,
    gather,
    scatter,
)

PROPS = settings(deadline=None, max_examples=100)

GUARD = 3 * PAGE_SIZE + 123  # deliberately not page-sized
GUARD_BYTE = 0xA5
LOW_PAGES = 6  # guest pages [0, 6) at gpa 0
HIGH_BASE = 10  # guest pages [10, 14) at gpa 0xA000; pages 6..9 are a hole
HIGH_PAGES = 4


class GuardedMemory:
    """Two guest regions, each inside a host buffer padded with guard bytes."""

    def __init__(self) -> None:
        self.low = bytearray([GUARD_BYTE]) * (2 * GUARD + LOW_PAGES * PAGE_SIZE)
        self.high = bytearray([GUARD_BYTE]) * (2 * GUARD + HIGH_PAGES * PAGE_SIZE)
        self.mem = GuestMemory()
        self.mem.add_buffer(0, self.low, offset=GUARD, size=LOW_PAGES * PAGE_SIZE)
        self.mem.add_buffer(
            HIGH_BASE * PAGE_SIZE, self.high, offset=GUARD, size=HIGH_PAGES * PAGE_SIZE
        )

    @staticmethod
    def mapped(gpn: int) -> bool:
        return 0 <= gpn < LOW_PAGES or HIGH_BASE <= gpn < HIGH_BASE + HIGH_PAGES

    def guards_intact(self) -> bool:
        return all(
            buf[:GUARD] == bytes([GUARD_BYTE]) * GUARD
            and buf[-GUARD:] == bytes([GUARD_BYTE]) * GUARD
            for buf in (self.low, self.high)
        )

    def host_index(self, gpa: int) -> tuple[bytearray, int]:
        gpn = gpa // PAGE_SIZE
        if gpn < LOW_PAGES:
            return self.low, GUARD + gpa
        return self.high, GUARD + gpa - HIGH_BASE * PAGE_SIZE


# ---------------------------------------------------------------- fuzz
wild_gpns = st.lists(
    st.one_of(
        st.integers(0, HIGH_BASE + HIGH_PAGES + 1),  # mapped, hole, just past the end
        st.sampled_from([MAX_GPN, MAX_GPN + 1, -1, 1 << 60, (1 << 64) // PAGE_SIZE]),
    ),
    max_size=6,
)
wild_ints = st.one_of(
    st.integers(-2, 7 * PAGE_SIZE),
    st.sampled_from([0, 1, 511, 512, 4095, 4096, 4097, 1 << 63, -(1 << 40)]),
)


@settings(deadline=None, max_examples=300)
@given(wild_ints, wild_ints, wild_gpns, st.booleans())
def test_fuzz_lock_and_write_every_byte(
    offset: int, length: int, gpns: list[int], via_writer: bool
) -> None:
    g = GuardedMemory()
    valid = offset >= 0 and length >= 0 and offset + length <= len(gpns) * PAGE_SIZE
    r = PagedRange.new(offset, length, gpns)
    assert (r is not None) == valid
    event("valid" if valid else "invalid")
    if r is None:
        try:
            OwnedRequestBuffers.new_unaligned(gpns, offset, length)
        except ValueError:
            pass
        else:
            raise AssertionError("an invalid triple was accepted")
        return

    buffers = OwnedRequestBuffers.new_unaligned(gpns, offset, length, True).buffer(g.mem)
    touched = r.gpns
    reachable = all(g.mapped(p) for p in touched)
    event(f"reachable={reachable} empty={length == 0}")
    try:
        if via_writer:
            buffers.writer().fill(0x3C, length)
        else:
            with buffers.lock(for_write=True) as locked:
                assert len(locked) == length
                for v in locked.io_vecs():
                    v[:] = b"\x3c" * v.nbytes
    except AccessError as exc:
        assert exc.kind is AccessErrorKind.MEMORY
        assert not reachable
        assert g.guards_intact()
        assert g.low.count(0x3C) == 0 and g.high.count(0x3C) == 0  # failed: touched nothing
        return
    assert reachable
    assert g.guards_intact()
    # Exactly the bytes of the range were written (fewer if pages repeat).
    written = g.low.count(0x3C) + g.high.count(0x3C)
    assert written == len({(gpa + i) for gpa, n in r.ranges() for i in range(n)})


# ---------------------------------------------------------------- round trips
@st.composite
def distinct_ranges(draw: st.DrawFn) -> PagedRange:
    """A valid range over distinct mapped pages (so what is written can be read back)."""
    pool = list(range(LOW_PAGES)) + list(range(HIGH_BASE, HIGH_BASE + HIGH_PAGES))
    gpns = draw(st.permutations(pool))[: draw(st.integers(0, 5))]
    total = len(gpns) * PAGE_SIZE
    offset = draw(st.integers(0, total))
    length = draw(st.integers(0, total - offset))
    return PagedRange(offset, length, gpns)


def chunks(data: st.DataObject, total: int) -> list[int]:
    sizes = []
    left = total
    while left:
        n = data.draw(st.integers(1, left)) if data.draw(st.booleans()) else left
        sizes.append(n)
        left -= n
    return sizes


@PROPS
@given(distinct_ranges(), st.data())
def test_writer_then_reader_round_trips(r: PagedRange, data: st.DataObject) -> None:
    g = GuardedMemory()
    b = RequestBuffers(g.mem, r, True)
    payload = bytes(np.random.default_rng(len(r)).integers(0, 256, len(r), dtype=np.uint8))
    w = b.writer()
    pos = 0
    for n in chunks(data, len(r)):
        w.write(payload[pos : pos + n])
        pos += n
    assert len(w) == 0
    rd = b.reader()
    out = bytearray()
    for n in chunks(data, len(r)):
        out += rd.read(n)
    assert bytes(out) == payload
    assert b.reader().read_all() == payload
    # The bytes landed where the model says.
    for gpa, n in r.ranges():
        host, idx = g.host_index(gpa)
        assert host[idx : idx + n] == payload[:n]
        payload = payload[n:]
    assert g.guards_intact()


@PROPS
@given(st.lists(distinct_ranges(), max_size=4))
def test_gather_scatter_round_trip(rs: list[PagedRange]) -> None:
    g = GuardedMemory()
    bufs = [RequestBuffers(g.mem, r, True) for r in rs]
    total = sum(len(r) for r in rs)
    expect = b"".join(b.reader().read_all() for b in bufs)
    out = bytearray(total)
    assert gather(bufs, out) == total
    assert bytes(out) == expect
    fresh = bytes((i * 31 + 7) & 0xFF for i in range(total))
    assert scatter(fresh, bufs) == total
    # Ranges may share pages, so compare against sequential writes through the writers.
    h = GuardedMemory()
    pos = 0
    for r in rs:
        RequestBuffers(h.mem, r, True).writer().write(fresh[pos : pos + len(r)])
        pos += len(r)
    assert g.low == h.low and g.high == h.high
    assert g.guards_intact()


@PROPS
@given(distinct_ranges(), st.data())
def test_lock_pieces_match_the_ranges(r: PagedRange, data: st.DataObject) -> None:
    g = GuardedMemory()
    b = RequestBuffers(g.mem, r, True)
    o = data.draw(st.integers(0, len(r)))
    n = data.draw(st.integers(0, len(r) - o))
    sub = b.subrange(o, n)
    with sub.lock(False) as locked:
        got = b"".join(v.tobytes() for v in locked.io_vecs())
        assert len(locked.io_buffers) == len(sub.range.ranges())
    assert got == b.reader().read_all()[o : o + n]
