"""End to end on remote storage: a Linux guest on an RBD image (one-node Ceph cluster) and on an
NBD export (qemu-nbd on a raw file), through
``python -m storage_daemon --image rbd:...|nbd+unix:...``.

One guest boot per scenario (TCG is slow): fio write+verify, discard and write-zeroes reading back
zeroes, a pattern written and an ext4 file system made, then the bytes checked from the host
(``rbd export``, the qemu-nbd file); a snapshot served read-only; and kill -9 under guest writes
-- of this server (QEMU reconnects, the in-flight requests are resubmitted; for RBD the restarted
server takes over the dead one's exclusive lock) and of the NBD server (this server reconnects
to it within ``--reconnect-delay``).
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest

from qemu_guest import Guest, GuestResult, run_guest
from remote_testbed.ceph import CephCluster
from tests.e2e.conftest import Server, image_bytes
from tests.e2e.workloads import (
    FIO,
    SLOW_RBD_WRITES,
    check_fio,
    crash_script,
    kill_and_restart_under_fio,
)
from tests.remote.fixtures import MakeNbd

pytestmark = pytest.mark.e2e

MiB = 1 << 20

#: fio verify on [0, 16M), a pattern at 40M, write-zeroes of [48M, 52M) inside random data at
#: [48M, 56M), then ext4 on the first 32 MiB (mkfs overwrites the verify area, not the rest).
WORKLOAD = (
    f"result verify {FIO} --name=verify --rw=randwrite --bsrange=512-128k --iomem_align=512 "
    "--verify=crc32c --verify_fatal=1 --do_verify=1 --size=16M --iodepth=16 --randrepeat=0\n"
    "dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null\n"
    "result write dd if=/tmp/pat of=/dev/vda bs=1M seek=40 oflag=direct conv=fsync\n"
    "result sum md5sum /tmp/pat\n"
    "result fill dd if=/dev/urandom of=/dev/vda bs=1M seek=48 count=8 oflag=direct\n"
    "result zero /usr/sbin/blkdiscard -z -o 50331648 -l 4194304 /dev/vda\n"
    "result_sh zsum 'dd if=/dev/vda bs=1M skip=48 count=4 iflag=direct 2>/dev/null | md5sum'\n"
    "result mkfs mkfs.ext4 -q -F /dev/vda 32M\n"
    "mkdir -p /mnt/t\n"
    "result mount mount -t ext4 /dev/vda /mnt/t\n"
    "result_sh files 'for i in 1 2 3 4; do dd if=/dev/urandom of=/mnt/t/f$i bs=64k "
    "count=$((i * 8)) 2>/dev/null || exit 1; done; md5sum /mnt/t/f* > /tmp/sums && sync'\n"
    "result umount umount /mnt/t\n"
    "result mount2 mount -t ext4 /dev/vda /mnt/t\n"
    "result fverify md5sum -c /tmp/sums\n"
    "result umount2 umount /mnt/t\n"
)


def check_workload(res: GuestResult, host: bytes, tmp_path: Path) -> None:
    """The guest's reports, then ``host`` (the first 64 MiB of the storage, read on the
    host after the server exited)."""
    check_fio(res, "verify")
    for name in ("write", "fill", "zero", "mkfs", "mount", "files", "umount", "mount2",
                 "fverify", "umount2"):
        assert res.rc(name) == 0, f"{name}: {res.text(name)}"
    zeros_md5 = hashlib.md5(bytes(4 * MiB)).hexdigest()
    assert res.text("zsum").split()[0] == zeros_md5
    assert hashlib.md5(host[40 * MiB : 44 * MiB]).hexdigest() == res.text("sum").split()[0]
    assert host[48 * MiB : 52 * MiB] == bytes(4 * MiB)
    assert host[52 * MiB : 56 * MiB] != bytes(4 * MiB)  # the data around is still there
    fs = tmp_path / "fs.img"
    fs.write_bytes(host[: 32 * MiB])
    fsck = subprocess.run(["e2fsck", "-fn", str(fs)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def rbd_export(cluster: CephCluster, image: str, tmp_path: Path) -> bytes:
    out = tmp_path / "export.raw"
    out.unlink(missing_ok=True)
    cluster.rbd("export", f"rbd/{image}", str(out))
    return out.read_bytes()


def serve(tmp_path: Path, spec: str, *args: str) -> Server:
    workdir = tmp_path / f"srv{len(list(tmp_path.glob('srv*')))}"
    workdir.mkdir()
    return Server(workdir, *args, spec=spec).start()


def test_guest_on_rbd(ceph_cluster: CephCluster, rbd_image: str, guest_image: Path,
                      tmp_path: Path) -> None:
    srv = serve(tmp_path, ceph_cluster.spec(rbd_image))
    try:
        res = run_guest(srv.sock, WORKLOAD, timeout=600)
    finally:
        assert srv.stop() == 0, srv.log
    check_workload(res, rbd_export(ceph_cluster, rbd_image, tmp_path), tmp_path)


def test_guest_on_nbd(make_nbd: MakeNbd, guest_image: Path, tmp_path: Path) -> None:
    nbd = make_nbd("qemu-nbd", "unix")
    srv = serve(tmp_path, nbd.uri)
    try:
        res = run_guest(srv.sock, WORKLOAD, timeout=600)
    finally:
        assert srv.stop() == 0, srv.log
    check_workload(res, image_bytes(nbd.image, 0, 64 * MiB), tmp_path)


def test_rbd_snapshot_is_read_only_in_the_guest(ceph_cluster: CephCluster, rbd_image: str,
                                                guest_image: Path, tmp_path: Path) -> None:
    pattern = (b"snapshot" * (MiB // 8))
    src = tmp_path / "pattern.raw"
    src.write_bytes(pattern)
    ceph_cluster.rbd("import", "--no-progress", str(src), "rbd/snapsrc")
    try:
        ceph_cluster.rbd("snap", "create", "rbd/snapsrc@s1")
        srv = serve(tmp_path, ceph_cluster.spec("snapsrc", "s1"))
        script = (
            "result ro blockdev --getro /dev/vda\n"
            "result_sh read 'dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | md5sum'\n"
            "result write dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct\n"
        )
        try:
            res = run_guest(srv.sock, script, timeout=300)
        finally:
            assert srv.stop() == 0, srv.log
        assert res.text("ro").strip() == "1"
        assert res.text("read").split()[0] == hashlib.md5(pattern).hexdigest()
        assert res.rc("write") != 0
        assert "read-only" in srv.log
    finally:
        ceph_cluster.rbd("snap", "purge", "rbd/snapsrc")
        ceph_cluster.rbd("rm", "rbd/snapsrc")


def test_rbd_server_killed_under_fio_restarts_and_takes_the_lock_over(
        ceph_cluster: CephCluster, rbd_image: str, guest_image: Path, tmp_path: Path) -> None:
    """kill -9 of this server under guest writes: QEMU reconnects to the restarted server,
    which takes the image's exclusive lock over from the dead one (its watch expires) and
    resubmits the in-flight requests; fio's verify passes."""
    spec = ceph_cluster.spec(rbd_image)
    workdir = tmp_path / "srv"
    workdir.mkdir()
    _, restarted = kill_and_restart_under_fio(
        lambda *args, **kw: Server(workdir, *args, spec=spec, **kw).start(), workdir, size="32M",
        timeout=900, launcher=SLOW_RBD_WRITES)
    assert " IOERR" not in restarted.log and "failed" not in restarted.log, restarted.log


def test_nbd_server_killed_under_fio_is_reconnected(make_nbd: MakeNbd, guest_image: Path,
                                                     tmp_path: Path) -> None:
    """kill -9 of qemu-nbd under guest writes, restarted 2 s later on the same socket: this
    server reconnects and reissues the requests; the guest sees no error, verify passes."""
    nbd = make_nbd("qemu-nbd", "unix")
    srv = serve(tmp_path, nbd.uri, "--reconnect-delay", "30")
    try:
        with Guest(srv.sock, crash_script("32M"), timeout=900) as g:
            g.wait_for(r"^@@FIO-START$")
            time.sleep(1)  # on a quiet machine this fio is done within about 5 s
            nbd.kill()
            time.sleep(2)
            nbd.start()
            res = g.wait()
    finally:
        assert srv.stop() == 0, srv.log
    check_fio(res, "crash")
    assert "NBD connection lost" in srv.log and "reconnected to" in srv.log, srv.log
