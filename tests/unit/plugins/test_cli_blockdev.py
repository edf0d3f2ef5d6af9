"""The command line in qemu-storage-daemon's form: a RAM-disk plugin behind an error filter,
served with two queues and driven by a vhost-user frontend; close() runs at exit; usage errors
are one line and exit status 2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.cli_harness import REPO, Server, assert_one_line_error, run
from vhost_frontend import Frontend, FrontendMemory
from vhost_frontend.blk import BlkDriver
from virtio_blk.request import BlkFeature, Status

PLUGIN = """
from ramdisk import RamDisk


class Closing(RamDisk):
    def __init__(self, size, marker):
        super().__init__(size)
        self.marker = marker

    def close(self):
        with open(self.marker, "w") as f:
            f.write("closed")
"""


def test_python_plugin_served_over_two_queues(tmp_path: Path, servers: list[Server],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "closing.py").write_text(PLUGIN)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{REPO / 'examples'}")
    sock, marker, trigger = tmp_path / "s.sock", tmp_path / "closed", tmp_path / "fail"
    server = Server(
        "--blockdev", f"driver=python,node-name=ram,module=closing,class=Closing,size=4M,"
                      f"marker={marker}",
        "--blockdev", f"driver=error,node-name=err,file=ram,error-rate=1,error-write-rate=0,"
                      f"error-file={trigger}",
        "--export", f"type=vhost-user-blk,id=e0,node-name=err,addr.type=unix,addr.path={sock},"
                    "writable=on,num-queues=2")
    servers.append(server)
    line = server.started()
    assert "node err" in line and "2 queue(s)" in line
    fe = Frontend(sock)
    mem = FrontendMemory([(0, 8 << 20, 0)])
    try:
        fe.negotiate()
        assert fe.features & BlkFeature.DISCARD and fe.features & BlkFeature.WRITE_ZEROES
        assert not fe.features & BlkFeature.RO and not fe.features & BlkFeature.FLUSH
        fe.set_mem_table(mem)
        q0 = BlkDriver(fe, fe.setup_queue(0, size=64), mem)
        q1 = BlkDriver(fe, fe.setup_queue(1, size=64), mem)
        data = os.urandom(64 << 10)
        assert q0.write(2048, data).status == Status.OK
        assert q1.read(2048, len(data)).data == data  # one instance behind both queues
        assert q1.discard((2048, 8)).status == Status.OK
        got = q0.read(2048, 8192).data
        assert got == bytes(4096) + data[4096:8192]
        trigger.touch()  # the error filter fails reads now
        assert q0.read(2048, 4096).status == Status.IOERR
        trigger.unlink()
        assert q0.read(2048 + 8, 4096).data == data[4096:8192]  # the next read works
        rc, _took = server.terminate()
    finally:
        fe.close()
        mem.close()
    assert rc == 0
    assert marker.read_text() == "closed"  # close() ran at exit
    assert not any("Traceback" in ln for ln in server.lines)


def test_read_only_export_of_a_plugin(tmp_path: Path, servers: list[Server]) -> None:
    sock = tmp_path / "s.sock"
    server = Server("--blockdev", "driver=python,node-name=ram,module=examples.ramdisk,"
                    "class=RamDisk,size=1M",
                    "--export", f"type=vhost-user-blk,id=e0,node-name=ram,addr.type=unix,"
                    f"addr.path={sock}")
    servers.append(server)
    assert "read-only" in server.started()  # writable defaults to off, as in QSD
    fe = Frontend(sock)
    try:
        fe.negotiate()
        assert fe.features & BlkFeature.RO
    finally:
        fe.close()


@pytest.mark.parametrize(("args", "fragment"), [
    (["--blockdev", "driver=python,node-name=r,module=examples.ramdisk,class=RamDisk",
      "--export", "type=vhost-user-blk,id=a,node-name=r,addr.type=unix,addr.path={d}/a",
      "--export", "type=vhost-user-blk,id=b,node-name=r,addr.type=unix,addr.path={d}/b"],
     "Node 'r' is already exported by 'a'"),
    (["--blockdev", "driver=file,node-name=f,filename={d}/x,bogus=1",
      "--export", "type=vhost-user-blk,id=a,node-name=f,addr.type=unix,addr.path={d}/a"],
     "Parameter 'bogus' is unexpected"),
    (["--blockdev", "driver=python,node-name=r,module=examples.ramdisk,class=RamDisk",
      "--export", "type=nbd,id=a,node-name=r"], "Parameter 'type' does not accept value 'nbd'"),
    (["--blockdev", "driver=python,node-name=r,module=examples.ramdisk,class=RamDisk",
      "--export", "type=vhost-user-blk,id=a,node-name=q,addr.type=unix,addr.path={d}/a"],
     "Cannot find device='' nor node-name='q'"),
    (["--blockdev", "driver=python,node-name=r,module=examples.ramdisk,class=RamDisk,size=1000",
      "--export", "type=vhost-user-blk,id=a,node-name=r,addr.type=unix,addr.path={d}/a"],
     "not a multiple of the 512-byte block size"),
    (["--blockdev", "driver=python,node-name=r,module=examples.ramdisk,class=RamDisk"],
     "--blockdev needs an --export"),
    (["--blockdev", "driver=python,node-name=r,module=examples.ramdisk,class=RamDisk",
      "--export", "type=vhost-user-blk,id=a,node-name=r,addr.type=unix,addr.path={d}/a",
      "--image", "{d}/x"], "use one form or the other"),
])
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    proc = run(*[a.format(d=tmp_path) for a in args])
    assert_one_line_error(proc, fragment)
