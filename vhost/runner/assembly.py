"""The one place a queue is put together: ring addresses, in-flight tracker, queue, handler, worker.

Used by the thread runner (:class:`vhost.runner.thread.ThreadRunner`, on the handler's memory
table) and by a queue process (:mod:`vhost.runner.process`, on its own copy of the table), so
both check the same things in the same order:

1. the ring's frontend addresses translate to guest physical addresses, whole parts inside
   guest memory (:meth:`vhost.memory.MemoryTable.uva_to_gpa`), aligned as virtio 2.7 requires;
2. the queue's in-flight region (if the frontend gave an area) matches the ring (split: its
   used index; packed: the descriptor a publication cut short may have used);
3. the queue is opened over the ring (which validates the base and recovers in-flight heads);
4. the device makes the queue's handler;
5. the worker is made (not started: the caller attaches dirty logging first).

The process runner also runs steps 1-2 in the control process (:func:`preflight`) before it
spawns a process, so a bad ring is refused there with one log line instead of after a
process start-up; the process checks again (the area is shared with the frontend).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from guestmem import AccessError
from vhost.device import Device, QueueHandler
from vhost.memory import MemoryTable, MemoryTableError
from vhost.queue.base import Queue, RingAddresses
from vhost.queue.factory import (
    check_alignment,
    inflight_tracker,
    is_packed,
    open_queue,
    ring_sizes,
)
from vhost.queue.inflight import InflightArea
from vhost.queue.inflight_packed import PackedInflightQueue
from vhost.queue.packed import PackedQueue
from vhost.queue.split import SplitQueue
from vhost.runner.base import QueueSpec, RunnerError
from vhost.runner.thread import Notifier, QueueWorker

log = logging.getLogger(__name__)


#: Makes the worker of a starting queue (tests substitute one that records or delays).
WorkerFactory = Callable[[Queue, QueueHandler, int, Notifier, Notifier], QueueWorker]


def ring_addresses(memory: MemoryTable, uaddrs: tuple[int, int, int], size: int,
                   features: int) -> RingAddresses:
    """Step 1: the ring's guest physical addresses, in the layout ``features`` negotiated
    (MemoryTableError, QueueError)."""
    packed = is_packed(features)
    addrs = RingAddresses(*(
        memory.uva_to_gpa(addr, length)
        for addr, length in zip(uaddrs, ring_sizes(size, packed), strict=True)
    ))
    check_alignment(addrs, packed)
    return addrs


def preflight(memory: MemoryTable, inflight: InflightArea | None,
              spec: QueueSpec) -> RingAddresses:
    """Steps 1-2 without opening anything: QueueError, MemoryTableError or InflightError if
    the queue cannot start."""
    addrs = ring_addresses(memory, spec.ring_uaddrs, spec.size, spec.features)
    if inflight is None:
        return addrs
    guest = memory.guest
    tracker = inflight_tracker(inflight, spec.key.index, spec.size)
    try:
        if isinstance(tracker, PackedInflightQueue):
            # (a publication cut short is judged by the flags of a descriptor it may have used)
            def ring_flags(slot: int) -> int:
                return int.from_bytes(guest.read(addrs.desc + 16 * slot + 14, 2), "little")

            tracker.plan(ring_flags)
        else:
            tracker.check(int.from_bytes(guest.read(addrs.used + 2, 2), "little"))
    except AccessError as exc:
        raise MemoryTableError(f"ring at {addrs.desc:#x}: {exc}") from exc
    finally:
        tracker.release()
    return addrs


def assemble(memory: MemoryTable, inflight: InflightArea | None, device: Device,
             spec: QueueSpec, make_worker: WorkerFactory,
             split_class: type[SplitQueue] = SplitQueue,
             packed_class: type[PackedQueue] = PackedQueue) -> QueueWorker:
    """Steps 1-5: the queue's worker, ready to start.  QueueError, MemoryTableError or
    InflightError if the frontend's input cannot be used; RunnerError if the device could not
    make the handler (no io_uring or threads left, say).  ``split_class``/``packed_class``:
    subclasses of the layouts' queues (a queue process hooks the used-side publication)."""
    index = spec.key.index
    addrs = ring_addresses(memory, spec.ring_uaddrs, spec.size, spec.features)
    tracker = inflight_tracker(inflight, index, spec.size) if inflight is not None else None
    vq = open_queue(memory.guest, spec.size, addrs, spec.features, spec.base, index, tracker,
                    split_class=split_class, packed_class=packed_class)
    try:
        handler = device.create_handler(index, memory.guest)
    except Exception as exc:
        log.exception("queue %d: the device could not set up its handler", index)
        vq.release()
        raise RunnerError(f"the device could not set up queue {index}'s handler: {exc}") from exc
    return make_worker(vq, handler, spec.kick_fd, spec.call, spec.err)
