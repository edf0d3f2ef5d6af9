"""Queues on threads of this process: the :class:`ThreadRunner` (see :mod:`vhost.runner.base`).

A thread's queue uses the connection's own memory table, in-flight area and dirty log (the
handler's objects), so a frontend's change to them needs no forwarding: the handler made it
already, and those forwarding methods do nothing.  What this runner does is start a queue
(:func:`vhost.runner.assembly.assemble`, then the dirty logging's marker, then the thread) and
stop it: drain it, and keep guest memory mapped for good when a thread or the device's IO
outlived the stop (they may still write it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from vhost.device import Device
from vhost.dirty_logging import DirtyLogging
from vhost.messages import RegionFields
from vhost.queue.factory import base_text
from vhost.runner.assembly import WorkerFactory, assemble
from vhost.runner.base import (
    ConnectionState,
    QueueKey,
    QueueSpec,
    RunnerError,
    RunningQueue,
    Stopped,
)
from vhost.runner.thread import QueueWorker

log = logging.getLogger(__name__)


@dataclass
class LocalQueue:
    """A queue running here, as :class:`~vhost.dirty_logging.DirtyLogging` sees it."""

    index: int
    log_addr: int | None
    worker: QueueWorker | None


class ThreadRunner:
    """Runs each queue of one connection (``conn``) on a thread of this process."""

    def __init__(self, device: Device, state: ConnectionState, dirty_logging: DirtyLogging,
                 conn: int = 0, worker_factory: WorkerFactory = QueueWorker) -> None:
        self.device = device
        self.state = state
        self.dirty_logging = dirty_logging
        self.conn = conn
        self.worker_factory = worker_factory
        self.workers: dict[QueueKey, QueueWorker] = {}

    def start(self, spec: QueueSpec) -> RunningQueue:
        state = self.state
        worker = assemble(state.memory, state.inflight, self.device, spec, self.worker_factory)
        self.dirty_logging.queue_starting(LocalQueue(spec.key.index, spec.log_addr, worker),
                                          spec.features)
        try:
            worker.start()
        except RuntimeError as exc:  # no thread can be started (a process or memory limit)
            worker.vq.release()
            if not worker.handler.close():
                state.memory.pin(f"queue {spec.key.index}'s handler did not close")
            raise RunnerError(f"queue {spec.key.index}: no worker thread: {exc}") from exc
        self.workers[spec.key] = worker
        # (the position the queue starts from: after in-flight recovery, not the frontend's)
        log.info("queue %d started: size %d, %s ring, avail from %s%s", spec.key.index,
                 spec.size, worker.vq.layout, base_text(worker.vq.vring_base(), spec.features),
                 ", event idx" if worker.vq.event_idx else "")
        return worker

    def stop(self, key: QueueKey) -> Stopped | None:
        worker = self.workers.pop(key, None)
        if worker is None:
            return None
        drained = worker.stop()
        vq = worker.vq
        memory = self.state.memory
        if worker.alive:  # its thread may still use its ring, its engine and guest memory
            memory.pin(f"queue {key.index}'s worker thread did not stop")
        else:
            vq.release()
            if not worker.handler.close():
                memory.pin(f"queue {key.index} has disk IO that did not finish")
        return Stopped(vq.vring_base(), vq.broken, drained, worker.kicks, worker.batches,
                       worker.completed)

    def ring_state(self, key: QueueKey, timeout: float = 1.0) -> dict[str, int]:
        worker = self.workers.get(key)
        if worker is None:
            raise RunnerError(f"queue {key.index} is not running")
        return worker.ring_state(timeout)

    # The queues use the connection's own memory table, in-flight area, dirty log and
    # notifiers: what the handler changed, they see.
    def set_mem_table(self, conn: int, regions: Sequence[RegionFields],
                      fds: Sequence[int]) -> None:
        """Nothing to forward: the queues read the handler's table."""

    def add_region(self, conn: int, region: RegionFields, fd: int) -> None:
        """Nothing to forward: the queues read the handler's table."""

    def remove_region(self, conn: int, region: RegionFields) -> None:
        """Nothing to forward: the queues read the handler's table."""

    def set_inflight(self, conn: int, fd: int, mmap_size: int, mmap_offset: int,
                     num_queues: int, queue_size: int) -> None:
        """Nothing to forward: a queue starting later takes the handler's area."""

    def notifier_changed(self, key: QueueKey, which: str, fd: int | None) -> None:
        """Nothing to forward: the worker writes the handler's Notifier."""

    def device_changed(self, conn: int) -> None:
        """Nothing to forward: the queues' handlers belong to the device itself."""

    def set_features(self, conn: int, features: int) -> None:
        """Nothing to forward: the handler's dirty logging switches these queues."""

    def set_log_base(self, conn: int, fd: int, size: int, offset: int) -> None:
        """Nothing to forward: the handler's dirty logging maps the log for these queues."""

    def set_log_fd(self, conn: int, fd: int | None) -> None:
        """Nothing to forward: the handler's dirty logging signals it."""

    def set_log_addr(self, key: QueueKey, log_addr: int | None) -> None:
        """Nothing to forward: the handler's dirty logging sets it on the queue."""

    def drop_log(self, conn: int) -> None:
        """Nothing to drop: the handler's dirty logging owns the log."""

    def close(self) -> None:
        """Nothing kept (every queue stopped already)."""
