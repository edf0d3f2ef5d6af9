"""Tests of the e2e guest launcher (qemu_guest/guest.py).

The e2e test boots the real guest against the reference backend, qemu-storage-daemon's
vhost-user-blk export, so that a failure there points at the guest tooling rather than at
our own backend.  The other tests check the launcher's pure-Python parts.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qemu_guest import (
    Guest,
    GuestResult,
    ensure_guest,
    newc_archive,
    parse_fio_json,
    parse_results,
)

DISK_SIZE = 1 << 30


@dataclass
class QsdExport:
    """A running qemu-storage-daemon vhost-user-blk export."""

    socket: Path
    image: Path
    process: subprocess.Popen[bytes]


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} not found: install the Debian package {package} (CI installs it)")
    return path


def start_qsd(workdir: Path, num_queues: int = 1, size: int = DISK_SIZE) -> QsdExport:
    """Create a raw image in ``workdir`` and export it with qemu-storage-daemon."""
    qsd = _require("qemu-storage-daemon", "qemu-system-common")
    image = workdir / "disk.img"
    sock = workdir / "vub.sock"
    with image.open("wb") as f:
        f.truncate(size)
    cmd = [
        qsd,
        "--blockdev",
        f"driver=file,node-name=f0,filename={image},cache.direct=on,aio=native",
        "--export",
        f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},"
        f"writable=on,num-queues={num_queues}",
    ]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"qemu-storage-daemon exited rc={proc.returncode}: {err}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail("qemu-storage-daemon did not create its socket within 15 s")
        time.sleep(0.05)
    return QsdExport(socket=sock, image=image, process=proc)


def stop_qsd(export: QsdExport) -> None:
    """Stop qemu-storage-daemon (SIGTERM, then SIGKILL after 10 s)."""
    proc = export.process
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()


@pytest.fixture
def qsd_export() -> Iterator[QsdExport]:
    """A 1 GiB raw image exported by qemu-storage-daemon on a short unix socket path."""
    # A short directory: unix socket paths are limited to 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="vub-qsd-"))
    export = start_qsd(workdir)
    try:
        yield export
    finally:
        stop_qsd(export)
        shutil.rmtree(workdir, ignore_errors=True)


RANDREAD = (
    "fio --name=randread --filename=/dev/vda --rw=randread --bs=4k --iodepth=32 "
    "--ioengine=libaio --direct=1 --runtime=3 --time_based --output-format=json"
)


@pytest.mark.e2e
def test_guest_boots_sees_disk_and_runs_fio(qsd_export: QsdExport) -> None:
    """(a) /dev/vda appears with the right size; (b) fio randread JSON parses."""
    _require("qemu-system-x86_64", "qemu-system-x86")
    ensure_guest()
    workload = f"result size blockdev --getsize64 /dev/vda\nresult randread {RANDREAD}\n"
    with Guest(qsd_export.socket, workload, timeout=300) as guest:
        res = guest.wait()
    assert res.done, res.tail()
    assert res.workload_rc == 0, res.tail()
    assert res.disk is not None and int(res.disk["size"]) == DISK_SIZE, res.tail()
    assert int(res.check("size")) == DISK_SIZE
    res.check("randread")
    fio = res.fio("randread")
    assert len(fio.jobs) == 1
    assert fio.errors == {}
    assert fio.iops > 0 and fio.jobs[0].read_io_bytes > 0


def test_newc_archive_roundtrip(tmp_path: Path) -> None:
    """cpio(1) unpacks what newc_archive writes."""
    _require("cpio", "cpio")
    data = newc_archive({"workload.sh": (b"echo hi\n", 0o755), "a/b/c.txt": b"x" * 5})
    assert len(data) % 512 == 0
    subprocess.run(
        ["cpio", "-id", "--quiet"], input=data, cwd=tmp_path, check=True, capture_output=True
    )
    script = tmp_path / "workload.sh"
    assert script.read_bytes() == b"echo hi\n"
    assert script.stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "a" / "b" / "c.txt").read_bytes() == b"xxxxx"


def test_parse_results_tolerates_noise() -> None:
    """Kernel messages inside a result block are skipped; rc and payload are decoded."""
    payload = b"hello\n" * 40
    b64 = base64.encodebytes(payload).decode().splitlines()
    console = "\n".join(
        [
            "[    1.0] boot noise",
            "@@RESULT-BEGIN one",
            b64[0],
            "[    2.5] virtio_blk virtio0: something happened",
            *b64[1:],
            "@@RESULT-END one rc=3",
            "@@RESULT-BEGIN empty",
            "@@RESULT-END empty rc=0",
            "@@RESULT-BEGIN truncated",
            "aGVsbG8K",
        ]
    )
    results = parse_results(console)
    assert results == {"one": (3, payload), "empty": (0, b"")}
    res = GuestResult(
        returncode=0,
        console=console,
        results=results,
        done=False,
        workload_rc=None,
        elapsed=1.0,
        boot_time=None,
    )
    assert res.rc("one") == 3
    with pytest.raises(KeyError):
        res.output("truncated")


def test_parse_fio_json_with_stderr_noise() -> None:
    """A fio JSON report preceded by warnings parses into per-job figures."""
    out = (
        "fio: warning: something\n"
        '{"fio version": "fio-3.33", "jobs": [{"jobname": "j", "error": 0,'
        ' "read": {"iops": 1000.5, "bw_bytes": 4098048, "io_bytes": 12294144,'
        ' "lat_ns": {"mean": 31000.0}}, "write": {"iops": 0, "bw_bytes": 0}}]}\n'
    )
    fio = parse_fio_json(out.encode())
    assert fio.iops == pytest.approx(1000.5)
    assert fio.bw == 4098048
    assert fio.errors == {}
    assert fio.jobs[0].read_lat_mean_ns == 31000.0
    with pytest.raises(ValueError):
        parse_fio_json("no json here")
