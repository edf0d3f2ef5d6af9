"""Property: any sequence of reads, writes, discards, write-zeroes and flushes on a qcow2 image
(with and without a backing file) reads back exactly like the same sequence on a raw model --
and leaves an image ``qemu-img check`` finds clean and ``qemu-img compare`` finds equal."""

from __future__ import annotations

import itertools
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockdev.qcow2 import Qcow2Disk, create
from tests.unit.qcow2.helpers import check, compare, needs_qemu_img, read, write, write_raw

pytestmark = needs_qemu_img

SIZE = 512 * 1024
SECTOR = 512
_names = itertools.count()


def _op() -> st.SearchStrategy:
    sector = st.integers(0, SIZE // SECTOR - 1)
    count = st.integers(1, 160)
    return st.one_of(
        st.tuples(st.just("write"), sector, count, st.integers(0, 2**32), st.integers(1, 4)),
        st.tuples(st.just("read"), sector, count, st.just(0), st.integers(1, 3)),
        st.tuples(st.just("discard"), sector, count, st.just(0), st.just(1)),
        st.tuples(st.just("zeroes"), sector, count, st.booleans(), st.just(1)),
        st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0), st.just(1)),
    )


@pytest.mark.parametrize("backing", (False, True), ids=("plain", "backed"))
@pytest.mark.parametrize("cluster_bits", (12, 16), ids=("4k", "64k"))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(_op(), min_size=1, max_size=30))
def test_qcow2_behaves_like_raw(cluster_bits: int, backing: bool, ops: list) -> None:
    cs = 1 << cluster_bits
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        img = tmp / f"p{next(_names)}.qcow2"
        if backing:
            model = bytearray(random.Random(len(ops)).randbytes(SIZE - 3 * cs // 2))
            write_raw(tmp / "base.raw", model)
            model += bytes(SIZE - len(model))
            create(str(img), SIZE, backing="base.raw", backing_format="raw",
                   cluster_bits=cluster_bits)
        else:
            model = bytearray(SIZE)
            create(str(img), SIZE, cluster_bits=cluster_bits)
        disk = Qcow2Disk(img)
        try:
            for kind, sector, count, arg, pieces in ops:
                off = sector * SECTOR
                n = min(count * SECTOR, SIZE - off)
                if kind == "write":
                    data = random.Random(arg).randbytes(n)
                    write(disk, off, data, pieces)
                    model[off:off + n] = data
                elif kind == "read":
                    assert read(disk, off, n, pieces) == model[off:off + n]
                elif kind == "discard":
                    disk.discard(off, n)
                    # Whole clusters read as zeroes afterwards; partial ones are untouched.
                    lo, hi = -(-off // cs) * cs, (off + n) // cs * cs
                    if off + n == SIZE:
                        hi = SIZE
                    if hi > lo:
                        model[lo:hi] = bytes(hi - lo)
                elif kind == "zeroes":
                    disk.write_zeroes(off, n, unmap=bool(arg))
                    model[off:off + n] = bytes(n)
                else:
                    disk.make_durable()
            assert read(disk, 0, SIZE) == model
        finally:
            disk.close()
        check(img)
        compare(write_raw(tmp / "model.raw", model), img)
