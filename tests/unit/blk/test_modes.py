"""Device modes and what the frontend sees: feature bits, config space, cache mode, read-only,
O_DIRECT, 4096-byte logical blocks, several queues."""

from __future__ import annotations

import fcntl
import os
import time

import pytest

from tests.unit.blk.conftest import ENGINES, BlkEnv, MakeBlk, MiB
from vhost.messages import ProtocolFeature, Request, VirtioFeature, config_space, u64
from vhost_frontend import Frontend
from vhost_frontend.blk import T_IN, BlkDriver, Piece
from virtio_blk.device import WRITEBACK_OFFSET
from virtio_blk.layout import plan
from virtio_blk.request import CONFIG, BlkFeature, Status

ALWAYS = (BlkFeature.SIZE_MAX | BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH
          | BlkFeature.TOPOLOGY | BlkFeature.CONFIG_WCE | BlkFeature.MQ)
RING = VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC | VirtioFeature.RING_EVENT_IDX


def config(env: BlkEnv) -> dict[str, int]:
    raw = env.frontend.get_config(0, 60)
    assert len(raw) == 60
    names = (
        "capacity", "size_max", "seg_max", "cylinders", "heads", "sectors", "blk_size",
        "physical_block_exp", "alignment_offset", "min_io_size", "opt_io_size", "writeback",
        "unused0", "num_queues", "max_discard_sectors", "max_discard_seg",
        "discard_sector_alignment", "max_write_zeroes_sectors", "max_write_zeroes_seg",
        "write_zeroes_may_unmap",
    )
    return dict(zip(names, CONFIG.unpack(raw), strict=True))


def set_writeback(env: BlkEnv, value: int) -> int | None:
    """SET_CONFIG of the writeback byte; the REPLY_ACK status (0 = accepted)."""
    return env.frontend.command(Request.SET_CONFIG, config_space(WRITEBACK_OFFSET,
                                                                 bytes([value])))


# ---------------------------------------------------------------- features
def test_features_of_a_writable_disk(blk: BlkEnv) -> None:
    offered = blk.frontend.get_u64(Request.GET_FEATURES)
    blk_bits = offered & 0xFFFFFF
    assert blk_bits == ALWAYS | BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES
    assert not offered & BlkFeature.RO
    assert offered & RING == RING
    assert offered & VirtioFeature.PROTOCOL_FEATURES
    proto = blk.frontend.get_u64(Request.GET_PROTOCOL_FEATURES)
    assert proto & ProtocolFeature.CONFIG


def test_features_of_a_read_only_disk(make_blk: MakeBlk) -> None:
    env = make_blk(read_only=True)
    offered = env.frontend.get_u64(Request.GET_FEATURES)
    assert offered & 0xFFFFFF == ALWAYS | BlkFeature.RO
    assert not offered & (BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES)
    assert env.device.feature_names() == sorted(
        env.device.feature_names(), key=lambda n: BlkFeature[n].value)
    assert "RO" in env.device.feature_names()


# ---------------------------------------------------------------- config space
@pytest.mark.parametrize(("lbs", "num_queues"), [(512, 1), (4096, 2)])
def test_config_space(make_blk: MakeBlk, lbs: int, num_queues: int) -> None:
    env = make_blk(size=3 * MiB, seed=None, lbs=lbs, num_queues=num_queues)
    cfg = config(env)
    limits = env.device.limits
    assert cfg["capacity"] == 3 * MiB // 512
    assert cfg["size_max"] == limits.size_max == 1 << 20
    assert cfg["seg_max"] == limits.seg_max == 126
    assert cfg["blk_size"] == lbs
    assert (cfg["physical_block_exp"], cfg["alignment_offset"]) == (0, 0)
    assert (cfg["min_io_size"], cfg["opt_io_size"]) == (1, 0)
    assert cfg["writeback"] == 1
    assert cfg["unused0"] == 0
    assert cfg["num_queues"] == num_queues
    assert cfg["max_discard_sectors"] == 1 << 15
    assert cfg["max_discard_seg"] == 1
    assert cfg["discard_sector_alignment"] == lbs // 512
    assert cfg["max_write_zeroes_sectors"] == 1 << 15
    assert cfg["max_write_zeroes_seg"] == 1
    assert cfg["write_zeroes_may_unmap"] == 1
    assert env.frontend.get_u64(Request.GET_QUEUE_NUM) == num_queues
    # Partial reads see the same bytes.
    assert env.frontend.get_config(WRITEBACK_OFFSET, 4) == bytes([1, 0]) + num_queues.to_bytes(
        2, "little")


