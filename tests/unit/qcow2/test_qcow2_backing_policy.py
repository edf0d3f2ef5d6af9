"""The backing-file policy on the command line: a qcow2 chain may reach only regular files and
block devices inside the top image's directory or a ``--backing-dir``, never procfs/sysfs, a
FIFO or a character device -- refused in one line, exit 2, at every level of the chain and for
``--create --backing``; chains inside the allowed directories are served."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from blockdev.qcow2 import Qcow2Disk, Qcow2OpenError
from tests.unit.cli_harness import Server, assert_one_line_error, connect, run
from tests.unit.qcow2.helpers import KiB, MiB, needs_qemu_img, qemu_img, read

pytestmark = needs_qemu_img

SECRET = b"host secret " * 100


def _overlay(img: Path, backing: str, fmt: str = "raw") -> Path:
    """A qcow2 naming ``backing`` as given (-u: qemu-img does not open it)."""
    img.parent.mkdir(parents=True, exist_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, img, "1M")
    return img


def _secret(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(SECRET + bytes(MiB - len(SECRET)))
    path.chmod(0o600)
    return path


def _refused(tmp_path: Path, img: Path, *fragments: str, extra: tuple[str, ...] = ()) -> None:
    t0 = time.monotonic()
    proc = run("--socket", tmp_path / "s.sock", "--image", img, "--format", "qcow2", *extra)
    assert time.monotonic() - t0 < 15
    assert_one_line_error(proc, *fragments)


def test_refuses_a_file_outside_the_image_directory(tmp_path: Path) -> None:
    secret = _secret(tmp_path / "elsewhere" / "secret.raw")
    img = _overlay(tmp_path / "vm" / "top.qcow2", str(secret))
    _refused(tmp_path, img, str(secret), "outside", "--backing-dir")


def test_refuses_a_dotdot_escape(tmp_path: Path) -> None:
    _secret(tmp_path / "secret.raw")
    img = _overlay(tmp_path / "vm" / "top.qcow2", "../secret.raw")
    _refused(tmp_path, img, "secret.raw", "outside", "--backing-dir")


def test_refuses_a_symlink_in_the_directory_that_leads_outside(tmp_path: Path) -> None:
    secret = _secret(tmp_path / "elsewhere" / "secret.raw")
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / "base.raw").symlink_to(secret)
    img = _overlay(tmp_path / "vm" / "top.qcow2", "base.raw")
    _refused(tmp_path, img, "base.raw", f"resolves to {secret}", "--backing-dir")


@pytest.mark.parametrize("allow", [(), ("--backing-dir", "/proc")])
def test_refuses_proc_self_mem(tmp_path: Path, allow: tuple[str, ...]) -> None:
    img = _overlay(tmp_path / "top.qcow2", "/proc/self/mem")
    _refused(tmp_path, img, "/proc/self/mem", "refused", "--backing-dir", extra=allow)
    if allow:  # inside an allowed directory, procfs is still refused
        _refused(tmp_path, img, "procfs", extra=allow)


def test_refuses_sysfs_even_under_backing_dir(tmp_path: Path) -> None:
    img = _overlay(tmp_path / "top.qcow2", "/sys/kernel/mm/transparent_hugepage/enabled")
    if not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        pytest.skip("no such sysfs file here")
    _refused(tmp_path, img, "sysfs", "--backing-dir", extra=("--backing-dir", "/sys"))


def test_refuses_a_fifo_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "base.raw")
    img = _overlay(tmp_path / "top.qcow2", "base.raw")
    _refused(tmp_path, img, "base.raw", "a FIFO", "--backing-dir")


@pytest.mark.parametrize("where", ["link", "dir"])
def test_refuses_a_character_device(tmp_path: Path, where: str) -> None:
    if where == "link":  # a symlink in the image's directory to /dev/zero
        (tmp_path / "base.raw").symlink_to("/dev/zero")
        img = _overlay(tmp_path / "top.qcow2", "base.raw")
        _refused(tmp_path, img, "base.raw", "character device", "--backing-dir")
    else:  # /dev allowed: still not a character device
        img = _overlay(tmp_path / "top.qcow2", "/dev/zero")
        _refused(tmp_path, img, "/dev/zero", "character device",
                 extra=("--backing-dir", "/dev"))


def test_refuses_at_the_second_level_of_a_chain(tmp_path: Path) -> None:
    """mid.qcow2 is inside the image's directory; its own backing file is not."""
    secret = _secret(tmp_path / "elsewhere" / "secret.raw")
    _overlay(tmp_path / "vm" / "mid.qcow2", str(secret))
    img = _overlay(tmp_path / "vm" / "top.qcow2", "mid.qcow2", "qcow2")
    _refused(tmp_path, img, "mid.qcow2", str(secret), "outside")


