"""What a worker binds once instead of looking up in every pass: the end of a pass
(:func:`vhost.queue.base.pass_ender`) and the device's fast path
(:meth:`vhost.device.QueueHandler.ring_submitter`).  Both follow the queue and the handler the
worker is given -- a fuzzer's rig swaps them between inputs -- and a blk device hands the worker
its fast path's own ``drain``, so no Python frame of the device sits between them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from benchmarks.common import make_image
from benchmarks.hotpath import Rig
from tests.unit.vhost.ring import Ring
from tests.unit.vhost.test_worker import ListHandler
from vhost.runner.thread import Notifier, QueueWorker
from virtio_blk.device import BlkQueueHandler


def test_a_swapped_queue_and_handler_are_the_ones_served() -> None:
    """After ``worker.vq, worker.handler = ...`` a pass pops, completes and publishes on the new
    queue: the old ring sees nothing more."""
    old, new = Ring(size=8), Ring(size=8)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call_fd = os.eventfd(0, os.EFD_NONBLOCK)
    call = Notifier(os.dup(call_fd))
    try:
        first, second = ListHandler(), ListHandler()
        worker = QueueWorker(old.vq, first, kick, call)
        old.simple_chain(0, 4, 8)
        old.publish(0)
        worker._service(kick=True)
        assert old.used_idx() == 1 and [c.head for c in first.seen] == [0]
        worker.vq, worker.handler = new.vq, second
        new.simple_chain(2, 4, 8)
        new.publish(2)
        worker._service(kick=True)
        assert [c.head for c in second.seen] == [2] and len(first.seen) == 1
        assert new.used_idx() == 1 and new.used_elem(0) == (2, 8)
        assert old.used_idx() == 1
        assert worker.vq is new.vq and worker.handler is second
    finally:
        call.close()
        for fd in (kick, call_fd):
            os.close(fd)
        old.vq.release()
        new.vq.release()


def test_a_blk_worker_calls_the_fast_paths_drain_itself() -> None:
    """The worker's pass calls the blk fast path's ``drain`` (the compiled core's, where it
    runs) with nothing in between; a new handler brings its own fast path."""
    with tempfile.TemporaryDirectory() as td:
        image = Path(td) / "disk.img"
        make_image(image, 32 << 20, fill=False)  # (the rig reads up to 32 MiB in)
        rig = Rig("io_uring", str(image), slots=4)
        try:
            rig.round(1)
            assert isinstance(rig.handler, BlkQueueHandler)
            fast = rig.handler._fast
            assert fast is not None and fast.taken == 1
            assert rig.worker._submit_from_ring == fast.drain
            rig.round(2)
            assert fast.taken == 3
            # another handler of the device: its own fast path serves the next pass
            handler = rig.device.create_handler(0, rig.mem)
            assert isinstance(handler, BlkQueueHandler)
            try:
                rig.worker.handler = handler
                rig.round(1)
                other = handler._fast
                assert other is not None and other is not fast and other.taken == 1
                assert rig.worker._submit_from_ring == other.drain and fast.taken == 3
            finally:
                rig.worker.handler = rig.handler
                handler.close()
        finally:
            rig.close()