@pytest.mark.parametrize(("size", "lbs", "capacity"),
                         [(MiB + 100, 512, 2048), (MiB + 3584, 4096, 2048), (4096, 4096, 8)])
def test_capacity_ignores_a_partial_last_block(make_blk: MakeBlk, size: int, lbs: int,
                                               capacity: int) -> None:
    env = make_blk(size=size, lbs=lbs)
    assert config(env)["capacity"] == capacity
    last = capacity - lbs // 512
    assert env.drv.read(last, lbs).status == Status.OK
    assert env.drv.read(capacity, lbs).status == Status.IOERR


def test_read_only_config_and_data(make_blk: MakeBlk) -> None:
    env = make_blk(read_only=True, size=2 * MiB)
    cfg = config(env)
    assert cfg["capacity"] == 4096
    res = env.drv.read(4088, 4096)
    assert (res.status, res.data) == (Status.OK, env.file(4088 * 512, 4096))
    assert env.drv.write(0, b"x" * 512).status == Status.IOERR


# ---------------------------------------------------------------- cache mode
def test_writeback_toggle(blk: BlkEnv, fdatasync_calls: list[int]) -> None:
    fd = blk.disk.fd
    assert config(blk)["writeback"] == 1
    assert blk.drv.write(0, b"a" * 4096).status == Status.OK
    assert blk.drv.write_zeroes((8, 8)).status == Status.OK
    assert fd not in fdatasync_calls

    assert set_writeback(blk, 0) == 0
    assert config(blk)["writeback"] == 0
    assert blk.drv.write(0, b"b" * 4096).status == Status.OK  # write-through: synced
    assert fdatasync_calls.count(fd) == 1
    assert blk.drv.write_zeroes((8, 8)).status == Status.OK
    assert fdatasync_calls.count(fd) == 2
    assert blk.drv.read(0, 4096).status == Status.OK  # reads never sync
    assert fdatasync_calls.count(fd) == 2
    assert blk.file(0, 4096) == b"b" * 4096

    assert set_writeback(blk, 1) == 0
    assert config(blk)["writeback"] == 1
    assert blk.drv.write(0, b"c" * 4096).status == Status.OK
    assert fdatasync_calls.count(fd) == 2


def test_only_the_writeback_byte_is_writable(blk: BlkEnv) -> None:
    assert set_writeback(blk, 2) != 0  # not a cache mode
    assert blk.frontend.command(Request.SET_CONFIG, config_space(0, bytes(8))) != 0  # capacity
    assert blk.frontend.command(Request.SET_CONFIG,
                                config_space(WRITEBACK_OFFSET, b"\0\0")) != 0
    cfg = config(blk)
    assert (cfg["writeback"], cfg["capacity"]) == (1, 2048)
    assert blk.drv.read(0, 512).status == Status.OK  # the connection is still fine


def test_write_through_when_the_driver_cannot_flush(make_blk: MakeBlk,
                                                    fdatasync_calls: list[int]) -> None:
    # Neither FLUSH nor CONFIG_WCE negotiated: every write is stable on completion (virtio 1.2
    # 5.2.6.3, case 1).
    env = make_blk(drop_features=BlkFeature.FLUSH | BlkFeature.CONFIG_WCE)
    assert config(env)["writeback"] == 0
    assert env.drv.write(0, b"w" * 512).status == Status.OK
    assert fdatasync_calls.count(env.disk.fd) == 1


