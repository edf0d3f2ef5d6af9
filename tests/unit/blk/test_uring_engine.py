"""The io_uring engine on its own: batches prepared in one call, completions read across the
ring's wrap, and the two ways a raw buffered image skips the ring (writes as pwritev, a lone read
with preadv(RWF_NOWAIT)) giving the same results and errors as the ring."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockdev.disk import Disk
from blockdev.engine import IoOp, UringEngine
from blockdev.ops import OpKind
from blockdev.uring import available
from guestmem import IoBuffer

pytestmark = pytest.mark.skipif(not available(), reason="io_uring unavailable here")

BLOCK = 4096


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (64 * BLOCK // 256))
    d = Disk(str(path))
    try:
        yield d
    finally:
        d.close()


def op(kind: OpKind, block: int, buf: bytearray) -> IoOp:
    view = memoryview(buf)
    return IoOp(kind, block * BLOCK, [IoBuffer(view)], BLOCK)


def run(engine: UringEngine, ops: list[IoOp]) -> list[IoOp]:
    """Submit ``ops`` as one batch and collect every one of them."""
    done = [o for o in ops if engine.submit(o)]
    engine.submit_batch()
    done += engine.reap()
    while len(done) < len(ops):
        engine.ring.submit(wait=1)
        done += engine.reap()
    return done


def test_batches_larger_than_the_ring_and_completions_across_its_wrap(disk: Disk) -> None:
    engine = UringEngine(disk, entries=4)
    engine.bypass = engine.nowait = False  # every op through the ring
    bufs = [bytearray(BLOCK) for _ in range(11)]
    try:
        for rnd in range(5):  # 55 ops through a 4-entry ring: the CQ ring wraps many times
            ops = [op(OpKind.READ, (rnd + i) % 64, b) for i, b in enumerate(bufs)]
            done = run(engine, ops)
            assert sorted(map(id, done)) == sorted(map(id, ops))
            for o, b in zip(ops, bufs, strict=True):
                assert o.result == BLOCK
                assert bytes(b) == os.pread(disk.fd, BLOCK, o.offset)
    finally:
        engine.close()


def test_buffered_write_is_done_in_submit(disk: Disk) -> None:
    engine = UringEngine(disk)
    buf = bytearray(b"w" * BLOCK)
    try:
        assert engine.bypass
        w = op(OpKind.WRITE, 3, buf)
        assert engine.submit(w)  # finished already: no ring entry
        assert w.result == BLOCK and not engine._ops
        assert os.pread(disk.fd, BLOCK, 3 * BLOCK) == b"w" * BLOCK
    finally:
        engine.close()


def test_lone_read_without_the_ring_and_its_fallbacks(disk: Disk,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    engine = UringEngine(disk)
    buf = bytearray(BLOCK)
    try:
        r = op(OpKind.READ, 5, buf)
        assert not engine.submit(r)
        engine.submit_batch()
        assert not engine._ops, "served from the page cache, not the ring"
        assert engine.reap() == [r] and r.result == BLOCK
        assert bytes(buf) == os.pread(disk.fd, BLOCK, 5 * BLOCK)
        # Not all cached (or short): the ring reads it.
        monkeypatch.setattr(disk, "try_readv_nowait", lambda *a: False)
        r = op(OpKind.READ, 6, buf)
        assert run(engine, [r]) == [r] and r.result == BLOCK
        # A disk error is the op's result, as from the ring.
        def eio(*_a: object) -> bool:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        monkeypatch.setattr(disk, "try_readv_nowait", eio)
        r = op(OpKind.READ, 7, buf)
        assert run(engine, [r]) == [r]
        assert isinstance(r.result, OSError) and r.result.errno == errno.EIO
        # No RWF_NOWAIT for this file: never tried again.
        def unsupported(*_a: object) -> bool:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        monkeypatch.setattr(disk, "try_readv_nowait", unsupported)
        r = op(OpKind.READ, 8, buf)
        assert run(engine, [r]) == [r] and r.result == BLOCK
        assert not engine.nowait
    finally:
        engine.close()
