"""The qcow2 driver against images made by qemu-img, and qemu-img against images we wrote."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from blockdev.qcow2 import Qcow2Disk
from tests.unit.qcow2.helpers import (
    KiB,
    MiB,
    check,
    compare,
    info,
    needs_qemu_img,
    qemu_img,
    qemu_io,
    randbytes,
    read,
    write,
    write_raw,
)

pytestmark = needs_qemu_img

CLUSTERS = (4 * KiB, 64 * KiB, 2 * MiB)


def _patterns(cs: int, size: int) -> list[tuple[int, int, int]]:
    """(offset, length, byte) writes that start, end and straddle cluster boundaries."""
    return [(0, 4 * KiB, 0xAB), (cs - 512, 1024, 0x11), (3 * cs + 512, 2 * cs, 0x22),
            (size - 4 * KiB, 4 * KiB, 0x33), (5 * cs, 512, 0x44)]


@pytest.mark.parametrize("cs", CLUSTERS)
def test_reads_what_qemu_io_wrote(tmp_path: Path, cs: int) -> None:
    size = 16 * cs
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", img, str(size))
    model = bytearray(size)
    for off, n, byte in _patterns(cs, size):
        qemu_io(img, f"write -P {byte:#x} {off} {n}")
        model[off:off + n] = bytes([byte]) * n
    disk = Qcow2Disk(img)
    try:
        assert read(disk, 0, size, pieces=7) == model
        for off, n, _ in _patterns(cs, size):
            assert read(disk, off, n) == model[off:off + n]
    finally:
        disk.close()
    check(img)


@pytest.mark.parametrize("cs", CLUSTERS)
def test_qemu_img_compares_what_we_wrote(tmp_path: Path, cs: int) -> None:
    size = 12 * cs
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", img, str(size))
    qemu_io(img, f"write -P 0x5a {cs} {cs}")
    model = bytearray(size)
    model[cs:2 * cs] = b"\x5a" * cs
    rng = random.Random(cs)
    disk = Qcow2Disk(img)
    try:
        for i in range(40):
            off = rng.randrange(0, size - 1) // 512 * 512
            n = min(rng.choice((512, 4 * KiB, cs, 3 * cs // 2 + 512)), size - off)
            data = randbytes(n, i)
            write(disk, off, data, pieces=rng.randrange(1, 5))
            model[off:off + n] = data
        assert read(disk, 0, size, pieces=3) == model
        disk.make_durable()
    finally:
        disk.close()
    check(img)
    compare(write_raw(tmp_path / "model.raw", model), img)


def test_compressed_clusters(tmp_path: Path) -> None:
    size = 2 * MiB
    data = bytearray(randbytes(size // 2, 1) + bytes(range(256)) * (size // 512))
    raw = write_raw(tmp_path / "src.raw", data)
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-q", "-c", "-O", "qcow2", raw, img)
    assert info(img)["format-specific"]["data"]["compression-type"] == "zlib"
    disk = Qcow2Disk(img)
    try:
        assert read(disk, 0, size, pieces=5) == data
        # Overwrite inside compressed clusters: copied out, never written in place.
        for off, n in ((size // 2 + 100, 300), (64 * KiB - 512, 1024), (0, 64 * KiB)):
            chunk = randbytes(n, off)
            write(disk, off, chunk)
            data[off:off + n] = chunk
        assert read(disk, 0, size) == data
    finally:
        disk.close()
    check(img)
    compare(write_raw(tmp_path / "model.raw", data), img)


def test_zero_clusters(tmp_path: Path) -> None:
    base = write_raw(tmp_path / "base.raw", randbytes(MiB, 2))
    img = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", img)
    qemu_io(img, "write -z 0 128k", "write -P 0x77 256k 64k", "write -z 256k 64k")
    model = bytearray(base.read_bytes())
    model[0:128 * KiB] = bytes(128 * KiB)
    model[256 * KiB:320 * KiB] = bytes(64 * KiB)
    disk = Qcow2Disk(img)
    try:
        assert read(disk, 0, MiB) == model
        write(disk, 100, b"\x01" * 10)  # inside a zero cluster: the rest stays zero
        model[100:110] = b"\x01" * 10
        assert read(disk, 0, MiB) == model
    finally:
        disk.close()
    check(img)
    compare(write_raw(tmp_path / "model.raw", model), img)


def test_backing_chain_raw_and_qcow2_relative_names(tmp_path: Path) -> None:
    sub = tmp_path / "images"
    sub.mkdir()
    size = 4 * MiB
    model = bytearray(randbytes(3 * MiB, 3))  # the base is smaller than the overlays
    write_raw(sub / "base.raw", model)
    model += bytes(size - len(model))
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.raw",
             "-F", "raw", sub / "mid.qcow2", str(size))
    qemu_io(sub / "mid.qcow2", "write -P 0x21 8k 8k", "write -P 0x22 3M 64k")
    model[8 * KiB:16 * KiB] = b"\x21" * 8 * KiB
    model[3 * MiB:3 * MiB + 64 * KiB] = b"\x22" * 64 * KiB
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             sub / "top.qcow2")
    qemu_io(sub / "top.qcow2", "write -P 0x31 1M 4k")
    model[MiB:MiB + 4 * KiB] = b"\x31" * 4 * KiB
    disk = Qcow2Disk(sub / "top.qcow2")
    try:
        assert disk.info.size == size
        assert read(disk, 0, size, pieces=4) == model
        # Partial writes copy the rest of the cluster from the chain (COW).
        for off, n in ((9 * KiB, 100), (MiB + 70 * KiB, 5000), (3 * MiB - 512, 4 * KiB)):
            chunk = randbytes(n, off)
            write(disk, off, chunk)
            model[off:off + n] = chunk
        assert read(disk, 0, size) == model
    finally:
        disk.close()
    for name in ("top.qcow2", "mid.qcow2"):
        check(sub / name)
    compare(write_raw(tmp_path / "model.raw", model), sub / "top.qcow2")


def test_internal_snapshot_is_preserved(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "2M")
    qemu_io(img, "write -P 0x61 0 1M")
    qemu_img("snapshot", "-c", "snap1", img)
    disk = Qcow2Disk(img)
    model = bytearray(b"\x61" * MiB + bytes(MiB))
    try:
        for off, n in ((0, 4 * KiB), (100 * KiB, 1000), (MiB - 10, 20), (1536 * KiB, 4 * KiB)):
            chunk = randbytes(n, off)
            write(disk, off, chunk)
            model[off:off + n] = chunk
        disk.discard(256 * KiB, 128 * KiB)
        model[256 * KiB:384 * KiB] = bytes(128 * KiB)
        disk.write_zeroes(512 * KiB, 64 * KiB, unmap=False)
        model[512 * KiB:576 * KiB] = bytes(64 * KiB)
        assert read(disk, 0, 2 * MiB) == model
    finally:
        disk.close()
    check(img)
    compare(write_raw(tmp_path / "model.raw", model), img)
    snap = tmp_path / "snap.raw"
    qemu_img("convert", "-q", "-l", "snap1", "-O", "raw", img, snap)
    assert snap.read_bytes() == b"\x61" * MiB + bytes(MiB)


def _map(img: Path) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", "-U", img))


def test_discard_frees_and_space_is_reused(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "8M")
    disk = Qcow2Disk(img)
    try:
        write(disk, 0, randbytes(4 * MiB, 5))
        first = [m["offset"] for m in _map(img) if m["data"]]
        disk.discard(0, 4 * MiB)
        assert read(disk, 0, 4 * MiB) == bytes(4 * MiB)
        write(disk, 4 * MiB, randbytes(2 * MiB, 6))
        again = [m["offset"] for m in _map(img) if m["data"]]
        assert max(again) <= max(first)  # the freed clusters were reused
        assert min(again) == min(first)
        disk.write_zeroes(4 * MiB + 1000, 200 * KiB, unmap=True)
    finally:
        disk.close()
    model = bytearray(8 * MiB)
    model[4 * MiB:6 * MiB] = randbytes(2 * MiB, 6)
    model[4 * MiB + 1000:4 * MiB + 1000 + 200 * KiB] = bytes(200 * KiB)
    report = check(img)
    assert report["allocated-clusters"] <= 2 * MiB // (64 * KiB) + 4
    compare(write_raw(tmp_path / "model.raw", model), img)


@pytest.mark.parametrize("version", ("0.10", "1.1"))
def test_version_2_and_3_discard_zeroes_with_backing(tmp_path: Path, version: str) -> None:
    base = randbytes(MiB, 9)
    write_raw(tmp_path / "b.raw", base)
    img = tmp_path / "v.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={version}", "-b", "b.raw",
             "-F", "raw", img)
    model = bytearray(base)
    disk = Qcow2Disk(img)
    try:
        write(disk, 0, b"\x99" * 256 * KiB)
        model[:256 * KiB] = b"\x99" * 256 * KiB
        disk.write_zeroes(64 * KiB, 128 * KiB + 512, unmap=True)
        model[64 * KiB:192 * KiB + 512] = bytes(128 * KiB + 512)
        disk.write_zeroes(512 * KiB, 64 * KiB, unmap=False)
        model[512 * KiB:576 * KiB] = bytes(64 * KiB)
        assert read(disk, 0, MiB) == model
    finally:
        disk.close()
    check(img)
    compare(write_raw(tmp_path / "model.raw", model), img)
