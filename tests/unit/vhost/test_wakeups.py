"""No wake-up is lost, and none is wasted: the queue thread's re-check after enabling
notifications (virtio 1.x 2.7.10), and the pool worker's one pass per queue per wait.

A lost notification hangs a guest (it waits for a completion of a request the device never
saw), so the worker's loop is tested on the race itself: a buffer the driver makes available
while the worker drains, with kicks suppressed, so the driver rightly sends no kick for it.
"""

from __future__ import annotations

import os

import pytest

from tests.unit.vhost.helpers import WAIT, wait_for
from tests.unit.vhost.ring import EVENT_IDX, Ring
from vhost.device import QueueHandler
from vhost.queue.base import DescriptorChain
from vhost.runner.base import Notifier
from vhost.runner.thread import QueueWorker


class RacingHandler(QueueHandler):
    """Completes each chain at once; while starting the first one, the driver makes one more
    chain available -- after the worker's pop, before it enables notifications again."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.seen: list[int] = []
        self.kick_wanted: bool | None = None

    def submit(self, chain: DescriptorChain) -> int | None:
        self.seen.append(chain.head)
        if len(self.seen) == 1:
            ring = self.ring
            ring.simple_chain(2, 4, 8)
            old = ring.avail_idx
            ring.publish(2)
            self.kick_wanted = ring.kick_needed(old)  # what the driver decides: no kick
        return chain.writable_len

    def reap(self) -> list[tuple[int, int]]:
        return []

    def close(self) -> bool:
        return True


@pytest.mark.parametrize("features", [EVENT_IDX, 0], ids=["event_idx", "no_notify_flag"])
def test_a_buffer_made_available_while_draining_is_served_without_a_kick(features: int) -> None:
    ring = Ring(size=8, features=features)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = Notifier(os.eventfd(0, os.EFD_NONBLOCK))
    handler = RacingHandler(ring)
    worker = QueueWorker(ring.vq, handler, kick, call)
    worker.start()
    try:
        wait_for(lambda: worker.passes >= 1, "the worker's first look at the ring")
        ring.simple_chain(0, 4, 8)
        old = ring.avail_idx
        ring.publish(0)
        assert ring.kick_needed(old)
        os.eventfd_write(kick, 1)
        # The second chain came while kicks were suppressed: only the worker's re-check after
        # enabling them finds it; without it the request waits for a kick that never comes.
        wait_for(lambda: ring.used_idx() == 2, "both requests completed, with one kick", 2.0)
        assert handler.kick_wanted is False
        assert handler.seen == [0, 2]
        assert [ring.used_elem(i) for i in range(2)] == [(0, 8), (2, 8)]
    finally:
        assert worker.stop(WAIT)
        call.close()
        os.close(kick)
        ring.vq.release()
