"""Bounded metadata work (issue 19 item 7): a hostile refcount table costs milliseconds per
allocation, never seconds under the image-wide lock; tables whose blocks overlap are refused at
open; the vectorised free-cluster search keeps qcow2 semantics for every refcount width."""

from __future__ import annotations

import errno
import os
import random
import struct
import time
from array import array
from pathlib import Path

import pytest

from blockdev.engine import IoOp
from blockdev.ops import OpKind
from blockdev.qcow2 import Qcow2Disk, Qcow2OpenError
from tests.unit.qcow2.helpers import (
    KiB,
    MiB,
    check,
    compare,
    needs_qemu_img,
    qemu_img,
    qemu_io,
    read,
    write,
    write_raw,
)

pytestmark = needs_qemu_img


def _full_table(img: Path, nblocks: int, cs: int = 512, size: str = "64M") -> None:
    """A qcow2 whose refcount table has ``nblocks`` distinct refcount blocks, every count in
    them at its maximum: every cluster below and far past the end of the file is "in use"."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", img, size)
    end = -(-os.path.getsize(img) // cs) * cs
    tclusters = -(-nblocks * 8 // cs)
    blocks = end + tclusters * cs
    table = struct.pack(f">{nblocks}Q", *(blocks + i * cs for i in range(nblocks)))
    with open(img, "r+b") as f:
        os.pwrite(f.fileno(), table + bytes(tclusters * cs - len(table)), end)
        os.pwrite(f.fileno(), b"\xff" * (nblocks * cs), blocks)
        os.pwrite(f.fileno(), struct.pack(">QI", end, tclusters), 48)


def test_full_refcount_table_fails_allocations_in_milliseconds(tmp_path: Path) -> None:
    """32768 full blocks: the old search walked them all in Python for every allocation
    (7.5-10 s each here); now each allocation looks at a bounded number and fails (IOERR)."""
    img = tmp_path / "h.qcow2"
    _full_table(img, 32768)
    disk = Qcow2Disk(img)
    try:
        for k in range(3):
            t0 = time.monotonic()
            with pytest.raises(OSError) as info:
                disk.writev([memoryview(bytearray(4096))], k * MiB)
            assert time.monotonic() - t0 < 1.0
            assert info.value.errno == errno.EIO
        assert read(disk, 0, 4096) == bytes(4096)  # the image is still served
    finally:
        disk.close()


def test_full_refcount_table_bounds_a_live_resize(tmp_path: Path) -> None:
    """Moving the L1 table looks for a run of free clusters past the end of the file: bounded
    too (the old loop tested one cluster at a time through every full block)."""
    img = tmp_path / "g.qcow2"
    _full_table(img, 32768)
    disk = Qcow2Disk(img)
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError) as info:
            disk.grow(512 * MiB)  # 64M -> 512M: the L1 table needs more clusters
        assert time.monotonic() - t0 < 1.0
        assert info.value.errno == errno.ENOSPC
        assert disk.info.size == 64 * MiB
    finally:
        disk.close()


def _reftable(img: Path) -> int:
    with open(img, "rb") as f:
        return int(struct.unpack(">Q", os.pread(f.fileno(), 8, 48))[0])


def _poke(img: Path, offset: int, value: int) -> None:
    with open(img, "r+b") as f:
        os.pwrite(f.fileno(), struct.pack(">Q", value), offset)


@pytest.mark.parametrize("target,match", [
    ("shared", "share refcount blocks"),
    ("reftable", "overlaps the refcount table"),
    ("l1", "is also an L1 or L2 table"),
    ("l2", "is also an L1 or L2 table"),
])
def test_overlapping_refcount_blocks_are_refused(tmp_path: Path, target: str,
                                                 match: str) -> None:
    """A second table entry naming block 0, the table itself, the L1 table or an L2 table: a
    count written there would change other counts or the mapping."""
    img = tmp_path / "o.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write 0 4k")
    reftable = _reftable(img)
    with open(img, "rb") as f:
        block0 = struct.unpack(">Q", os.pread(f.fileno(), 8, reftable))[0]
        l1 = struct.unpack(">Q", os.pread(f.fileno(), 8, 40))[0]
        l2 = struct.unpack(">Q", os.pread(f.fileno(), 8, l1))[0] & 0x00FFFFFFFFFFFE00
    _poke(img, reftable + 8, {"shared": block0, "reftable": reftable, "l1": l1, "l2": l2}[target])
    with pytest.raises(Qcow2OpenError, match=match):
        Qcow2Disk(img)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_every_refcount_width_allocates_and_reuses_exactly(tmp_path: Path, bits: int) -> None:
    """512-byte clusters: with 1-bit counts one block covers 4096 clusters, so 3 MiB of
    writes take new blocks; discards free clusters that later writes must reuse."""
    img = tmp_path / f"w{bits}.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size=512,refcount_bits={bits}",
             img, "8M")
    model = bytearray(8 * MiB)
    rng = random.Random(bits)
    disk = Qcow2Disk(img)
    try:
        for i in range(0, 3 * MiB, 64 * KiB):
            data = rng.randbytes(64 * KiB)
            write(disk, i, data)
            model[i:i + len(data)] = data
        disk.discard(MiB, MiB)
        model[MiB:2 * MiB] = bytes(MiB)
        disk.make_durable()
        size_before = os.path.getsize(img)
        for i in range(4 * MiB, 5 * MiB, 64 * KiB):
            data = rng.randbytes(64 * KiB)
            write(disk, i, data)
            model[i:i + len(data)] = data
        assert os.path.getsize(img) <= size_before + 64 * KiB  # the freed MiB was reused
        assert read(disk, 0, 8 * MiB) == bytes(model)
    finally:
        disk.close()
    check(img)
    compare(write_raw(tmp_path / "m.raw", model), img)


def test_flush_failure_leaves_as_oserror(tmp_path: Path) -> None:
    """Whatever goes wrong in a flush leaves as OSError (an IOERR for the request), never as
    an exception that ends the worker."""
    img = tmp_path / "f.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    disk = Qcow2Disk(img)
    try:
        def broken() -> None:
            raise ValueError("bad metadata")
        disk.image.make_durable = broken  # type: ignore[method-assign]
        with pytest.raises(OSError) as info:
            disk.make_durable()
        assert info.value.errno == errno.EIO
    finally:
        disk.close()


def test_fast_path_failure_falls_back_to_the_general_path(tmp_path: Path) -> None:
    """The io_uring engine's translation never raises into the queue's worker: whatever it
    meets, the request goes the general path, which turns it into an IOERR."""
    img = tmp_path / "m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    qemu_io(img, "write -P 0x11 0 128k")
    disk = Qcow2Disk(img)
    try:
        def broken(offset: int) -> array:
            raise IndexError("bad metadata")
        disk.image._l2_table = broken  # type: ignore[method-assign]  # (the cache is empty)
        ops = [IoOp(OpKind.READ, 0, [], 4096), IoOp(OpKind.WRITE, 65536, [], 4096)]
        first = list(ops)
        guest: dict[int, int] = {}
        assert disk.map_batch(ops, guest) == first  # both for the general path, unchanged,
        assert ops == [] and guest == {} and [op.offset for op in first] == [0, 65536]
        assert disk.image._inflight == 0  # and not counted in flight
    finally:
        disk.close()