def test_second_level_resolves_next_to_its_referrer(tmp_path: Path) -> None:
    """A relative name resolves against the directory of the image that names it (QEMU's
    rule): lib/mid.qcow2's "base.raw" is lib/base.raw, which --backing-dir lib allows, while
    the top image's directory holds a decoy of the same name that must not be used."""
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / "base.raw").write_bytes(b"decoy" * 1000)
    _secret(tmp_path / "lib" / "base.raw")
    _overlay(tmp_path / "lib" / "mid.qcow2", "base.raw")
    img = _overlay(tmp_path / "vm" / "top.qcow2", str(tmp_path / "lib" / "mid.qcow2"), "qcow2")
    _refused(tmp_path, img, "mid.qcow2", "outside")
    disk = Qcow2Disk(img, read_only=True, backing_dirs=[str(tmp_path / "lib")])
    try:
        assert read(disk, 0, len(SECRET)) == SECRET
    finally:
        disk.close()


def test_create_refuses_a_backing_file_outside(tmp_path: Path) -> None:
    secret = _secret(tmp_path / "elsewhere" / "secret.raw")
    (tmp_path / "vm").mkdir()
    img = tmp_path / "vm" / "new.qcow2"
    _refused(tmp_path, img, str(secret), "outside", "--backing-dir",
             extra=("--create", "1M", "--backing", str(secret), "--backing-format", "raw"))
    assert not img.exists()


def test_backing_dir_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    img = _overlay(tmp_path / "top.qcow2", "base.raw")
    _refused(tmp_path, img, "--backing-dir", str(tmp_path / "nope"),
             extra=("--backing-dir", str(tmp_path / "nope")))


def _served(tmp_path: Path, servers: list[Server], img: Path, expect: bytes,
            *extra: str) -> None:
    server = Server("--socket", tmp_path / "s.sock", "--image", img, "--format", "qcow2",
                    "--aio", "threads", *extra)
    servers.append(server)
    server.started()
    fe, mem, drv = connect(tmp_path / "s.sock")
    try:
        assert drv.read(0, len(expect)).data == expect
    finally:
        fe.close()
        mem.close()
    assert server.terminate()[0] == 0


def test_serves_a_chain_inside_the_image_directory(tmp_path: Path,
                                                   servers: list[Server]) -> None:
    """Subdirectories and symlinks that stay inside the directory are fine."""
    data = os.urandom(64 * KiB)
    (tmp_path / "vm" / "bases").mkdir(parents=True)
    (tmp_path / "vm" / "bases" / "base.raw").write_bytes(data)
    (tmp_path / "vm" / "current.raw").symlink_to("bases/base.raw")
    _overlay(tmp_path / "vm" / "bases" / "mid.qcow2", "../current.raw")
    img = _overlay(tmp_path / "vm" / "top.qcow2", "bases/mid.qcow2", "qcow2")
    _served(tmp_path, servers, img, data)


def test_serves_a_chain_under_backing_dir(tmp_path: Path, servers: list[Server]) -> None:
    data = os.urandom(64 * KiB)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "base.raw").write_bytes(data)
    _overlay(tmp_path / "lib" / "mid.qcow2", "base.raw")
    img = _overlay(tmp_path / "vm" / "top.qcow2", str(tmp_path / "lib" / "mid.qcow2"), "qcow2")
    _served(tmp_path, servers, img, data, "--backing-dir", str(tmp_path / "lib"))


def test_create_with_backing_dir_is_served(tmp_path: Path, servers: list[Server]) -> None:
    data = os.urandom(64 * KiB)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "base.raw").write_bytes(data)
    (tmp_path / "vm").mkdir()
    _served(tmp_path, servers, tmp_path / "vm" / "new.qcow2", data,
            "--create", "1M", "--backing", str(tmp_path / "lib" / "base.raw"),
            "--backing-format", "raw", "--backing-dir", str(tmp_path / "lib"))


def test_policy_errors_in_process(tmp_path: Path) -> None:
    """The library refuses as the command does (the policy is the image's, not the CLI's)."""
    os.mkfifo(tmp_path / "f.raw")
    img = _overlay(tmp_path / "top.qcow2", "f.raw")
    # A writer keeps an open without O_NONBLOCK from hanging this test: the refusal is
    # checked here, the hang by test_refuses_a_fifo_without_hanging.
    writer = os.open(tmp_path / "f.raw", os.O_RDWR | os.O_NONBLOCK)
    try:
        with pytest.raises(Qcow2OpenError, match="FIFO"):
            Qcow2Disk(img)
    finally:
        os.close(writer)


def test_serves_a_block_device_under_backing_dir(tmp_path: Path, servers: list[Server]) -> None:
    """A block device is a valid backing file (its size comes from lseek: fstat says 0)."""
    data = os.urandom(64 * KiB)
    (tmp_path / "dev.raw").write_bytes(data + bytes(MiB - len(data)))
    attach = subprocess.run(["losetup", "-f", "--show", "-r", tmp_path / "dev.raw"],
                            capture_output=True, text=True, check=False)
    if attach.returncode != 0:
        pytest.skip(f"no loop device: {attach.stderr.strip()}")
    dev = attach.stdout.strip()
    try:
        img = _overlay(tmp_path / "top.qcow2", dev)
        _refused(tmp_path, img, dev, "outside")  # /dev is not allowed by default
        _served(tmp_path, servers, img, data, "--backing-dir", "/dev")
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
