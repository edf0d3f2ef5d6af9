"""Request accounting: the buckets of the latency histograms, and totals over the queues.

The hot path keeps plain integers in each queue's :class:`virtio_blk.device.BlkStats` (written by
that queue's worker thread only): per kind of operation (a row of the operation table,
:mod:`blockdev.ops`, extended by the device's own in :mod:`virtio_blk.ops`) a failure count, the
total time in nanoseconds and a histogram of latencies.  Readers -- ``query-blockstats``, the
Prometheus exporter -- sum the queues here when they ask, so nothing on the request path knows
they exist (each queue's counters as its ``BlkStats.snapshot`` reads them: the compiled fast
path counts in C arrays of that object, which a snapshot adds in).  Sums are read without
locks: each integer is read whole, and a request finishing during a read shows up in the next
one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: Upper bounds (inclusive, ns) of the latency buckets; one more bucket above the last holds the
#: rest.  From page-cache hits (~10 us) to a stalled device (seconds).
LATENCY_BOUNDS_NS = tuple(
    int(us * 1000) for us in (
        10, 25, 50, 100, 250, 500,
        1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
        1_000_000, 2_500_000, 5_000_000, 10_000_000,
    )
)


def new_histograms(kinds: int) -> list[list[int]]:
    """One zeroed histogram (``len(LATENCY_BOUNDS_NS) + 1`` buckets) per operation kind."""
    return [[0] * (len(LATENCY_BOUNDS_NS) + 1) for _ in range(kinds)]


@dataclass
class Totals:
    """Counters of one or more queues, summed (see :func:`totals`): the named counters, and
    per operation kind (table order) failures, total times and latency histograms."""

    counters: dict[str, int]
    failed: list[int]
    total_ns: list[int]
    latency: list[list[int]]


def totals(parts: Iterable[Any], counter_names: Iterable[str], kinds: int) -> Totals:
    """Sum the per-queue stats ``parts`` (BlkStats): named counters, and the failures, times
    and buckets of ``kinds`` operation kinds."""
    parts = list(parts)
    names = list(counter_names)
    out = Totals({name: sum(getattr(p, name) for p in parts) for name in names},
                 [0] * kinds, [0] * kinds, new_histograms(kinds))
    for p in parts:
        for k in range(kinds):
            out.failed[k] += p.failed[k]
            out.total_ns[k] += p.total_ns[k]
            src, dst = p.latency[k], out.latency[k]
            for b, n in enumerate(src):
                dst[b] += n
    return out
