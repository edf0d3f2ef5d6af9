"""Image locking (``--locking``): QEMU's lock bytes, so this server, QEMU's tools and
qemu-storage-daemon refuse each other's images as two QEMUs would; ``--locking off`` shares."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from blockdev.image_lock import ImageLockError, lock_image
from tests.unit.cli_harness import REPO, Server, assert_one_line_error, connect, run

requires_qemu_tools = pytest.mark.skipif(
    shutil.which("qemu-io") is None or shutil.which("qemu-storage-daemon") is None,
    reason="qemu-io / qemu-storage-daemon not installed (.ci/run installs them)",
)


def _open(path: Path, writable: bool) -> int:
    return os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)


# ---------------------------------------------------------------- the lock bytes, in-process
# OFD locks belong to open file descriptions, so two open()s in one process conflict like two
# processes do.
@pytest.mark.parametrize(("first_rw", "second_rw", "conflict"), [
    (True, True, True), (True, False, True), (False, True, True), (False, False, False)],
    ids=["rw-rw", "rw-ro", "ro-rw", "ro-ro"])
def test_lock_conflicts(image: Path, first_rw: bool, second_rw: bool, conflict: bool) -> None:
    a, b = _open(image, first_rw), _open(image, second_rw)
    try:
        lock_image(a, str(image), first_rw)
        if conflict:
            with pytest.raises(ImageLockError, match='"write" lock') as info:
                lock_image(b, str(image), second_rw)
            assert str(image) in str(info.value) and not info.value.unsupported
        else:
            lock_image(b, str(image), second_rw)
    finally:
        os.close(a)
        os.close(b)


def test_lock_goes_with_the_fd(image: Path) -> None:
    a = _open(image, True)
    lock_image(a, str(image), True)
    os.close(a)
    b = _open(image, True)
    try:
        lock_image(b, str(image), True)  # the first holder is gone: free again
    finally:
        os.close(b)


def test_qemu_lock_bytes_are_taken(image: Path) -> None:
    """Bytes 100 (consistent read), 101 (write), 201 (write not shared), 203 (resize not
    shared): what QEMU's raw_check_lock_bytes probes."""
    a = _open(image, True)
    try:
        lock_image(a, str(image), True)
        with open(f"/proc/self/fdinfo/{a}") as f:
            info = f.read()
        taken: set[int] = set()
        for line in info.splitlines():  # "lock: 1: OFDLCK ADVISORY READ -1 dev:ino START END"
            if line.startswith("lock:") and "OFDLCK" in line and " READ " in line:
                start, end = map(int, line.split()[-2:])  # adjacent bytes come merged
                taken.update(range(start, end + 1))
        assert sorted(taken) == [100, 101, 201, 203], info
    finally:
        os.close(a)


# ---------------------------------------------------------------- the command
def test_second_server_on_the_image_is_refused(tmp_path: Path, image: Path,
                                               servers: list[Server]) -> None:
    first = Server("--socket", tmp_path / "a.sock", "--image", image, "--aio", "threads")
    servers.append(first)
    first.started()
    proc = run("--socket", tmp_path / "b.sock", "--image", image)
    assert_one_line_error(proc, '"write" lock', str(image), "--locking off")
    assert not (tmp_path / "b.sock").exists()
    proc = run("--socket", tmp_path / "b.sock", "--image", image, "--read-only")
    assert_one_line_error(proc, 'shared "write" lock')
    fe, mem, drv = connect(tmp_path / "a.sock")  # the first one still serves
    try:
        assert drv.read(0, 512).status == 0
    finally:
        fe.close()
        mem.close()


def test_locking_off_shares_the_image(tmp_path: Path, image: Path, servers: list[Server]) -> None:
    """The migration setup: source and destination servers on one image."""
    for name in ("src", "dst"):
        server = Server("--socket", tmp_path / f"{name}.sock", "--image", image, "--aio",
                        "threads", "--locking", "off")
        servers.append(server)
        server.started()
    for name in ("src", "dst"):
        fe, mem, drv = connect(tmp_path / f"{name}.sock")
        try:
            assert drv.write(0, bytes([ord(name[0])]) * 512).status == 0
            assert drv.read(0, 512).data == bytes([ord(name[0])]) * 512
        finally:
            fe.close()
            mem.close()


@requires_qemu_tools
def test_qemu_tools_and_this_server_refuse_each_other(tmp_path: Path, image: Path,
                                                      servers: list[Server]) -> None:
    server = Server("--socket", tmp_path / "a.sock", "--image", image, "--aio", "threads")
    servers.append(server)
    server.started()
    io = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 512", str(image)], cwd=REPO,
                        capture_output=True, text=True, timeout=30, check=False)
    assert io.returncode != 0 and 'Failed to get "write" lock' in io.stderr, io.stderr
    io = subprocess.run(["qemu-io", "-f", "raw", "-U", "-r", "-c", "read 0 512", str(image)],
                        capture_output=True, text=True, timeout=30, check=False)
    assert io.returncode == 0, io.stderr  # --force-share reads, as with a running VM
    server.terminate()

    qsd = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev",
         f"driver=file,node-name=f0,filename={image}", "--export",
         f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
         f"addr.path={tmp_path / 'q.sock'},writable=on"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            if (tmp_path / "q.sock").exists():
                break
            assert qsd.poll() is None, qsd.communicate()[1]
            subprocess.run(["sleep", "0.05"], check=True)
        proc = run("--socket", tmp_path / "b.sock", "--image", image)
        assert_one_line_error(proc, '"write" lock')
        shared = Server("--socket", tmp_path / "b.sock", "--image", image, "--aio", "threads",
                        "--locking", "off")
        servers.append(shared)
        shared.started()  # off: nothing taken, nothing checked
    finally:
        qsd.terminate()
        qsd.wait(10)
