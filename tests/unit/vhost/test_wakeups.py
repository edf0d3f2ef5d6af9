"""No wake-up is lost, and none is wasted: the queue thread's re-check after enabling
notifications (virtio 1.x 2.7.10), and the pool worker's one pass per queue per wait.

A lost notification hangs a guest (it waits for a completion of a request the device never
saw), so the worker's loop is tested on the race itself: a buffer the driver makes available
while the worker drains, with kicks suppressed, so the driver rightly sends no kick for it.
"""

from __future__ import annotations

import os
import select
import socket
import threading
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tests.unit.vhost.helpers import WAIT, wait_for
from tests.unit.vhost.ring import EVENT_IDX, Ring
from vhost.device import QueueHandler
from vhost.queue.base import DescriptorChain
from vhost.runner.base import Notifier, QueueKey
from vhost.runner.poolworker import HostedQueue, PoolWorker
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


class CountingWorker:
    """What the pool worker's loop uses of a hosted queue's worker: counts its passes."""

    def __init__(self) -> None:
        self.vq = SimpleNamespace(broken=False)
        self.passes = 0

    def run_pass(self) -> None:
        self.passes += 1


def test_pool_worker_runs_one_pass_for_a_queue_whose_kick_and_completion_both_fired() -> None:
    ours, theirs = socket.socketpair()
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    completion = os.eventfd(0, os.EFD_NONBLOCK)
    other_kick = os.eventfd(0, os.EFD_NONBLOCK)
    pool = PoolWorker(ours)
    queue, other = CountingWorker(), CountingWorker()
    hosted = HostedQueue(QueueKey(1, 0), cast(Any, queue), cast(Any, None), cast(Any, None))
    hosted_other = HostedQueue(QueueKey(1, 1), cast(Any, other), cast(Any, None),
                               cast(Any, None))
    for fd, host in ((kick, hosted), (completion, hosted), (other_kick, hosted_other)):
        pool.ep.register(fd, select.EPOLLIN | select.EPOLLET)
        pool.by_fd[fd] = host
    # All three fired before the loop's first wait: one wait returns them together.
    for fd in (kick, completion, other_kick):
        os.eventfd_write(fd, 1)
    status: list[int] = []
    loop = threading.Thread(target=lambda: status.append(pool.serve()), daemon=True)
    loop.start()
    try:
        wait_for(lambda: queue.passes and other.passes, "the passes of both queues")
        theirs.close()  # the control process goes away: the loop ends
        loop.join(WAIT)
        assert status == [0]
        assert (queue.passes, other.passes) == (1, 1)
    finally:
        theirs.close()
        loop.join(WAIT)
        pool.ep.close()
        ours.close()
        for fd in (kick, completion, other_kick):
            os.close(fd)
