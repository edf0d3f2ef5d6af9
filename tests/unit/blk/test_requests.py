"""Every request type through the frontend driver, with its status and used length.

Used length = bytes the device wrote to guest memory, status byte included: IN OK -> data + 1;
GET_ID -> ID bytes written + 1; OUT, FLUSH, DISCARD, WRITE_ZEROES and every error -> 1.
"""

from __future__ import annotations

import errno
import os

import pytest

from blockdev.uring import OP_FSYNC
from tests.unit.blk.conftest import ENGINES, BlkEnv, MakeBlk, uring_engine
from vhost_frontend.blk import (
    POISON,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    segment,
)
from virtio_blk.request import Status


def is_hole(env: BlkEnv, offset: int, length: int) -> bool:
    """Whether [offset, offset+length) of the image is deallocated (no data before its end)."""
    fd = os.open(env.image, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as exc:  # ENXIO: no data at all after offset
        return exc.errno == errno.ENXIO
    finally:
        os.close(fd)


@pytest.mark.parametrize("engine", ENGINES)
def test_in_reads_the_image(make_blk: MakeBlk, engine: str) -> None:
    env = make_blk(engine=engine)
    res = env.drv.read(16, 8192)
    assert res.status == Status.OK
    assert res.used == 8192 + 1
    assert res.data == env.file(16 * 512, 8192)
    assert env.device.stats.reads == 1
    assert env.device.stats.bytes_read == 8192


@pytest.mark.parametrize("engine", ENGINES)
def test_out_writes_the_image(make_blk: MakeBlk, engine: str) -> None:
    env = make_blk(engine=engine)
    before = env.file(0, 1 << 20)
    data = os.urandom(4096)
    res = env.drv.write(24, data)
    assert (res.status, res.used) == (Status.OK, 1)
    after = env.file(0, 1 << 20)
    assert after[24 * 512 : 24 * 512 + 4096] == data
    assert after[: 24 * 512] == before[: 24 * 512]  # nothing else changed
    assert after[24 * 512 + 4096 :] == before[24 * 512 + 4096 :]
    assert env.device.stats.writes == 1


def test_zero_length_in_and_out_are_ok_and_touch_nothing(blk: BlkEnv) -> None:
    # Documented choice: IN/OUT without data is a valid no-op (length 0 is a multiple of 512).
    before = blk.file(0, 1 << 20)
    assert (blk.drv.read(0, 0).status, blk.drv.read(0, 0).used) == (Status.OK, 1)
    res = blk.drv.request(T_OUT, 0)
    assert (res.status, res.used) == (Status.OK, 1)
    assert blk.file(0, 1 << 20) == before


@pytest.mark.parametrize("engine", ENGINES)
def test_flush_reaches_fdatasync(make_blk: MakeBlk, engine: str,
                                 fdatasync_calls: list[int]) -> None:
    env = make_blk(engine=engine)
    if engine == "io_uring":  # the kernel does the fdatasync: count IORING_OP_FSYNC entries
        ring = uring_engine(env).ring
        real_prep = ring.prep

        def prep(opcode: int, fd: int, *args: int, **kwargs: int) -> None:
            if opcode == OP_FSYNC:
                fdatasync_calls.append(fd)
            real_prep(opcode, fd, *args, **kwargs)

        ring.prep = prep
    assert env.drv.write(0, b"f" * 512).status == Status.OK
    assert env.disk.fd not in fdatasync_calls  # write-back mode: a write alone does not sync
    res = env.drv.flush()
    assert (res.status, res.used) == (Status.OK, 1)
    assert fdatasync_calls.count(env.disk.fd) == 1
    assert env.device.stats.flushes == 1


@pytest.mark.parametrize(
    ("serial", "expected"),
    [
        ("vub-serial-0001", b"vub-serial-0001\0\0\0\0\0"),
        ("A" * 20, b"A" * 20),  # exactly 20: no NUL
        ("", bytes(20)),
    ],
)
def test_get_id(make_blk: MakeBlk, serial: str, expected: bytes) -> None:
    env = make_blk(serial=serial)
    res = env.drv.get_id(20)
    assert res.status == Status.OK
    assert res.data == expected
    assert res.used == 21
    assert env.device.stats.get_ids == 1


def test_get_id_with_a_larger_buffer_writes_20_bytes(make_blk: MakeBlk) -> None:
    env = make_blk(serial="longer-buffer")
    res = env.drv.get_id(64)
    assert res.status == Status.OK
    assert res.data[:20] == b"longer-buffer".ljust(20, b"\0")
    assert res.data[20:] == bytes([POISON]) * 44  # untouched
    assert res.used == 21


def test_discard_deallocates_and_reads_back_zero(blk: BlkEnv) -> None:
    before = blk.file(0, 1 << 20)
    res = blk.drv.discard((64, 16))  # 8 KiB at 32 KiB: whole file-system blocks
    assert (res.status, res.used) == (Status.OK, 1)
    assert blk.file(64 * 512, 8192) == bytes(8192)
    assert is_hole(blk, 64 * 512, 8192)
    assert blk.file(0, 64 * 512) == before[: 64 * 512]
    assert blk.file(80 * 512, 4096) == before[80 * 512 : 80 * 512 + 4096]
    assert blk.drv.read(64, 8192).data == bytes(8192)
    assert blk.device.stats.discards == 1


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes(blk: BlkEnv, unmap: bool) -> None:
    before = blk.file(0, 1 << 20)
    res = blk.drv.write_zeroes((128, 24, int(unmap)))
    assert (res.status, res.used) == (Status.OK, 1)
    assert blk.file(128 * 512, 24 * 512) == bytes(24 * 512)
    assert blk.file(0, 128 * 512) == before[: 128 * 512]
    assert blk.file(152 * 512, 4096) == before[152 * 512 : 152 * 512 + 4096]
    if unmap:  # the device advertises write_zeroes_may_unmap and punches a hole
        assert is_hole(blk, 128 * 512, 12288)
    assert blk.drv.read(128, 24 * 512).data == bytes(24 * 512)
    assert blk.device.stats.write_zeroes == 1


def test_write_zeroes_mid_block_range(blk: BlkEnv) -> None:
    # 3 sectors in the middle of a file-system block: zeroed exactly, neighbours kept.
    before = blk.file(0, 8192)
    assert blk.drv.write_zeroes((3, 3, 1)).status == Status.OK
    after = blk.file(0, 8192)
    assert after[: 3 * 512] == before[: 3 * 512]
    assert after[3 * 512 : 6 * 512] == bytes(3 * 512)
    assert after[6 * 512 :] == before[6 * 512 :]


@pytest.mark.parametrize(
    "req_type",
    [2, 3, 5, 6, 7, 9, 10, 12, 14, 15, 16, 18, 20, 22, 24, 26, 0x7FFFFFFF, 0x80000002],
)
def test_unknown_types_are_unsupp(blk: BlkEnv, req_type: int) -> None:
    before = blk.file(0, 1 << 20)
    res = blk.drv.request(req_type, 0, in_len=512)
    assert (res.status, res.used) == (Status.UNSUPP, 1)
    assert res.data == bytes([POISON]) * 512  # nothing written but the status
    assert blk.device.stats.unsupported == 1
    assert blk.file(0, 1 << 20) == before


def test_barrier_bit_is_masked(blk: BlkEnv) -> None:
    data = os.urandom(1024)
    res = blk.drv.request(0x80000000 | T_OUT, 40, out=data)  # a legacy barrier write
    assert (res.status, res.used) == (Status.OK, 1)
    assert blk.file(40 * 512, 1024) == data
    res = blk.drv.request(0x80000000 | T_IN, 40, in_len=1024)
    assert (res.status, res.used, res.data) == (Status.OK, 1025, data)
    res = blk.drv.request(0x80000000 | T_FLUSH, 0)
    assert (res.status, res.used) == (Status.OK, 1)


def test_reserved_field_is_ignored(blk: BlkEnv) -> None:
    res = blk.drv.read(0, 512, reserved=0xFFFFFFFF)  # ioprio in legacy drivers
    assert (res.status, res.data) == (Status.OK, blk.file(0, 512))


@pytest.mark.parametrize(
    ("req_type", "kwargs", "status", "used"),
    [
        (T_IN, {"sector": 0, "in_len": 4096}, Status.OK, 4097),
        (T_IN, {"sector": 2048, "in_len": 512}, Status.IOERR, 1),
        (T_OUT, {"sector": 0, "out": b"o" * 1024}, Status.OK, 1),
        (T_OUT, {"sector": 0, "out": b"o" * 100}, Status.IOERR, 1),
        (T_FLUSH, {}, Status.OK, 1),
        (T_FLUSH, {"sector": 8}, Status.IOERR, 1),
        (T_GET_ID, {"in_len": 20}, Status.OK, 21),
        (T_GET_ID, {"in_len": 7}, Status.OK, 8),
        (T_GET_ID, {"in_len": 20, "out": b"x" * 4}, Status.IOERR, 1),
        (T_DISCARD, {"out": segment(0, 8)}, Status.OK, 1),
        (T_DISCARD, {"out": segment(0, 8, 1)}, Status.UNSUPP, 1),
        (T_WRITE_ZEROES, {"out": segment(0, 8, 1)}, Status.OK, 1),
        (T_WRITE_ZEROES, {"out": segment(0, 8)[:8]}, Status.IOERR, 1),
        (99, {"in_len": 512}, Status.UNSUPP, 1),
    ],
)
def test_status_and_used_length(blk: BlkEnv, req_type: int, kwargs: dict, status: Status,
                                used: int) -> None:
    res = blk.drv.request(req_type, **kwargs)
    assert (res.status, res.used) == (status, used)


def test_many_requests_in_flight_complete_with_their_own_results(blk: BlkEnv) -> None:
    image = blk.file(0, 1 << 20)
    pending = [blk.drv.start(T_IN, 8 * i, in_len=4096) for i in range(40)]
    results = blk.drv.wait(pending)
    for i, res in enumerate(results):
        assert (res.status, res.used) == (Status.OK, 4097)
        assert res.data == image[4096 * i : 4096 * (i + 1)]
