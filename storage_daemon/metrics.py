"""Prometheus metrics: a custom collector that reads the device's counters when scraped.

Nothing of prometheus_client runs on the request path: the queues keep plain integers
(:class:`virtio_blk.device.BlkStats`) and :class:`BlkCollector` turns them into metric families
on each scrape (see :mod:`blockdev.stats` for why the lock-free reads are sound).

Exposed (``queue`` is the virtqueue index, ``op`` the request type):

* ``vhost_user_blk_requests_total{queue,op}`` -- requests completed successfully, one ``op``
  per row of the operation table (:data:`virtio_blk.ops.OPS`: read, write, flush, discard,
  write_zeroes, get_id);
* ``vhost_user_blk_bytes_total{queue,op}`` -- bytes of each op with a byte counter of its own
  (read, write; discard and write-zeroes share one, ``unmap_bytes`` in query-blockstats);
* ``vhost_user_blk_errors_total{queue}`` -- requests answered IOERR or UNSUPP;
* ``vhost_user_blk_request_seconds{op}`` -- histogram of operation latency (all queues), every
  op of the table;
* ``vhost_user_blk_requests_in_flight{queue}``, ``vhost_user_blk_bounced_requests_total{queue}``;
* ``vhost_user_blk_frontend_connected``, ``vhost_user_blk_frontend_connections_total``;
* ``vhost_user_blk_capacity_bytes`` -- the disk's size (changes with block_resize).

Every family carries an ``export`` label (the export's id): one server serves several disks,
and an export added or removed at run time appears or disappears at the next scrape.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from blockdev.stats import LATENCY_BOUNDS_NS
from vhost.daemon import VhostUserDaemon
from virtio_blk.device import BlkDevice
from virtio_blk.ops import OPS

log = logging.getLogger(__name__)

PREFIX = "vhost_user_blk"
#: (op label, counter) of the ops whose bytes are counted apart from any other op's.
_BYTE_COUNTERS = tuple(
    (row.name, row.bytes_counter) for row in OPS
    if row.bytes_counter is not None
    and sum(other.bytes_counter == row.bytes_counter for other in OPS) == 1
)
_BUCKET_LABELS = [f"{b / 1e9:g}" for b in LATENCY_BOUNDS_NS] + ["+Inf"]


class Exported(Protocol):
    """What the collector reads of an export (storage_daemon.export.BlockExport)."""

    @property
    def export_id(self) -> str: ...

    @property
    def device(self) -> BlkDevice: ...

    @property
    def daemon(self) -> VhostUserDaemon | None: ...


class ExportsCollector(Collector):
    """Metric families of every export, built from their counters per scrape.

    ``exports`` is called on each scrape, so the set may change between scrapes."""

    def __init__(self, exports: Callable[[], Iterable[Exported]]) -> None:
        self.exports = exports

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(f"{PREFIX}_requests", "Requests completed successfully",
                                       labels=["export", "queue", "op"])
        nbytes = CounterMetricFamily(f"{PREFIX}_bytes", "Bytes transferred",
                                     labels=["export", "queue", "op"])
        errors = CounterMetricFamily(f"{PREFIX}_errors",
                                     "Requests answered with an error status (IOERR, UNSUPP)",
                                     labels=["export", "queue"])
        bounced = CounterMetricFamily(f"{PREFIX}_bounced_requests",
                                      "Requests whose data went through a bounce buffer",
                                      labels=["export", "queue"])
        latency = HistogramMetricFamily(f"{PREFIX}_request_seconds",
                                        "Latency of operations, submit to completion",
                                        labels=["export", "op"])
        in_flight = GaugeMetricFamily(f"{PREFIX}_requests_in_flight",
                                      "Requests taken from the ring and not yet completed",
                                      labels=["export", "queue"])
        connected = GaugeMetricFamily(f"{PREFIX}_frontend_connected",
                                      "1 while a vhost-user frontend (QEMU) is connected",
                                      labels=["export"])
        connections = CounterMetricFamily(f"{PREFIX}_frontend_connections",
                                          "Frontend connections accepted", labels=["export"])
        capacity = GaugeMetricFamily(f"{PREFIX}_capacity_bytes", "Size of the disk in bytes",
                                     labels=["export"])
        for export in self.exports():
            name = export.export_id
            device, daemon = export.device, export.daemon
            for q, st in enumerate(device.fresh_queue_stats()):
                queue = str(q)
                for row in OPS:
                    requests.add_metric([name, queue, row.name], getattr(st, row.counter))
                for op, counter in _BYTE_COUNTERS:
                    nbytes.add_metric([name, queue, op], getattr(st, counter))
                errors.add_metric([name, queue], st.errors + st.unsupported)
                bounced.add_metric([name, queue], st.bounced_requests)
            totals = device.totals()
            for row in OPS:
                k = row.index
                running = 0
                buckets = []
                for label, n in zip(_BUCKET_LABELS, totals.latency[k], strict=True):
                    running += n
                    buckets.append((label, running))
                latency.add_metric([name, row.name], buckets,
                                   sum_value=totals.total_ns[k] / 1e9)
            counts = daemon.in_flight() if daemon is not None else [0] * device.num_queues
            for q, n in enumerate(counts):
                in_flight.add_metric([name, str(q)], n)
            connected.add_metric([name], int(daemon is not None and daemon.connected))
            connections.add_metric([name], daemon.connections if daemon is not None else 0)
            capacity.add_metric([name], device.limits.capacity * 512)
        yield from (requests, nbytes, errors, bounced, latency, in_flight, connected,
                    connections, capacity)


@dataclass(frozen=True)
class _One:
    export_id: str
    device: BlkDevice
    daemon: VhostUserDaemon | None


class BlkCollector(ExportsCollector):
    """The families of one device (and its daemon, if any), labelled ``export``."""

    def __init__(self, device: BlkDevice, daemon: VhostUserDaemon | None,
                 export_id: str = "export0") -> None:
        one = _One(export_id, device, daemon)
        super().__init__(lambda: (one,))


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


#: Connections served at once; more are refused (503) at once.
MAX_CONNECTIONS = 16
#: How long a client has to send its request and take the answer (per connection).
CONNECTION_TIMEOUT = 5.0
#: Largest request head read (a scrape's is a few hundred bytes).
MAX_REQUEST = 8192
_METRICS_PATHS = frozenset({"/", "/metrics"})


class _Connection:
    __slots__ = ("deadline", "inbuf", "outbuf", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.inbuf = b""
        self.outbuf = b""


def _response(status: HTTPStatus, body: bytes, content_type: str = "text/plain",
              head: bool = False) -> bytes:
    header = (f"HTTP/1.1 {status.value} {status.phrase}\r\n"
              f"Content-Type: {content_type}\r\n"
              f"Content-Length: {len(body)}\r\n"
              "Connection: close\r\n\r\n").encode()
    return header if head else header + body


class MetricsServer:
    """The HTTP endpoint for one collector, on its own registry: one thread, whatever the
    number of clients.

    Why not prometheus_client's own server: it runs a thread per connection and never times a
    client out, so clients that connect and send half a request each pin a thread for good
    (200 of them made 203 threads).  Here one thread runs a selector loop: at most
    :data:`MAX_CONNECTIONS` at once (the next is answered 503 and closed), each with
    :data:`CONNECTION_TIMEOUT` to send its request and take the answer, requests larger than
    :data:`MAX_REQUEST` refused.  A scrape only reads counters (queue processes publish theirs
    in shared memory), so serving it inline keeps the loop responsive.
    """

    def __init__(self, host: str, port: int, collector: Collector) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(collector)
        # OSError (address in use, bad host) goes to the caller: a user error.
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(address)
            self._listener.listen(64)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._conns: dict[int, _Connection] = {}
        self._stopping = False
        self.refused = 0
        self.timed_out = 0
        self._thread = threading.Thread(target=self._loop, name="metrics", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._conns)

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(5)
        for conn in list(self._conns.values()):
            self._close(conn)
        self._selector.close()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            timeout = None
            if self._conns:
                timeout = max(0.0, min(c.deadline for c in self._conns.values()) - now)
            for key, events in self._selector.select(timeout):
                try:
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj == self._wake_r:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 64)
                    else:
                        conn = self._conns.get(key.fd)
                        if conn is not None:
                            self._serve(conn, events)
                except Exception:  # one client's trouble never ends the endpoint
                    log.exception("metrics endpoint: error serving a client")
                    conn = self._conns.get(key.fd)
                    if conn is not None:
                        self._close(conn)
            now = time.monotonic()
            for conn in [c for c in self._conns.values() if c.deadline <= now]:
                self.timed_out += 1
                self._close(conn)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: try again on the next event
                log.warning("metrics endpoint: accept failed: %s", exc)
                return
            sock.setblocking(False)
            if len(self._conns) >= MAX_CONNECTIONS:
                self.refused += 1
                with contextlib.suppress(OSError):
                    sock.send(_response(HTTPStatus.SERVICE_UNAVAILABLE, b"busy\n"))
                sock.close()
                continue
            conn = _Connection(sock, time.monotonic() + CONNECTION_TIMEOUT)
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ)

    def _serve(self, conn: _Connection, events: int) -> None:
        if events & selectors.EVENT_READ and not conn.outbuf:
            try:
                data = conn.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn)
                return
            if not data:
                self._close(conn)
                return
            conn.inbuf += data
            end = conn.inbuf.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.inbuf) > MAX_REQUEST:
                    self._answer(conn, _response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                                 b"request too large\n"))
                return
            self._answer(conn, self._handle(conn.inbuf[:end]))
            return
        if events & selectors.EVENT_WRITE and conn.outbuf:
            self._flush(conn)

    def _handle(self, head: bytes) -> bytes:
        """The answer to one request head."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(HTTPStatus.BAD_REQUEST, b"bad request\n")
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return _response(HTTPStatus.METHOD_NOT_ALLOWED, b"GET only\n")
        if target.split("?", 1)[0] not in _METRICS_PATHS:
            return _response(HTTPStatus.NOT_FOUND, b"see /metrics\n")
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        encoder, content_type = choose_encoder(accept)
        return _response(HTTPStatus.OK, encoder(self.registry), content_type,
                         head=method == "HEAD")

    def _answer(self, conn: _Connection, data: bytes) -> None:
        conn.outbuf = data
        self._selector.modify(conn.sock, selectors.EVENT_WRITE)
        self._flush(conn)

    def _flush(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        if not conn.outbuf:
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        fd = conn.sock.fileno()
        if self._conns.pop(fd, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
        conn.sock.close()
