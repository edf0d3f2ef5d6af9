"""AcceptBackoff: the accept rule both listening loops (vhost-user, QMP) share (issue 19,
item 6): after a failed accept the listener is left alone for 10 ms, doubling to 1 s while
failures go on, with one warning per run of failures (at most one a minute) and one line when
accepting works again."""

from __future__ import annotations

import errno
import logging
import socket

import pytest

from vhost.daemon import AcceptBackoff


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Listener:
    """accept() fails with ``errors`` while there are any, then hands out a socket."""

    def __init__(self) -> None:
        self.errors = 0
        self.calls = 0

    def accept(self) -> tuple[socket.socket, str]:
        self.calls += 1
        if self.errors:
            self.errors -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        a, b = socket.socketpair()
        b.close()
        return a, ""


def test_delays_double_to_a_second_and_reset_after_an_accept(
        caplog: pytest.LogCaptureFixture) -> None:
    clock, lst = Clock(), Listener()
    b = AcceptBackoff("test socket", logging.getLogger("t"), clock=clock)
    lst.errors = 12
    delays = []
    with caplog.at_level(logging.INFO, logger="t"):
        while True:
            conn = b.accept(lst)  # type: ignore[arg-type]
            if conn is not None:
                conn.close()
                break
            assert b.waiting
            t = b.timeout()
            assert t is not None
            delays.append(round(t, 3))
            clock.now += t
            assert not b.waiting and b.timeout() is None
    assert delays == [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert b.total_failures == 12 and lst.calls == 13
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "accept failed: Too many open files" in messages[0]
    assert "accepting again after 12 failed attempts" in messages[1]
    # The next failure starts again at 10 ms, but within the minute it is not logged again.
    lst.errors = 1
    assert b.accept(lst) is None  # type: ignore[arg-type]
    assert round(b.timeout() or 0, 3) == 0.01
    clock.now += 0.01
    conn = b.accept(lst)  # type: ignore[arg-type]
    assert conn is not None
    conn.close()
    assert len(caplog.records) == 2  # neither that run's start nor its end
    clock.now += 61
    lst.errors = 1
    with caplog.at_level(logging.INFO, logger="t"):
        b.accept(lst)  # type: ignore[arg-type]
    assert "1 earlier runs of failures not logged" in caplog.records[-1].getMessage()


def test_nothing_waiting_is_not_a_failure() -> None:
    a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    a.bind("\0accept-backoff-test")
    a.listen()
    a.setblocking(False)
    try:
        b = AcceptBackoff("test socket")
        assert b.accept(a) is None and not b.waiting and b.total_failures == 0
    finally:
        a.close()
