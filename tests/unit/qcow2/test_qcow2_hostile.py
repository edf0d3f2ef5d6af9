"""Images that must be refused at open, and metadata that turns bad while serving (IOERR for
that request, a log line, never an exception of another kind or a read outside the image)."""

from __future__ import annotations

import errno
import logging
import struct
from pathlib import Path

import pytest

from blockdev.disk import DiskError
from blockdev.qcow2 import Qcow2Disk, Qcow2OpenError
from blockdev.qcow2.format import OFLAG_COPIED, OFLAG_ZERO
from tests.unit.qcow2.helpers import KiB, MiB, needs_qemu_img, qemu_img, qemu_io, read, run, write

pytestmark = needs_qemu_img


def _image(tmp_path: Path, *opts: str, size: str = "4M") -> Path:
    img = tmp_path / "h.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", *opts, img, size)
    return img


def _poke(img: Path, offset: int, fmt: str, *values: int) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _peek(img: Path, offset: int, fmt: str) -> int:
    with open(img, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _refused(img: Path, match: str) -> None:
    with pytest.raises(Qcow2OpenError, match=match) as exc:
        Qcow2Disk(img).close()
    assert "\n" not in str(exc.value)


def test_not_qcow2(tmp_path: Path) -> None:
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(MiB))
    _refused(raw, "not a qcow2 image")


def test_unknown_incompatible_bit(tmp_path: Path) -> None:
    img = _image(tmp_path)
    _poke(img, 72, ">Q", 1 << 40)
    _refused(img, "unknown incompatible feature bits 0x10000000000")


def test_dirty_and_corrupt_bits(tmp_path: Path) -> None:
    img = _image(tmp_path)
    _poke(img, 72, ">Q", 1)
    _refused(img, r"dirty.*qemu-img check -r all")
    _poke(img, 72, ">Q", 2)
    _refused(img, "marked corrupt")


def test_encryption(tmp_path: Path) -> None:
    img = _image(tmp_path)
    _poke(img, 32, ">I", 1)  # crypt_method AES
    _refused(img, "encrypted")


def test_external_data_file(tmp_path: Path) -> None:
    img = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'x.data'}", img, "1M")
    _refused(img, "external data file")


def test_zstd_compression_type(tmp_path: Path) -> None:
    img = tmp_path / "z.qcow2"
    p = run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", img, "1M")
    if p.returncode != 0:
        pytest.skip(f"this qemu-img cannot make zstd images: {p.stderr.strip()}")
    _refused(img, "compression type zstd is not supported")


@pytest.mark.parametrize("field,fmt,value,match", [
    (20, ">I", 30, "cluster_bits 30"),
    (40, ">Q", 1 << 40, "L1 table .* beyond the end"),
    (40, ">Q", 0x10200, "not a cluster boundary"),
    (48, ">Q", 1 << 40, "refcount table .* beyond the end"),
    (36, ">I", 0, "cannot map"),
    (4, ">I", 4, "version 4"),
    (96, ">I", 7, "refcount_order 7"),
])
def test_bad_header_fields(tmp_path: Path, field: int, fmt: str, value: int, match: str) -> None:
    img = _image(tmp_path)
    _poke(img, field, fmt, value)
    _refused(img, match)


def test_tables_pointing_outside_the_file(tmp_path: Path) -> None:
    img = _image(tmp_path)
    qemu_io(img, "write -P 1 0 4k")
    l1 = _peek(img, 40, ">Q")
    _poke(img, l1, ">Q", (1 << 40) | OFLAG_COPIED)
    _refused(img, "L1 entry 0")
    img.unlink()
    img = _image(tmp_path)
    reftable = _peek(img, 48, ">Q")
    _poke(img, reftable + 8, ">Q", 1 << 40)
    _refused(img, "refcount table entry 1")


def test_missing_backing_file_and_loops(tmp_path: Path) -> None:
    img = tmp_path / "o.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "gone.raw", "-F", "raw", "-u", img, "1M")
    with pytest.raises(DiskError, match=r"gone\.raw"):
        Qcow2Disk(img)
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", a, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b, "1M")
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    _refused(b, "loops")


def test_backing_format_not_recorded(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    img = tmp_path / "o.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", img, "1M")
    # Drop the backing-format extension by renaming its type to an unknown one.
    data = bytearray(img.read_bytes()[:4096])
    at = data.find(struct.pack(">I", 0xE2792ACA))
    assert at > 0
    _poke(img, at, ">I", 0x12345678)
    _refused(img, "backing file format is not recorded")


def _l2_entry_offset(img: Path, guest_cluster: int = 0) -> int:
    l1 = _peek(img, 40, ">Q")
    l2 = _peek(img, l1, ">Q") & 0x00FFFFFFFFFFFE00
    return l2 + 8 * guest_cluster


@pytest.mark.parametrize("entry,what", [
    ((1 << 40) | OFLAG_COPIED, "beyond the end"),
    (0x10200 | OFLAG_COPIED, "misaligned"),
    ((1 << 62) | (1 << 40), "compressed beyond the end"),
    ((1 << 62) | 0x30000 | (20 << 54), "compressed garbage"),
    (OFLAG_COPIED | 0x0000_0000_0000_0100, "reserved bits"),
])
def test_bad_l2_entries_fail_the_request(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                         entry: int, what: str) -> None:
    img = _image(tmp_path)
    qemu_io(img, "write -P 1 0 64k", "write -P 2 64k 64k")
    _poke(img, _l2_entry_offset(img), ">Q", entry)
    disk = Qcow2Disk(img)
    try:
        with caplog.at_level(logging.ERROR):
            with pytest.raises(OSError) as exc:
                read(disk, 0, 4 * KiB)
            assert exc.value.errno == errno.EIO
            with pytest.raises(OSError):
                write(disk, 0, b"x" * 512)
            assert caplog.records, f"no log line for {what}"
        # The rest of the image is still served.
        assert read(disk, 64 * KiB, 64 * KiB) == b"\x02" * 64 * KiB
        write(disk, 128 * KiB, b"\x03" * 4096)
        assert read(disk, 128 * KiB, 4096) == b"\x03" * 4096
    finally:
        disk.close()


def test_l2_entry_aimed_at_metadata_is_not_written(tmp_path: Path) -> None:
    img = _image(tmp_path)
    qemu_io(img, "write -P 1 0 64k")
    l1 = _peek(img, 40, ">Q")
    _poke(img, _l2_entry_offset(img), ">Q", l1 | OFLAG_COPIED)  # data "is" the L1 table
    before = img.read_bytes()[l1:l1 + 64 * KiB]
    disk = Qcow2Disk(img)
    try:
        with pytest.raises(OSError):
            write(disk, 0, b"\xff" * 4096)
    finally:
        disk.close()
    assert img.read_bytes()[l1:l1 + 64 * KiB] == before


def test_zero_flag_on_version_2_is_corrupt(tmp_path: Path) -> None:
    img = _image(tmp_path, "-o", "compat=0.10")
    qemu_io(img, "write -P 1 0 64k")
    e = _peek(img, _l2_entry_offset(img), ">Q")
    _poke(img, _l2_entry_offset(img), ">Q", e | OFLAG_ZERO)
    disk = Qcow2Disk(img)
    try:
        with pytest.raises(OSError):
            read(disk, 0, 512)
    finally:
        disk.close()
