"""Disk errors become IOERR for that request only: logged with the sector, the server goes on."""

from __future__ import annotations

import errno
import logging
import os

import pytest

from blockdev.ops import OpKind
from tests.unit.blk.conftest import ENGINES, BlkEnv, MakeBlk, inject_uring_results, uring_engine
from vhost_frontend.blk import POISON
from virtio_blk import core as cores
from virtio_blk.request import Status

_KINDS = {"readv": OpKind.READ, "writev": OpKind.WRITE, "make_durable": OpKind.FLUSH}


def fail_disk(env: BlkEnv, monkeypatch: pytest.MonkeyPatch, engine: str, what: str,
              err: int = errno.EIO) -> None:
    """Make the disk's ``what`` fail with ``err``, for whichever engine does the IO.

    (On the pure-Python core: see :func:`python_core`.)
    """
    if engine == "io_uring" and what in _KINDS:
        inject_uring_results(monkeypatch, uring_engine(env), _KINDS[what], lambda op, res: -err)
        # Buffered writes and lone reads of a raw image skip the ring (UringEngine.bypass).
        if what == "writev":
            monkeypatch.setattr(env.disk, "writev", failing(err))
        elif what == "readv":
            monkeypatch.setattr(env.disk, "try_readv_nowait", failing(err))
    else:
        monkeypatch.setattr(env.disk, what, failing(err))


