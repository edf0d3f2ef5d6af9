"""What the virtio-blk device marks in the dirty log while QEMU migrates: the data of reads
(zero-copy and bounced, every engine), status bytes, GET_ID strings, used-ring entries -- and
nothing it only read (the data of writes)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.qemu_log import PAGE, QemuLog, pages, pieces_pages
from tests.unit.blk.conftest import ENGINES, BlkEnv, MakeBlk
from vhost_frontend.blk import T_GET_ID, T_IN, T_OUT, PendingRequest

MEM = 32 << 20  # make_blk's default guest memory


@pytest.fixture
def qlog() -> Iterator[QemuLog]:
    q = QemuLog(MEM)
    yield q
    q.close()


def logging_env(make_blk: MakeBlk, qlog: QemuLog, **kw: object) -> BlkEnv:
    env = make_blk(**kw)
    assert env.frontend.set_log_base(qlog.fd, qlog.size) == b"\0" * 8
    env.frontend.set_logging(True)
    qlog.take()  # what was marked while switching on
    return env


def used_ring_pages(env: BlkEnv) -> set[int]:
    q = env.queue
    return pages(q.used, 6 + 8 * q.size)


def run(env: BlkEnv, pending: PendingRequest) -> int:
    return env.drv.wait([pending])[0].status


@pytest.mark.parametrize("engine", ENGINES)
def test_read_marks_its_data_status_and_used_ring(make_blk: MakeBlk, qlog: QemuLog,
                                                  engine: str) -> None:
    env = logging_env(make_blk, qlog, engine=engine)
    pending = env.drv.start(T_IN, 8, in_len=3 * PAGE)
    assert run(env, pending) == 0
    marked = qlog.take()
    data, status = pending.writable[:-1], pending.writable[-1:]
    assert pieces_pages(data) <= marked and len(pieces_pages(data)) == 3
    assert pieces_pages(status) <= marked
    assert marked & used_ring_pages(env)
    assert marked <= pieces_pages(pending.writable) | used_ring_pages(env)


def test_bounced_read_marks_every_piece(make_blk: MakeBlk, qlog: QemuLog) -> None:
    """Pieces split mid-sector: the data is scattered from a bounce buffer after the read."""
    env = logging_env(make_blk, qlog)
    pieces = env.drv.pieces([1000, 3000, 96], offsets=[100, 0, 4050])
    pending = env.drv.start(T_IN, 0, in_len=4096, in_pieces=pieces)
    assert run(env, pending) == 0
    assert env.device.stats.bounced_requests == 1
    marked = qlog.take()
    assert pieces_pages(pieces) <= marked
    assert len(pieces_pages(pieces)) == 4  # the last piece crosses into a second page


def test_get_id_marks_the_string(make_blk: MakeBlk, qlog: QemuLog) -> None:
    env = logging_env(make_blk, qlog, serial="migrate-me")
    pieces = env.drv.pieces([10, 10], offsets=[PAGE - 5, 0])  # the first crosses a page
    pending = env.drv.start(T_GET_ID, 0, in_len=20, in_pieces=pieces)
    assert run(env, pending) == 0
    assert pieces_pages(pending.writable) <= qlog.take()


def test_write_marks_only_its_status(make_blk: MakeBlk, qlog: QemuLog) -> None:
    """The data of a write is only read by the backend: QEMU tracks the guest's own stores."""
    env = logging_env(make_blk, qlog)
    pending = env.drv.start(T_OUT, 0, out=b"w" * 8192)
    assert run(env, pending) == 0
    marked = qlog.take()
    assert pieces_pages(pending.writable) <= marked
    assert marked <= pieces_pages(pending.writable) | used_ring_pages(env)


def test_failed_read_still_marks_its_status(make_blk: MakeBlk, qlog: QemuLog) -> None:
    env = logging_env(make_blk, qlog)
    capacity = env.device.limits.capacity
    pending = env.drv.start(T_IN, capacity, in_len=512)  # past the end: IOERR, no IO
    assert run(env, pending) != 0
    assert pieces_pages(pending.writable[-1:]) <= qlog.take()


def test_nothing_marked_once_logging_is_off(make_blk: MakeBlk, qlog: QemuLog) -> None:
    env = logging_env(make_blk, qlog)
    env.frontend.set_logging(False)
    qlog.take()
    assert run(env, env.drv.start(T_IN, 0, in_len=PAGE)) == 0
    assert qlog.take() == set()
    assert env.queue_handler().dirty is None


def test_stopping_while_logging_flushes_the_disk(make_blk: MakeBlk, qlog: QemuLog,
                                                 fdatasync_calls: list[int]) -> None:
    """The source VM stops at the end of a migration: what the server completed is made
    durable before the destination can run the guest (on another host's cache, maybe)."""
    env = logging_env(make_blk, qlog)
    assert run(env, env.drv.start(T_OUT, 0, out=b"m" * 4096)) == 0
    before = len(fdatasync_calls)
    env.frontend.get_vring_base(0)
    assert len(fdatasync_calls) == before + 1
    assert fdatasync_calls[-1] == env.disk.fd


def test_stopping_without_logging_does_not_flush(make_blk: MakeBlk,
                                                 fdatasync_calls: list[int]) -> None:
    env = make_blk()
    assert run(env, env.drv.start(T_OUT, 0, out=b"m" * 4096)) == 0
    before = len(fdatasync_calls)
    env.frontend.get_vring_base(0)
    assert len(fdatasync_calls) == before
