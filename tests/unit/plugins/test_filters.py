"""The delay, error and log filters over real storage kinds (a plugin, a raw file)."""

from __future__ import annotations

import errno
import re
import select
import time
from pathlib import Path

import pytest

from blockdev.disk import Disk
from blockdev.engine import IoOp
from blockdev.filters import DelayStorage, ErrorStorage, FilterError, LogStorage
from blockdev.ops import OpKind
from blockdev.python.storage import PluginStorage
from blockdev.storage import FileStorage, Storage
from examples.ramdisk import RamDisk
from guestmem import IoBuffer
from tests.unit.plugins.helpers import end_batch, engines, flush, ranged, read, write

MiB = 1 << 20


def ram() -> PluginStorage:
    return PluginStorage(RamDisk("1M"), "ram")


def raw_file(tmp_path: Path, engine: str = "threads") -> FileStorage:
    path = tmp_path / "d.img"
    path.write_bytes(bytes(MiB))
    return FileStorage(Disk(path), engine)


def test_delay_holds_each_kind_its_time_without_blocking_submit():
    st = DelayStorage(ram(), "d", {"delay-read": "80", "delay-write": "0ms"})
    (q,) = engines(st, 1)
    t0 = time.monotonic()
    assert write(q, 0, b"w" * 4096) == 4096
    assert time.monotonic() - t0 < 0.07  # writes are not delayed
    # The worker's way: an edge-triggered epoll on the completion fd, reap on each wake.
    ep = select.epoll()
    assert q.completion_fd is not None
    ep.register(q.completion_fd, select.EPOLLIN | select.EPOLLET)
    buf = bytearray(4096)
    op = IoOp(OpKind.READ, 0, [IoBuffer(memoryview(buf))], 4096)
    t0 = time.monotonic()
    assert not q.submit(op)
    end_batch(q)
    assert time.monotonic() - t0 < 0.02
    done: list[IoOp] = []
    while not done:
        assert ep.poll(2.0), "no wake-up: the completion never made an edge"
        done = q.reap()
    assert time.monotonic() - t0 >= 0.08
    assert done == [op] and op.result == 4096 and bytes(buf) == b"w" * 4096
    ep.close()
    assert q.close()


@pytest.mark.parametrize("engine", ["inline", "threads", "io_uring"])
def test_delay_over_every_file_engine(tmp_path, engine):
    st = DelayStorage(raw_file(tmp_path, engine), "d", {"delay-read": "20", "delay-flush": "20"})
    (q,) = engines(st, 1)
    assert write(q, 4096, b"z" * 4096) == 4096
    t0 = time.monotonic()
    assert read(q, 4096, 4096) == b"z" * 4096
    assert flush(q) == 0
    assert time.monotonic() - t0 >= 0.04
    assert q.close()
    st.close()


def test_delay_close_drops_held_requests():
    st = DelayStorage(ram(), "d", {"delay-read": "10000"})
    (q,) = engines(st, 1)
    op = IoOp(OpKind.READ, 0, [IoBuffer(memoryview(bytearray(512)))], 512)
    assert not q.submit(op)
    assert q.close(timeout=1)
    assert op.result is None


def test_error_rate_and_errno_per_kind():
    st = ErrorStorage(ram(), "e", {"error": "ENOSPC", "error-write-rate": "1",
                                   "error-read": "EIO", "error-read-rate": "0"})
    q0, q1 = engines(st)
    res = write(q0, 0, b"x" * 512)
    assert isinstance(res, OSError) and res.errno == errno.ENOSPC
    assert read(q1, 0, 512) == bytes(512)  # the failed write never reached the disk
    assert flush(q0) == 0
    for q in (q0, q1):
        q.close()


def test_error_fraction_is_about_the_rate_and_repeats_with_a_seed():
    def outcomes(seed: str) -> list[bool]:
        st = ErrorStorage(ram(), "e", {"error-rate": "0.3", "seed": seed})
        (q,) = engines(st, 1)
        out = [isinstance(read(q, 0, 512), OSError) for _ in range(300)]
        q.close()
        return out

    a = outcomes("7")
    assert 50 < sum(a) < 130
    assert outcomes("7") == a