@pytest.fixture(autouse=True)
def python_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are the Python engines': the compiled core does its IO in C, out of reach
    of :func:`fail_disk`'s patches (its failures are handed to the same Python completion,
    which the differential property test checks with injected errors)."""
    monkeypatch.setenv(cores.ENV, "python")


def failing(err: int = errno.EIO):
    def fail(*_args: object, **_kwargs: object) -> int:
        raise OSError(err, os.strerror(err))
    return fail


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "virtio_blk.device" and r.levelno >= logging.ERROR]


def still_serving(env: BlkEnv) -> None:
    res = env.drv.read(0, 4096)
    assert (res.status, res.data) == (Status.OK, env.file(0, 4096))
    assert env.daemon.thread.is_alive()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bounced", [False, True], ids=["zero-copy", "bounced"])
def test_read_error(make_blk: MakeBlk, monkeypatch: pytest.MonkeyPatch,
                    caplog: pytest.LogCaptureFixture, engine: str, bounced: bool) -> None:
    env = make_blk(engine=engine)
    fail_disk(env, monkeypatch, engine, "readv")
    pieces = env.drv.pieces([1000, 3096] if bounced else [4096])
    res = env.drv.read(8, 4096, pieces=pieces)
    assert (res.status, res.used) == (Status.IOERR, 1)
    if engine != "io_uring" or bounced:  # (injected after the kernel read into guest memory)
        assert res.data == bytes([POISON]) * 4096
    assert any("READ at sector 8 failed" in m and "Input/output error" in m
               for m in error_lines(caplog))
    assert env.device.stats.errors == 1
    assert env.device.tracker.free_pages(0) == env.device.tracker.max_pages
    monkeypatch.undo()
    still_serving(env)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bounced", [False, True], ids=["zero-copy", "bounced"])
def test_write_error(make_blk: MakeBlk, monkeypatch: pytest.MonkeyPatch,
                     caplog: pytest.LogCaptureFixture, engine: str, bounced: bool) -> None:
    env = make_blk(engine=engine)
    fail_disk(env, monkeypatch, engine, "writev", errno.ENOSPC)
    pieces = env.drv.pieces([1000, 3096] if bounced else [4096])
    res = env.drv.write(16, os.urandom(4096), pieces=pieces)
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert any("WRITE at sector 16 failed" in m for m in error_lines(caplog))
    monkeypatch.undo()
    still_serving(env)


@pytest.mark.parametrize("engine", ["inline", "threads"])
def test_short_write_is_ioerr(make_blk: MakeBlk, monkeypatch: pytest.MonkeyPatch,
                              caplog: pytest.LogCaptureFixture, engine: str) -> None:
    """A write the disk keeps taking short (Disk.writev already loops) is IOERR."""
    env = make_blk(engine=engine)
    monkeypatch.setattr(env.disk, "writev", lambda bufs, off: sum(b.nbytes for b in bufs) - 512)
    res = env.drv.write(24, os.urandom(4096))
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert any("WRITE at sector 24 failed: 3584 of 4096 bytes" in m
               for m in error_lines(caplog))


def test_uring_short_completion_is_finished(make_blk: MakeBlk,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """io_uring reporting a short write: the engine writes the rest, the request is OK."""
    env = make_blk(engine="io_uring")
    uring_engine(env).bypass = False  # the write goes to the ring, as with O_DIRECT
    inject_uring_results(monkeypatch, uring_engine(env), OpKind.WRITE,
                         lambda op, res: res - 512 if res == op.length else res)
    data = os.urandom(4096)
    res = env.drv.write(24, data)
    assert (res.status, res.used) == (Status.OK, 1)
    assert env.file(24 * 512, 4096) == data


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("what", ["make_durable", "discard", "write_zeroes"])
def test_other_op_errors(make_blk: MakeBlk, monkeypatch: pytest.MonkeyPatch,
                         caplog: pytest.LogCaptureFixture, engine: str, what: str) -> None:
    env = make_blk(engine=engine)
    fail_disk(env, monkeypatch, engine, what)
    if what == "make_durable":
        res = env.drv.flush()
    elif what == "discard":
        res = env.drv.discard((32, 8))
    else:
        res = env.drv.write_zeroes((32, 8))
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert any("failed" in m and "Input/output error" in m for m in error_lines(caplog))
    monkeypatch.undo()
    still_serving(env)


def test_write_through_sync_failure_is_ioerr(make_blk: MakeBlk,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    env = make_blk(writeback=False)
    monkeypatch.setattr(env.disk, "make_durable", failing())
    res = env.drv.write(0, b"s" * 512)
    assert (res.status, res.used) == (Status.IOERR, 1)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bounced", [False, True], ids=["zero-copy", "bounced"])
def test_short_read_after_the_image_shrank(make_blk: MakeBlk, caplog: pytest.LogCaptureFixture,
                                           engine: str, bounced: bool) -> None:
    env = make_blk(engine=engine)
    os.truncate(env.image, 512 * 1024)  # behind the device's back: capacity still says 1 MiB
    pieces = env.drv.pieces([1000, 7192] if bounced else [8192])
    res = env.drv.read(1020, 8192, pieces=pieces)  # straddles the new end
    assert (res.status, res.used) == (Status.IOERR, 1)
    if bounced:  # nothing is scattered back from a failed bounced read
        assert res.data == bytes([POISON]) * 8192
    res = env.drv.read(1536, 4096)  # wholly past it: preadv returns 0
    assert (res.status, res.used) == (Status.IOERR, 1)
    assert any("READ at sector 1536 failed: 0 of 4096 bytes" in m
               for m in error_lines(caplog))
    res = env.drv.read(0, 4096)  # what is still there reads fine
    assert (res.status, res.data) == (Status.OK, env.file(0, 4096))


def test_many_errors_do_not_stop_the_queue(make_blk: MakeBlk) -> None:
    # The error filter fails every request touching the 32 blocks after the first 4 KiB;
    # still_serving reads the first 4 KiB.
    env = make_blk(filters=[("error", {"error-start": "4096", "error-length": str(32 * 4096)})])
    pending = [env.drv.start(0, 8 * (i + 1), in_len=4096) for i in range(32)]
    assert all(r.status == Status.IOERR for r in env.drv.wait(pending))
    assert env.device.stats.errors == 32
    still_serving(env)


def test_a_failing_disk_logs_a_few_lines_then_a_count(
        make_blk: MakeBlk, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A disk that fails every request must not write a line per request forever: the first
    ones are kept, the rest counted and reported once the interval has passed."""
    env = make_blk(filters=[("error", {"error-read-rate": "1"})])
    now = [0.0]
    limiter = env.device.errlog
    monkeypatch.setattr(limiter, "_clock", lambda: now[0])
    limiter._window_start = 0.0
    for i in range(3 * limiter.burst):
        assert env.drv.read(8 * i, 4096).status == Status.IOERR
    failed = [m for m in error_lines(caplog) if "failed" in m]
    assert len(failed) == limiter.burst
    assert env.device.stats.errors == 3 * limiter.burst
    now[0] = limiter.interval + 1
    assert env.drv.read(0, 4096).status == Status.IOERR
    lines = error_lines(caplog)
    assert f"{2 * limiter.burst} similar lines suppressed" in lines[-2]
    assert "READ at sector 0 failed" in lines[-1]
