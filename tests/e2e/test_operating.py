"""End to end, operating a running disk: live resize over QMP while a guest watches, and the
Prometheus metrics scraped during a guest's fio run.

QMP is driven with QEMU's own client library (qemu.qmp's QMPClient), as an operator would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from qemu.qmp import QMPClient

from qemu_guest import Guest
from tests.e2e.conftest import image_bytes
from tests.e2e.workloads import FIO

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def qmp(path: Path, *commands: tuple[str, dict[str, Any] | None]) -> list[Any]:
    """Run ``commands`` in one QMP session; their return values."""
    async def session() -> list[Any]:
        client = QMPClient("e2e")
        await client.connect(str(path))
        try:
            return [await client.execute(name, args) for name, args in commands]
        finally:
            with contextlib.suppress(EOFError):
                await client.disconnect()

    async def bounded() -> list[Any]:
        return await asyncio.wait_for(session(), 60)
    return asyncio.run(bounded())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


#: The export's "frontend connected" gauge (every metric carries its export's label).
CONNECTED = ("vhost_user_blk_frontend_connected", (("export", "export0"),))


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of ``name`` over every label set that has ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= set(lbl))


def test_live_resize_seen_by_the_guest(tmp_path: Path, server) -> None:
    """block_resize while the guest polls /sys/block/vda/size: it sees the new size without a
    reboot, writes and reads the new last MiB, and the image file has the new size."""
    qmp_path = tmp_path / "qmp.sock"
    srv = server("--qmp", str(qmp_path), size="64M")
    new_size = 96 * MiB
    last_mib = new_size // MiB - 1
    script = f"""
old=$(cat /sys/block/vda/size)
marker WAITING-RESIZE sectors=$old
i=0
while [ "$(cat /sys/block/vda/size)" = "$old" ] && [ $i -lt 600 ]; do sleep 1; i=$((i+1)); done
marker RESIZED sectors=$(cat /sys/block/vda/size) after=$i
dd if=/dev/urandom of=/tmp/pat bs=1M count=1 2>/dev/null
result write_end dd if=/tmp/pat of=/dev/vda bs=1M seek={last_mib} oflag=direct conv=fsync
result read_end dd if=/dev/vda of=/tmp/back bs=1M skip={last_mib} count=1 iflag=direct
result sums md5sum /tmp/pat /tmp/back
result getsize blockdev --getsize64 /dev/vda
"""
    with Guest(srv.sock, script, timeout=600) as guest:
        line = guest.wait_for(r"^@@WAITING-RESIZE", timeout=400)
        assert line.split("sectors=")[1].strip() == str(64 * MiB // 512), line
        exports, resized, stats = qmp(qmp_path, ("query-block-exports", None),
                                      ("block_resize", {"node-name": "disk0",
                                                        "size": new_size}),
                                      ("query-blockstats", None))
        assert exports[0]["node-name"] == "disk0" and resized == {}
        # The host image grew at once, before the guest said anything.
        assert os.path.getsize(srv.image) == new_size
        line = guest.wait_for(r"^@@RESIZED", timeout=120)
        res = guest.wait()
    found_sectors = re.search(r"sectors=(\d+)", line)
    found_after = re.search(r"after=(\d+)", line)
    assert found_sectors is not None and found_after is not None, line
    sectors = int(found_sectors.group(1))
    waited = int(found_after.group(1))
    assert sectors == new_size // 512, f"the guest still sees {sectors} sectors:\n{res.tail()}"
    assert waited < 600
    assert res.text("getsize").strip() == str(new_size)
    for name in ("write_end", "read_end"):
        assert res.rc(name) == 0, res.text(name)
    pat, back = (ln.split()[0] for ln in res.text("sums").splitlines()[:2])
    assert pat == back
    assert srv.stop() == 0
    assert os.path.getsize(srv.image) == new_size
    assert hashlib.md5(image_bytes(srv.image, last_mib * MiB, MiB)).hexdigest() == pat
    assert stats[0]["node-name"] == "disk0"
    assert "frontend told of the new size" in srv.log, srv.log


def test_metrics_during_a_guest_workload(tmp_path: Path, server) -> None:
    """Scrapes while fio runs in a two-queue guest, parsed with prometheus_client's parser;
    afterwards the counters equal query-blockstats and the bytes fio wrote."""
    qmp_path = tmp_path / "qmp.sock"
    port = free_port()
    srv = server("--num-queues", "2", "--qmp", str(qmp_path), "--metrics",
                 f"127.0.0.1:{port}", size="256M")
    script = (
        "marker FIO-START\n"
        f"result fio {FIO} --name=mix --rw=randrw --bs=4k --iodepth=8 --numjobs=2 "
        "--cpus_allowed=0-1 --cpus_allowed_policy=split --size=32M --runtime=5 --time_based "
        "--group_reporting\n"
    )
    scrapes = []
    with Guest(srv.sock, script, num_queues=2, smp=2, timeout=600) as guest:
        guest.wait_for(r"^@@FIO-START", timeout=400)
        deadline = time.monotonic() + 300
        while guest.running() and time.monotonic() < deadline:
            scrapes.append(scrape(port))
            time.sleep(0.5)
        res = guest.wait()
    assert res.rc("fio") == 0, res.text("fio")[-2000:]
    assert scrapes, "no scrape while the guest ran"
    during = [s for s in scrapes if s[CONNECTED] == 1]
    assert during, "never scraped while the frontend was connected"
    # Counters only go up, scrape after scrape.
    writes = [total(s, "vhost_user_blk_requests_total", op="write") for s in scrapes]
    assert writes == sorted(writes) and writes[-1] > 0
    assert any(0 < w < writes[-1] for w in writes), f"no scrape landed mid-fio: {writes}"

    final = scrape(port)
    deadline = time.monotonic() + 10  # QEMU exited: the server notices the hang-up
    while final[CONNECTED] and time.monotonic() < deadline:
        time.sleep(0.1)
        final = scrape(port)
    [entry] = qmp(qmp_path, ("query-blockstats", None))[0]
    st = entry["stats"]
    job = res.fio("fio").jobs[0]
    # fio's bytes are the guest's: the block layer may merge requests, never change bytes.
    assert st["wr_bytes"] == job.write_io_bytes
    assert total(final, "vhost_user_blk_bytes_total", op="write") == st["wr_bytes"]
    assert total(final, "vhost_user_blk_bytes_total", op="read") == st["rd_bytes"]
    assert st["rd_bytes"] >= job.read_io_bytes  # plus the kernel's partition scan
    assert total(final, "vhost_user_blk_requests_total", op="write") == st["wr_operations"]
    assert total(final, "vhost_user_blk_requests_total", op="read") == st["rd_operations"]
    assert total(final, "vhost_user_blk_request_seconds_count", op="write") == st["wr_operations"]
    assert total(final, "vhost_user_blk_request_seconds_sum", op="write") == pytest.approx(
        st["wr_total_time_ns"] / 1e9, rel=1e-6)
    assert total(final, "vhost_user_blk_errors_total") == 0
    assert st["failed_rd_operations"] == st["failed_wr_operations"] == 0
    # Both queues carried requests (two fio jobs on two vCPUs).
    for q in ("0", "1"):
        assert total(final, "vhost_user_blk_requests_total", queue=q) > 0, q
    assert final[CONNECTED] == 0  # the guest powered off
    print(f"scrapes during the run: {len(scrapes)}; writes {st['wr_operations']} "
          f"({st['wr_bytes']} bytes), reads {st['rd_operations']}")
