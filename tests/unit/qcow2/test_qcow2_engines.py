"""A qcow2 disk under every IO engine: io_uring translates IO inside allocated clusters and
sends the rest through the general path; the device serves qcow2 with each engine."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from blockdev.engine import Engine, IoOp, UringEngine, make_engine
from blockdev.ops import OpKind
from blockdev.qcow2 import Qcow2Disk
from blockdev.qcow2.uring_engine import MappedUringEngine
from blockdev.uring import EXTERNAL_TAG, OP_READ
from blockdev.uring import available as uring_available
from guestmem import IoBuffer
from tests.conftest import RunningDaemon
from tests.unit.qcow2.helpers import (
    KiB,
    MiB,
    check,
    compare,
    needs_qemu_img,
    qemu_img,
    qemu_io,
    read,
    write_raw,
)
from vhost_frontend import Frontend, FrontendMemory
from vhost_frontend.blk import BlkDriver
from virtio_blk.device import BlkDevice, BlkQueueHandler
from virtio_blk.request import Status

pytestmark = needs_qemu_img
needs_uring = pytest.mark.skipif(not uring_available(), reason="no io_uring on this kernel")


def _image(tmp_path: Path) -> tuple[Path, bytearray]:
    img = tmp_path / "e.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x55 0 2M")
    return img, bytearray(b"\x55" * 2 * MiB + bytes(2 * MiB))


def _run(engine: Engine, ops: list[IoOp]) -> None:
    assert isinstance(engine, UringEngine), engine  # it waits on the engine's own ring
    pending = 0
    for op in ops:
        if not engine.submit(op):
            pending += 1
    engine.submit_batch()
    done = len(engine.reap())
    while done < pending:
        engine.ring.submit(wait=1)
        done += len(engine.reap())
    for op in ops:
        assert not isinstance(op.result, BaseException), op.result


@needs_uring
def test_uring_engine_maps_and_falls_back(tmp_path: Path) -> None:
    img, model = _image(tmp_path)
    disk = Qcow2Disk(img)
    engine = make_engine("io_uring", disk, 0)
    assert isinstance(engine, MappedUringEngine)
    rng = random.Random(1)
    try:
        buf = bytearray(4096)
        first = IoOp(OpKind.READ, 8192, [IoBuffer(memoryview(buf))], 4096)
        assert not engine.submit(first)  # an allocated cluster: into the ring
        engine.submit_batch()
        got = engine.reap()
        while not got:
            engine.ring.submit(wait=1)
            got = engine.reap()
        assert got == [first] and first.offset == 8192 and bytes(buf) == model[8192:12288]
        for _ in range(20):
            ops, reads = [], []
            for _ in range(16):
                off = rng.randrange(0, 4 * MiB - 8 * KiB) // 512 * 512
                n = rng.choice((512, 4 * KiB, 8 * KiB))
                kind = rng.choice((OpKind.READ, OpKind.WRITE, OpKind.WRITE, OpKind.DISCARD))
                if kind == OpKind.READ:
                    buf = bytearray(n)
                    op = IoOp(kind, off, [IoBuffer(memoryview(buf))], n)
                    reads.append((op, buf, bytes(model[off:off + n])))
                elif kind == OpKind.WRITE:
                    data = bytearray(rng.randbytes(n))
                    op = IoOp(kind, off, [IoBuffer(memoryview(data))], n)
                    model[off:off + n] = data
                else:
                    off = off // (64 * KiB) * 64 * KiB
                    op = IoOp(kind)
                    op.segments = [SimpleNamespace(offset=off, length=64 * KiB, unmap=True)]
                    model[off:off + 64 * KiB] = bytes(64 * KiB)
                ops.append(op)
                # One request per offset range per batch, as a guest's would be in flight.
                _run(engine, [op])
            for op, buf, expect in reads:
                assert op.result == len(buf) and bytes(buf) == expect
        assert read(disk, 0, 4 * MiB) == model
    finally:
        engine.close()
        disk.close()
    check(img)
    compare(write_raw(tmp_path / "m.raw", model), img)


@needs_uring
def test_discard_on_one_queue_while_another_has_ring_io(tmp_path: Path) -> None:
    """Queue A discards (drains in-flight IO) while queue B keeps IO in its ring: no deadlock,
    because each engine empties its own ring before running anything inline."""
    img, _ = _image(tmp_path)
    disk = Qcow2Disk(img)
    stop = threading.Event()
    errors: list[BaseException] = []

    def ring_io() -> None:
        engine = make_engine("io_uring", disk, 1)
        try:
            bufs = [bytearray(4096) for _ in range(32)]
            while not stop.is_set():
                ops = [IoOp(OpKind.READ, i * 64 * KiB, [IoBuffer(memoryview(b))], 4096)
                       for i, b in enumerate(bufs)]
                ops.append(IoOp(OpKind.WRITE, 3 * MiB + 512, [IoBuffer(memoryview(bufs[0]))],
                                4096))  # unallocated at first: the inline path, then the ring
                _run(engine, ops)
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.close()

    def discards() -> None:
        engine = make_engine("io_uring", disk, 0)
        try:
            for i in range(200):
                op = IoOp(OpKind.DISCARD)
                op.segments = [SimpleNamespace(offset=(i % 16) * 64 * KiB + 2 * MiB,
                                               length=64 * KiB, unmap=True)]
                w = IoOp(OpKind.WRITE, (i % 16) * 64 * KiB + 2 * MiB,
                         [IoBuffer(memoryview(bytearray(4096)))], 4096)
                _run(engine, [w, op])
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.close()

    b = threading.Thread(target=ring_io)
    a = threading.Thread(target=discards)
    b.start()
    a.start()
    a.join(60)
    stop.set()
    b.join(60)
    try:
        assert not a.is_alive() and not b.is_alive(), "deadlock"
        assert not errors, errors
    finally:
        disk.close()
    check(img)


@needs_uring
def test_a_discard_waits_for_the_compiled_callers_ring_io_without_deadlock(
        tmp_path: Path) -> None:
    """The compiled fast path's reads at host offsets are counted in the image's in-flight IO
    and sit in the same ring; a discard on that queue (which waits for in-flight IO to drain)
    must first let the ring give them back -- their completions stashed for the compiled
    caller and counted out at once -- or it would wait forever on this very thread."""
    img, model = _image(tmp_path)
    disk = Qcow2Disk(img)
    engine = make_engine("io_uring", disk, 0)
    assert isinstance(engine, MappedUringEngine)
    ring = engine.ring
    buf = bytearray(4096)
    done = threading.Event()
    errors: list[BaseException] = []
    try:
        # What the compiled caller does (virtio_blk._fastpath_core): map, count in, submit
        # tagged entries at the host offset, count them in external_in_flight.
        image = disk.image
        host = image.fast_target(8192, 4096, False)  # counted in flight, as _map counts
        assert host > 0
        with memoryview(buf) as view:
            ring.prep(OP_READ, disk.fd, IoBuffer(view).address, 4096, host,
                      EXTERNAL_TAG | 5)
        ring.external_in_flight += 1
        ring.submit()

        def discard() -> None:
            try:
                op = IoOp(OpKind.DISCARD)
                op.segments = [SimpleNamespace(offset=2 * MiB, length=64 * KiB, unmap=True)]
                assert engine.submit(op)  # inline, after the ring emptied
                assert not isinstance(op.result, BaseException), op.result
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        t = threading.Thread(target=discard, daemon=True)
        t.start()
        assert done.wait(20), "the discard waits for the compiled caller's IO: deadlock"
        assert not errors, errors
        # Handed back to the compiled caller, already out of the image's in-flight IO.
        assert [ud for ud, _ in ring.external_stash] == [EXTERNAL_TAG | 5]
        assert image._inflight == 0
        assert bytes(buf) == model[8192:12288]
    finally:
        if done.is_set():
            ring.external_in_flight -= len(ring.external_stash)
            ring.external_stash.clear()
            engine.close()
            disk.close()


@pytest.mark.parametrize("engine", ["inline", "threads",
                                    pytest.param("io_uring", marks=needs_uring)])
def test_device_serves_qcow2(tmp_path: Path, engine: str) -> None:
    img, model = _image(tmp_path)
    disk = Qcow2Disk(img)
    device = BlkDevice(disk, engine=engine, io_threads=4)
    daemon = RunningDaemon(device, tmp_path / "q.sock")
    mem = FrontendMemory([(0, 32 * MiB, 0)])
    fe = Frontend(daemon.path, timeout=10.0)
    try:
        fe.negotiate()
        fe.set_mem_table(mem)
        drv = BlkDriver(fe, fe.setup_queue(0, size=128), mem)
        assert daemon.daemon.handler is not None
        served_by = daemon.daemon.handler.vrings[0].queue_handler
        assert isinstance(served_by, BlkQueueHandler), served_by
        assert served_by.engine.name == engine  # not a thread pool it fell back to
        data = os.urandom(64 * KiB)
        pending = [drv.start(1, 8, out=data[:4096])]  # T_OUT, in place (allocated)
        pending.append(drv.start(1, 3 * MiB // 512 + 1, out=data))  # allocating, unaligned
        for r in drv.wait(pending):
            assert r.status == Status.OK
        model[4096:8192] = data[:4096]
        model[3 * MiB + 512:3 * MiB + 512 + len(data)] = data
        assert drv.discard((2 * MiB // 512 - 128, 256)).status == Status.OK
        model[2 * MiB - 64 * KiB:2 * MiB] = bytes(64 * KiB)  # the whole cluster in range
        assert drv.flush().status == Status.OK
        for off in range(0, 4 * MiB, 256 * KiB):
            assert drv.read(off // 512, 256 * KiB).data == model[off:off + 256 * KiB]
    finally:
        fe.close()
        daemon.stop()
        mem.close()
        disk.close()
    check(img)
    compare(write_raw(tmp_path / "m.raw", model), img)


def test_map_batch_translates_only_io_inside_one_allocated_cluster(tmp_path: Path) -> None:
    """One lock round trip for a batch: the ops the fast path may take get their host offsets
    (guest offsets kept, counted in flight, order kept); every other op is handed back
    untouched, in order, for the general path -- the same rules as one IO at a time."""
    img, _ = _image(tmp_path)  # clusters 0-31 (64 KiB) allocated, the rest not
    disk = Qcow2Disk(img)
    image = disk.image
    try:
        def op(kind: OpKind, offset: int, length: int = 4096) -> IoOp:
            return IoOp(kind, offset, [], length)

        fast = [op(OpKind.READ, 8192), op(OpKind.WRITE, 128 * KiB + 512),
                op(OpKind.READ, 192 * KiB)]
        slow = [op(OpKind.READ, 64 * KiB - 512, 1024),  # across two clusters
                op(OpKind.READ, 3 * MiB),  # unallocated
                op(OpKind.READ, 4 * MiB - 512, 1024),  # beyond the virtual size
                op(OpKind.WRITE, 192 * KiB + 4096)]  # its cluster is busy (being allocated)
        ops = [fast[0], slow[0], fast[1], slow[1], slow[2], fast[2], slow[3]]
        image._busy.add(3)
        guest: dict[int, int] = {}
        hosts = [image.fast_target(o.offset, o.length, o.kind == OpKind.WRITE) for o in fast]
        image.leave(len(fast))
        assert disk.map_batch(ops, guest) == slow
        assert ops == fast and image._inflight == len(fast)
        assert [o.offset for o in fast] == hosts and all(h > 0 for h in hosts)
        assert guest == {id(fast[0]): 8192, id(fast[1]): 128 * KiB + 512,
                         id(fast[2]): 192 * KiB}
        assert [o.offset for o in slow] == [64 * KiB - 512, 3 * MiB, 4 * MiB - 512,
                                            192 * KiB + 4096]
        disk.unmap_io(len(fast))
        image._busy.clear()
        image._draining = True  # a discard waits for in-flight IO: nothing is counted in
        one = op(OpKind.READ, 8192)
        ops = [one]
        assert disk.map_batch(ops, guest) == [one] and ops == [] and one.offset == 8192
        assert image._inflight == 0
        image._draining = False
    finally:
        disk.close()


@needs_uring
def test_uring_engine_writes_and_lone_reads_skip_the_ring(tmp_path: Path) -> None:
    """As on a raw image, a translated write is a plain pwritev and a lone translated read is
    tried from the page cache: finished when submit_batch returns, nothing in the ring, the
    op's guest offset back, nothing left in flight -- and the bytes where the guest put them."""
    img, model = _image(tmp_path)
    with open(img, "rb") as f:  # the page cache holds the image (preadv(RWF_NOWAIT) finds it)
        while f.read(1 << 20):
            pass
    disk = Qcow2Disk(img)
    engine = make_engine("io_uring", disk, 0)
    assert isinstance(engine, MappedUringEngine)
    syncs: list[int] = []
    durable = disk.make_durable

    def counted() -> None:
        syncs.append(1)
        durable()
    disk.make_durable = counted  # type: ignore[method-assign]
    try:
        data = bytearray(os.urandom(4096))
        w = IoOp(OpKind.WRITE, 64 * KiB + 512, [IoBuffer(memoryview(data))], 4096)
        w.sync = True  # write-through: made durable before it is reported
        assert not engine.submit(w)
        engine.submit_batch()
        assert not engine._ops  # not in the ring
        assert engine.reap() == [w] and w.result == 4096 and w.offset == 64 * KiB + 512
        assert syncs == [1]
        model[64 * KiB + 512:64 * KiB + 512 + 4096] = data
        buf = bytearray(4096)
        r = IoOp(OpKind.READ, 64 * KiB, [IoBuffer(memoryview(buf))], 4096)
        assert not engine.submit(r)
        engine.submit_batch()
        assert not engine._ops
        assert engine.reap() == [r] and r.result == 4096 and r.offset == 64 * KiB
        assert bytes(buf) == model[64 * KiB:68 * KiB]
        assert disk.image._inflight == 0
        # A batch of reads and an in-place write: the write is written, not put in the ring.
        bufs = [bytearray(4096) for _ in range(4)]
        reads = [IoOp(OpKind.READ, (5 + i) * 64 * KiB + 1024, [IoBuffer(memoryview(b))], 4096)
                 for i, b in enumerate(bufs)]
        data2 = bytearray(os.urandom(8192))
        w2 = IoOp(OpKind.WRITE, 12 * 64 * KiB, [IoBuffer(memoryview(data2[:4096]))], 4096)
        batch = [reads[0], w2, reads[1], reads[2]]
        for o in batch:
            assert not engine.submit(o)
        engine.submit_batch()
        assert w2 not in engine._ops.values() and w2.result == 4096
        done = engine.reap()
        while len(done) < len(batch):
            engine.ring.submit(wait=1)
            done += engine.reap()
        assert sorted(map(id, done)) == sorted(map(id, batch))
        # A translated read and an allocating write (the general path, run after the ring has
        # emptied) in one batch.
        w3 = IoOp(OpKind.WRITE, 3 * MiB + 512, [IoBuffer(memoryview(data2[4096:]))], 4096)
        _run(engine, [w3, reads[3]])
        for i, (o, b) in enumerate(zip(reads, bufs, strict=True)):
            off = (5 + i) * 64 * KiB + 1024
            assert o.offset == off and o.result == 4096 and bytes(b) == model[off:off + 4096]
        assert w2.offset == 12 * 64 * KiB and w3.offset == 3 * MiB + 512
        assert w2.result == w3.result == 4096
        model[12 * 64 * KiB:12 * 64 * KiB + 4096] = data2[:4096]
        model[3 * MiB + 512:3 * MiB + 512 + 4096] = data2[4096:]
        assert disk.image._inflight == 0
        assert read(disk, 0, 4 * MiB) == model
    finally:
        engine.close()
        disk.close()
    check(img)
    compare(write_raw(tmp_path / "m.raw", model), img)
