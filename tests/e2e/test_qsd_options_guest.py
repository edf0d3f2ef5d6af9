"""One daemon started with qemu-storage-daemon's options serves a guest two disks at once.

A raw file node (vda) and a qcow2 node behind a throttle filter (vdb, its group at
``iops-total``), two exports of two queues, a QMP monitor (issue 22, "Done when" 1).  The guest
writes both disks at once with a crc32c verify, then reads vdb with a job per vCPU (so both
queues are busy): it runs at ``iops-total`` within 15 %; the host changes the limit with qom-set
while the guest runs, and the next run is at the new limit within 15 %.  ``quit`` exits 0 and
the qcow2 image is ``qemu-img check`` clean.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_guest import Guest
from tests.e2e.daemons import DAEMONS, Daemon
from tests.e2e.workloads import check_fio

pytestmark = pytest.mark.e2e
log = logging.getLogger(__name__)

IOPS, NEW_IOPS = 200, 400
GO_OFFSET = 32 << 20  # where the host writes its "go on" token on vda (past fio's 8 MiB)
GO = b"GO-ON-after-qom-set"
FIO = "fio --ioengine=libaio --direct=1 --output-format=json"
READ = (f"{FIO} --filename=/dev/vdb --rw=randread --bs=4k --iodepth=4 --numjobs=2 "
        "--cpus_allowed=0-1 --cpus_allowed_policy=split --group_reporting --time_based "
        "--ramp_time=1 --runtime=5")


@pytest.fixture
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(request.param, tmp_path)
    yield d
    d.kill()


def workload() -> str:
    return f"""
n=0; while [ ! -b /dev/vdb ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done
result_sh disks 'cat /sys/block/vda/size /sys/block/vdb/size; ls /sys/block/vdb/mq | wc -l'
result verify {FIO} --rw=randwrite --bs=4k --iodepth=8 --verify=crc32c --verify_fatal=1 \\
    --do_verify=1 --name=raw --filename=/dev/vda --size=8M --name=thr --filename=/dev/vdb --size=1M
result before {READ} --name=before
marker LIMIT-MEASURED
n=0
while ! dd if=/dev/vda bs=4096 skip={GO_OFFSET // 4096} count=1 iflag=direct 2>/dev/null \\
        | grep -q {GO.decode()} && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
result after {READ} --name=after
"""


@pytest.mark.parametrize("daemon", DAEMONS, indirect=True)
def test_two_disks_one_throttled_and_its_limit_changed_live(daemon: Daemon,
                                                            tmp_path: Path) -> None:
    raw, qcow2 = tmp_path / "raw.img", tmp_path / "disk.qcow2"
    with raw.open("wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "128M"], check=True)
    sock0, sock1 = tmp_path / "exp0.sock", tmp_path / "exp1.sock"
    mon = daemon.start(
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
    guest = Guest(sock0, workload(), num_queues=2, smp=2, timeout=240, extra_qemu_args=[
        "-chardev", f"socket,id=vub1,path={sock1}",
        "-device", "vhost-user-blk-pci,chardev=vub1,num-queues=2",
    ])
    with guest:
        guest.wait_for(r"^@@LIMIT-MEASURED", 180)
        mon.cmd("qom-set", path="tg0", property="limits", value={"iops-total": NEW_IOPS})
        assert mon.cmd("qom-get", path="tg0", property="limits")["iops-total"] == NEW_IOPS
        with raw.open("r+b") as f:  # the guest's "go on": read through vda, still served
            os.pwrite(f.fileno(), GO, GO_OFFSET)
        res = guest.wait(120)
    assert res.done, guest.report()
    assert res.text("disks").split() == [str(64 << 11), str(128 << 11), "2"], res.text("disks")
    check_fio(res, "verify")
    before, after = check_fio(res, "before"), check_fio(res, "after")
    log.info("%s: throttled vdb at %.0f IOPS (limit %d), %.0f after qom-set (limit %d)",
             daemon.kind, before, IOPS, after, NEW_IOPS)
    assert IOPS * 0.85 <= before <= IOPS * 1.15, f"throttled at {before:.0f} IOPS, not {IOPS}"
    assert NEW_IOPS * 0.85 <= after <= NEW_IOPS * 1.15, \
        f"after qom-set at {after:.0f} IOPS, not {NEW_IOPS}"
    assert daemon.quit() == 0, daemon.log
    check = subprocess.run(["qemu-img", "check", str(qcow2)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
