"""Request accounting: the buckets of the latency histograms, and totals over the queues.

The hot path keeps plain integers in each queue's :class:`virtio_blk.device.BlkStats` (written by
that queue's worker thread only): per kind of disk operation a failure count, the total time in
nanoseconds and a histogram of latencies.  Readers -- ``query-blockstats``, the Prometheus
exporter -- sum the queues here when they ask, so nothing on the request path knows they exist.
Sums are read without locks: each integer is read whole, and a request finishing during a read
shows up in the next one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: Names of the disk operation kinds, indexed by :class:`blockdev.engine.OpKind`.
OP_NAMES = ("read", "write", "flush", "discard", "write_zeroes")
NUM_KINDS = len(OP_NAMES)

#: Upper bounds (inclusive, ns) of the latency buckets; one more bucket above the last holds the
#: rest.  From page-cache hits (~10 us) to a stalled device (seconds).
LATENCY_BOUNDS_NS = tuple(
    int(us * 1000) for us in (
        10, 25, 50, 100, 250, 500,
        1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
        1_000_000, 2_500_000, 5_000_000, 10_000_000,
    )
)


def new_histograms() -> list[list[int]]:
    """One zeroed histogram (``len(LATENCY_BOUNDS_NS) + 1`` buckets) per operation kind."""
    return [[0] * (len(LATENCY_BOUNDS_NS) + 1) for _ in range(NUM_KINDS)]


def zeros() -> list[int]:
    return [0] * NUM_KINDS


@dataclass
class Totals:
    """Counters of one or more queues, summed (see :func:`totals`)."""

    counters: dict[str, int]
    failed: list[int] = field(default_factory=zeros)
    total_ns: list[int] = field(default_factory=zeros)
    latency: list[list[int]] = field(default_factory=new_histograms)

    def ops(self, kind: str) -> int:
        """Successful operations of ``kind`` (an :data:`OP_NAMES` entry or ``get_id``)."""
        return self.counters[_OP_COUNTER[kind]]


#: The BlkStats counter of successful operations of each kind.
_OP_COUNTER = {
    "read": "reads", "write": "writes", "flush": "flushes", "discard": "discards",
    "write_zeroes": "write_zeroes", "get_id": "get_ids",
}


def totals(parts: Iterable[Any], counter_names: Iterable[str]) -> Totals:
    """Sum the per-queue stats ``parts`` (BlkStats): named counters, failures, times, buckets."""
    parts = list(parts)
    names = list(counter_names)
    out = Totals({name: sum(getattr(p, name) for p in parts) for name in names})
    for p in parts:
        for k in range(NUM_KINDS):
            out.failed[k] += p.failed[k]
            out.total_ns[k] += p.total_ns[k]
            src, dst = p.latency[k], out.latency[k]
            for b, n in enumerate(src):
                dst[b] += n
    return out
