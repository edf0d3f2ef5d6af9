"""virtio-blk requests (virtio 1.2, 5.2.6): wire constants, the config space, and the checks.

Pure functions of bytes and numbers: what a request asks for and whether it may be done.  No
guest memory and no IO here, so every rule is a unit test.  A broken request is answered with a
status (IOERR for a driver or device error, UNSUPP for what the device does not do) -- it never
stops the queue and never reaches the disk.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from blockdev.disk import SECTOR_SIZE

SECTOR_SHIFT = 9
HEADER = struct.Struct("<IIQ")  # type, reserved (ioprio), sector
HEADER_SIZE = HEADER.size
SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
SEGMENT_SIZE = SEGMENT.size
ID_BYTES = 20
T_BARRIER = 0x80000000  # legacy flag, masked off the type
SEGMENT_F_UNMAP = 1


class ReqType(enum.IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


class BlkFeature(enum.IntFlag):
    """VIRTIO_BLK_F_* bits."""

    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    GEOMETRY = 1 << 4
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14


class RequestError(Exception):
    """The request is answered with ``status`` (and logged at debug level with the reason)."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What the device advertised; requests are checked against it."""

    capacity: int  # in 512-byte sectors
    logical_block_size: int = SECTOR_SIZE
    max_transfer: int = 4 << 20  # bytes of data in one IN/OUT
    seg_max: int = 126
    size_max: int = 1 << 20
    max_discard_sectors: int = 1 << 15
    max_discard_seg: int = 1
    max_write_zeroes_sectors: int = 1 << 15
    max_write_zeroes_seg: int = 1
    read_only: bool = False
    write_zeroes_may_unmap: bool = True

    @property
    def block_sectors(self) -> int:
        return self.logical_block_size >> SECTOR_SHIFT


def range_fault(sector: int, nbytes: int, limits: Limits) -> str | None:
    """Why a read or write of ``nbytes`` at ``sector`` must fail (None: aligned, inside the
    disk) -- the one statement of the rule; the fast path asks it without raising."""
    lbs = limits.logical_block_size
    if nbytes % SECTOR_SIZE or nbytes % lbs:
        return f"length {nbytes} is not a multiple of {lbs}"
    if nbytes > limits.max_transfer:
        return f"length {nbytes} > the {limits.max_transfer} limit"
    if sector % limits.block_sectors:
        return f"sector {sector} not aligned to {lbs}-byte blocks"
    # Python integers do not overflow, but a u64 sector near 2**64 must still be refused.
    if sector > limits.capacity or nbytes >> SECTOR_SHIFT > limits.capacity - sector:
        return f"sectors {sector}+{nbytes >> SECTOR_SHIFT} beyond capacity {limits.capacity}"
    return None


def check_range(sector: int, nbytes: int, limits: Limits) -> None:
    """A read or write of ``nbytes`` at ``sector``: IOERR unless aligned and inside the disk."""
    fault = range_fault(sector, nbytes, limits)
    if fault is not None:
        raise RequestError(Status.IOERR, fault)


@dataclass(frozen=True)
class Segment:
    """One discard / write-zeroes range, in bytes."""

    offset: int
    length: int
    unmap: bool


def parse_segments(req_type: ReqType, data: bytes, limits: Limits) -> list[Segment]:
    """Decode and check the segments of a DISCARD or WRITE_ZEROES request.

    UNSUPP for unknown flags, or UNMAP on a discard (checked on every segment first, as the spec
    demands UNSUPP whatever else is wrong); IOERR for a payload that is not 16*n bytes, too many
    segments, too many sectors, misalignment, or a range past the end of the disk.
    """
    if req_type == ReqType.DISCARD:
        max_seg, max_sectors = limits.max_discard_seg, limits.max_discard_sectors
    else:
        max_seg, max_sectors = limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors
    if not data or len(data) % SEGMENT_SIZE:
        raise RequestError(Status.IOERR, f"{req_type.name} payload of {len(data)} bytes "
                           f"(not a non-zero multiple of {SEGMENT_SIZE})")
    raw = [SEGMENT.unpack_from(data, i) for i in range(0, len(data), SEGMENT_SIZE)]
    for _, _, flags in raw:
        if flags & ~SEGMENT_F_UNMAP:
            raise RequestError(Status.UNSUPP, f"{req_type.name} with unknown flags {flags:#x}")
        if flags & SEGMENT_F_UNMAP and req_type == ReqType.DISCARD:
            raise RequestError(Status.UNSUPP, "DISCARD with the UNMAP flag")
    if len(raw) > max_seg:
        raise RequestError(Status.IOERR, f"{req_type.name} with {len(raw)} segments > {max_seg}")
    out = []
    for sector, num, flags in raw:
        if num > max_sectors:
            raise RequestError(Status.IOERR, f"{req_type.name} of {num} sectors > {max_sectors}")
        if sector % limits.block_sectors or num % limits.block_sectors:
            raise RequestError(Status.IOERR, f"{req_type.name} {sector}+{num} not aligned to "
                               f"{limits.logical_block_size}-byte blocks")
        if sector > limits.capacity or num > limits.capacity - sector:
            raise RequestError(Status.IOERR, f"{req_type.name} {sector}+{num} beyond capacity")
        out.append(Segment(sector << SECTOR_SHIFT, num << SECTOR_SHIFT,
                           bool(flags & SEGMENT_F_UNMAP) and limits.write_zeroes_may_unmap))
    return out


def check_serial(serial: str) -> None:
    """ValueError unless ``serial`` fits the GET_ID answer (:data:`ID_BYTES` ASCII bytes)."""
    if not serial.isascii():
        raise ValueError(f"serial {serial!r} is not ASCII")
    if len(serial) > ID_BYTES:
        raise ValueError(f"serial {serial!r} is longer than {ID_BYTES} characters")


def device_id(serial: str) -> bytes:
    """The 20-byte GET_ID answer: ASCII, NUL-padded, no terminator when 20 long."""
    raw = serial.encode("ascii", "replace")[:ID_BYTES]
    return raw.ljust(ID_BYTES, b"\0")


CONFIG = struct.Struct(
    "<Q"  # capacity
    "I"  # size_max
    "I"  # seg_max
    "HBB"  # geometry: cylinders, heads, sectors
    "I"  # blk_size
    "BBHI"  # topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    "BB"  # writeback, unused0
    "H"  # num_queues
    "III"  # max_discard_sectors, max_discard_seg, discard_sector_alignment
    "II"  # max_write_zeroes_sectors, max_write_zeroes_seg
    "B3x"  # write_zeroes_may_unmap, unused1
)
#: Offset of ``writeback``, the one config byte a driver may write (CONFIG_WCE).
WRITEBACK_OFFSET = struct.calcsize("<QIIHBBIBBHI")


def config_space(limits: Limits, num_queues: int, writeback: bool) -> bytes:
    """struct virtio_blk_config as far as the features we offer reach (60 bytes)."""
    lbs = limits.logical_block_size
    return CONFIG.pack(
        limits.capacity,
        limits.size_max,
        limits.seg_max,
        0, 0, 0,
        lbs,
        0, 0, 1, 0,  # one logical block per physical block, no preferred IO size
        int(writeback), 0,
        num_queues,
        limits.max_discard_sectors, limits.max_discard_seg, limits.block_sectors,
        limits.max_write_zeroes_sectors, limits.max_write_zeroes_seg,
        int(limits.write_zeroes_may_unmap),
    )
