"""Crash safety: a kill -9 leaves the image as a prefix of the driver's pwrite calls.  Record
every pwrite of a run of operations, rebuild the file as it is after each prefix, and have
``qemu-img check`` judge it: leaked clusters are acceptable, corruption never.  At every
operation boundary the prefix must also hold the completed writes (durability)."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import pytest

from blockdev.qcow2 import Qcow2Disk, image
from tests.unit.qcow2.helpers import (
    KiB,
    MiB,
    check_rc,
    compare,
    needs_qemu_img,
    qemu_img,
    qemu_io,
    run,
    write_raw,
)

pytestmark = needs_qemu_img


class _Recorder:
    """Wraps os.pwrite / os.pwritev to log (offset, bytes) of every write to one fd."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple[int, bytes]] = []
        self.fds: set[int] = set()
        real_pwrite, real_pwritev = os.pwrite, os.pwritev

        def pwrite(fd: int, data, offset: int) -> int:
            n = real_pwrite(fd, data, offset)
            if fd in self.fds:
                self.log.append((offset, bytes(memoryview(data)[:n])))
            return n

        def pwritev(fd: int, views, offset: int) -> int:
            n = real_pwritev(fd, views, offset)
            if fd in self.fds:
                self.log.append((offset, b"".join(bytes(v) for v in views)[:n]))
            return n

        def fdatasync(fd: int) -> None:
            real_fdatasync(fd)
            if fd in self.fds:
                self.syncs.append(len(self.log))  # every write before this index is durable

        real_fdatasync = os.fdatasync
        self.syncs: list[int] = []
        monkeypatch.setattr(os, "fdatasync", fdatasync)

        def ftruncate(fd: int, size: int) -> None:
            real_ftruncate(fd, size)
            if fd in self.fds:  # the driver only grows the file: replayed as an extension
                self.log.append((size, b""))

        real_ftruncate = os.ftruncate
        monkeypatch.setattr(os, "ftruncate", ftruncate)

        def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
            real_fallocate(fd, mode, offset, length)
            if fd in self.fds:  # FALLOC_FL_ZERO_RANGE: replayed as a write of zeroes
                assert mode == image.FALLOC_FL_ZERO_RANGE
                self.log.append((offset, bytes(length)))

        real_fallocate = image.fallocate
        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(image, "fallocate", fallocate)


def _replay(initial: bytes, writes: list[tuple[int, bytes]], out: Path) -> Path:
    buf = bytearray(initial)
    for off, data in writes:
        if off + len(data) > len(buf):
            buf += bytes(off + len(data) - len(buf))
        buf[off:off + len(data)] = data
    out.write_bytes(buf)
    return out


