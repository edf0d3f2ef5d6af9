"""Prometheus metrics: a custom collector that reads the device's counters when scraped.

Nothing of prometheus_client runs on the request path: the queues keep plain integers
(:class:`virtio_blk.device.BlkStats`) and :class:`BlkCollector` turns them into metric families
on each scrape (see :mod:`virtio_blk.accounting` for why the lock-free reads are sound).

Exposed (``queue`` is the virtqueue index, ``op`` the request type):

* ``vhost_user_blk_requests_total{queue,op}`` -- requests completed successfully
  (op: read, write, flush, discard, write_zeroes, get_id);
* ``vhost_user_blk_bytes_total{queue,op}`` -- bytes read and written;
* ``vhost_user_blk_errors_total{queue}`` -- requests answered IOERR or UNSUPP;
* ``vhost_user_blk_request_seconds{op}`` -- histogram of disk operation latency (all queues);
* ``vhost_user_blk_requests_in_flight{queue}``, ``vhost_user_blk_bounced_requests_total{queue}``;
* ``vhost_user_blk_frontend_connected``, ``vhost_user_blk_frontend_connections_total``;
* ``vhost_user_blk_capacity_bytes`` -- the disk's size (changes with block_resize).

One server exports one disk, so the export is told apart by the scrape target, not a label.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from vhost.daemon import VhostUserDaemon

from ..accounting import LATENCY_BOUNDS_NS, OP_NAMES
from ..device import BlkDevice

PREFIX = "vhost_user_blk"
_REQUEST_COUNTERS = (
    ("read", "reads"), ("write", "writes"), ("flush", "flushes"), ("discard", "discards"),
    ("write_zeroes", "write_zeroes"), ("get_id", "get_ids"),
)
_BUCKET_LABELS = [f"{b / 1e9:g}" for b in LATENCY_BOUNDS_NS] + ["+Inf"]


class BlkCollector(Collector):
    """Metric families of one device and its daemon, built from their counters per scrape."""

    def __init__(self, device: BlkDevice, daemon: VhostUserDaemon | None) -> None:
        self.device = device
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(f"{PREFIX}_requests", "Requests completed successfully",
                                       labels=["queue", "op"])
        nbytes = CounterMetricFamily(f"{PREFIX}_bytes", "Bytes transferred",
                                     labels=["queue", "op"])
        errors = CounterMetricFamily(f"{PREFIX}_errors",
                                     "Requests answered with an error status (IOERR, UNSUPP)",
                                     labels=["queue"])
        bounced = CounterMetricFamily(f"{PREFIX}_bounced_requests",
                                      "Requests whose data went through a bounce buffer",
                                      labels=["queue"])
        for q, st in enumerate(self.device.fresh_queue_stats()):
            queue = str(q)
            for op, counter in _REQUEST_COUNTERS:
                requests.add_metric([queue, op], getattr(st, counter))
            nbytes.add_metric([queue, "read"], st.bytes_read)
            nbytes.add_metric([queue, "write"], st.bytes_written)
            errors.add_metric([queue], st.errors + st.unsupported)
            bounced.add_metric([queue], st.bounced_requests)
        yield requests
        yield nbytes
        yield errors
        yield bounced

        totals = self.device.totals()
        latency = HistogramMetricFamily(f"{PREFIX}_request_seconds",
                                        "Latency of disk operations, submit to completion",
                                        labels=["op"])
        for k, op in enumerate(OP_NAMES):
            running = 0
            buckets = []
            for label, n in zip(_BUCKET_LABELS, totals.latency[k], strict=True):
                running += n
                buckets.append((label, running))
            latency.add_metric([op], buckets, sum_value=totals.total_ns[k] / 1e9)
        yield latency

        in_flight = GaugeMetricFamily(f"{PREFIX}_requests_in_flight",
                                      "Requests taken from the ring and not yet completed",
                                      labels=["queue"])
        counts = (self.daemon.in_flight() if self.daemon is not None
                  else [0] * self.device.num_queues)
        for q, n in enumerate(counts):
            in_flight.add_metric([str(q)], n)
        yield in_flight
        connected = GaugeMetricFamily(f"{PREFIX}_frontend_connected",
                                      "1 while a vhost-user frontend (QEMU) is connected")
        connected.add_metric([], int(self.daemon is not None and self.daemon.connected))
        yield connected
        connections = CounterMetricFamily(f"{PREFIX}_frontend_connections",
                                          "Frontend connections accepted")
        connections.add_metric([], self.daemon.connections if self.daemon is not None else 0)
        yield connections
        capacity = GaugeMetricFamily(f"{PREFIX}_capacity_bytes", "Size of the disk in bytes")
        capacity.add_metric([], self.device.limits.capacity * 512)
        yield capacity


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); ValueError with the reason."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return host, port


class MetricsServer:
    """prometheus_client's HTTP server for one collector, on its own registry."""

    def __init__(self, host: str, port: int, collector: Collector) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(collector)
        # OSError (address in use, bad host) goes to the caller: a user error.
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
