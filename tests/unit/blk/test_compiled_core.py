"""Choosing the per-request core (:mod:`virtio_blk.core`), and the ring the compiled core shares
with the Python io_uring engine (:mod:`blockdev.uring`).

That both cores serve requests alike is the differential property test's
(``tests/property/test_fastpath_differential.py``); here: the environment variable's rules, the
fallback when the compiled core is not built, which queues each core serves, and the ring's
bookkeeping of the entries a compiled caller puts in it.
"""

from __future__ import annotations

import os
import resource
import signal
import tempfile
from collections.abc import Iterator

import pytest

from blockdev.disk import Disk
from blockdev.engine import UringEngine
from blockdev.uring import EXTERNAL_TAG, OP_READ, Uring
from guestmem import buffer_address
from tests.property.test_fastpath_differential import (
    IMAGE_SECTORS,
    SHAPE_SCENARIOS,
    Layout,
    Req,
    Rig,
    Scenario,
    compiled_core_or_skip,
    serve_both,
)
from tests.unit.cli_harness import assert_one_line_error, run
from vhost import compiled
from vhost.queue.packed import PackedQueue
from vhost.queue.split import SplitQueue
from vhost.runner.process import PublishingPackedQueue, PublishingQueue
from virtio_blk import core as cores
from virtio_blk.fastpath import FastPath
from virtio_blk.request import ReqType, Status