@pytest.mark.parametrize("backed", (True, False), ids=("backed", "plain"))
def test_every_prefix_of_pwrites_is_consistent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               backed: bool) -> None:
    # 4 KiB clusters: an L2 table maps 2 MiB and a refcount block counts 8 MiB, so the run
    # below allocates L2 tables, a second refcount block, and copies clusters and an L2
    # table shared with an internal snapshot.
    size = 16 * MiB
    base = random.Random(1).randbytes(2 * MiB) if backed else b""
    write_raw(tmp_path / "base.raw", base)
    img = tmp_path / "c.qcow2"
    backing = ["-b", "base.raw", "-F", "raw"] if backed else []
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", *backing, img, str(size))
    qemu_io(img, "write -P 0x41 0 256k")
    qemu_img("snapshot", "-c", "s1", img)
    initial = img.read_bytes()
    model = bytearray(base + bytes(size - len(base)))
    model[:256 * KiB] = b"\x41" * 256 * KiB

    rec = _Recorder(monkeypatch)
    disk = Qcow2Disk(img)
    rec.fds.add(disk.fd)
    boundaries: list[tuple[int, bytes]] = []  # (writes so far, model then)
    rng = random.Random(2)
    try:
        ops = [("w", 100 * KiB, 8 * KiB), ("w", 1 * MiB + 512, 70 * KiB), ("d", 0, 64 * KiB),
               ("z", 192 * KiB, 40 * KiB), ("w", 3 * MiB, 9 * MiB), ("w", 8 * KiB, 4 * KiB),
               ("d", 3 * MiB, MiB), ("w", 15 * MiB, 64 * KiB)]
        for kind, off, n in ops:
            if kind == "w":
                data = rng.randbytes(n)
                for pos in range(0, n, MiB):
                    chunk = data[pos:pos + MiB]
                    assert disk.writev([memoryview(chunk)], off + pos) == len(chunk)
                model[off:off + n] = data
            elif kind == "d":
                disk.discard(off, n)
                model[off:off + n] = bytes(n)  # whole 4k clusters: zero (backed: zero flag)
            else:
                disk.write_zeroes(off, n, unmap=True)
                model[off:off + n] = bytes(n)
            boundaries.append((len(rec.log), bytes(model)))
    finally:
        disk.close()
    writes = rec.log
    assert len(writes) > 100
    # Every prefix of the first operations (snapshot COW, L2 table COW, first allocations),
    # around each refcount-table change (a new refcount block), and a sample of the rest.
    reftable = int.from_bytes(initial[48:56], "big")
    grow = [k for k, (off, _) in enumerate(writes) if reftable <= off < reftable + 4096]
    assert grow, "the run did not add a refcount block"
    picks = set(range(min(len(writes), boundaries[3][0] + 1)))
    picks |= {k + d for k in grow for d in (-2, -1, 0, 1, 2)}
    picks |= set(random.Random(3).sample(range(len(writes) + 1), 40)) | {len(writes)}
    bad = []
    buf = bytearray(initial)
    done = 0
    crash = tmp_path / "crash.qcow2"
    for k in sorted(p for p in picks if 0 <= p <= len(writes)):
        for off, data in writes[done:k]:
            if off + len(data) > len(buf):
                buf += bytes(off + len(data) - len(buf))
            buf[off:off + len(data)] = data
        done = k
        crash.write_bytes(buf)
        rc = check_rc(crash)
        if rc not in (0, 3):  # 3: leaks only
            bad.append((k, rc))
    assert not bad, f"prefixes with corruption (index, qemu-img check rc): {bad[:10]}"
    for k, expect in boundaries:
        crashed = _replay(initial, writes[:k], tmp_path / "crash.qcow2")
        compare(write_raw(tmp_path / "expect.raw", expect), crashed)


