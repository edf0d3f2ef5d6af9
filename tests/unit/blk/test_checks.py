"""Every check the device makes on a request, one test (or parametrized case) each.

Choices documented here:
* FLUSH with a non-zero sector, or with any data (readable or writable), is IOERR -- the spec
  makes both driver errors ("MUST set sector to 0", "SHOULD NOT include any data") and IOERR is
  its status for driver errors.  Nothing is synced then.
* A chain with no device-writable byte has nowhere to put a status: it completes with used
  length 0 and nothing done; the queue keeps working.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from scsi_buffers import GuestMemory
from tests.unit.blk.conftest import BlkEnv, MakeBlk, MiB
from vhost_frontend.blk import (
    POISON,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    BlkDriver,
    Piece,
    header,
    segment,
)
from virtio_blk.request import Status

U64 = 2**64


def header_piece(drv: BlkDriver, req_type: int, sector: int = 0) -> list[Piece]:
    pieces = drv.pieces([16])
    drv.fill(pieces, header(req_type, sector))
    return pieces


def image_state(env: BlkEnv) -> tuple[bytes, int, int]:
    st = os.stat(env.image)
    return env.file(0, st.st_size), st.st_size, st.st_blocks


# ---------------------------------------------------------------- data direction
def test_in_with_readable_data_is_ioerr(blk: BlkEnv) -> None:
    res = blk.drv.request(T_IN, 0, out=b"r" * 512, in_len=512)
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert res.data == bytes([POISON]) * 512  # no data was read into it


def test_in_with_only_readable_data_is_ioerr(blk: BlkEnv) -> None:
    res = blk.drv.request(T_IN, 0, out=b"r" * 512)
    assert (res.status, res.used) == (Status.IOERR, 1)


@pytest.mark.parametrize("out_len", [0, 512])
def test_out_with_writable_data_is_ioerr(blk: BlkEnv, out_len: int) -> None:
    before = image_state(blk)
    res = blk.drv.request(T_OUT, 0, out=b"w" * out_len, in_len=512)
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert res.data == bytes([POISON]) * 512
    assert image_state(blk) == before


@pytest.mark.parametrize("req_type", [T_DISCARD, T_WRITE_ZEROES])
def test_discard_and_write_zeroes_payload_must_be_readable(blk: BlkEnv, req_type: int) -> None:
    before = image_state(blk)
    # A valid segment, but in a device-writable descriptor...
    seg_piece = blk.drv.pieces([16])
    blk.drv.fill(seg_piece, segment(0, 8, 0))
    res = blk.drv.run_chain(header_piece(blk.drv, req_type), seg_piece + blk.drv.pieces([1]),
                            poison=False)
    assert (res.status, res.used) == (Status.IOERR, 1)
    # ... and a readable payload with extra writable bytes before the status.
    res = blk.drv.request(req_type, 0, out=segment(0, 8, 0), in_len=16)
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert image_state(blk) == before


@pytest.mark.parametrize("out_len", [20, 1])
def test_get_id_data_must_be_writable(blk: BlkEnv, out_len: int) -> None:
    res = blk.drv.request(T_GET_ID, 0, out=b"i" * out_len)
    assert (res.status, res.used) == (Status.IOERR, 1)
    res = blk.drv.request(T_GET_ID, 0, out=b"i" * out_len, in_len=20)
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert res.data == bytes([POISON]) * 20


# ---------------------------------------------------------------- the header
SPLITS = [(8, 8), (1, 15), (15, 1), (4, 4, 8), (1,) * 16]


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "+".join(map(str, s)))
def test_split_header_is_gathered(make_blk: MakeBlk, split: tuple[int, ...]) -> None:
    env = make_blk(serial="split-header")
    drv = env.drv
    data = os.urandom(2048)
    res = drv.write(32, data, header_split=split)
    assert (res.status, res.used) == (Status.OK, 1)
    assert env.file(32 * 512, 2048) == data
    res = drv.read(32, 2048, header_split=split)
    assert (res.status, res.used, res.data) == (Status.OK, 2049, data)
    res = drv.request(T_GET_ID, 0, in_len=20, header_split=split)
    assert (res.status, res.data) == (Status.OK, b"split-header".ljust(20, b"\0"))
    assert drv.request(T_FLUSH, 0, header_split=split).status == Status.OK
    res = drv.request(T_WRITE_ZEROES, 0, out=segment(32, 4), header_split=split)
    assert res.status == Status.OK
    assert env.file(32 * 512, 2048) == bytes(2048)
    # The type and sector really come from the gathered bytes: an UNSUPP type and an
    # out-of-range sector, both split.
    assert drv.request(3, 0, in_len=1, header_split=split).status == Status.UNSUPP
    assert drv.read(2048, 512, header_split=split).status == Status.IOERR


def test_header_and_data_in_one_descriptor(blk: BlkEnv) -> None:
    data = os.urandom(4096)
    res = blk.drv.write(8, data, header_with_data=True)
    assert (res.status, res.used) == (Status.OK, 1)
    assert blk.file(8 * 512, 4096) == data


def test_split_header_whose_last_piece_carries_data(blk: BlkEnv) -> None:
    # readable: [8 bytes of header] [last 8 header bytes + 1024 data bytes]
    drv = blk.drv
    data = os.urandom(1024)
    first = drv.pieces([8])
    drv.fill(first, header(T_OUT, 16)[:8])
    second = drv.pieces([8 + 1024])
    drv.fill(second, header(T_OUT, 16)[8:] + data)
    res = drv.run_chain(first + second, drv.pieces([1]))
    assert (res.status, res.used) == (Status.OK, 1)
    assert blk.file(16 * 512, 1024) == data


@pytest.mark.parametrize("length", [0, 1, 8, 15])
def test_short_header_is_ioerr(blk: BlkEnv, length: int) -> None:
    drv = blk.drv
    readable = drv.pieces([length]) if length else []
    if readable:
        drv.fill(readable, header(T_IN, 0)[:length])
    res = drv.run_chain(readable, drv.pieces([513]))
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert res.data == bytes([POISON]) * 512


def test_header_in_a_writable_descriptor_is_ioerr(blk: BlkEnv) -> None:
    res = blk.drv.run_chain([], blk.drv.pieces([16, 1]))
    assert (res.status, res.used) == (Status.IOERR, 1)


# ---------------------------------------------------------------- lengths and ranges
@pytest.mark.parametrize("length", [1, 100, 511, 513, 1000, 4095])
def test_length_not_a_multiple_of_512_is_ioerr(blk: BlkEnv, length: int) -> None:
    before = image_state(blk)
    res = blk.drv.read(0, length)
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert res.data == bytes([POISON]) * length
    res = blk.drv.write(0, b"x" * length)
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert image_state(blk) == before


@pytest.mark.parametrize(
    ("sector", "length", "ok"),
    [
        (0, 4096, True),
        (8, 8192, True),
        (2040, 4096, True),  # the last block
        (0, 512, False),  # a sector, not a logical block
        (0, 2048, False),
        (0, 4608, False),
        (1, 4096, False),  # misaligned sector
        (4, 4096, False),
        (7, 4096, False),
    ],
)
def test_logical_block_size_4096(make_blk: MakeBlk, sector: int, length: int, ok: bool) -> None:
    env = make_blk(lbs=4096)
    before = image_state(env)
    res = env.drv.read(sector, length)
    assert res.status == (Status.OK if ok else Status.IOERR)
    assert res.used == (length + 1 if ok else 1)
    if ok:
        assert res.data == env.file(sector * 512, length)
    data = os.urandom(length)
    res = env.drv.write(sector, data)
    assert (res.status, res.used) == (Status.OK if ok else Status.IOERR, 1)
    if ok:
        assert env.file(sector * 512, length) == data
    else:
        assert image_state(env) == before


def test_transfer_limit(make_blk: MakeBlk) -> None:
    env = make_blk(size=8 * MiB, seed=None)
    limits = env.device.limits
    # The limit is what the config space lets a driver send: seg_max segments of size_max.
    assert limits.max_transfer == limits.seg_max * limits.size_max
    # Check the rule itself with a limit that fits this small image.
    limit = 4 * MiB
    handler = env.queue_handler()
    handler.limits = dataclasses.replace(limits, max_transfer=limit)
    assert env.drv.read(0, limit).status == Status.OK
    res = env.drv.read(0, limit + 512)
    assert (res.status, res.used) == (Status.IOERR, 1)
    before = image_state(env)
    res = env.drv.write(0, b"\x01" * (limit + 512))
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert image_state(env) == before
    assert env.drv.write(0, b"\x02" * limit).status == Status.OK
    assert env.file(0, limit) == b"\x02" * limit


@pytest.mark.parametrize(
    ("sector", "length"),
    [
        (2048, 512),  # just past the end (capacity 2048 sectors)
        (2047, 1024),  # straddles the end
        (2049, 0),  # empty, but past the end
        (4096, 512),
        (U64 - 1, 512),  # sector + length wraps a u64
        (U64 - 8, 4096),
        (U64 - 1, 0),
        (2**63, 512),
    ],
)
def test_beyond_capacity_is_ioerr(blk: BlkEnv, sector: int, length: int) -> None:
    before = image_state(blk)
    res = blk.drv.read(sector, length)
    assert (res.status, res.used) == (Status.IOERR, 1)
    res = blk.drv.write(sector, b"z" * length)
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert image_state(blk) == before  # in particular the file did not grow


def test_last_sectors_are_reachable(blk: BlkEnv) -> None:
    data = os.urandom(1024)
    assert blk.drv.write(2046, data).status == Status.OK
    res = blk.drv.read(2046, 1024)
    assert (res.status, res.data) == (Status.OK, data)
    assert os.stat(blk.image).st_size == 1 * MiB


# ---------------------------------------------------------------- FLUSH
def test_flush_ok_syncs(blk: BlkEnv, fdatasync_calls: list[int]) -> None:
    res = blk.drv.flush()
    assert (res.status, res.used) == (Status.OK, 1)
    assert fdatasync_calls == [blk.disk.fd]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sector": 8},
        {"sector": U64 - 1},
        {"out": b"d" * 512},
        {"in_len": 512},
        {"out": b"d" * 16, "in_len": 16},
    ],
    ids=["sector", "sector-u64", "readable-data", "writable-data", "both"],
)
def test_flush_misuse_is_ioerr(blk: BlkEnv, fdatasync_calls: list[int], kwargs: dict) -> None:
    res = blk.drv.request(T_FLUSH, **kwargs)
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert fdatasync_calls == []
    assert blk.device.stats.flushes == 0


# ---------------------------------------------------------------- DISCARD / WRITE_ZEROES
@pytest.mark.parametrize("req_type", [T_DISCARD, T_WRITE_ZEROES], ids=["discard", "zeroes"])
@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"", Status.IOERR),  # no segment
        (segment(0, 8)[:15], Status.IOERR),  # not 16*n bytes
        (segment(0, 8) + b"\0", Status.IOERR),
        (segment(0, 8) + segment(16, 8), Status.IOERR),  # 2 segments > max_*_seg 1
        (segment(2040, 16), Status.IOERR),  # past the end
        (segment(2048, 1), Status.IOERR),
        (segment(U64 - 1, 2), Status.IOERR),  # wraps
        (segment(0, 8, 2), Status.UNSUPP),  # unknown flag
        (segment(0, 8, 0x80000000), Status.UNSUPP),
        (segment(0, 8) + segment(8, 8, 4), Status.UNSUPP),  # UNSUPP beats "too many"
        (segment(U64 - 1, 8, 8), Status.UNSUPP),  # ... and "past the end"
    ],
    ids=["empty", "15", "17", "2segs", "past-end", "at-end", "wrap", "flag2", "flag31",
         "2segs-badflag", "wrap-badflag"],
)
def test_segment_checks(blk: BlkEnv, req_type: int, payload: bytes, status: Status) -> None:
    before = image_state(blk)
    res = blk.drv.request(req_type, 0, out=payload) if payload else blk.drv.request(req_type)
    assert (res.status, res.used) == (status, 1)
    assert image_state(blk) == before


def test_unmap_on_discard_is_unsupp(blk: BlkEnv) -> None:
    before = image_state(blk)
    res = blk.drv.discard((0, 8, 1))
    assert (res.status, res.used) == (Status.UNSUPP, 1)
    assert image_state(blk) == before
    assert blk.device.stats.unsupported == 1


@pytest.mark.parametrize("req_type", [T_DISCARD, T_WRITE_ZEROES], ids=["discard", "zeroes"])
def test_segment_sector_limit(make_blk: MakeBlk, req_type: int) -> None:
    env = make_blk(size=32 * MiB, seed=None)
    most = env.device.limits.max_discard_sectors
    assert most == env.device.limits.max_write_zeroes_sectors == 1 << 15
    res = env.drv.request(req_type, 0, out=segment(0, most + 1))
    assert (res.status, res.used) == (Status.IOERR, 1)
    res = env.drv.request(req_type, 0, out=segment(0, most))
    assert (res.status, res.used) == (Status.OK, 1)


@pytest.mark.parametrize("req_type", [T_DISCARD, T_WRITE_ZEROES], ids=["discard", "zeroes"])
@pytest.mark.parametrize("seg", [(1, 8), (8, 4), (8, 12)])
def test_segment_alignment_with_4k_blocks(make_blk: MakeBlk, req_type: int,
                                          seg: tuple[int, int]) -> None:
    env = make_blk(lbs=4096)
    before = image_state(env)
    res = env.drv.request(req_type, 0, out=segment(*seg))
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert image_state(env) == before
    assert env.drv.request(req_type, 0, out=segment(8, 16)).status == Status.OK


def test_segment_at_the_end_of_the_disk(blk: BlkEnv) -> None:
    assert blk.drv.write_zeroes((2040, 8)).status == Status.OK
    assert blk.file(2040 * 512, 4096) == bytes(4096)
    assert os.stat(blk.image).st_size == MiB


# ---------------------------------------------------------------- read-only
def test_read_only_refuses_every_write(make_blk: MakeBlk) -> None:
    env = make_blk(read_only=True, serial="ro")
    before = image_state(env)
    mtime = os.stat(env.image).st_mtime_ns
    for res in (
        env.drv.write(0, b"w" * 4096),
        env.drv.request(0x80000000 | T_OUT, 8, out=b"w" * 512),
        env.drv.discard((0, 8)),
        env.drv.write_zeroes((0, 8)),
        env.drv.write_zeroes((0, 8, 1)),
        env.drv.request(T_OUT, 0),  # even an empty write
    ):
        assert (res.status, res.used) == (Status.IOERR, 1)
    assert image_state(env) == before
    assert os.stat(env.image).st_mtime_ns == mtime
    # Reads, flushes and GET_ID still work.
    res = env.drv.read(0, 4096)
    assert (res.status, res.data) == (Status.OK, before[0][:4096])
    assert env.drv.flush().status == Status.OK
    assert env.drv.get_id().data == b"ro".ljust(20, b"\0")


# ---------------------------------------------------------------- GET_ID buffers
GUARD = b"GUARD-BYTES-1234"


@pytest.mark.parametrize("status_with_data", [False, True], ids=["status-apart", "status-in"])
def test_get_id_never_writes_past_a_short_buffer(make_blk: MakeBlk,
                                                 status_with_data: bool) -> None:
    env = make_blk(serial="0123456789abcdefghij")
    drv = env.drv
    # 5 writable data bytes, then guard bytes in the same page right after them.
    gpa = drv.alloc(5 + 1 + len(GUARD))
    if status_with_data:
        writable = [(gpa, 6)]
        guard_at = gpa + 6
    else:
        writable = [(gpa, 5), (drv.alloc(1), 1)]
        guard_at = gpa + 5
    drv.mem.write(guard_at, GUARD)
    res = drv.run_chain(header_piece(drv, T_GET_ID), writable)
    assert res.status == Status.OK
    assert res.data == b"01234"
    assert res.used == 6
    assert drv.mem.read(guard_at, len(GUARD)) == GUARD


def test_get_id_across_several_descriptors(make_blk: MakeBlk) -> None:
    env = make_blk(serial="0123456789abcdefghij")
    drv = env.drv
    pieces = drv.pieces([2, 3, 10, 30])
    res = drv.run_chain(header_piece(drv, T_GET_ID), [*pieces, *drv.pieces([1])])
    assert res.status == Status.OK
    assert res.used == 21
    assert res.data == b"0123456789abcdefghij" + bytes([POISON]) * 25


def test_get_id_with_no_data_bytes(make_blk: MakeBlk) -> None:
    env = make_blk(serial="abc")
    res = env.drv.get_id(0)
    assert (res.status, res.used) == (Status.OK, 1)


# ---------------------------------------------------------------- no status byte at all
@pytest.mark.parametrize("req_type", [T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, 77])
def test_request_without_a_writable_byte(blk: BlkEnv, req_type: int) -> None:
    drv = blk.drv
    before = image_state(blk)
    readable = header_piece(drv, req_type)
    if req_type == T_OUT:
        data = drv.pieces([512])
        drv.fill(data, b"n" * 512)
        readable += data
    elif req_type == T_DISCARD:
        data = drv.pieces([16])
        drv.fill(data, segment(0, 8))
        readable += data
    res = drv.run_chain(readable, [])
    assert res.used == 0
    assert image_state(blk) == before
    # The queue still works.
    res = drv.read(0, 512)
    assert (res.status, res.data) == (Status.OK, before[0][:512])
    assert blk.daemon.thread.is_alive()


# ---------------------------------------------------------------- bounded copies
@pytest.fixture
def backend_reads(monkeypatch: pytest.MonkeyPatch, blk: BlkEnv) -> list[int]:
    """Lengths of every GuestMemory.read the backend makes (the frontend's own are left out)."""
    sizes: list[int] = []
    real = GuestMemory.read
    frontend_memory = blk.mem.guest

    def read(self: GuestMemory, gpa: int, length: int) -> bytes:
        if self is not frontend_memory:
            sizes.append(length)
        return real(self, gpa, length)

    monkeypatch.setattr(GuestMemory, "read", read)
    return sizes


def test_split_header_gathers_only_the_header(blk: BlkEnv, backend_reads: list[int]) -> None:
    # Regression: a split header used to be gathered by copying every readable byte of the
    # chain -- with an OUT's data that can be gigabytes a guest chooses to send.
    data = os.urandom(1 << 20)
    res = blk.drv.write(0, data, header_split=(8, 8))
    assert (res.status, res.used) == (Status.OK, 1)
    assert blk.file(0, 1 << 20) == data
    assert backend_reads and max(backend_reads) <= 16


def test_huge_segment_payload_is_refused_without_copying(blk: BlkEnv,
                                                         backend_reads: list[int]) -> None:
    before = image_state(blk)
    payload = segment(0, 8, 2) * 4097  # 64 KiB + 16
    res = blk.drv.request(T_DISCARD, 0, out=payload)
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert not backend_reads or max(backend_reads) <= 16
    # Up to the cap, an unknown flag anywhere still wins (UNSUPP), as the spec asks.
    res = blk.drv.request(T_WRITE_ZEROES, 0, out=segment(0, 8) * 4095 + segment(8, 8, 2))
    assert (res.status, res.used) == (Status.UNSUPP, 1)
    assert image_state(blk) == before
