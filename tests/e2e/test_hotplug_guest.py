"""Hot-plug, the way orchestrators do it, into a running TCG guest.

One storage daemon started with qemu-storage-daemon's options serves the guest's boot-time disk
(vda).  While the guest runs, an export is added over the daemon's QMP (blockdev-add +
block-export-add) and attached over QEMU's QMP (chardev-add + device_add vhost-user-blk-pci); the
guest sees vdb in /sys/block, writes a pattern and reads it back, and the host finds the bytes in
the image file.  Then device_del + DEVICE_DELETED, block-export-del + BLOCK_EXPORT_DELETED,
blockdev-del; vda keeps serving throughout (the guest reads a token the host writes into vda's
image only after the export is gone -- the host's "go on" -- and writes and reads vda again);
``quit`` exits 0.

``daemon``: ``qsd`` (qemu-storage-daemon, the reference) or ``server`` (this project, a strict
xfail until several exports and QMP blockdev-add land on main).  ``machine``: ``pc`` puts the
device on pci.0 (ACPI hot-plug); q35 needs a spare pcie-root-port from boot.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_guest import Guest
from qemu_guest.hotplug import Monitor, plug, unplug
from tests.e2e.daemons import DAEMONS, Daemon

pytestmark = pytest.mark.e2e

TOKEN = "hotplug-e2e"
PATTERN = (TOKEN + "\n").encode() * (65536 // (len(TOKEN) + 1) + 1)
PATTERN = PATTERN[:65536]
HOT_OFFSET = 16 * 65536  # where the guest writes on vdb (dd bs=64k seek=16)
GO_BLOCK = 100  # the 4 KiB block of vda's image the host writes its "go on" token into
GO = b"GO-ON-" + TOKEN.encode()


@pytest.fixture
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(request.param, tmp_path)
    yield d
    d.kill()


def workload() -> str:
    """The guest's side: wait for vdb, write + read it back, wait for it to go, then wait for
    the host's token on vda and use vda again."""
    return f"""
marker HOTPLUG-READY
n=0; while [ ! -b /dev/vdb ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
result sysblock ls /sys/block
yes {TOKEN} | head -c 65536 > /tmp/pat
result write dd if=/tmp/pat of=/dev/vdb bs=64k seek=16 oflag=direct conv=fsync
result_sh readback 'dd if=/dev/vdb bs=64k skip=16 count=1 iflag=direct 2>/dev/null | cmp - /tmp/pat'
marker HOTPLUG-WRITTEN
n=0; while [ -e /sys/block/vdb ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
result sysblock2 ls /sys/block
n=0
while ! dd if=/dev/vda bs=4096 skip={GO_BLOCK} count=1 iflag=direct 2>/dev/null \\
        | grep -q {GO.decode()} && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
result_sh go 'dd if=/dev/vda bs=4096 skip={GO_BLOCK} count=1 iflag=direct 2>/dev/null \\
        | grep -c {GO.decode()}'
result_sh other 'dd if=/tmp/pat of=/dev/vda bs=64k seek=32 oflag=direct conv=fsync 2>/dev/null \\
        && dd if=/dev/vda bs=64k skip=32 count=1 iflag=direct 2>/dev/null | cmp - /tmp/pat'
"""


MACHINES = {
    # machine -> (extra QEMU arguments, the bus device_add names)
    "pc": ((), None),
    "q35": (("-device", "pcie-root-port,id=hp0,bus=pcie.0,chassis=1"), "hp0"),
}


@pytest.mark.parametrize("daemon", DAEMONS, indirect=True)
@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_hotplug_add_use_and_remove_an_export(daemon: Daemon, machine: str,
                                              tmp_path: Path) -> None:
    disk0, hot = tmp_path / "disk0.img", tmp_path / "hot.img"
    for img in (disk0, hot):
        with img.open("wb") as f:
            f.truncate(64 << 20)
    sock0, sock1 = tmp_path / "exp0.sock", tmp_path / "exp1.sock"
    dmon = daemon.start(
        "--blockdev", f"driver=file,node-name=disk0,filename={disk0}",
        "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                    f"addr.path={sock0},writable=on",
    )
    qmp_path = tmp_path / "qemu.qmp"
    extra, bus = MACHINES[machine]
    guest = Guest(sock0, workload(), machine=machine, timeout=240,
                  extra_qemu_args=["-qmp", f"unix:{qmp_path},server=on,wait=off", *extra])
    with guest:
        guest.wait_for(r"^@@HOTPLUG-READY", 180)
        qemu = Monitor(qmp_path)
        try:
            dmon.cmd("blockdev-add", driver="file", **{"node-name": "hot0"}, filename=str(hot))
            dmon.cmd("block-export-add", type="vhost-user-blk", id="exp1",
                     **{"node-name": "hot0"}, addr={"type": "unix", "path": str(sock1)},
                     writable=True)
            plug(qemu, "vub1", sock1, bus=bus)
            guest.wait_for(r"^@@HOTPLUG-WRITTEN", 120)
            with hot.open("rb") as f:
                on_host = os.pread(f.fileno(), len(PATTERN), HOT_OFFSET)
            assert on_host == PATTERN, "the host does not see what the guest wrote on vdb"
            unplug(qemu, "vub1", timeout=60)
        finally:
            qemu.close()
        dmon.cmd("block-export-del", id="exp1")
        dmon.wait_event("BLOCK_EXPORT_DELETED", 10, id="exp1")
        dmon.cmd("blockdev-del", **{"node-name": "hot0"})
        exports = dmon.cmd("query-block-exports")
        assert [e["id"] for e in exports] == ["exp0"]
        with disk0.open("r+b") as f:  # the host's "go on": vda must still serve to see it
            os.pwrite(f.fileno(), GO, GO_BLOCK * 4096)
        res = guest.wait(120)
    assert res.done, guest.report()
    sysblock = res.text("sysblock").split()
    assert res.rc("sysblock") == 0 and "vdb" in sysblock, res.text("sysblock")
    assert res.rc("write") == 0, res.text("write")
    assert res.rc("readback") == 0, res.text("readback")
    assert "vdb" not in res.text("sysblock2").split(), res.text("sysblock2")
    assert res.rc("go") == 0 and res.text("go").strip() == "1", res.text("go")
    assert res.rc("other") == 0, res.text("other")
    assert daemon.quit() == 0, daemon.log