def test_error_byte_range():
    st = ErrorStorage(ram(), "e", {"error-start": "8192", "error-length": "4096"})
    (q,) = engines(st, 1)
    assert read(q, 0, 8192) == bytes(8192)
    assert isinstance(read(q, 4096, 8192), OSError)  # overlaps the range
    assert isinstance(write(q, 12287, b"a"), OSError)
    assert read(q, 12288, 512) == bytes(512)
    assert isinstance(ranged(q, OpKind.DISCARD, 8192, 512), OSError)
    assert ranged(q, OpKind.DISCARD, 0, 512) == 0
    assert flush(q) == 0  # a range alone leaves flushes alone
    q.close()
    st = ErrorStorage(ram(), "e", {"error-start": "0", "error-length": "512",
                                   "error-flush-rate": "1"})
    (q,) = engines(st, 1)
    assert isinstance(flush(q), OSError)
    q.close()


def test_error_file_switches_errors_on_and_off(tmp_path):
    trigger = tmp_path / "fail"
    st = ErrorStorage(ram(), "e", {"error-rate": "1", "error-file": str(trigger)})
    (q,) = engines(st, 1)
    assert read(q, 0, 512) == bytes(512)
    trigger.touch()
    assert isinstance(read(q, 0, 512), OSError)
    trigger.unlink()
    assert read(q, 0, 512) == bytes(512)
    q.close()


@pytest.mark.parametrize(("options", "message"), [
    ({"error": "EWHAT"}, "unknown errno name 'EWHAT'"),
    ({"error-rate": "1.5"}, "'error-rate' expects a value from 0 to 1"),
    ({"error-rate": "nan"}, "'error-rate' expects a value from 0 to 1"),
    ({"error-start": "0"}, "go together"),
    ({"bogus": "1"}, "Invalid parameter 'bogus' for driver 'error'"),
])
def test_error_options_are_checked(options, message):
    with pytest.raises(FilterError, match=message):
        ErrorStorage(ram(), "e", options)


def test_delay_options_are_checked():
    with pytest.raises(FilterError, match="'delay-read' expects a number"):
        DelayStorage(ram(), "d", {"delay-read": "soon"})
    with pytest.raises(FilterError, match="Invalid parameter 'rdelay'"):
        DelayStorage(ram(), "d", {"rdelay": "1"})


def test_log_one_line_per_request(tmp_path):
    logfile = tmp_path / "io.log"
    inner: Storage = ErrorStorage(ram(), "e", {"error-start": "4096", "error-length": "512"})
    st = LogStorage(inner, "l", {"logfile": str(logfile)})
    q0, q1 = engines(st)
    write(q0, 0, b"a" * 1024)
    read(q1, 4096, 512)
    ranged(q1, OpKind.WRITE_ZEROES, 512, 512)
    for q in (q0, q1):
        q.close()
    st.close()
    lines = logfile.read_text().splitlines()
    assert [line.split(" ", 1)[1].rsplit(" ", 1)[0] for line in lines] == [
        "queue=0 write offset=0 length=1024 result=ok",
        "queue=1 read offset=4096 length=512 result=EIO",
        "queue=1 zero offset=512 length=512 result=ok",
    ]
    assert all(re.fullmatch(r"us=\d+", line.rsplit(" ", 1)[1]) for line in lines)
    with pytest.raises(FilterError, match="'logfile' is missing"):
        LogStorage(ram(), "l", {})


def test_filters_keep_the_childs_geometry_and_caps():
    child = PluginStorage(RamDisk("1M"), "ram", read_only=True)
    st = LogStorage(DelayStorage(child, "d", {}), "l", {"logfile": "/dev/null"})
    assert st.info == child.info and st.caps == child.caps