def test_refcount_table_growth_is_crash_safe(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """512-byte clusters: 9 MiB of writes outgrow the one-cluster refcount table."""
    img = tmp_path / "g.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "16M")
    initial = img.read_bytes()
    rec = _Recorder(monkeypatch)
    disk = Qcow2Disk(img)
    rec.fds.add(disk.fd)
    data = random.Random(7).randbytes(9 * MiB)
    try:
        for pos in range(0, len(data), MiB):
            chunk = data[pos:pos + MiB]
            assert disk.writev([memoryview(chunk)], pos) == len(chunk)
    finally:
        disk.close()
    writes = rec.log
    header = [k for k, (off, _) in enumerate(writes) if off == 48]
    assert header, "the refcount table did not grow"
    picks = {k + d for k in header for d in range(-3, 4)}
    picks |= set(random.Random(8).sample(range(len(writes) + 1), 30)) | {len(writes)}
    buf = bytearray(initial)
    done = 0
    crash = tmp_path / "crash.qcow2"
    bad = []
    for k in sorted(p for p in picks if 0 <= p <= len(writes)):
        for off, chunk in writes[done:k]:
            if off + len(chunk) > len(buf):
                buf += bytes(off + len(chunk) - len(buf))
            buf[off:off + len(chunk)] = chunk
        done = k
        crash.write_bytes(buf)
        rc = check_rc(crash)
        if rc not in (0, 3):
            bad.append((k, rc))
    assert not bad, f"prefixes with corruption (index, qemu-img check rc): {bad[:10]}"
    assert check_rc(crash) == 0
    compare(write_raw(tmp_path / "m.raw", data + bytes(7 * MiB)), crash)


@pytest.mark.parametrize("seed", (12, 13, 14))
def test_host_crash_between_syncs_keeps_metadata_consistent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """A host crash persists every write before the last fdatasync and any subset of those
    after it.  Whatever subset, ``qemu-img check`` finds leaks at most."""
    base = random.Random(11).randbytes(MiB)
    write_raw(tmp_path / "base.raw", base)
    img = tmp_path / "h.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.raw",
             "-F", "raw", img, str(12 * MiB))
    qemu_io(img, "write -P 0x41 0 128k")
    qemu_img("snapshot", "-c", "s1", img)
    initial = img.read_bytes()
    rec = _Recorder(monkeypatch)
    disk = Qcow2Disk(img)
    rec.fds.add(disk.fd)
    rng = random.Random(seed)
    try:
        for i in range(60):
            off = rng.randrange(0, 12 * MiB - 64 * KiB) // 512 * 512
            op = rng.random()
            if op < 0.6:
                data = rng.randbytes(rng.choice((512, 4096, 20000)) // 512 * 512)
                assert disk.writev([memoryview(data)], off) == len(data)
            elif op < 0.75:
                disk.discard(off, 64 * KiB)
            elif op < 0.85:
                disk.write_zeroes(off, 32 * KiB, unmap=bool(i % 2))
            else:
                disk.make_durable()
    finally:
        disk.close()
    writes, syncs = rec.log, rec.syncs
    assert len(syncs) >= 5
    bounds = [0, *syncs, len(writes)]
    bad = []
    crash = tmp_path / "crash.qcow2"
    for lo, hi in itertools.pairwise(bounds):
        if hi - lo < 2:
            continue
        for trial in range(3):
            keep = [w for w in writes[lo:hi] if rng.random() < 0.5]
            _replay(initial, writes[:lo] + keep, crash)
            rc = check_rc(crash)
            if rc not in (0, 3):
                out = run("qemu-img", "check", crash)
                why = [ln for ln in (out.stdout + out.stderr).splitlines() if "ERROR" in ln][:3]
                bad.append((lo, hi, trial, rc, why))
    assert not bad, f"host-crash states with corruption (sync window, trial, rc): {bad[:10]}"


def test_live_growth_that_moves_the_l1_table_is_crash_safe(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """512-byte clusters: one L1 cluster maps 2 MiB, so growing 1 MiB -> 8 MiB moves the L1
    table to four new clusters.  Every prefix of the writes (new refcounts, the new table,
    the header, the old table's refcount) is clean for qemu-img but for leaks, and what was
    written before and after the move reads back."""
    img = tmp_path / "l1.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "1M")
    rng = random.Random(11)
    before, after = rng.randbytes(64 * KiB), rng.randbytes(64 * KiB)
    initial = img.read_bytes()
    rec = _Recorder(monkeypatch)
    disk = Qcow2Disk(img)
    rec.fds.add(disk.fd)
    try:
        assert disk.writev([memoryview(before)], 256 * KiB) == len(before)
        start = len(rec.log)
        disk.grow(8 * MiB)
        moved = rec.log[start:]
        assert disk.writev([memoryview(after)], 7 * MiB) == len(after)
        disk.make_durable()
    finally:
        disk.close()
    header = [k for k, (off, data) in enumerate(rec.log) if off == 24 and len(data) == 24]
    assert header and moved, "the L1 table did not move"
    writes = rec.log
    bad = []
    for k in sorted({*range(start, start + len(moved) + 1), len(writes)}):
        rc = check_rc(_replay(initial, writes[:k], tmp_path / "crash.qcow2"))
        if rc not in (0, 3):
            bad.append((k, rc))
    assert not bad, f"prefixes with corruption (index, qemu-img check rc): {bad[:10]}"
    assert check_rc(img) == 0  # closed cleanly: no leak either
    assert '"virtual-size": 8388608' in run("qemu-img", "info", "--output=json", img).stdout
    expect = bytearray(8 * MiB)
    expect[256 * KiB:256 * KiB + len(before)] = before
    expect[7 * MiB:7 * MiB + len(after)] = after
    compare(write_raw(tmp_path / "expect.raw", bytes(expect)), img)