def test_config_wce_without_flush_starts_write_through(make_blk: MakeBlk,
                                                       fdatasync_calls: list[int]) -> None:
    # "If VIRTIO_BLK_F_CONFIG_WCE is negotiated but VIRTIO_BLK_F_FLUSH is not, the device MUST
    # initialize writeback to 0."
    env = make_blk(drop_features=BlkFeature.FLUSH)
    assert config(env)["writeback"] == 0
    assert env.drv.write(0, b"w" * 512).status == Status.OK
    assert fdatasync_calls.count(env.disk.fd) == 1


def test_flush_without_config_wce_is_write_back(make_blk: MakeBlk,
                                                fdatasync_calls: list[int]) -> None:
    env = make_blk(drop_features=BlkFeature.CONFIG_WCE)
    assert config(env)["writeback"] == 1
    assert env.drv.write(0, b"w" * 512).status == Status.OK
    assert env.disk.fd not in fdatasync_calls


def test_cache_mode_resets_with_the_connection(blk: BlkEnv) -> None:
    assert set_writeback(blk, 0) == 0
    blk.frontend.close()
    deadline = time.monotonic() + 10
    while blk.daemon.daemon.handler is not None:  # the daemon notices the disconnect
        assert time.monotonic() < deadline
        time.sleep(0.01)
    fe = Frontend(blk.daemon.path)
    try:
        fe.negotiate()
        assert fe.get_config(WRITEBACK_OFFSET, 1) == b"\x01"
    finally:
        fe.close()


# ---------------------------------------------------------------- several queues
def test_second_queue_serves_requests(make_blk: MakeBlk) -> None:
    env = make_blk(num_queues=2)
    q1 = env.frontend.setup_queue(1, size=64)
    drv1 = BlkDriver(env.frontend, q1, env.mem)
    data = os.urandom(8192)
    # A bounced write on queue 1 (its own bounce budget), read back on queue 0.
    assert drv1.write(64, data, pieces=drv1.pieces([1000, 7192])).status == Status.OK
    assert env.drv.read(64, 8192).data == data
    res = drv1.read(64, 8192, pieces=drv1.pieces([448, 7744]))
    assert (res.status, res.data) == (Status.OK, data)
    assert env.device.stats.bounced_requests == 2


# ---------------------------------------------------------------- O_DIRECT
def host_misaligned(env: BlkEnv, pieces: list[Piece], mmap_offsets: dict[int, int]) -> bool:
    """Whether some host buffer the zero-copy path would use breaks the DIO alignment.

    The backend maps each region from a page-aligned file offset, so a guest address's host
    address is ``region mmap offset + (gpa - region gpa)`` modulo the page size."""
    mask = env.disk.info.mem_align - 1
    layout = plan(env.mem.guest, pieces, True)
    for buf in layout.buffers:
        for gpa, n in buf.range.ranges():
            base = max(g for g in mmap_offsets if g <= gpa)
            host = mmap_offsets[base] + gpa - base
            if (host | n) & mask:
                return True
    return False


DIRECT_LAYOUT = ((0, 16 * MiB, 0), (16 * MiB, 8 * MiB, 0x101))  # region 1: odd host addresses
MMAP_OFFSETS = {0: 0, 16 * MiB: 0x101}

