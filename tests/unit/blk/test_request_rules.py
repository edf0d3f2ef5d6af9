"""virtio_blk.request as a unit: check_range, parse_segments, device_id, config_space."""

from __future__ import annotations

import pytest

from virtio_blk.request import (
    CONFIG,
    ID_BYTES,
    SEGMENT,
    Limits,
    ReqType,
    RequestError,
    Segment,
    Status,
    check_range,
    config_space,
    device_id,
    parse_segments,
)

LIMITS = Limits(capacity=2048)
LIMITS_4K = Limits(capacity=2048, logical_block_size=4096)


def status_of(fn, *args) -> Status:
    with pytest.raises(RequestError) as info:
        fn(*args)
    return info.value.status


# ---------------------------------------------------------------- check_range
@pytest.mark.parametrize(
    ("sector", "nbytes", "limits"),
    [
        (0, 512, LIMITS),
        (2047, 512, LIMITS),  # the last sector
        (0, 2048 * 512, LIMITS),  # the whole disk
        (2048, 0, LIMITS),  # an empty request at the end
        (8, 4096, LIMITS_4K),
        (2040, 4096, LIMITS_4K),
        (0, 4 << 20, Limits(capacity=1 << 20)),  # exactly the transfer limit
    ],
)
def test_check_range_accepts(sector: int, nbytes: int, limits: Limits) -> None:
    check_range(sector, nbytes, limits)


@pytest.mark.parametrize(
    ("sector", "nbytes", "limits"),
    [
        (0, 511, LIMITS),
        (0, 513, LIMITS),
        (0, 1000, LIMITS),
        (0, 512, LIMITS_4K),  # not a multiple of the logical block size
        (0, 2048, LIMITS_4K),
        (1, 4096, LIMITS_4K),  # sector not on a logical block
        (7, 4096, LIMITS_4K),
        (0, (4 << 20) + 512, Limits(capacity=1 << 20)),  # above the transfer limit
        (2048, 512, LIMITS),  # past the end
        (2047, 1024, LIMITS),  # straddles the end
        (2049, 0, LIMITS),  # empty, but past the end
        (2**64 - 1, 512, LIMITS),  # would wrap a u64
        (2**64 - 8, 4096, LIMITS_4K),
        (2**63, 512, LIMITS),
    ],
)
def test_check_range_refuses_with_ioerr(sector: int, nbytes: int, limits: Limits) -> None:
    assert status_of(check_range, sector, nbytes, limits) == Status.IOERR


# ---------------------------------------------------------------- parse_segments
def segs(*triples: tuple[int, int, int]) -> bytes:
    return b"".join(SEGMENT.pack(*t) for t in triples)


def test_parse_segments_decodes_bytes() -> None:
    limits = Limits(capacity=4096, max_write_zeroes_seg=2)
    out = parse_segments(ReqType.WRITE_ZEROES, segs((8, 16, 1), (100, 4, 0)), limits)
    assert out == [Segment(8 * 512, 16 * 512, True), Segment(100 * 512, 4 * 512, False)]


def test_unmap_is_dropped_when_the_device_may_not_unmap() -> None:
    limits = Limits(capacity=4096, write_zeroes_may_unmap=False)
    out = parse_segments(ReqType.WRITE_ZEROES, segs((8, 16, 1)), limits)
    assert out == [Segment(8 * 512, 16 * 512, False)]


@pytest.mark.parametrize("kind", [ReqType.DISCARD, ReqType.WRITE_ZEROES])
@pytest.mark.parametrize(
    ("payload", "limits"),
    [
        (b"", LIMITS),
        (segs((0, 8, 0))[:15], LIMITS),
        (segs((0, 8, 0)) + b"\0", LIMITS),
        (segs((0, 8, 0), (16, 8, 0)), LIMITS),  # 2 segments > max 1
        (segs((0, (1 << 15) + 1, 0)), Limits(capacity=1 << 20)),  # sectors > max
        (segs((2040, 16, 0)), LIMITS),  # past the end
        (segs((2**64 - 1, 1, 0)), LIMITS),  # u64 wrap
        (segs((1, 8, 0)), LIMITS_4K),  # not on a logical block
        (segs((8, 4, 0)), LIMITS_4K),
    ],
)
def test_parse_segments_ioerr(kind: ReqType, payload: bytes, limits: Limits) -> None:
    assert status_of(parse_segments, kind, payload, limits) == Status.IOERR


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (ReqType.DISCARD, segs((0, 8, 1))),  # UNMAP on a discard
        (ReqType.DISCARD, segs((0, 8, 2))),
        (ReqType.WRITE_ZEROES, segs((0, 8, 2))),
        (ReqType.WRITE_ZEROES, segs((0, 8, 0x80000001))),
        # UNSUPP wins over what would be IOERR: too many segments, one with a bad flag...
        (ReqType.WRITE_ZEROES, segs((0, 8, 0), (8, 8, 4))),
        # ... and a range past the end
        (ReqType.DISCARD, segs((2**64 - 1, 8, 1))),
    ],
)
def test_parse_segments_unsupp(kind: ReqType, payload: bytes) -> None:
    assert status_of(parse_segments, kind, payload, LIMITS) == Status.UNSUPP


# ---------------------------------------------------------------- GET_ID and config
@pytest.mark.parametrize(
    ("serial", "expected"),
    [
        ("", bytes(20)),
        ("abc", b"abc" + bytes(17)),
        ("x" * 20, b"x" * 20),  # 20 long: no terminator
        ("y" * 25, b"y" * 20),
        ("d\u00e9j\u00e0", b"d?j?" + bytes(16)),  # ASCII only
    ],
)
def test_device_id(serial: str, expected: bytes) -> None:
    assert device_id(serial) == expected
    assert len(device_id(serial)) == ID_BYTES


def test_config_space_layout() -> None:
    limits = Limits(capacity=12345 * 8, logical_block_size=4096, max_discard_seg=1)
    raw = config_space(limits, num_queues=3, writeback=True)
    assert len(raw) == CONFIG.size == 60
    f = CONFIG.unpack(raw)
    assert f[0] == 12345 * 8  # capacity
    assert f[1:3] == (limits.size_max, limits.seg_max)
    assert f[3:6] == (0, 0, 0)  # no geometry
    assert f[6] == 4096  # blk_size
    assert f[7:11] == (0, 0, 1, 0)  # topology
    assert f[11:14] == (1, 0, 3)  # writeback, unused0, num_queues
    assert f[14:17] == (limits.max_discard_sectors, 1, 8)  # discard; alignment in sectors
    assert f[17:19] == (limits.max_write_zeroes_sectors, limits.max_write_zeroes_seg)
    assert f[19] == 1
    assert raw[57:60] == b"\0\0\0"  # unused1
    assert CONFIG.unpack(config_space(limits, 1, writeback=False))[11] == 0
