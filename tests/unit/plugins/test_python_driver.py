"""The python driver's protocol: capabilities follow the methods, errors fail one request and
are logged as they should be, calls stay off the caller's thread, close() runs once."""

from __future__ import annotations

import errno
import logging
import threading
import time

import pytest

from blockdev.ops import OpKind
from blockdev.python.storage import PluginStorage, load_class, open_plugin
from blockdev.storage import StorageError
from tests.unit.plugins.helpers import engines, flush, ranged, read, run, write

BLOCK = 512


class Minimal:
    """Read-only: size and pread only."""

    def size(self) -> int:
        return 8 * BLOCK

    def pread(self, buf: memoryview, offset: int) -> None:
        buf[:] = bytes([offset // BLOCK]) * len(buf)


class Full(Minimal):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.data = bytearray(8 * BLOCK)

    def pread(self, buf: memoryview, offset: int) -> None:
        buf[:] = self.data[offset:offset + len(buf)]

    def pwrite(self, buf: memoryview, offset: int) -> None:
        self.data[offset:offset + len(buf)] = buf

    def flush(self) -> None:
        self.calls.append("flush")

    def trim(self, offset: int, length: int) -> None:
        self.data[offset:offset + length] = bytes(length)

    def zero(self, offset: int, length: int) -> None:
        self.data[offset:offset + length] = bytes(length)

    def close(self) -> None:
        self.calls.append("close")


def test_capabilities_follow_the_methods():
    ro = PluginStorage(Minimal(), "m")
    assert ro.info.read_only and ro.info.size == 8 * BLOCK
    assert (ro.caps.flush, ro.caps.discard, ro.caps.write_zeroes) == (False, False, False)
    rw = PluginStorage(Full(), "f")
    assert not rw.info.read_only
    assert (rw.caps.flush, rw.caps.discard, rw.caps.write_zeroes) == (True, True, True)

    class OnlyTrim(Full):
        flush = None  # type: ignore[assignment]
        zero = None  # type: ignore[assignment]

    t = PluginStorage(OnlyTrim(), "t")
    assert (t.caps.flush, t.caps.discard, t.caps.write_zeroes) == (False, True, False)
    assert PluginStorage(Full(), "f", read_only=True).info.read_only


def test_data_written_through_one_queue_reads_back_through_another():
    plugin = Full()
    st = PluginStorage(plugin, "f")
    q0, q1 = engines(st)
    try:
        assert write(q0, BLOCK, b"a" * BLOCK + b"b" * BLOCK) == 2 * BLOCK
        assert read(q1, BLOCK, 2 * BLOCK) == b"a" * BLOCK + b"b" * BLOCK
        # several buffers: bounced both ways
        assert write(q1, 0, bytes(range(256)) * 4, pieces=3) == 4 * 256
        assert read(q0, 0, 1024, pieces=3) == bytes(range(256)) * 4
        assert ranged(q0, OpKind.DISCARD, 0, BLOCK) == 0
        assert read(q1, 0, BLOCK) == bytes(BLOCK)
        assert flush(q1) == 0 and plugin.calls == ["flush"]
    finally:
        for e in (q0, q1):
            assert e.close()
    st.close()
    st.close()
    assert plugin.calls == ["flush", "close"]


def test_single_buffer_is_passed_zero_copy():
    seen: list[memoryview] = []

    class Spy(Full):
        def pread(self, buf: memoryview, offset: int) -> None:
            seen.append(buf)
            super().pread(buf, offset)

    st = PluginStorage(Spy(), "s")
    (q,) = engines(st, 1)
    from blockdev.engine import IoOp
    from guestmem import IoBuffer

    target = memoryview(bytearray(BLOCK))
    run(q, IoOp(OpKind.READ, 0, [IoBuffer(target)], BLOCK))
    assert seen[0].obj is target.obj  # the caller's memory itself, not a copy
    q.close()


def test_pwrite_gets_a_read_only_view():
    got: list[bool] = []

    class Spy(Full):
        def pwrite(self, buf: memoryview, offset: int) -> None:
            got.append(buf.readonly)

    st = PluginStorage(Spy(), "s")
    (q,) = engines(st, 1)
    write(q, 0, b"x" * BLOCK)
    q.close()
    assert got == [True]


def test_oserror_fails_the_request_without_a_traceback(caplog):
    class Failing(Full):
        fail = True

        def pread(self, buf: memoryview, offset: int) -> None:
            if self.fail:
                self.fail = False
                raise OSError(errno.EIO, "medium error")
            super().pread(buf, offset)

    st = PluginStorage(Failing(), "f")
    (q,) = engines(st, 1)
    with caplog.at_level(logging.DEBUG):
        res = read(q, 0, BLOCK)
        assert isinstance(res, OSError) and res.errno == errno.EIO
        assert read(q, 0, BLOCK) == bytes(BLOCK)  # the next read works
    q.close()
    assert not [r for r in caplog.records if r.exc_info]  # the device logs the failure line
    assert st.buglog.total == 0


def test_other_exceptions_are_plugin_bugs_logged_with_traceback_rate_limited(caplog):
    class Buggy(Full):
        def pread(self, buf: memoryview, offset: int) -> None:
            raise KeyError("oops")

    st = PluginStorage(Buggy(), "b")
    st.buglog.burst = 2
    (q,) = engines(st, 1)
    with caplog.at_level(logging.ERROR):
        for _ in range(5):
            res = read(q, 0, BLOCK)
            assert isinstance(res, OSError) and res.errno == errno.EIO
            assert "plugin bug" in str(res)
    assert write(q, 0, b"y" * BLOCK) == BLOCK  # the IO thread survived
    q.close()
    bugs = [r for r in caplog.records if "plugin bug" in r.getMessage()]
    assert len(bugs) == 2 and all(r.exc_info for r in bugs)
    assert st.buglog.total == 5


def test_calls_run_off_the_submitting_thread_and_serialized_by_default():
    active = 0
    most = 0
    threads: set[int] = set()
    lock = threading.Lock()

    class Slow(Full):
        def pread(self, buf: memoryview, offset: int) -> None:
            nonlocal active, most
            threads.add(threading.get_ident())
            with lock:
                active += 1
                most = max(most, active)
            time.sleep(0.02)
            with lock:
                active -= 1
            super().pread(buf, offset)

    from blockdev.engine import IoOp
    from guestmem import IoBuffer

    def burst(plugin: Full) -> int:
        nonlocal most
        most = 0
        st = PluginStorage(plugin, "s")
        qs = engines(st, 2)
        t0 = time.monotonic()
        for q in qs:
            # submit returns at once: the call is queued for the engine's threads
            op_list = [IoOp(OpKind.READ, 0, [IoBuffer(memoryview(bytearray(BLOCK)))], BLOCK)
                       for _ in range(4)]
            assert not any(q.submit(op) for op in op_list)
        assert time.monotonic() - t0 < 0.02
        for q in qs:
            run(q)  # nothing new; wait below
        deadline = time.monotonic() + 5
        done = 0
        while done < 8 and time.monotonic() < deadline:
            done += sum(len(q.reap()) for q in qs)
            time.sleep(0.005)
        assert done == 8
        for q in qs:
            q.close()
        return most

    assert burst(Slow()) == 1
    assert threading.get_ident() not in threads

    class Parallel(Slow):
        thread_model = "parallel"

    assert burst(Parallel()) > 1


@pytest.mark.parametrize(("plugin", "message"), [
    (type("Odd", (Minimal,), {"size": lambda self: 1000}),
     "size() returned 1000, not a multiple of the 512-byte block size"),
    (type("Neg", (Minimal,), {"size": lambda self: 0}), "want a positive int"),
    (type("Str", (Minimal,), {"size": lambda self: "4096"}), "want a positive int"),
    (type("Later", (Minimal,), {"API_VERSION": 2}), "protocol version 2"),
    (type("Model", (Minimal,), {"thread_model": "wild"}), "thread_model 'wild'"),
    (type("NoRead", (), {"size": lambda self: 4096}), "no pread() method"),
])
def test_open_errors_are_clear(plugin, message):
    with pytest.raises(StorageError) as info:
        PluginStorage(plugin(), "p")
    assert message in str(info.value)


def test_loading_by_module_and_class(tmp_path, monkeypatch):
    (tmp_path / "myplug.py").write_text(
        "class Disk:\n"
        "    def __init__(self, size, fill='0'):\n"
        "        self.n = int(size); self.fill = int(fill)\n"
        "    def size(self): return self.n\n"
        "    def pread(self, buf, off): buf[:] = bytes([self.fill]) * len(buf)\n"
        "    def close(self): raise RuntimeError('close bug')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = load_class("myplug", "Disk")
    st = open_plugin(cls, {"size": 4096, "fill": "7"}, "n")
    (q,) = engines(st, 1)
    assert read(q, 0, BLOCK) == b"\x07" * BLOCK
    q.close()
    st.close()  # a close() bug is logged, not raised
    with pytest.raises(StorageError, match="cannot import plugin module 'nosuch'"):
        load_class("nosuch", "X")
    with pytest.raises(StorageError, match="has no class 'Nope'"):
        load_class("myplug", "Nope")
    with pytest.raises(StorageError, match=r"Disk\(\) failed: TypeError"):
        open_plugin(cls, {"bogus": "1"}, "n")
    with pytest.raises(StorageError, match="must be a single value"):
        open_plugin(cls, {"size": {"a": "1"}}, "n")
