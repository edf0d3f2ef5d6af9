"""A server refused by the image lock writes nothing to the image (issue 19 item 4): opening a
qcow2 image writes nothing at all; the autoclear bits are cleared by the first change, after
the lock was taken."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.cli_harness import REPO, Server, assert_one_line_error, connect, run
from tests.unit.qcow2.helpers import check, check_rc, needs_qemu_img, qemu_img, qemu_io
from virtio_blk.request import Status

pytestmark = needs_qemu_img

AUTOCLEAR = 88  # header offset of the autoclear feature bits

_HOLDER = """
import os, sys, time
from blockdev.image_lock import lock_image
fd = os.open(sys.argv[1], os.O_RDONLY)  # never writes: only takes QEMU's lock bytes
lock_image(fd, sys.argv[1], writable=True)
print("locked", flush=True)
time.sleep(600)
"""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _autoclear(img: Path) -> int:
    with open(img, "rb") as f:
        return int.from_bytes(os.pread(f.fileno(), 8, AUTOCLEAR), "big")


@pytest.fixture
def bitmap_image(tmp_path: Path) -> Path:
    """A qcow2 with data, lazy refcounts and a persistent dirty bitmap (autoclear bit 0 set,
    the bitmaps extension): everything the open path could be tempted to write."""
    img = tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "4M")
    qemu_io(img, "write -P 0x5a 0 128k")
    qemu_img("bitmap", "--add", img, "b0")
    assert _autoclear(img) & 1
    return img


@pytest.fixture
def python_holder(bitmap_image: Path) -> Iterator[subprocess.Popen[str]]:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, bitmap_image],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait(10)


def test_refused_server_leaves_the_image_byte_identical(
        tmp_path: Path, bitmap_image: Path, python_holder: subprocess.Popen[str]) -> None:
    before = _digest(bitmap_image)
    proc = run("--socket", tmp_path / "s.sock", "--image", bitmap_image, "--format", "qcow2")
    assert _digest(bitmap_image) == before
    assert _autoclear(bitmap_image) & 1
    assert_one_line_error(proc, "lock")


def test_refused_by_a_second_instance_of_this_server(tmp_path: Path, bitmap_image: Path,
                                                     servers: list[Server]) -> None:
    first = Server("--socket", tmp_path / "a.sock", "--image", bitmap_image, "--format",
                   "qcow2")
    servers.append(first)
    first.started()
    before = _digest(bitmap_image)
    proc = run("--socket", tmp_path / "b.sock", "--image", bitmap_image, "--format", "qcow2")
    assert _digest(bitmap_image) == before
    assert_one_line_error(proc, "lock")
    assert _autoclear(bitmap_image) & 1  # neither server has written: the bitmaps still hold
    assert first.terminate()[0] == 0


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                    reason="qemu-storage-daemon is needed")
def test_refused_by_qemu_storage_daemon_leaves_its_bitmaps_alone(tmp_path: Path,
                                                                 bitmap_image: Path) -> None:
    sock = tmp_path / "qsd.sock"
    qsd = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=f,filename={bitmap_image}",
         "--blockdev", "driver=qcow2,node-name=q,file=f",
         "--export", f"type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={sock}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert qsd.poll() is None, qsd.communicate()[1]
            assert time.monotonic() < deadline, "qemu-storage-daemon did not start"
            time.sleep(0.05)
        before = _digest(bitmap_image)  # after QSD marked its bitmaps in use
        proc = run("--socket", tmp_path / "s.sock", "--image", bitmap_image, "--format",
                   "qcow2")
        assert _digest(bitmap_image) == before
        assert_one_line_error(proc, "lock")
    finally:
        qsd.terminate()
        qsd.wait(10)
    assert "b0" in str(qemu_img("info", "--output=json", bitmap_image))
    check(bitmap_image)


def test_autoclear_is_cleared_by_the_first_write_only(tmp_path: Path, bitmap_image: Path,
                                                      servers: list[Server]) -> None:
    """Served and only read: the image is untouched.  Then the first write clears the bits
    (the spec's rule for software that does not maintain the bitmaps) before it lands."""
    before = _digest(bitmap_image)
    server = Server("--socket", tmp_path / "s.sock", "--image", bitmap_image, "--format",
                    "qcow2")
    servers.append(server)
    server.started()
    fe, mem, drv = connect(tmp_path / "s.sock")
    try:
        assert drv.read(0, 4096).data == b"\x5a" * 4096
        assert _digest(bitmap_image) == before
        assert drv.write(8, b"\x11" * 4096).status == Status.OK  # in place: the fast path
        assert _autoclear(bitmap_image) == 0
    finally:
        fe.close()
        mem.close()
    assert server.terminate()[0] == 0
    # With the bits clear QEMU no longer trusts the bitmaps extension: its two clusters (the
    # bitmap directory and table) show as leaks, nothing worse.
    assert check_rc(bitmap_image) == 3
    qemu_io(bitmap_image, "read -P 0x11 4k 4k", "read -P 0x5a 8k 120k")
