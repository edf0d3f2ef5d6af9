"""One daemon started with qemu-storage-daemon's options serves a guest; a disk is hot-plugged.

Issue 22, "Done when" 1 and 2, in one guest run (one boot per daemon keeps the e2e budget):

* a raw file node (vda) and a qcow2 node behind a throttle filter (vdb, its group at
  ``iops-total``), two exports of two queues, a QMP monitor on a --chardev; the guest writes both
  disks at once with a crc32c verify, then reads vdb with a job per vCPU (both queues busy): it
  runs at ``iops-total`` within 15 %; the host changes the limit with qom-set while the guest
  runs, and the next run is at the new limit within 15 %;
* then an export added with blockdev-add + block-export-add is hot-plugged over QEMU's QMP
  (chardev-add + device_add vhost-user-blk-pci; on q35 into the spare pcie-root-port); the guest
  sees vdc in /sys/block, writes and reads it back, the host finds the bytes in the image file;
  device_del + DEVICE_DELETED, block-export-del + BLOCK_EXPORT_DELETED, blockdev-del; vda and
  vdb keep serving (the guest reads a token the host writes into vda's image only after the
  removal -- the host's "go on" -- and writes and reads both again);
* ``quit`` exits 0 and the qcow2 image is ``qemu-img check`` clean.

``daemon``: ``qsd`` (qemu-storage-daemon, the reference) or ``server`` (this project).  Each
runs on one machine type: QSD on q35 (the spare root port), the server on ``pc`` (pci.0, ACPI
hot-plug), so both hot-plug paths run, one boot per daemon.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_guest import Guest
from qemu_guest.hotplug import Monitor, plug, unplug
from tests.e2e.daemons import Daemon
from tests.e2e.workloads import check_fio

pytestmark = pytest.mark.e2e
log = logging.getLogger(__name__)

IOPS, NEW_IOPS = 100, 200  # the guest under TCG must do well over NEW_IOPS on a busy host
FIO = "fio --ioengine=libaio --direct=1 --output-format=json"
READ = (f"{FIO} --filename=/dev/vdb --rw=randread --bs=4k --iodepth=4 --numjobs=2 "
        "--cpus_allowed=0-1 --cpus_allowed_policy=split --group_reporting --time_based "
        "--ramp_time=1 --runtime=3")
# The host's "go on" tokens, written into vda's image past fio's 4 MiB, read by the guest
# through vda (so vda still serves when it sees them).
GO_BLOCK = (32 << 20) // 4096
GO_LIMIT, GO_REMOVED = "GO-ON-after-qom-set", "GO-ON-after-removal"
TOKEN = "hotplug-e2e"
PATTERN = ((TOKEN + "\n").encode() * (65536 // (len(TOKEN) + 1) + 1))[:65536]
HOT_OFFSET = 16 * 65536  # where the guest writes on vdc (dd bs=64k seek=16)

MACHINES = {
    # machine -> (extra QEMU arguments, the bus device_add names)
    "pc": ((), None),
    "q35": (("-device", "pcie-root-port,id=hp0,bus=pcie.0,chassis=1"), "hp0"),
}


@pytest.fixture
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(request.param, tmp_path)
    yield d
    d.kill()


def wait_token(token: str) -> str:
    return f"""n=0
while ! dd if=/dev/vda bs=4096 skip={GO_BLOCK} count=1 iflag=direct 2>/dev/null \\
        | grep -q {token} && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
"""


def workload() -> str:
    return f"""
