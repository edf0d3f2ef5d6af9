"""Prometheus metrics, scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from blockdev.stats import LATENCY_BOUNDS_NS
from storage_daemon.metrics import parse_address
from tests.unit.control.conftest import MakeOperated, Operated
from vhost_frontend.blk import BlkDriver
from virtio_blk.request import Status

MiB = 1 << 20


def scrape(op: Operated, export: str = "export0"
           ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels but ``export``): value} of one scrape, every sample
    checked to carry ``export`` (the fixture's one export)."""
    with urllib.request.urlopen(op.metrics_url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            assert labels.pop("export") == export, s
            samples[(s.name, tuple(sorted(labels.items())))] = s.value
    return samples


def blockstats(op: Operated) -> dict[str, int]:
    """query-blockstats over the QMP socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(op.qmp_path))
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-blockstats"}')
        f.readline()
        return json.loads(f.readline())["return"][0]["stats"]


def test_scrape_agrees_with_the_driver_and_query_blockstats(make_operated: MakeOperated) -> None:
    op = make_operated(num_queues=2, bounce_pages=64)
    drv = op.env.drv
    for i in range(5):
        assert drv.write(8 * i, bytes([i]) * 4096).status == Status.OK
    for i in range(7):
        assert drv.read(8 * i, 4096).status == Status.OK
    # A piece boundary mid-sector: bounced.
    pieces = drv.pieces([1000, 3096])
    assert drv.read(0, 4096, pieces=pieces).status == Status.OK
    assert drv.flush().status == Status.OK
    assert drv.discard((64, 8)).status == Status.OK
    assert drv.write_zeroes((80, 8)).status == Status.OK
    assert drv.get_id().status == Status.OK
    assert drv.read(MiB >> 9, 512).status == Status.IOERR
    assert drv.request(99).status == Status.UNSUPP

    m = scrape(op)

    def v(name: str, **labels: str) -> float:
        return m[(name, tuple(sorted(labels.items())))]

    expected = {"read": 8, "write": 5, "flush": 1, "discard": 1, "write_zeroes": 1, "get_id": 1}
    for op_name, n in expected.items():
        assert v("vhost_user_blk_requests_total", queue="0", op=op_name) == n
        assert v("vhost_user_blk_requests_total", queue="1", op=op_name) == 0
    assert v("vhost_user_blk_bytes_total", queue="0", op="read") == 8 * 4096
    assert v("vhost_user_blk_bytes_total", queue="0", op="write") == 5 * 4096
    assert v("vhost_user_blk_errors_total", queue="0") == 2
    assert v("vhost_user_blk_bounced_requests_total", queue="0") == 1
    assert v("vhost_user_blk_requests_in_flight", queue="0") == 0
    assert v("vhost_user_blk_frontend_connected") == 1
    assert v("vhost_user_blk_frontend_connections_total") == 1
    assert v("vhost_user_blk_capacity_bytes") == MiB
    # The histograms: cumulative buckets ending in +Inf == count, the sum in seconds.
    for op_name, n in (("read", 8), ("write", 5), ("flush", 1), ("discard", 1)):
        assert v("vhost_user_blk_request_seconds_count", op=op_name) == n
        assert v("vhost_user_blk_request_seconds_bucket", op=op_name, le="+Inf") == n
        prev = 0.0
        for bound in LATENCY_BOUNDS_NS:
            b = v("vhost_user_blk_request_seconds_bucket", op=op_name, le=f"{bound / 1e9:g}")
            assert prev <= b <= n
            prev = b
        assert v("vhost_user_blk_request_seconds_sum", op=op_name) > 0

    st = blockstats(op)
    assert st["rd_operations"] == v("vhost_user_blk_requests_total", queue="0", op="read")
    assert st["wr_operations"] == v("vhost_user_blk_requests_total", queue="0", op="write")
    assert st["rd_bytes"] == v("vhost_user_blk_bytes_total", queue="0", op="read")
    assert st["wr_bytes"] == v("vhost_user_blk_bytes_total", queue="0", op="write")
    assert st["flush_operations"] == 1 and st["unmap_operations"] == 2
    assert st["rd_total_time_ns"] == pytest.approx(
        v("vhost_user_blk_request_seconds_sum", op="read") * 1e9, rel=1e-6)

    # The disk grows: the capacity gauge follows.
    op.env.device.resize(2 * MiB)
    assert scrape(op)[("vhost_user_blk_capacity_bytes", ())] == 2 * MiB


def test_two_queues_counted_apart_and_summed(make_operated: MakeOperated) -> None:
    """Each queue's worker thread counts its own requests; labels keep them apart and
    query-blockstats sums them."""
    op = make_operated(num_queues=2)
    env = op.env
    drv1 = BlkDriver(env.frontend, env.frontend.setup_queue(1, size=64), env.mem)
    for i in range(30):  # each queue's requests are served (and counted) on its own worker
        assert env.drv.write(8 * i, b"q" * 4096).status == Status.OK
        if i < 20:
            assert drv1.write(8 * i, b"q" * 4096).status == Status.OK
    m = scrape(op)
    assert m[("vhost_user_blk_requests_total", (("op", "write"), ("queue", "0")))] == 30
    assert m[("vhost_user_blk_requests_total", (("op", "write"), ("queue", "1")))] == 20
    assert m[("vhost_user_blk_request_seconds_count", (("op", "write"),))] == 50
    st = blockstats(op)
    assert (st["wr_operations"], st["wr_bytes"]) == (50, 50 * 4096)


def test_io_errors_are_failed_operations(make_operated: MakeOperated) -> None:
    op = make_operated(filters=[("error", {"error-read-rate": "1"})])
    assert op.env.drv.read(0, 4096).status == Status.IOERR
    st = blockstats(op)
    assert st["failed_rd_operations"] == 1 and st["rd_operations"] == 0
    assert scrape(op)[("vhost_user_blk_errors_total", (("queue", "0"),))] == 1


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("localhost:65535") == ("localhost", 65535)
    for bad in ("9100", ":9100", "host:port", "host:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)


def _half_sent(port: int, n: int) -> list[socket.socket]:
    """``n`` clients that connect and send half a request, then say nothing more."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    return socks


def test_half_sent_requests_take_no_thread_each_and_qmp_still_answers(
        make_operated: MakeOperated) -> None:
    """200 clients that never finish their request: the endpoint keeps its one thread (it
    used to start one per connection, without a timeout), and QMP, with queue processes
    serving, answers at once."""
    import threading
    import time

    op = make_operated(num_queues=2, queue_processes=True)
    assert op.env.drv.read(0, 4096).status == Status.OK
    assert op.plane.metrics is not None
    before = threading.active_count()
    socks = _half_sent(op.plane.metrics.port, 200)
    try:
        time.sleep(0.5)
        assert threading.active_count() - before < 64
        t0 = time.monotonic()
        stats = blockstats(op)
        assert time.monotonic() - t0 < 2.0
        assert stats["rd_operations"] == 1
    finally:
        for s in socks:
            s.close()


def test_a_client_that_stalls_is_dropped_and_excess_clients_are_refused(
        make_operated: MakeOperated, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from storage_daemon import metrics

    monkeypatch.setattr(metrics, "CONNECTION_TIMEOUT", 0.5)
    op = make_operated()
    assert op.plane.metrics is not None
    port = op.plane.metrics.port
    socks = _half_sent(port, metrics.MAX_CONNECTIONS)
    try:
        extra = _half_sent(port, 1)[0]
        assert extra.recv(100).startswith(b"HTTP/1.1 503")  # over the cap: refused at once
        extra.close()
        t0 = time.monotonic()
        for s in socks:  # each stalled client is cut off after its timeout
            assert s.recv(100) == b""
        assert time.monotonic() - t0 < 3
    finally:
        for s in socks:
            s.close()
    assert scrape(op)[("vhost_user_blk_capacity_bytes", ())] > 0  # and scrapes go on
