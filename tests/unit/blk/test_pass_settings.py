"""Settings the compiled fast path keeps between passes obey a change at run time.

The compiled core (:mod:`virtio_blk._fastpath_core`) reads the write cache mode only when the
device says it changed (:attr:`virtio_blk.device.BlkDevice.writeback`'s setter tells every
queue's fast path), not in every pass.  So a change between two passes must reach the very next
request: here the guest switches the cache mode through the config byte (the way QEMU forwards
a write of the ``writeback`` field) between single-request passes of the real worker code.
In write-through mode the compiled path declines a write (it has no synchronous write), and the
Python fast path takes it with ``sync`` set.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.common import make_image
from benchmarks.hotpath import Rig
from blockdev.engine import IoOp
from tests.property.test_fastpath_differential import compiled_core_or_skip
from virtio_blk import core as cores
from virtio_blk.device import BlkQueueHandler
from virtio_blk.fastpath import FastPath
from virtio_blk.request import WRITEBACK_OFFSET


@pytest.fixture
def write_rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    """A split ring of 4k writes served by the compiled core on io_uring."""
    compiled_core_or_skip("compiled")
    monkeypatch.setenv(cores.ENV, "compiled")
    image = tmp_path / "disk.img"
    make_image(image, 32 << 20, fill=False)
    rig = Rig("io_uring", str(image), slots=4, op="write")
    try:
        yield rig
    finally:
        rig.close()


def _passes(rig: Rig) -> tuple[int, int, list[bool]]:
    """One request through the worker: (requests the compiled path took, requests the Python
    fast path took, the ``sync`` flag of each write the Python path submitted)."""
    handler = rig.handler
    assert isinstance(handler, BlkQueueHandler)
    module = cores.compiled_module()
    fast = handler._fast
    assert module is not None and isinstance(fast, module.FastPath), "the compiled core serves"
    python: FastPath = fast.python
    syncs: list[bool] = []
    submit = handler.engine.submit

    def noting_submit(op: IoOp) -> bool:
        syncs.append(bool(getattr(op, "sync", False)))
        return submit(op)

    handler.engine.submit = noting_submit  # type: ignore[method-assign]
    before = fast.taken, python.taken
    try:
        rig.round(1)
    finally:
        del handler.engine.submit
    rig.check_statuses()
    return fast.taken - before[0], python.taken - before[1], syncs


def test_the_cache_mode_set_between_passes_governs_the_next_write(write_rig: Rig) -> None:
    rig = write_rig
    device = rig.device
    rig.round(1)  # (the first pass makes the fast path)
    assert device.writeback
    assert _passes(rig) == (1, 0, [])  # write-back: the compiled path writes it itself
    device.write_config(WRITEBACK_OFFSET, b"\x00", 0)  # the guest: write-through
    assert _passes(rig) == (0, 1, [True])  # the very next write is synchronous
    assert _passes(rig) == (0, 1, [True])
    device.write_config(WRITEBACK_OFFSET, b"\x01", 0)  # and back
    assert _passes(rig) == (1, 0, [])


def test_a_renegotiation_without_flush_makes_the_next_write_synchronous(write_rig: Rig) -> None:
    """SET_FEATURES without VIRTIO_BLK_F_FLUSH (firmware) forces write-through; a reset brings
    the default back: each is seen by the next pass."""
    rig = write_rig
    device = rig.device
    rig.round(1)
    assert _passes(rig) == (1, 0, [])
    device.set_features(0)
    assert not device.writeback
    assert _passes(rig) == (0, 1, [True])
    device.reset()
    assert _passes(rig) == (1, 0, [])
