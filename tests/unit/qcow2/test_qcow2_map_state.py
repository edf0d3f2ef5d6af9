"""The map state the compiled fast path reads once per pass (``Qcow2Image.map_state``) is kept
between passes: it must be built again after every change of a field it holds -- a stale L1
table, end of file or refcount table range would let the fast path map guest IO with rules of
the past (an L2 table moved, a cluster past the old end, guest data over new metadata)."""

from __future__ import annotations

import struct
from pathlib import Path

from blockdev.qcow2 import Qcow2Disk
from blockdev.qcow2.image import Qcow2Image
from tests.unit.qcow2.helpers import MiB, needs_qemu_img, qemu_img, write

pytestmark = needs_qemu_img


def fresh_state(image: Qcow2Image) -> tuple[object, ...]:
    """What map_state returns, built from the image's fields as they are now."""
    ref = image.ref
    assert ref is not None
    cb = image.cluster_bits
    return (image.l1, image._l2_cache, image._busy, image._autoclear_pending, image.file_end,
            image.size, image._l2_table, image._l1_clusters.start << cb,
            image._l1_clusters.stop << cb, image._l2_offsets, ref.block_offsets,
            *ref.table_range)


def state(image: Qcow2Image) -> tuple[object, ...]:
    with image.lock:
        got = image.map_state()
    assert got is not None
    return got


def test_the_map_state_follows_every_change_of_its_fields(tmp_path: Path) -> None:
    """512-byte clusters and 64-bit refcounts: one refcount table cluster covers 2 MiB of
    file, so some 4,000 allocations grow the table; growing the disk to 64 MiB moves the L1
    table; an autoclear bit in the header holds writes back until the first write clears it."""
    img = tmp_path / "m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", img, "4M")
    with open(img, "r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", 1))  # an autoclear bit this server does not maintain
    disk = Qcow2Disk(img)
    try:
        image = disk.image
        first = state(image)
        assert first == fresh_state(image)
        assert first[3] is True  # writes wait for the autoclear bits
        assert state(image) is first  # kept while nothing changed: the point of keeping it

        write(disk, 0, b"\x01" * 4096)  # clears the autoclear bits, allocates: the end moves
        now = state(image)
        assert now == fresh_state(image)
        assert now[3] is False and now[4] == image.file_end != first[4]

        old_l1, old_range = image.l1, image._l1_clusters
        disk.grow(64 * MiB)  # 4 MiB -> 64 MiB: the L1 table needs more clusters, so it moves
        assert image.l1 is not old_l1 and image._l1_clusters != old_range
        now = state(image)
        assert now == fresh_state(image)
        assert now[0] is image.l1 and now[5] == 64 * MiB

        # The refcount table grows by allocations alone (no field of the image assigned: a
        # guest write would also move the end of the file, which drops the state anyway).
        ref = image.ref
        assert ref is not None
        old_table = ref.table_range
        before = state(image)
        with image.lock:
            for _ in range(5000):
                ref.allocate()
                if ref.table_range != old_table:
                    break
        assert ref.table_range != old_table  # the refcount table grew and moved
        now = state(image)
        assert now is not before and now == fresh_state(image)
        assert (now[11], now[12]) == ref.table_range
    finally:
        disk.close()
