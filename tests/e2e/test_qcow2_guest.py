"""End to end on qcow2 exports: a Linux guest runs fio verify, ext4 and discard/write-zeroes on
a thin overlay of a raw base (2 queues), and survives a kill -9 of the server under fio writes
(1 queue); ``qemu-img check`` finds no corruption afterwards.  Two guest boots in all."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from qemu_guest import run_guest
from tests.e2e.conftest import Server
from tests.e2e.workloads import FIO, check_fio, kill_and_restart_under_fio

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def qemu_img_check(img: Path) -> tuple[int, dict]:
    p = subprocess.run(["qemu-img", "check", "--output=json", str(img)], capture_output=True,
                       text=True, timeout=300, check=False)
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else {}


def test_qcow2_overlay_fio_ext4_discard_two_queues(tmp_path: Path, server) -> None:
    base = tmp_path / "base.raw"
    with base.open("wb") as f:
        f.truncate(512 * MiB)
        f.write(os.urandom(8 * MiB))  # the guest sees these through the overlay
    base_md5 = hashlib.md5(base.read_bytes()[:8 * MiB]).hexdigest()
    srv = server("--format", "qcow2", "--backing", "base.raw", "--backing-format", "raw",
                 "--num-queues", "2")
    script = (
        "result_sh base 'dd if=/dev/vda bs=1M count=8 iflag=direct 2>/dev/null | md5sum'\n"
        f"result verify {FIO} --name=verify --rw=randwrite --bsrange=512-128k "
        "--iomem_align=512 --verify=crc32c --verify_fatal=1 --do_verify=1 --size=64M "
        "--offset=4M --iodepth=16 --numjobs=2 --offset_increment=96M --randrepeat=0 "
        "--cpus_allowed=0-1 --cpus_allowed_policy=split\n"
        "result fill dd if=/dev/urandom of=/dev/vda bs=1M seek=300 count=16 oflag=direct\n"
        "result zero /usr/sbin/blkdiscard -z -o 315621376 -l 4194304 /dev/vda\n"
        "result_sh zsum 'dd if=/dev/vda bs=1M skip=301 count=4 iflag=direct 2>/dev/null "
        "| md5sum'\n"
        "result discard /usr/sbin/blkdiscard -o 321912832 -l 4194304 /dev/vda\n"
        "result mkfs mkfs.ext4 -q -F -E nodiscard /dev/vda 400M\n"
        "mkdir -p /mnt/t\n"
        "result mount mount -t ext4 /dev/vda /mnt/t\n"
        "result_sh write 'for i in 1 2 3 4 5; do dd if=/dev/urandom of=/mnt/t/f$i bs=64k "
        "count=$((i * 8)) 2>/dev/null || exit 1; done; md5sum /mnt/t/f* > /tmp/sums && sync'\n"
        "result umount umount /mnt/t\n"
        "result mount2 mount -t ext4 /dev/vda /mnt/t\n"
        "result verify2 md5sum -c /tmp/sums\n"
        "result fstrim fstrim -v /mnt/t\n"
        "result umount2 umount /mnt/t\n"
    )
    res = run_guest(srv.sock, script, num_queues=2, smp=2, timeout=900)
    assert res.text("base").split()[0] == base_md5, "backing data not seen through the overlay"
    check_fio(res, "verify")
    for name in ("fill", "zero", "discard", "mkfs", "mount", "write", "umount", "mount2",
                 "verify2", "fstrim", "umount2"):
        assert res.rc(name) == 0, f"{name}: {res.text(name)}"
    assert res.text("zsum").split()[0] == hashlib.md5(bytes(4 * MiB)).hexdigest()
    assert "queue 0 started" in srv.log and "queue 1 started" in srv.log, srv.log
    assert srv.stop() == 0
    rc, report = qemu_img_check(srv.image)
    assert rc == 0, report
    raw = tmp_path / "fs.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(srv.image), str(raw)], check=True,
                   timeout=300)
    with raw.open("r+b") as f:
        f.truncate(400 * MiB)
    fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_qcow2_server_killed_and_restarted_under_fio(tmp_path: Path, server) -> None:
    """kill -9 under guest writes on a fresh thin image (every write allocates), restart: the
    guest's verify passes and ``qemu-img check`` finds leaks at most, no corruption."""
    def check_right_after_kill(dead: Server) -> None:
        rc, report = qemu_img_check(dead.image)
        assert rc in (0, 3), f"corruption right after kill -9: {report}"

    _, srv = kill_and_restart_under_fio(
        lambda *args, **kw: server("--format", "qcow2", *args, **kw), tmp_path, timeout=900,
        after_kill=check_right_after_kill)
    rc, report = qemu_img_check(srv.image)
    assert rc in (0, 3), report
    assert report.get("corruptions", 0) == 0, report
    print(f"after kill -9: {report.get('leaks', 0)} leaked clusters")
