"""Images we create are what qemu-img expects; many threads share one image safely."""

from __future__ import annotations

import logging
import random
import threading
from pathlib import Path

import pytest

from blockdev.disk import DiskError
from blockdev.qcow2 import Qcow2Disk, create
from tests.unit.qcow2.helpers import (
    KiB,
    MiB,
    check,
    compare,
    info,
    needs_qemu_img,
    qemu_img,
    qemu_io,
    read,
    write,
    write_raw,
)

pytestmark = needs_qemu_img


def test_create_plain(tmp_path: Path) -> None:
    img = tmp_path / "n.qcow2"
    create(str(img), 10 * 1024 * MiB)
    i = info(img)
    assert i["virtual-size"] == 10 * 1024 * MiB
    assert i["cluster-size"] == 64 * KiB
    assert i["format-specific"]["data"]["compat"] == "1.1"
    assert i["format-specific"]["data"]["refcount-bits"] == 16
    check(img)
    with pytest.raises(DiskError, match="cannot create"):
        create(str(img), MiB)  # never over an existing file


def test_create_overlay_readable_by_qemu(tmp_path: Path) -> None:
    base = random.Random(4).randbytes(2 * MiB)
    write_raw(tmp_path / "base.raw", base)
    img = tmp_path / "o.qcow2"
    create(str(img), 2 * MiB, backing="base.raw", backing_format="raw")
    i = info(img)
    assert i["backing-filename"] == "base.raw"
    assert i["backing-filename-format"] == "raw"
    check(img)
    compare(tmp_path / "base.raw", img)
    disk = Qcow2Disk(img)
    try:
        write(disk, 4096, b"\x10" * 4096)
    finally:
        disk.close()
    qemu_io(img, "read -P 0x10 4096 4096")
    model = bytearray(base)
    model[4096:8192] = b"\x10" * 4096
    compare(write_raw(tmp_path / "m.raw", model), img)
    check(img)


def test_threads_writing_the_same_clusters(tmp_path: Path) -> None:
    """Eight threads write distinct sectors of the same unallocated clusters at once, and
    discard/zero other clusters: every allocation happens once, nothing written is lost."""
    size = 8 * MiB
    img = tmp_path / "t.qcow2"
    create(str(img), size)
    disk = Qcow2Disk(img)
    model = bytearray(size)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        rng = random.Random(t)
        try:
            for i in range(60):
                cluster = rng.randrange(64)
                off = cluster * 64 * KiB + t * 8 * KiB  # thread t owns 8 KiB of each cluster
                data = rng.randbytes(8 * KiB)
                write(disk, off, data, pieces=2)
                model[off:off + len(data)] = data
                if i % 10 == 0:  # and churns clusters nobody else writes
                    z = (100 + t) * 64 * KiB
                    write(disk, z, data)
                    disk.discard(z, 64 * KiB)
                    assert read(disk, z, 64 * KiB) == bytes(64 * KiB)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert not errors, errors
        assert read(disk, 0, size) == model
    finally:
        disk.close()
    report = check(img)
    assert report["allocated-clusters"] <= 64 + 8 + 8
    compare(write_raw(tmp_path / "m.raw", model), img)


def test_refcount_table_grows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """512-byte clusters: qemu-img's one-cluster refcount table counts 8 MiB of file; writing
    20 MiB grows the table (twice).  The same code grows a 4 KiB-cluster image's table at
    4 GiB of file."""
    size = 24 * MiB
    img = tmp_path / "g.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, str(size))
    written = 20 * MiB
    data = random.Random(5).randbytes(written)
    disk = Qcow2Disk(img)
    try:
        with caplog.at_level(logging.INFO):
            for pos in range(0, written, MiB):
                write(disk, pos, data[pos:pos + MiB])
        assert read(disk, 0, written) == data
    finally:
        disk.close()
    assert sum("refcount table grown" in r.getMessage() for r in caplog.records) >= 2
    check(img)
    compare(write_raw(tmp_path / "m.raw", data + bytes(size - written)), img)
