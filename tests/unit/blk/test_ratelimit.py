"""RateLimitedLog on its own, with a fake clock."""

from __future__ import annotations

import logging

import pytest

from blockdev.ratelimit import RateLimitedLog


def test_burst_then_count_then_burst_again(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    rl = RateLimitedLog(logging.getLogger("t.rl"), burst=3, interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="t.rl"):
        for i in range(8):
            rl.log(logging.ERROR, "failure %d", i)
        assert [r.getMessage() for r in caplog.records] == [f"failure {i}" for i in range(3)]
        now[0] += 10.0
        rl.log(logging.ERROR, "failure %d", 8)
        assert [r.getMessage() for r in caplog.records[3:]] == [
            "5 similar lines suppressed in the last 10 s", "failure 8"]
        for i in range(9, 14):
            rl.log(logging.ERROR, "failure %d", i)
        now[0] += 4.0
        rl.close()
        assert caplog.records[-1].getMessage() == "3 similar lines suppressed in the last 4 s"
    assert rl.total == 14


def test_close_with_nothing_suppressed_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(logging.getLogger("t.rl2"), burst=3)
    with caplog.at_level(logging.INFO, logger="t.rl2"):
        rl.log(logging.WARNING, "once")
        rl.close()
    assert [r.getMessage() for r in caplog.records] == ["once"]