n=0; while [ ! -b /dev/vdb ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done
result_sh disks 'cat /sys/block/vda/size /sys/block/vdb/size; ls /sys/block/vdb/mq | wc -l'
result verify {FIO} --rw=randwrite --bs=4k --iodepth=8 --verify=crc32c --verify_fatal=1 \\
    --do_verify=1 --name=raw --filename=/dev/vda --size=4M --name=thr --filename=/dev/vdb --size=1M
result before {READ} --name=before
marker LIMIT-MEASURED
{wait_token(GO_LIMIT)}
result after {READ} --name=after
yes {TOKEN} | head -c 65536 > /tmp/pat
marker AFTER-MEASURED
n=0; while [ ! -b /dev/vdc ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
result sysblock ls /sys/block
result write dd if=/tmp/pat of=/dev/vdc bs=64k seek=16 oflag=direct conv=fsync
result_sh readback 'dd if=/dev/vdc bs=64k skip=16 count=1 iflag=direct 2>/dev/null | cmp - /tmp/pat'
marker HOTPLUG-WRITTEN
n=0; while [ -e /sys/block/vdc ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
result sysblock2 ls /sys/block
{wait_token(GO_REMOVED)}
result_sh go 'dd if=/dev/vda bs=4096 skip={GO_BLOCK} count=1 iflag=direct 2>/dev/null \\
        | grep -c {GO_REMOVED}'
for d in vda vdb; do
    result_sh still-$d "dd if=/tmp/pat of=/dev/$d bs=64k seek=32 oflag=direct conv=fsync \\
        2>/dev/null && dd if=/dev/$d bs=64k skip=32 count=1 iflag=direct 2>/dev/null \\
        | cmp - /tmp/pat"
done
"""


def write_token(image: Path, token: str) -> None:
    with image.open("r+b") as f:
        os.pwrite(f.fileno(), token.encode().ljust(4096, b"\0"), GO_BLOCK * 4096)


@pytest.mark.parametrize(("daemon", "machine"), [
    ("qsd", "q35"),
    ("server", "pc"),
], indirect=["daemon"])
def test_two_disks_throttled_and_a_hot_plugged_one(daemon: Daemon, machine: str,
                                                   tmp_path: Path) -> None:
    raw, qcow2, hot = tmp_path / "raw.img", tmp_path / "disk.qcow2", tmp_path / "hot.img"
    for img in (raw, hot):
        with img.open("wb") as f:
            f.truncate(64 << 20)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "128M"], check=True)
    sock0, sock1, sock2 = (tmp_path / f"exp{i}.sock" for i in range(3))
    dmon = daemon.start(
        "--blockdev", f"driver=file,node-name=file0,filename={raw}",
        "--blockdev", f"driver=file,node-name=file1,filename={qcow2}",
        "--blockdev", "driver=qcow2,node-name=qcow1,file=file1",
        "--object", f"throttle-group,id=tg0,limits.iops-total={IOPS}",
        "--blockdev", "driver=throttle,node-name=thr1,throttle-group=tg0,file=qcow1",
        "--export", "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
                    f"addr.path={sock0},writable=on,num-queues=2",
        "--export", "type=vhost-user-blk,id=exp1,node-name=thr1,addr.type=unix,"
                    f"addr.path={sock1},writable=on,num-queues=2",
    )
    qmp_path = tmp_path / "qemu.qmp"
    extra, bus = MACHINES[machine]
    guest = Guest(sock0, workload(), num_queues=2, smp=2, timeout=240, machine=machine,
                  extra_qemu_args=[
                      "-chardev", f"socket,id=vub1,path={sock1}",
                      "-device", "vhost-user-blk-pci,chardev=vub1,num-queues=2",
                      "-qmp", f"unix:{qmp_path},server=on,wait=off", *extra,
                  ])
    with guest:
        guest.wait_for(r"^@@LIMIT-MEASURED", 180)
        dmon.cmd("qom-set", path="tg0", property="limits", value={"iops-total": NEW_IOPS})
        assert dmon.cmd("qom-get", path="tg0", property="limits")["iops-total"] == NEW_IOPS
        write_token(raw, GO_LIMIT)
        guest.wait_for(r"^@@AFTER-MEASURED", 60)
        qemu = Monitor(qmp_path)
        try:
            dmon.cmd("blockdev-add", driver="file", **{"node-name": "hot0"}, filename=str(hot))
            dmon.cmd("block-export-add", type="vhost-user-blk", id="exp2",
                     **{"node-name": "hot0"}, addr={"type": "unix", "path": str(sock2)},
                     writable=True)
            plug(qemu, "vub2", sock2, bus=bus)
            guest.wait_for(r"^@@HOTPLUG-WRITTEN", 120)
            with hot.open("rb") as f:
                on_host = os.pread(f.fileno(), len(PATTERN), HOT_OFFSET)
            assert on_host == PATTERN, "the host does not see what the guest wrote on vdc"
            unplug(qemu, "vub2", timeout=60)
        finally:
            qemu.close()
        dmon.cmd("block-export-del", id="exp2")
        dmon.wait_event("BLOCK_EXPORT_DELETED", 10, id="exp2")
        dmon.cmd("blockdev-del", **{"node-name": "hot0"})
        assert sorted(e["id"] for e in dmon.cmd("query-block-exports")) == ["exp0", "exp1"]
        write_token(raw, GO_REMOVED)
        res = guest.wait(120)
    assert res.done, guest.report()
    assert res.text("disks").split() == [str(64 << 11), str(128 << 11), "2"], res.text("disks")
    check_fio(res, "verify")
    before, after = check_fio(res, "before"), check_fio(res, "after")
    log.info("%s: throttled vdb at %.0f IOPS (limit %d), %.0f after qom-set (limit %d); "
             "guest ran %.1f s (boot %.1f s)", daemon.kind, before, IOPS, after, NEW_IOPS,
             res.elapsed, res.boot_time or -1)
    assert IOPS * 0.85 <= before <= IOPS * 1.15, f"throttled at {before:.0f} IOPS, not {IOPS}"
    assert NEW_IOPS * 0.85 <= after <= NEW_IOPS * 1.15, \
        f"after qom-set at {after:.0f} IOPS, not {NEW_IOPS}"
    assert "vdc" in res.text("sysblock").split(), res.text("sysblock")
    assert res.rc("write") == 0, res.text("write")
    assert res.rc("readback") == 0, res.text("readback")
    assert "vdc" not in res.text("sysblock2").split(), res.text("sysblock2")
    assert res.rc("go") == 0 and res.text("go").strip() == "1", res.text("go")
    for d in ("vda", "vdb"):
        assert res.rc(f"still-{d}") == 0, res.text(f"still-{d}")
    assert daemon.quit() == 0, daemon.log
    check = subprocess.run(["qemu-img", "check", str(qcow2)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
