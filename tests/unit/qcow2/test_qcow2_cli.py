"""``--format qcow2`` on the command line: refusals (one line, exit 2) and a served image."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from blockdev.qcow2.format import OFLAG_COPIED
from tests.unit.cli_harness import Server, assert_one_line_error, connect, run
from tests.unit.qcow2.helpers import (
    KiB,
    MiB,
    check,
    compare,
    info,
    needs_qemu_img,
    qemu_img,
    qemu_io,
    write_raw,
)
from virtio_blk.request import Status

pytestmark = needs_qemu_img


def _serve_args(tmp_path: Path, img: Path, *extra: str) -> list[str | Path]:
    return ["--socket", tmp_path / "s.sock", "--image", img, *extra]


def _poke(img: Path, offset: int, fmt: str, *values: int) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def test_refuses_a_raw_file_as_qcow2(tmp_path: Path) -> None:
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(MiB))
    assert_one_line_error(run(*_serve_args(tmp_path, raw, "--format", "qcow2")),
                          "not a qcow2 image")


@pytest.mark.parametrize("offset,fmt,value,fragment", [
    (72, ">Q", 1 << 33, "unknown incompatible feature bits"),
    (32, ">I", 2, "encrypted"),
    (40, ">Q", 1 << 40, "L1 table"),
    (72, ">Q", 1, "dirty"),
])
def test_refuses_bad_images(tmp_path: Path, offset: int, fmt: str, value: int,
                            fragment: str) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    _poke(img, offset, fmt, value)
    assert_one_line_error(run(*_serve_args(tmp_path, img, "--format", "qcow2")), fragment)


def test_refuses_external_data_file(tmp_path: Path) -> None:
    img = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'x.raw'}", img, "1M")
    assert_one_line_error(run(*_serve_args(tmp_path, img, "--format", "qcow2")),
                          "external data file")


@pytest.mark.parametrize("args,fragment", [
    (["--backing", "b.raw", "--backing-format", "raw"], "--backing needs --create"),
    (["--create", "1M", "--backing", "b.raw"], "go together"),
    (["--create", "1M", "--backing", "nope.raw", "--backing-format", "raw"], "does not exist"),
    (["--direct"], "--direct is not supported"),
    (["--format", "vmdk"], "invalid choice"),
])
def test_refuses_bad_options(tmp_path: Path, args: list[str], fragment: str) -> None:
    img = tmp_path / "new.qcow2"
    if "--create" not in args and "--backing" not in args:
        qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    proc = run(*_serve_args(tmp_path, img, "--format", "qcow2", *args))
    if fragment == "invalid choice":  # argparse's own line: "vhost-user-blk: error: ..."
        assert proc.returncode == 2
        assert len(proc.stderr.splitlines()) == 1 and fragment in proc.stderr
    else:
        assert_one_line_error(proc, fragment)


def test_raw_with_a_qcow2_header_is_still_raw(tmp_path: Path, servers: list[Server]) -> None:
    """The format is never probed: a guest that wrote a qcow2 header (naming a host file as
    its backing file) gets its own bytes back, not the host file."""
    img = tmp_path / "q.img"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", img, "1M")
    os.truncate(img, MiB)
    header = img.read_bytes()[:512]
    server = Server(*_serve_args(tmp_path, img, "--aio", "threads"))
    servers.append(server)
    assert " bytes, raw," in server.started()
    fe, mem, drv = connect(tmp_path / "s.sock")
    try:
        assert drv.read(0, 512).data == header
    finally:
        fe.close()
        mem.close()
    assert server.terminate()[0] == 0


def test_create_overlay_and_serve_with_two_queues(tmp_path: Path, servers: list[Server]) -> None:
    base = os.urandom(2 * MiB)
    write_raw(tmp_path / "base.raw", base)
    img = tmp_path / "top.qcow2"
    server = Server(*_serve_args(tmp_path, img, "--format", "qcow2", "--create", "4M",
                                 "--backing", "base.raw", "--backing-format", "raw",
                                 "--num-queues", "2"))
    servers.append(server)
    line = server.started()
    assert " bytes, qcow2," in line and "aio=" in line
    assert info(img)["backing-filename-format"] == "raw"
    model = bytearray(base + bytes(2 * MiB))
    fe, mem, drv = connect(tmp_path / "s.sock")
    try:
        assert drv.read(0, 64 * KiB).data == model[:64 * KiB]
        data = os.urandom(12 * KiB)
        assert drv.write(1, data).status == Status.OK  # partial clusters: COW from the base
        model[512:512 + len(data)] = data
        assert drv.write(3 * MiB // 512, data).status == Status.OK
        model[3 * MiB:3 * MiB + len(data)] = data
        assert drv.discard((1 * MiB // 512, 128)).status == Status.OK  # 64k: one cluster
        model[MiB:MiB + 64 * KiB] = bytes(64 * KiB)
        assert drv.write_zeroes((2 * MiB // 512 - 8, 16)).status == Status.OK
        model[2 * MiB - 4 * KiB:2 * MiB + 4 * KiB] = bytes(8 * KiB)
        assert drv.flush().status == Status.OK
        for off in range(0, 4 * MiB, MiB // 2):
            assert drv.read(off // 512, MiB // 2).data == model[off:off + MiB // 2]
    finally:
        fe.close()
        mem.close()
    assert server.terminate()[0] == 0
    check(img)
    compare(write_raw(tmp_path / "m.raw", model), img)


def test_bad_metadata_at_run_time_fails_that_request(tmp_path: Path,
                                                     servers: list[Server]) -> None:
    img = tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x42 0 64k", "write -P 0x43 1M 64k")
    with open(img, "rb") as f:
        l1 = struct.unpack(">Q", os.pread(f.fileno(), 8, 40))[0]
        l2 = struct.unpack(">Q", os.pread(f.fileno(), 8, l1))[0] & 0x00FFFFFFFFFFFE00
    _poke(img, l2 + 8 * 16, ">Q", (1 << 45) | OFLAG_COPIED)  # guest 1M -> far beyond the file
    server = Server(*_serve_args(tmp_path, img, "--format", "qcow2"))
    servers.append(server)
    server.started()
    fe, mem, drv = connect(tmp_path / "s.sock")
    try:
        assert drv.read(MiB // 512, 4096).status == Status.IOERR
        assert drv.write(MiB // 512, b"x" * 512).status == Status.IOERR
        assert drv.read(0, 4096).data == b"\x42" * 4096
        assert drv.write(8, b"y" * 512).status == Status.OK
    finally:
        fe.close()
        mem.close()
    assert server.terminate()[0] == 0
    assert any("points outside the file" in ln for ln in server.lines)


def test_served_image_is_clean(tmp_path: Path, servers: list[Server]) -> None:
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "8M")
    qemu_io(img, "write -P 0x42 0 1M")
    server = Server(*_serve_args(tmp_path, img, "--format", "qcow2", "--aio", "inline"))
    servers.append(server)
    server.started()
    fe, mem, drv = connect(tmp_path / "s.sock")
    try:
        assert drv.read(0, 4096).data == b"\x42" * 4096
        assert drv.write(2048, b"\x43" * 8192).status == Status.OK
    finally:
        fe.close()
        mem.close()
    assert server.terminate()[0] == 0
    check(img)
    qemu_io(img, "read -P 0x43 1M 8k", "read -P 0x42 0 1M")