@pytest.fixture
def no_compiled_core(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As on a machine without a C compiler: the compiled module does not import."""
    monkeypatch.setitem(compiled._modules, cores.COMPILED_MODULE, None)
    monkeypatch.setitem(compiled._problems, cores.COMPILED_MODULE,
                        "No module named 'virtio_blk._fastpath_core'")
    yield


@pytest.mark.parametrize(("value", "expected"), [("python", "python"), (" Python ", "python"),
                                                 ("", "auto"), ("compiled", "compiled")])
def test_the_variable_names_the_core(monkeypatch, value, expected) -> None:
    monkeypatch.setenv(cores.ENV, value)
    assert cores.requested() == expected


def test_an_unknown_core_is_refused(monkeypatch) -> None:
    monkeypatch.setenv(cores.ENV, "fast")
    with pytest.raises(cores.CoreUnavailable, match="choose one of auto, compiled, python"):
        cores.core_name()


def test_python_runs_when_asked_even_where_compiled_is_built(monkeypatch) -> None:
    monkeypatch.setenv(cores.ENV, "python")
    assert cores.core_name() == "python"
    assert "pure Python (VHOST_USER_BLK_CORE=python)" in cores.describe()


def test_auto_falls_back_to_python_when_the_core_is_not_built(monkeypatch,
                                                              no_compiled_core) -> None:
    monkeypatch.setenv(cores.ENV, "auto")
    assert cores.core_name() == "python"
    assert "the compiled core is not built: No module named" in cores.describe()


def test_compiled_asked_for_and_not_built_is_an_error(monkeypatch, no_compiled_core) -> None:
    monkeypatch.setenv(cores.ENV, "compiled")
    with pytest.raises(cores.CoreUnavailable, match="not built here"):
        cores.core_name()


def test_the_server_refuses_to_start_with_a_core_it_does_not_know(tmp_path,
                                                                  monkeypatch) -> None:
    """A one-line error and exit status 2, before anything is served."""
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    monkeypatch.setenv(cores.ENV, "fast")
    proc = run("--socket", tmp_path / "s.sock", "--image", image)
    assert_one_line_error(proc, "VHOST_USER_BLK_CORE='fast'", "choose one of")


def test_auto_runs_the_compiled_core_where_it_is_built(monkeypatch) -> None:
    compiled_core_or_skip("compiled")
    monkeypatch.setenv(cores.ENV, "auto")
    assert cores.core_name() == "compiled"
    assert cores.describe().startswith("per-request core: compiled (")


# ------------------------------------------------------------------ which queues it serves
def _rig(engine: str, ring: str, core: str, tmp: str) -> Rig:
    sc = next(sc for shape, eng, sc in SHAPE_SCENARIOS if shape == "read" and eng == engine)
    image = bytes(2048 * 512)
    return Rig(sc, Layout(sc, ring), image, tmp, fast=True, core=core)


@pytest.mark.parametrize(("engine", "ring", "compiled"), [
    ("io_uring", "split", True), ("io_uring", "packed", True), ("inline", "split", False),
    ("inline", "packed", False)])
def test_the_compiled_core_serves_rings_on_io_uring(engine, ring, compiled) -> None:
    """A split or packed ring on the io_uring engine of a raw image gets the compiled fast
    path; another engine keeps the Python one, whichever core runs."""
    compiled_core_or_skip("compiled")
    with tempfile.TemporaryDirectory() as tmp:
        rig = _rig(engine, ring, "compiled", tmp)
        try:
            fp = rig.handler._fast
            assert (not isinstance(fp, FastPath)) == compiled, type(fp)
        finally:
            rig.close()
        rig = _rig(engine, ring, "python", tmp)
        try:
            assert isinstance(rig.handler._fast, FastPath)
        finally:
            rig.close()


def test_the_compiled_core_takes_the_requests_itself() -> None:
    """Its own count, not its Python fallback's: each of a ring of reads and writes in Linux's
    shapes (the floor the differential test also keeps)."""
    compiled_core_or_skip("compiled")
    sc = next(sc for shape, eng, sc in SHAPE_SCENARIOS
              if shape == "several data runs" and eng == "io_uring")
    layout, _, _, compiled = serve_both(sc, "split", "compiled")
    assert compiled == set(layout.heads)


# ------------------------------------------------------------------ the shared ring
def test_the_ring_keeps_a_compiled_callers_completions_for_it(tmp_path) -> None:
    """Entries tagged EXTERNAL_TAG that the engine's reap meets go to ``external_stash``, not
    to the engine; the engine's own that the compiled caller met come back first."""
    path = tmp_path / "d.img"
    path.write_bytes(bytes(range(256)) * 64)
    ring = Uring(8)
    buf = bytearray(4096)
    try:
        with memoryview(buf) as view:
            addr = buffer_address(view)
        fd = os.open(path, os.O_RDONLY)
        try:
            ring.external_in_flight = 1
            ring.prep(OP_READ, fd, addr, 512, 0, EXTERNAL_TAG | 7)
            ring.prep(OP_READ, fd, addr + 512, 512, 512, 42)
            ring.submit(wait=2)
            ring.stash.append((41, 512))  # as a compiled caller's reap would leave it
            got = ring.reap()
        finally:
            os.close(fd)
    finally:
        ring.close()
    assert got == [(41, 512), (42, 512)]
    assert ring.external_stash == [(EXTERNAL_TAG | 7, 512)]
    assert not ring.stash


def test_closing_the_engine_waits_for_the_compiled_callers_entries(tmp_path) -> None:
    """The kernel may write guest memory until a completion is posted: close waits for the
    entries a compiled caller left in the ring (and closes the ring only then)."""
    path = tmp_path / "d.img"
    path.write_bytes(bytes(1 << 16))
    disk = Disk(str(path))
    engine = UringEngine(disk)
    buf = bytearray(4096)
    try:
        with memoryview(buf) as view:
            addr = buffer_address(view)
        ring = engine.ring
        ring.prep(OP_READ, disk.fd, addr, 4096, 0, EXTERNAL_TAG | 3)
        ring.external_in_flight = 1
        ring.submit()
        assert engine.close(timeout=5)
        assert ring.fd == -1
        assert ring.external_stash == [(EXTERNAL_TAG | 3, 4096)]
    finally:
        disk.close()


def test_a_real_disk_error_in_the_compiled_core_is_reported_as_the_reference_does() -> None:
    """The kernel's own failure, not an injected one: with RLIMIT_FSIZE below a write's offset
    the buffered pwritev the compiled core makes fails with EFBIG.  The request is the compiled
    core's, and it ends as the generic path ends it (IOERR, the counters, the log line)."""
    compiled_core_or_skip("compiled")
    limit = IMAGE_SECTORS * 512 // 2
    sc = Scenario([Req(ReqType.OUT, 8, [(4096, "A", "page")], False, None),
                   Req(ReqType.OUT, limit // 512 + 8, [(4096, "B", "page")], False, None),
                   Req(ReqType.IN, 16, [(4096, "A", "page")], False, None)],
                  None, 3, "io_uring", False, False, 64, [3])
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)

    def start() -> None:  # (once the images are written)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))

    failed: list[tuple[int, int]] = []

    def inspect(fast: Rig, ref: Rig) -> None:
        failed.append((ref.device.stats.errors, fast.device.stats.errors))
        used = dict(fast.used())
        failed.append((used[fast.layout.heads[1]], fast.mem.read(status_of(fast, 1), 1)[0]))

    try:
        layout, _, _, compiled = serve_both(sc, "split", "compiled", inspect, start)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert compiled == set(layout.heads)
    # (serve_both compared everything observable with the generic path's run.)
    assert failed == [(1, 1), (1, Status.IOERR)]


def status_of(rig: Rig, index: int) -> int:
    """The guest address of the status byte of the ``index``-th request of ``rig``'s ring (a
    direct chain): its last descriptor's."""
    descs = {i: (addr, flags, nxt) for i, addr, _, flags, nxt in rig.layout.descs}
    addr, flags, nxt = descs[rig.layout.heads[index]]
    while flags & 1:  # NEXT
        addr, flags, nxt = descs[nxt]
    return addr


def test_a_split_queue_that_keeps_the_rules_gets_the_compiled_core() -> None:
    """A queue process's queue (PublishingQueue: a hook at publish) is still a split ring with
    the split ring's chain rules; a subclass with a walker of its own is not served."""
    compiled_core_or_skip("compiled")
    module = cores.compiled_module()
    assert module is not None

    class OwnWalker(SplitQueue):
        def _simple(self, head, max_pieces):
            return None

    with tempfile.TemporaryDirectory() as tmp:
        rig = _rig("io_uring", "split", "compiled", tmp)
        try:
            vq = rig.vq
            assert module.applicable(rig.handler, vq) is None
            vq.__class__ = PublishingQueue
            assert module.applicable(rig.handler, vq) is None
            vq.__class__ = OwnWalker
            assert "chain rules of its own" in module.applicable(rig.handler, vq)
            vq.__class__ = SplitQueue
        finally:
            rig.close()


def test_a_packed_queue_that_keeps_the_rules_gets_the_compiled_core() -> None:
    """The same for a packed ring: a queue process's PublishingPackedQueue keeps the packed
    ring's chain rules and is served; a subclass with a walk, a gather or a claim of its own
    is not."""
    compiled_core_or_skip("compiled")
    module = cores.compiled_module()
    assert module is not None

    class OwnWalk(PackedQueue):
        def _walk(self, descs, buf_id, indirect_rule):
            return super()._walk(descs, buf_id, indirect_rule)

    class OwnGather(PackedQueue):
        def _gather(self):
            return None

    class OwnTake(PackedQueue):
        def _take(self, buf_id, descs):
            super()._take(buf_id, descs)

    with tempfile.TemporaryDirectory() as tmp:
        rig = _rig("io_uring", "packed", "compiled", tmp)
        try:
            vq = rig.vq
            assert module.applicable(rig.handler, vq) is None
            vq.__class__ = PublishingPackedQueue
            assert module.applicable(rig.handler, vq) is None
            for kind in (OwnWalk, OwnGather, OwnTake):
                vq.__class__ = kind
                assert "chain rules of its own" in module.applicable(rig.handler, vq)
            vq.__class__ = PackedQueue
        finally:
            rig.close()


def test_the_compiled_core_takes_packed_requests_itself() -> None:
    """A packed ring's reads and writes in Linux's shapes, direct and indirect, each taken by
    the compiled core itself (its record), with an in-flight area."""
    compiled_core_or_skip("compiled")
    sc = next(sc for shape, eng, sc in SHAPE_SCENARIOS
              if shape == "several data runs" and eng == "io_uring")
    layout, _, _, compiled = serve_both(sc, "packed", "compiled")
    assert compiled == set(layout.heads)
