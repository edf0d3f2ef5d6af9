"""Every reader of a queue's counters sees each request completed before it asked.

The compiled fast path counts its reads and writes in C, straight into the stats' native arrays
(:class:`virtio_blk.device.BlkStats`), with nothing moved into the Python counters after a
pass: these tests complete requests through the real worker on the compiled core and then read,
with no pass after the last completion, through each reader -- the totals QMP's
``query-blockstats`` and the Prometheus exporter read, the per-queue copies, and what a queue
process publishes to the control process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.common import make_image
from benchmarks.hotpath import Rig
from blockdev.ops import OpKind
from tests.property.test_fastpath_differential import compiled_core_or_skip
from virtio_blk import core as cores
from virtio_blk.device import BlkQueueHandler, BlkStats
from virtio_blk.fastpath import FastPath
from virtio_blk.ops import NATIVE_COUNT_SLOTS, NATIVE_KINDS, NATIVE_LATENCY_SLOTS


@pytest.mark.parametrize("layout", ["split", "packed"])
@pytest.mark.parametrize("op", ["read", "write"])
def test_every_reader_sees_what_the_compiled_core_completed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str, layout: str) -> None:
    compiled_core_or_skip("compiled")
    monkeypatch.setenv(cores.ENV, "compiled")
    image = tmp_path / "img"
    make_image(image, 32 << 20, fill=False)
    rig = Rig("io_uring", str(image), slots=8, op=op, layout=layout)
    try:
        for batch in (1, 3, 4):  # (each round serves until nothing is in flight)
            rig.round(batch)
        n = 8
        handler = rig.handler
        assert isinstance(handler, BlkQueueHandler)
        fast = handler._fast
        assert fast is not None and not isinstance(fast, FastPath), type(fast)
        assert fast.taken == n  # the compiled core took (and counted) every one itself
        rig.check_statuses()
        kind = OpKind.READ if op == "read" else OpKind.WRITE
        counter, nbytes = ("reads", "bytes_read") if op == "read" else ("writes", "bytes_written")
        device = rig.device

        # The device's live totals (what the tests and the QMP commands read by name).
        assert getattr(device.stats, counter) == n
        assert getattr(device.stats, nbytes) == n * 4096
        assert device.stats.as_dict()[counter] == n
        assert device.stats.requests == n
        # The summed totals (query-blockstats, the exporter's histograms).
        totals = device.totals()
        assert (totals.counters[counter], totals.counters[nbytes]) == (n, n * 4096)
        assert sum(totals.latency[kind]) == n and totals.total_ns[kind] > 0
        # Per queue (the exporter's per-queue counters).
        (queue,) = device.fresh_queue_stats()
        assert getattr(queue, counter) == n and sum(queue.latency[kind]) == n
        assert f"{counter}={n}," in repr(device.queue_stats[0])

        # What a queue process publishes after a batch (a prefix: the counter block keeps the
        # rest as it was, zeros here) and the control process takes in.
        published = list(device.queue_counter_values(0))
        control = BlkStats()
        control.set_values(published + [0] * (device.counter_slots() - len(published)))
        assert (getattr(control, counter), getattr(control, nbytes)) == (n, n * 4096)
        assert sum(control.latency[kind]) == n
        assert control.total_ns[kind] == totals.total_ns[kind]
    finally:
        rig.close()


def test_taking_values_in_adds_the_native_part_once() -> None:
    """``set_values`` (a queue process's counters arriving, a snapshot) adds the native arrays
    into the counters and zeroes them: taking an object's own values in changes no sum."""
    stats = BlkStats()
    stats.reads, stats.bytes_read = 3, 3 * 512
    stats.add_latency(OpKind.READ, 0)
    counts = NATIVE_COUNT_SLOTS * NATIVE_KINDS.index(OpKind.READ)
    stats.native_counts[counts] += 2
    stats.native_counts[counts + 1] += 2 * 4096
    latency = NATIVE_LATENCY_SLOTS * NATIVE_KINDS.index(OpKind.READ)
    stats.native_latency[latency] += 7000  # 7 us in all, the first bucket's (<= 10 us)
    stats.native_latency[latency + 1] += 2
    before = stats.snapshot()
    assert (before.reads, before.bytes_read) == (5, 3 * 512 + 2 * 4096)
    assert sum(before.latency[OpKind.READ]) == 3 and before.latency[OpKind.READ][0] >= 2

    stats.set_values(stats.values())
    after = stats.snapshot()
    assert (after.reads, after.bytes_read, after.latency, after.total_ns) == (
        before.reads, before.bytes_read, before.latency, before.total_ns)
    assert (stats.reads, stats.latency) == (before.reads, before.latency)
    assert not any(stats.native_counts) and not any(stats.native_latency)


def test_a_queue_process_publishes_latency_the_compiled_core_counted() -> None:
    """The prefix a queue process publishes leaves the latency part out only while none was
    counted anywhere -- not while the compiled core's native arrays hold some."""
    stats = BlkStats()
    assert len(stats.values(full=False)) < len(stats.values())
    latency = NATIVE_LATENCY_SLOTS * NATIVE_KINDS.index(OpKind.WRITE)
    stats.native_latency[latency] += 30_000
    stats.native_latency[latency + 1 + 2] += 1
    assert stats.values(full=False) == stats.values()