DIRECT_CASES = {
    "page-aligned": (lambda d: d.pieces([8192]), False),
    "sector-aligned-address": (lambda d: d.pieces([8192], offsets=512), None),
    "odd-address": (lambda d: d.pieces([8192], offsets=1), True),
    "sector-pieces-apart": (lambda d: d.pieces([512, 1536], offsets=[0, 1024]), None),
    "contiguous-mid-sector": (lambda d: d.pieces([448, 64, 3584], contiguous=True), False),
    "page-joined-partial": (lambda d: d.pieces([3584, 512], offsets=[512, 0]), None),
    "region-with-odd-mmap-offset": (lambda d: d.pieces([8192], region=1), True),
    "mid-sector-apart": (lambda d: d.pieces([1000, 24]), True),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", list(DIRECT_CASES))
def test_direct_roundtrip(make_blk: MakeBlk, engine: str, case: str) -> None:
    env = make_blk(direct=True, engine=engine, mem_layout=DIRECT_LAYOUT)
    assert fcntl.fcntl(env.disk.fd, fcntl.F_GETFL) & os.O_DIRECT
    info = env.disk.info
    assert info.direct and info.mem_align > 1 and info.offset_align <= info.logical_block_size
    make, bounced = DIRECT_CASES[case]
    drv = env.drv
    stats = env.device.stats
    pieces = make(drv)
    # Bounced iff the split rule says so or a host buffer breaks the DIO alignment.
    model = plan(env.mem.guest, pieces, True).bounce or host_misaligned(env, pieces,
                                                                         MMAP_OFFSETS)
    if bounced is None:  # depends on the kernel's DIO alignment for this file
        bounced = model
    assert model == bounced
    length = sum(n for _, n in pieces)
    data = os.urandom(length)
    res = drv.write(24, data, pieces=pieces)
    assert (res.status, res.used) == (Status.OK, 1)
    assert env.file(24 * 512, length) == data
    assert stats.bounced_requests == int(bounced)
    res = drv.request(T_IN, 24, in_len=length, in_pieces=make(drv))
    assert (res.status, res.used, res.data) == (Status.OK, length + 1, data)
    assert stats.bounced_requests == 2 * int(bounced)


def test_direct_with_4k_blocks(make_blk: MakeBlk) -> None:
    env = make_blk(direct=True, lbs=4096, size=2 * MiB)
    assert config(env)["blk_size"] == 4096
    data = os.urandom(16384)
    assert env.drv.write(64, data, pieces=env.drv.pieces([4096, 12288])).status == Status.OK
    assert env.file(64 * 512, 16384) == data
    res = env.drv.read(64, 16384, pieces=env.drv.pieces([100, 16284]))  # bounced
    assert (res.status, res.data) == (Status.OK, data)
    assert env.drv.read(4, 4096).status == Status.IOERR
    assert env.drv.write_zeroes((64, 8)).status == Status.OK
    assert env.file(64 * 512, 4096) == bytes(4096)
    assert env.drv.flush().status == Status.OK


def test_firmware_then_os_driver_is_write_back(blk: BlkEnv, fdatasync_calls: list[int]) -> None:
    """SeaBIOS negotiates without FLUSH, then Linux with it: the disk is write-back again.

    (Regression: write-through stuck from the firmware's negotiation made every guest write
    an fdatasync.)
    """
    features = blk.frontend.features
    blk.frontend.checked(Request.SET_FEATURES, u64(features & ~int(BlkFeature.FLUSH)))
    assert blk.frontend.get_config(WRITEBACK_OFFSET, 1) == b"\x00"
    blk.frontend.checked(Request.SET_FEATURES, u64(features))
    assert blk.frontend.get_config(WRITEBACK_OFFSET, 1) == b"\x01"
    assert blk.drv.write(0, b"w" * 512).status == Status.OK
    assert blk.disk.fd not in fdatasync_calls


def test_cache_mode_chosen_by_the_driver_survives_renegotiation(
        blk: BlkEnv, fdatasync_calls: list[int]) -> None:
    assert set_writeback(blk, 0) == 0
    blk.frontend.checked(Request.SET_FEATURES, u64(blk.frontend.features))  # a vhost restart
    assert blk.frontend.get_config(WRITEBACK_OFFSET, 1) == b"\x00"
    assert blk.drv.write(0, b"w" * 512).status == Status.OK
    assert fdatasync_calls.count(blk.disk.fd) == 1


def test_io_uring_failure_falls_back_to_threads(make_blk: MakeBlk,
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A queue that cannot make its ring (a limit reached after the command line checked
    io_uring) runs on the thread pool, and says so."""
    import errno

    from blockdev import engine
    from blockdev.uring import UringError

    def no_ring(*_args: object) -> None:
        raise UringError(errno.EPERM, "io_uring_setup: Operation not permitted")

    monkeypatch.setattr(engine, "Uring", no_ring)
    env = make_blk(engine="io_uring", engine_ran="threads")
    handler = env.queue_handler()
    assert handler.engine.name == "threads"
    assert "queue 0: io_uring unavailable (io_uring_setup: Operation not permitted); using the " \
        "thread pool" in caplog.text
    data = os.urandom(4096)
    assert env.drv.write(8, data).status == Status.OK
    assert env.drv.read(8, 4096).data == data
