"""Dirty-page logging for live migration: one connection's log and the queues' markers.

QEMU drives it (``hw/virtio/vhost.c``, ``vhost_migration_log``): at the start of a migration
``SET_LOG_BASE`` (the log memfd; QEMU waits for our reply), ``SET_FEATURES`` with
``VHOST_F_LOG_ALL`` (QEMU waits for it to be processed) and ``SET_VRING_ADDR`` with
``VHOST_VRING_F_LOG`` for each ring -- all while the queues run; at the end or on a cancel the
same without the flags.  A new ``SET_LOG_BASE`` may come at any time (the log grows with
memory hot-plug).

Logging is on while ``VHOST_F_LOG_ALL`` is acked and a log is mapped.  Each running queue then
has a :class:`~guestmem.dirty_log.DirtyMarker`, stored in its ``SplitQueue`` and its
``QueueHandler`` (the only thing their hot paths check: one attribute, None when off).  Every
change is published by plain stores, then each worker is made to pass a quiescent point
(:meth:`QueueWorker.quiesce`) before the message is answered:

* on: the writes a worker made in a pass that still saw no marker are finished -- and visible
  -- before QEMU, told we are done, starts copying memory;
* a new log: no worker marks the old one once QEMU reads it for the last time, and its mapping
  can go;
* off: nothing more to guarantee (QEMU no longer reads the log).

A queue served in a process of its own (:mod:`vhost.runner.process`) runs this same class there, on
the messages the control process forwards to it (:mod:`vhost.runner.pool`: the log's fd, the
features, the used-ring log address -- each acknowledged before the frontend gets its reply).
The control process's instance then only sums what each process reports (:class:`RemoteLog`):
whether it logs and how many pages it marked.  Every process maps the same shared bitmap and
marks it with the same atomic OR, so marks from several processes and QEMU's clearing lose
nothing (:mod:`guestmem.dirty_log`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from guestmem.dirty_log import DirtyLog, DirtyMarker
from vhost.device import Device
from vhost.messages import VHOST_F_LOG_ALL
from vhost.runner.base import Notifier, RemoteLog, RunningQueue
from vhost.runner.thread import QueueWorker

log = logging.getLogger(__name__)


class LoggedQueue(Protocol):
    """What this module needs of a queue (:class:`vhost.handler.Vring`, or the runner's own
    record of a queue it runs: :class:`vhost.runner.thread_runner.LocalQueue`, a queue
    process's)."""

    @property
    def index(self) -> int: ...

    log_addr: int | None

    @property
    def worker(self) -> RunningQueue | None: ...


#: Logs that could not be unmapped (see :meth:`DirtyLogging._unmap`).
KEPT_LOGS: list[DirtyLog] = []

__all__ = ["KEPT_LOGS", "DirtyLogging", "LoggedQueue", "RemoteLog"]


def _remote(vring: LoggedQueue) -> RemoteLog | None:
    """The reported state of a queue that logs in a process of its own; None for a thread."""
    return vring.worker.remote_log if vring.worker is not None else None


def _local(vring: LoggedQueue) -> QueueWorker | None:
    """The worker of a queue that marks the log in this process (None: none, or elsewhere)."""
    worker = vring.worker
    return worker if isinstance(worker, QueueWorker) else None


class DirtyLogging:
    """The mapped log, the logs waiting to be unmapped, SET_LOG_FD's eventfd, the counters."""

    def __init__(self) -> None:
        self.log: DirtyLog | None = None
        self.retired: list[DirtyLog] = []
        #: SET_LOG_FD: signalled after marks are committed.
        self.call = Notifier()
        #: Also called after marks are committed, on the marking thread (a queue process
        #: publishes its count then).
        self.on_marks: Callable[[], None] | None = None
        self._pages_done = 0  # marked by queues that have stopped or stopped logging since
        #: A worker that may still mark outlived its stop: no log is unmapped any more.
        self.pinned = False

    # ------------------------------------------------------------------ state
    def wanted(self, acked_features: int) -> bool:
        return bool(acked_features & VHOST_F_LOG_ALL) and self.log is not None

    @staticmethod
    def logging(vrings: Sequence[LoggedQueue]) -> bool:
        """Whether any queue marks the log now."""
        for v in vrings:
            remote = _remote(v)
            if remote is not None:
                if remote.logging:
                    return True
            elif (local := _local(v)) is not None and local.vq.dirty is not None:
                return True
        return False

    def pages_marked(self, vrings: Sequence[LoggedQueue]) -> int:
        """Pages the queues marked in dirty logs over this connection (summed across queue
        processes, as each last reported)."""
        live = 0
        for v in vrings:
            remote = _remote(v)
            if remote is not None:
                live += remote.pages
                continue
            local = _local(v)
            marker = local.vq.dirty if local is not None else None
            if marker is not None:
                live += marker.pages
        return self._pages_done + live

    # ------------------------------------------------------------------ queues
    def queue_starting(self, vring: LoggedQueue, acked_features: int) -> None:
        """A queue's worker is made but not started: its used-ring log address, its marker."""
        local = _local(vring)
        assert local is not None, "a queue process attaches its own"
        if vring.log_addr is not None:
            local.vq.used_log_addr = vring.log_addr
        if self.wanted(acked_features):
            self._attach(local)

    def queue_stopped(self, vring: LoggedQueue) -> bool:
        """Count a stopped queue's marks (its last flush committed them); True if it was
        logging (the end of a migration, if it was the last queue)."""
        assert vring.worker is not None
        remote = _remote(vring)
        if remote is None and vring.worker.alive:
            # Its stop timed out: the thread may still be in a pass holding the marker.
            if not self.pinned:
                log.error("queue %d: its worker did not stop; dirty logs stay mapped for the "
                          "life of the process", vring.index)
            self.pinned = True
        if remote is not None:  # its stop answer reported where it ended
            self._pages_done += remote.pages
            was, remote.logging, remote.pages = remote.logging, False, 0
            return was
        local = _local(vring)
        if local is None:
            return False
        vq = local.vq
        marker = vq.dirty
        if marker is None:
            return False
        self._pages_done += marker.pages
        vq.dirty = None
        return True

    def set_log_addr(self, vring: LoggedQueue, log_addr: int | None) -> None:
        """VHOST_VRING_F_LOG's used-ring log address, also for a running queue."""
        vring.log_addr = log_addr
        local = _local(vring)
        if local is not None:  # (a queue process is told by its runner)
            vq = local.vq
            vq.used_log_addr = vq.addresses.used if log_addr is None else log_addr

    def _attach(self, worker: QueueWorker) -> None:
        assert self.log is not None
        marker = DirtyMarker(self.log, self._marked)
        # The ring first: whatever the device records is then committed by the ring's flush.
        worker.vq.dirty = marker
        worker.handler.dirty = marker

    def _marked(self) -> None:
        self.call.signal()
        if self.on_marks is not None:
            self.on_marks()

    def _detach(self, worker: QueueWorker) -> None:
        vq = worker.vq
        marker = vq.dirty
        worker.handler.dirty = None
        vq.dirty = None
        if marker is not None:
            self._pages_done += marker.pages

    # ------------------------------------------------------------------ transitions
    def update(self, vrings: Sequence[LoggedQueue], acked_features: int,
               force_quiesce: bool = False) -> None:
        """Bring every running queue's marker in line with the features and the log."""
        want = self.wanted(acked_features)
        current = self.log
        changed = force_quiesce
        switched = False
        for vring in vrings:
            local = _local(vring)
            if local is None:
                continue  # not running, or a queue process, which runs this same code on the
                # message its runner forwards
            marker = local.vq.dirty
            if want and marker is None:
                self._attach(local)
                changed = switched = True
            elif want and marker is not None and current is not None and marker.log is not current:
                marker.log = current  # a new log (resize): pending marks go to it
                changed = True
            elif not want and marker is not None:
                self._detach(local)
                changed = switched = True
        if not changed:
            return
        if self._quiesce(vrings):
            self._close_retired()
        if switched:
            log.info("dirty logging %s (%d pages marked so far)", "on" if want else "off",
                     self.pages_marked(vrings))

    def set_base(self, new: DirtyLog, vrings: Sequence[LoggedQueue], acked_features: int) -> None:
        """SET_LOG_BASE: use ``new`` from now on; the old log goes once nobody can mark it."""
        old, self.log = self.log, new
        if old is not None:
            self.retired.append(old)
        log.info("dirty log: %d bytes (%d pages of 4 KiB)", new.size, new.pages)
        self.update(vrings, acked_features, force_quiesce=old is not None)
        if not any(v.worker is not None for v in vrings):
            self._close_retired()

    @staticmethod
    def _quiesce(vrings: Sequence[LoggedQueue]) -> bool:
        quiet = True
        for vring in vrings:
            worker = vring.worker
            if worker is not None and not worker.quiesce():
                log.error("queue %d did not pass a quiescent point; an old dirty log stays "
                          "mapped until the connection ends", vring.index)
                quiet = False
        return quiet

    def _close_retired(self) -> None:
        self._unmap(self.retired)
        self.retired.clear()

    def _unmap(self, logs: Sequence[DirtyLog]) -> None:
        """Unmap ``logs``; keep them mapped for good if a worker that may mark them is still
        running (an atomic OR into an unmapped log would kill the server)."""
        if self.pinned:
            KEPT_LOGS.extend(logs)
            return
        for old in logs:
            old.close()

    @staticmethod
    def make_durable_at_stop(device: Device) -> None:
        """The source VM stops at the end of a migration (its last logged queue stopped): make
        what the device completed durable before the destination, on other storage caches
        perhaps, can run the guest -- QEMU's own block layer flushes at this point too."""
        try:
            device.make_durable()
        except OSError as exc:
            log.error("making the disk durable at the end of the migration failed: %s", exc)
        else:
            log.info("queues stopped while logging (end of a migration): device flushed")

    def drop(self, vrings: Sequence[LoggedQueue], report: bool = True) -> None:
        """Unmap every log (the queues are stopped).  ``report``: log the connection's total
        (a queue process does not: the control process reports the sum)."""
        if report and (self.log is not None or self.retired):
            log.info("dirty log closed: %d pages marked over the connection",
                     self.pages_marked(vrings))
        self._close_retired()
        if self.log is not None:
            self._unmap([self.log])
            self.log = None

    def close(self, vrings: Sequence[LoggedQueue], report: bool = True) -> None:
        self.drop(vrings, report)
        self.call.close()
