"""benchmarks.wakeup runs the real queue thread against a driver process and counts what it
claims: every request completed OK, one kick and one call per request at depth 1 (Linux's
EVENT_IDX rules), no notification lost.  No time is checked: these machines are too noisy."""

from __future__ import annotations

from pathlib import Path

from benchmarks import wakeup
from benchmarks.common import make_image


def test_wakeup_benchmark_serves_every_request_with_no_lost_notification(
        tmp_path: Path) -> None:
    image = tmp_path / "img"
    make_image(image, 32 << 20, fill=True)
    one = wakeup.run(str(image), "inline", "indirect", depth=1, requests=20, accounting=True)
    assert one["requests"] == 20 and one["lost"] == 0
    # depth 1: each request is one kick, one wake-up of the worker, one call
    assert one["kicks"] == 20 and one["signals"] == 20 and one["calls"] >= 1
    assert one["passes"] >= 20
    deep = wakeup.run(str(image), "inline", "direct", depth=8, requests=64, accounting=False)
    assert deep["requests"] == 64 and deep["lost"] == 0
    assert 1 <= deep["kicks"] <= 64 and deep["calls"] >= 1
