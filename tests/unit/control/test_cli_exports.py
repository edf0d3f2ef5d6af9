"""The command with qemu-storage-daemon's options for several exports: --chardev/--monitor,
@FILE argument files, --daemonize/--pidfile, and its usage errors (one line, exit 2)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.unit.cli_harness import (
    REPO,
    TIMEOUT,
    Server,
    assert_one_line_error,
    command,
    connect,
    qmp,
    run,
)
from virtio_blk.request import Status

MiB = 1 << 20


def _images(tmp: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        path = tmp / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(4 * MiB)
        out.append(path)
    return out


def _qsd_args(tmp: Path) -> list[str]:
    a, b = _images(tmp, "a", "b")
    return [
        "--blockdev", f"driver=file,node-name=fa,filename={a}",
        "--blockdev", "driver=raw,node-name=ra,file=fa",
        "--blockdev", f'{{"driver": "file", "node-name": "fb", "filename": "{b}"}}',
        "--export", f"type=vhost-user-blk,id=ea,node-name=ra,writable=on,"
                    f"addr.type=unix,addr.path={tmp}/a.sock",
        "--export", f"type=vhost-user-blk,id=eb,node-name=fb,writable=on,num-queues=2,"
                    f"addr.type=unix,addr.path={tmp}/b.sock",
        "--chardev", f"socket,id=m0,path={tmp}/qmp0.sock,server=on,wait=off",
        "--chardev", f"socket,id=m1,path={tmp}/qmp1.sock,server=on,wait=off",
        "--monitor", "chardev=m0", "--monitor", "chardev=m1,mode=control",
    ]


def test_two_exports_and_two_monitors_from_an_argument_file(tmp_path: Path) -> None:
    """@FILE holds QSD's options (as the systemd unit gives them); both exports serve, both
    monitors answer, SIGTERM exits 0 and both exports report that they stopped."""
    lines = []
    args = _qsd_args(tmp_path)
    for opt, value in zip(args[::2], args[1::2], strict=True):
        lines.append(f"{opt} '{value}'  # a comment")
    argfile = tmp_path / "server.args"
    argfile.write_text("\n".join(["# QSD options", *lines, ""]))
    server = Server(f"@{argfile}")
    try:
        server.wait_for(r"export eb serving")
        server.wait_for(r"QMP on .*qmp1.sock")
        for sock, byte in ((tmp_path / "a.sock", b"\xaa"), (tmp_path / "b.sock", b"\xbb")):
            fe, _, drv = connect(sock)
            try:
                assert drv.write(0, byte * 512).status == Status.OK
            finally:
                fe.close()
        assert (tmp_path / "a.img").read_bytes()[:512] == b"\xaa" * 512
        assert (tmp_path / "b.img").read_bytes()[:512] == b"\xbb" * 512
        (exports,) = qmp(tmp_path / "qmp0.sock", '{"execute": "query-block-exports"}')
        assert [e["id"] for e in exports["return"]] == ["ea", "eb"]
        (stats,) = qmp(tmp_path / "qmp1.sock",
                       '{"execute": "query-blockstats", "arguments": {"query-nodes": true}}')
        wr = {s["node-name"]: s["stats"]["wr_operations"] for s in stats["return"]}
        assert wr == {"fa": 0, "ra": 1, "fb": 1}
        rc, _ = server.terminate()
        assert rc == 0, server.lines
        assert any("export ea stopped: 1 requests" in ln for ln in server.lines)
        assert any("export eb stopped: 1 requests" in ln for ln in server.lines)
        assert not (tmp_path / "a.sock").exists() and not (tmp_path / "qmp0.sock").exists()
    finally:
        server.kill()


def test_daemonize_and_pidfile(tmp_path: Path) -> None:
    """QSD's --daemonize: the command returns 0 once the exports listen; the pid file names
    the server, which SIGTERM stops (removing the pid file)."""
    pidfile = tmp_path / "pid"
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.run(command(*_qsd_args(tmp_path), "--daemonize",
                                      "--pidfile", pidfile),
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                              timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()
    # Listening already when the command returned: no waiting here.
    assert (tmp_path / "a.sock").exists() and (tmp_path / "b.sock").exists()
    pid = int(pidfile.read_text())
    try:
        fe, _, drv = connect(tmp_path / "b.sock")
        try:
            assert drv.read(0, 512).status == Status.OK
        finally:
            fe.close()
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + TIMEOUT
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists()


def test_daemonize_reports_a_failed_start(tmp_path: Path) -> None:
    """The parent exits non-zero when the server fails before listening (stderr says why)."""
    args = _qsd_args(tmp_path)
    (tmp_path / "a.img").unlink()
    proc = subprocess.run(command(*args, "--daemonize"), cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode != 0
    assert "a.img" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--chardev", "socket,id=m9,path={d}/q.sock,server=on,wait=on"], "wait=on is not"),
    (["--chardev", "socket,id=m0,path={d}/q.sock,server=on,wait=off"],
     "duplicate property 'm0'"),
    (["--monitor", "chardev=nope"], 'chardev "nope" not found'),
    (["--monitor", "chardev=m0,mode=readline"], "Only QMP is supported"),
    (["--monitor", "chardev=m0"], 'chardev "m0" is already used'),
    (["--export", "type=vhost-user-blk,id=ea,node-name=fb,addr.type=unix,addr.path={d}/c"],
     "Block export id 'ea' is already in use"),
    (["--export", "type=vhost-user-blk,id=ec,node-name=fb,addr.type=unix,addr.path={d}/a.sock"],
     "listen on the same address"),
    (["--pidfile", "{d}/no/such/dir/pid"], "Cannot write pid file"),
    (["--object", "nope,id=x"],
     "--object nope,id=x: Parameter 'qom-type' does not accept value 'nope'"),
])
def test_usage_errors(tmp_path: Path, extra: list[str], fragment: str) -> None:
    args = _qsd_args(tmp_path) + [a.format(d=tmp_path) for a in extra]
    proc = run(*args)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "a.sock").exists()  # nothing left behind


def test_a_monitor_alone_starts_a_server_for_qmp_to_fill(tmp_path: Path) -> None:
    """QSD starts with no export when a monitor can add some; without one it is an error."""
    assert_one_line_error(run("--blockdev", f"driver=file,node-name=f,filename={tmp_path}/x"),
                          "needs an --export")
    server = Server("--chardev", f"socket,id=m,path={tmp_path}/q.sock,server=on,wait=off",
                    "--monitor", "chardev=m")
    try:
        server.wait_for("QMP on")
        (img,) = _images(tmp_path, "n")
        replies = qmp(tmp_path / "q.sock",
                      '{"execute": "blockdev-add", "arguments": {"driver": "file", '
                      f'"node-name": "n", "filename": "{img}"}}}}',
                      '{"execute": "block-export-add", "arguments": {"type": "vhost-user-blk",'
                      f' "id": "e", "node-name": "n", "addr": {{"type": "unix", "path": '
                      f'"{tmp_path}/n.sock"}}}}}}',
                      '{"execute": "quit"}')
        assert replies == [{"return": {}}] * 3
        assert server.proc.wait(TIMEOUT) == 0
    finally:
        server.kill()
