"""Descriptor splits at every offset class: reads and writes round-trip byte-exact.

Each layout is written through the device, checked against the image file (os.pread), read back
into a fresh copy of the same layout and compared; the device's bounce counter says whether the
request went through a bounce buffer, and must agree with the rule (virtio_blk.layout.plan).
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.blk.conftest import ENGINES, BlkEnv, MakeBlk, MiB
from vhost_frontend.blk import T_IN, T_OUT, BlkDriver, Piece
from virtio_blk.layout import plan
from virtio_blk.request import Status

Layout = Callable[[BlkDriver], list[Piece]]

# name -> (how to place the pieces, bounced?)
CASES: dict[str, tuple[Layout, bool]] = {
    "one-piece": (lambda d: d.pieces([8192], offsets=0), False),
    "one-piece-odd-address": (lambda d: d.pieces([8192], offsets=1234), False),
    "page-aligned-joined": (lambda d: d.pieces([4096, 4096, 8192]), False),
    "page-joined-partial-ends": (lambda d: d.pieces([3648, 4096, 448], offsets=[448, 0, 0]),
                                 False),
    "sector-aligned-apart": (lambda d: d.pieces([512, 1024, 2560], offsets=[0, 512, 1024]),
                             False),
    "sector-boundaries-odd-addresses": (lambda d: d.pieces([512, 1536], offsets=[7, 3001]),
                                        False),
    "contiguous-mid-sector": (lambda d: d.pieces([448, 64, 3952, 2704, 1000, 24],
                                                 offsets=100, contiguous=True), False),
    "contiguous-across-pages": (lambda d: d.pieces([100, 4000, 5000, 3188], offsets=4000,
                                                   contiguous=True), False),
    "448+64-joinable": (lambda d: d.pieces([448, 64], offsets=[3648, 0]), False),
    "448+64-apart": (lambda d: d.pieces([448, 64]), True),
    "3952+2704-apart": (lambda d: d.pieces([3952, 2704]), True),
    "1000+24-apart": (lambda d: d.pieces([1000, 24]), True),
    "sector-then-mid-sector": (lambda d: d.pieces([512, 100, 412, 4096]), True),
    "mid-sector-then-contiguous": (lambda d: [*d.pieces([1000]),
                                              *d.pieces([24, 512], contiguous=True)], True),
}


def roundtrip(env: BlkEnv, sector: int, make: Layout, bounced: bool, *, indirect: bool = False,
              status_with_data: bool = False, header_with_data: bool = False) -> None:
    """Write through one copy of the layout, check the file, read into another, compare."""
    drv = env.drv
    stats = env.device.stats
    pieces = make(drv)
    length = sum(n for _, n in pieces)
    data = os.urandom(length)
    before = stats.bounced_requests
    res = drv.write(sector, data, pieces=pieces, indirect=indirect,
                    header_with_data=header_with_data)
    assert (res.status, res.used) == (Status.OK, 1)
    assert env.file(sector * 512, length) == data
    assert stats.bounced_requests - before == int(bounced)
    res = drv.read(sector, length, pieces=make(drv), indirect=indirect,
                   status_with_data=status_with_data)
    assert res.status == Status.OK
    assert res.used == length + 1
    assert res.data == data
    assert stats.bounced_requests - before == 2 * int(bounced)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize("case", list(CASES))
def test_split_roundtrip(make_blk: MakeBlk, engine: str, indirect: bool, case: str) -> None:
    env = make_blk(engine=engine)
    make, bounced = CASES[case]
    assert plan(env.mem.guest, make(env.drv), True).bounce == bounced  # the rule agrees
    roundtrip(env, 40, make, bounced, indirect=indirect)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", ["one-piece", "page-aligned-joined", "contiguous-mid-sector",
                                  "448+64-apart", "1000+24-apart"])
def test_status_in_the_last_data_descriptor(make_blk: MakeBlk, engine: str, case: str) -> None:
    env = make_blk(engine=engine)
    make, bounced = CASES[case]
    roundtrip(env, 8, make, bounced, status_with_data=True, header_with_data=True)
    roundtrip(env, 16, make, bounced, status_with_data=True, indirect=True)


def test_data_status_descriptor_is_trimmed_not_read_into(blk: BlkEnv) -> None:
    # IN with one writable descriptor of 4097 bytes: 4096 data, then the status.
    drv = blk.drv
    gpa = drv.alloc(4097)
    res = drv.request(T_IN, 24, in_len=4096, in_pieces=[(gpa, 4096)], status_with_data=True)
    assert (res.status, res.used) == (Status.OK, 4097)
    assert res.data == blk.file(24 * 512, 4096)
    assert drv.mem.read(gpa + 4096, 1) == bytes([Status.OK])


TWO_REGIONS = ((0, 16 * MiB, 0), (16 * MiB, 8 * MiB, 0x1234))
EDGE = 16 * MiB  # where region 0 ends and region 1 (mmap offset 0x1234) begins

REGION_CASES: dict[str, tuple[list[Piece], bool]] = {
    "one-piece-across": ([(EDGE - 3000, 8192)], False),
    "contiguous-pieces-across": ([(EDGE - 3000, 3000), (EDGE, 1608)], False),
    "page-joined-across": ([(EDGE - 4096, 4096), (EDGE + 8192, 4096)], False),
    "mid-sector-into-region-1": ([(EDGE - 1500, 1000), (EDGE + 100, 24)], True),
    "mid-sector-across": ([(EDGE - 5000, 300), (EDGE - 200, 724)], True),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", list(REGION_CASES))
def test_pieces_spanning_two_regions(make_blk: MakeBlk, engine: str, case: str) -> None:
    env = make_blk(engine=engine, mem_layout=TWO_REGIONS)
    pieces, bounced = REGION_CASES[case]
    assert plan(env.mem.guest, pieces, True).bounce == bounced
    # The same guest pieces serve the write and the read (the driver poisons them before the
    # read, so the data seen afterwards came from the disk).
    roundtrip(env, 100, lambda d: list(pieces), bounced)
    roundtrip(env, 300, lambda d: list(pieces), bounced, indirect=True, status_with_data=True)


# ---------------------------------------------------------------- the property
ARENA = 512 * 1024


@st.composite
def requests(draw: st.DrawFn) -> tuple[int, list[int], list[str], list[int], bool, bool]:
    sectors = draw(st.integers(1, 128))  # up to 64 KiB
    length = sectors * 512
    ncuts = draw(st.integers(0, min(12, length - 1)))
    cuts = draw(st.lists(st.integers(1, length - 1), min_size=ncuts, max_size=ncuts,
                         unique=True)) if length > 1 else []
    points = [0, *sorted(cuts), length]
    lengths = [b - a for a, b in itertools.pairwise(points)]
    modes = draw(st.lists(st.sampled_from(["contiguous", "next-page", "gap", "sector-gap"]),
                          min_size=len(lengths), max_size=len(lengths)))
    gaps = draw(st.lists(st.integers(1, 8192), min_size=len(lengths), max_size=len(lengths)))
    sector = draw(st.integers(0, 2048 - sectors))
    return sector, lengths, modes, gaps, draw(st.booleans()), draw(st.booleans())


def place(base: int, start: int, lengths: list[int], modes: list[str],
          gaps: list[int]) -> list[Piece]:
    """Pieces laid out from ``base + start`` going up, separated as ``modes`` say."""
    cursor = base + start
    out = []
    for i, (n, mode) in enumerate(zip(lengths, modes, strict=True)):
        if i:
            if mode == "next-page":
                cursor = -(-cursor // 4096) * 4096 + 4096 * (gaps[i] % 3)
            elif mode == "gap":
                cursor += gaps[i]
            elif mode == "sector-gap":
                cursor += 512 * (gaps[i] % 8 + 1)
        out.append((cursor, n))
        cursor += n
    assert cursor <= base + ARENA
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_random_splits_roundtrip(make_blk: MakeBlk, engine: str) -> None:
    env = make_blk(engine=engine)
    drv = env.drv
    stats = env.device.stats
    arenas = [drv.alloc(ARENA), drv.alloc(ARENA)]
    shadow = bytearray(env.file(0, MiB))  # what the image must hold
    rng = random.Random(0)

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(req=requests(), start=st.integers(0, 8191))
    def check(req: tuple[int, list[int], list[str], list[int], bool, bool], start: int) -> None:
        sector, lengths, modes, gaps, indirect, status_with_data = req
        length = sum(lengths)
        offset = sector * 512
        wpieces = place(arenas[0], start, lengths, modes, gaps)
        rpieces = place(arenas[1], (start * 7) % 4096, lengths, modes, gaps)
        data = rng.randbytes(length)
        expect_w = plan(env.mem.guest, wpieces, False).bounce
        expect_r = plan(env.mem.guest, rpieces, True).bounce

        before = stats.bounced_requests
        res = drv.request(T_OUT, sector, out=data, out_pieces=wpieces, indirect=indirect)
        assert (res.status, res.used) == (Status.OK, 1)
        assert stats.bounced_requests - before == int(expect_w)
        shadow[offset : offset + length] = data
        assert env.file(offset, length) == data

        before = stats.bounced_requests
        res = drv.request(T_IN, sector, in_len=length, in_pieces=rpieces, indirect=indirect,
                          status_with_data=status_with_data)
        assert (res.status, res.used) == (Status.OK, length + 1)
        assert res.data == data
        assert stats.bounced_requests - before == int(expect_r)

    check()
    assert env.file(0, MiB) == bytes(shadow)  # nothing outside the written ranges changed
    assert stats.bounced_requests > 0  # the examples did exercise the bounce path
    assert stats.reads >= 60 and stats.writes >= 60
