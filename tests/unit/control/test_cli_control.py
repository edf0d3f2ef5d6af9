"""The command with --qmp and --metrics: user errors, and a start the way systemd's socket unit
starts it (the listening socket as fd 3, LISTEN_FDS/LISTEN_PID set, ``--fd 3``)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.cli_harness import REPO, TIMEOUT, Server, assert_one_line_error, connect, qmp, run
from virtio_blk.request import Status

UNITS = REPO / "qemu-configs" / "systemd"


def test_bad_metrics_address(tmp_path: Path, image: Path) -> None:
    proc = run("--socket", tmp_path / "s.sock", "--image", image, "--metrics", "9100")
    assert proc.returncode == 2 and "--metrics" in proc.stderr and "HOST:PORT" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_metrics_port_in_use(tmp_path: Path, image: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run("--socket", tmp_path / "s.sock", "--image", image,
                   "--qmp", tmp_path / "q.sock", "--metrics", f"127.0.0.1:{port}")
    assert_one_line_error(proc, f"--metrics 127.0.0.1:{port}", "in use")
    # Nothing left behind: neither socket file.
    assert not (tmp_path / "s.sock").exists() and not (tmp_path / "q.sock").exists()


def test_qmp_path_that_cannot_be_bound(tmp_path: Path, image: Path) -> None:
    proc = run("--socket", tmp_path / "s.sock", "--image", image,
               "--qmp", tmp_path / "no" / "such" / "dir" / "q.sock")
    assert_one_line_error(proc, "--qmp", "cannot bind")
    assert not (tmp_path / "s.sock").exists()


def activated_server(listener: socket.socket, *args: str | os.PathLike[str]) -> Server:
    """The server started as systemd starts a socket-activated service."""
    fd = listener.fileno()
    # bash sets fd 3 to the socket and execs the server in its own process, so LISTEN_PID
    # ($$ of the shell) is the server's pid, as systemd sets it.
    script = f'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@" 3<&{fd} {fd}<&-'
    return Server(*args, pass_fds=[fd], launcher=["bash", "-c", script, "bash"])



def test_socket_activation_with_qmp_and_metrics(tmp_path: Path, image: Path,
                                                servers: list[Server]) -> None:
    sock_path = tmp_path / "vhost.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # what systemd binds
    listener.bind(str(sock_path))
    listener.listen()
    qmp_path = tmp_path / "vm1.qmp"
    server = activated_server(listener, "--fd", "3", "--image", image, "--qmp", qmp_path,
                             "--metrics", "127.0.0.1:0", "--node-name", "vm1-disk",
                             "--export-id", "vm1")
    servers.append(server)
    server.started()
    found = re.search(r"metrics on port (\d+)", server.wait_for("metrics on port"))
    assert found is not None
    port = int(found.group(1))
    fe, mem, drv = connect(sock_path)
    try:
        assert drv.write(0, b"\x42" * 4096).status == Status.OK
        assert drv.read(0, 4096).data == b"\x42" * 4096
        exports, stats = qmp(qmp_path, '{"execute": "query-block-exports"}',
                             '{"execute": "query-blockstats"}')
        assert exports["return"] == [{"type": "vhost-user-blk", "id": "vm1",
                                      "node-name": "vm1-disk", "shutting-down": False}]
        assert stats["return"][0]["stats"]["wr_operations"] == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert samples[("vhost_user_blk_requests_total",
                        (("export", "vm1"), ("op", "write"), ("queue", "0")))] == 1
        assert samples[("vhost_user_blk_frontend_connected", (("export", "vm1"),))] == 1
        # quit takes the SIGTERM path: exit 0, QMP socket removed, the activation socket kept.
        (reply,) = qmp(qmp_path, '{"execute": "quit"}')
        assert reply == {"return": {}}
        assert server.proc.wait(TIMEOUT) == 0
    finally:
        fe.close()
        mem.close()
    assert not qmp_path.exists()
    assert sock_path.exists()  # systemd's, not the server's, to remove
    # systemd starts the next instance on the same socket: it serves again.
    again = activated_server(listener, "--fd", "3", "--image", image)
    servers.append(again)
    again.started()
    fe, mem, drv = connect(sock_path)
    try:
        assert drv.read(0, 4096).data == b"\x42" * 4096
    finally:
        fe.close()
        mem.close()
    rc, _ = again.terminate()
    assert rc == 0
    listener.close()


def test_systemd_units_verify(tmp_path: Path) -> None:
    """The units in qemu-configs/systemd pass ``systemd-analyze verify`` as an instance."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (the systemd package; .ci/run installs it)"
    server = shutil.which("vhost-user-blk") or "/bin/true"
    for unit in ("vhost-user-blk@.socket", "vhost-user-blk@.service"):
        text = (UNITS / unit).read_text().replace("/usr/local/bin/vhost-user-blk", server)
        (tmp_path / unit.replace("@.", "@vm1.")).write_text(text)
    proc = subprocess.run([analyze, "verify", "--man=no", "vhost-user-blk@vm1.socket",
                           "vhost-user-blk@vm1.service"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--fd 3" in (UNITS / "vhost-user-blk@.service").read_text()


@pytest.mark.parametrize("name", ["1disk", "disk 0", "", "a" * 32, "disk/0"])
def test_node_name_and_export_id_follow_qemus_rule(tmp_path: Path, image: Path,
                                                   name: str) -> None:
    for option in ("--node-name", "--export-id"):
        proc = run("--socket", tmp_path / "s.sock", "--image", image, option, name)
        assert proc.returncode == 2 and option in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1
