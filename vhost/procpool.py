"""Queue processes, the control side: start one per queue, keep them in step, notice deaths.

:class:`QueueProcesses` belongs to one frontend connection (:class:`vhost.handler.
BackendHandler` makes it when the device serves queues in processes).  It keeps what a queue
process will need that the handler itself closes once used -- duplicates of the guest memory fds
and of the in-flight area fd -- and forwards every change to the processes running:

* a memory table change (SET_MEM_TABLE, ADD/REM_MEM_REG) is sent to every queue process and
  acknowledged by each *before* the handler replies to the frontend, so no queue ever reads a
  ring through a table the frontend believes gone;
* a new call/err eventfd for a running queue, and device state (the cache mode), likewise;
* the dirty-page log of a live migration (SET_LOG_BASE's memfd, SET_LOG_FD's eventfd, the
  features that switch VHOST_F_LOG_ALL, a ring's used-ring log address): each process maps the
  log itself and runs :class:`vhost.dirty_logging.DirtyLogging` on its queue, acknowledging
  before the frontend gets its reply; it reports whether it logs and the pages it marked with
  its counters and in every answer (the worker's ``remote_log``), which the handler sums.

A queue is started by spawning ``python -m vhost.queueproc`` (fork+exec through
:mod:`subprocess`, safe with the control process's threads: nothing runs between fork and exec
but the C code of ``_posixsubprocess``) on one end of a ``SOCK_SEQPACKET`` socketpair.  Each
process has a reader thread here that takes its messages: replies go to whoever waits for
them; counters go into the device's per-queue statistics (so ``device.stats`` sums every
process); an EOF while the queue is meant to run is a death: logged, the queue marked broken and
the driver told through the err eventfd -- the other queues and the control socket go on, and
the next connection starts fresh processes.

GET_VRING_BASE stops a queue's process cleanly: it drains the queue and answers with its next
avail index, which the handler returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from .dirty_logging import RemoteLog
from .queueproc import receive, send

if TYPE_CHECKING:
    from .device import Device
    from .messages import RegionFields
    from .worker import Notifier

log = logging.getLogger(__name__)

#: How long a queue process may take to start, or to answer a memory table change.
REPLY_TIMEOUT = 30.0


class QueueProcessError(Exception):
    """A queue process could not be started or did not answer."""


class RemoteQueue:
    """A queue a process runs, as the handler sees it: where it stopped (after ``stop``)."""

    def __init__(self, next_avail: int = 0, broken: bool = False) -> None:
        self.next_avail = next_avail
        self.broken = broken
        self.in_flight_count = 0

    def release(self) -> None:
        """Nothing to unmap here: the process mapped the rings."""


def _raw_region(region: RegionFields) -> tuple[int, int, int, int]:
    return (region.guest_phys_addr, region.memory_size, region.userspace_addr,
            region.mmap_offset)


class QueueProcessWorker:
    """A running queue process, seen from the control process (a QueueWorker look-alike)."""

    drain_timeout = 30.0

    def __init__(self, index: int, call: Notifier, err: Notifier, device: Device) -> None:
        self.index = index
        self.call = call
        self.err = err
        self.device = device
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.replies: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.vq = RemoteQueue()
        #: The process's dirty logging, as it last reported (vhost.dirty_logging sums these).
        self.remote_log = RemoteLog()
        self.kicks = self.batches = self.completed = 0
        self.last_avail = 0  # as last reported (a dead process cannot say where it stopped)
        self.stopping = False
        self.died = False
        self._reader: threading.Thread | None = None
        self._send_lock = threading.Lock()
        #: Answers to ring_state queries, kept apart from the replies the handler waits for:
        #: a late one must never be taken for the answer to a stop or a memory table change.
        self._ring_states: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()

    # ------------------------------------------------------------------ lifecycle
    def spawn(self, start: dict[str, Any], fds: list[int]) -> None:
        """Start the process and hand it the queue; QueueProcessError if it does not start."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vhost.queueproc", str(theirs.fileno()),
                 str(os.getpid())],
                pass_fds=[theirs.fileno()],
                env={**os.environ,
                     "VHOST_QUEUEPROC_LOG_LEVEL": str(logging.getLogger().getEffectiveLevel())},
            )
        finally:
            theirs.close()
        self.sock = ours
        send(ours, start, fds)
        reply = self._read_one(REPLY_TIMEOUT)
        if reply.get("kind") != "started":
            self._reap()
            raise QueueProcessError(reply.get("why", "no answer"))
        self._reader = threading.Thread(target=self._read_loop, name=f"vq{self.index}-proc",
                                        daemon=True)
        self._reader.start()
        log.info("queue %d: serving in process %d", self.index, self.proc.pid)

    def _read_one(self, timeout: float) -> dict[str, Any]:
        """A message read directly (before the reader thread runs)."""
        assert self.sock is not None
        self.sock.settimeout(timeout)
        try:
            while True:
                msg, fds = receive(self.sock)
                for fd in fds:
                    os.close(fd)
                self._note_dirty(msg)
                if msg.get("kind") != "counters":
                    return dict(msg)
                self.device.set_queue_counters(self.index, msg["counters"])
        except (EOFError, OSError) as exc:
            return {"kind": "error", "why": f"queue process gone before starting ({exc})"}
        finally:
            self.sock.settimeout(None)

    def _read_loop(self) -> None:
        assert self.sock is not None
        while True:
            try:
                msg, fds = receive(self.sock)
            except (EOFError, OSError):
                break
            for fd in fds:
                os.close(fd)
            if "counters" in msg:
                self.device.set_queue_counters(self.index, msg["counters"])
            if "next_avail" in msg:
                self.last_avail = msg["next_avail"]
            self._note_dirty(msg)
            if msg.get("kind") == "ring_state":
                self._ring_states.put(msg)
            elif msg.get("kind") != "counters":
                self.replies.put(msg)
        self.replies.put({"kind": "eof"})
        if not self.stopping:
            self.died = True
            code = self.proc.wait() if self.proc is not None else None
            log.error("queue %d: its process died (exit status %s); the queue is stopped",
                      self.index, code)
            self.err.signal()

    def _note_dirty(self, msg: dict[str, Any]) -> None:
        """Take the dirty-log state a message reports (before its answer is handed on)."""
        dirty = msg.get("dirty")
        if dirty is not None:
            self.remote_log.logging, self.remote_log.pages = bool(dirty[0]), int(dirty[1])

    def request(self, msg: dict[str, Any], fds: list[int] | None = None,
                timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        """Send ``msg`` and wait for the answer (the process is the only one talking back)."""
        if self.died or self.sock is None:
            return {"kind": "eof"}
        with self._send_lock:
            try:
                send(self.sock, msg, fds or [])
            except OSError:
                return {"kind": "eof"}
            try:
                return self.replies.get(timeout=timeout)
            except queue.Empty as exc:
                raise QueueProcessError(f"queue {self.index}: no answer to {msg['kind']} in "
                                        f"{timeout:.0f} s") from exc

    def ring_state(self, timeout: float = 1.0) -> dict[str, int]:
        """The process's queue's ring state (see :meth:`vhost.virtqueue.VirtQueue.ring_state`).

        QueueProcessError if the process does not answer within ``timeout``: a diagnostics
        query must not hang on the queue it is there to diagnose.  It never waits on the
        handler's replies (its answers come on a channel of their own), and takes the send
        lock -- held while the handler waits for a reply -- for ``timeout`` at most.
        """
        if self.died or self.sock is None:
            raise QueueProcessError(f"queue {self.index}: process not running")
        deadline = time.monotonic() + timeout
        while True:  # answers to earlier queries that timed out
            try:
                self._ring_states.get_nowait()
            except queue.Empty:
                break
        if not self._send_lock.acquire(timeout=timeout):
            raise QueueProcessError(f"queue {self.index}: process busy for {timeout} s")
        try:
            send(self.sock, {"kind": "ring_state"})
        except OSError as exc:
            raise QueueProcessError(f"queue {self.index}: {exc}") from exc
        finally:
            self._send_lock.release()
        try:
            answer = self._ring_states.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise QueueProcessError(f"queue {self.index}: no ring state in {timeout} s") from None
        if "state" not in answer:
            raise QueueProcessError(f"queue {self.index}: {answer.get('why', 'no state')}")
        return dict(answer["state"])

    def stop(self, timeout: float | None = None) -> bool:
        """Drain and stop the process; True if every request finished."""
        self.stopping = True
        reply: dict[str, Any] = {"kind": "eof"}
        if not self.died:
            try:
                reply = self.request({"kind": "stop"},
                                     timeout=self.drain_timeout + 5 if timeout is None else timeout)
            except QueueProcessError as exc:
                log.error("%s; killing it", exc)
        if reply.get("kind") == "stopped":
            self.vq = RemoteQueue(reply["next_avail"], reply["broken"])
            self.kicks, self.batches = reply["kicks"], reply["batches"]
            self.completed = reply["completed"]
            self.call.count += reply["calls"]  # the process signalled through its own copy
            drained = bool(reply["drained"])
        else:
            # Dead or silent: its in-flight requests are lost to it.  The avail index it last
            # reported is the best restart point we have (with an in-flight area, a restart
            # resubmits what was popped and not completed; without, the driver must reset).
            self.vq = RemoteQueue(self.last_avail, True)
            drained = False
        self._reap()
        return drained

    def _reap(self) -> None:
        proc = self.proc
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5)
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def quiesce(self, timeout: float = 5.0) -> bool:
        """Nothing of the control process's is used by a queue process between passes."""
        return True

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class QueueProcesses:
    """Every queue process of one connection, and what a new one needs."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self._regions: list[tuple[int, int, int, int]] = []
        self._region_fds: list[int] = []
        self._inflight: tuple[int, tuple[int, int, int, int]] | None = None
        #: The dirty log (a duplicate of SET_LOG_BASE's fd, its size and offset) and
        #: SET_LOG_FD's eventfd (a duplicate), for processes started later.
        self._log: tuple[int, int, int] | None = None
        self._log_call: int | None = None
        self.workers: dict[int, QueueProcessWorker] = {}
        device.refresh_counters = self.refresh_counters
        device.process_state_changed = self.device_changed

    def refresh_counters(self) -> None:
        """Ask every running process for its counters (they also come every 0.1 s unasked)."""
        for worker in list(self.workers.values()):
            with contextlib.suppress(QueueProcessError):
                worker.request({"kind": "counters"}, timeout=5.0)

    # ------------------------------------------------------------------ queues
    def start(self, index: int, size: int, addresses: tuple[int, int, int], features: int,
              base: int, kick_fd: int, call: Notifier, err: Notifier,
              log_addr: int | None = None) -> QueueProcessWorker:
        """Start queue ``index`` in a process of its own (``log_addr``: VHOST_VRING_F_LOG's
        used-ring log address, if the frontend gave one)."""
        target, kwargs, device_fds = self.device.process_recipe()
        start: dict[str, Any] = {
            "kind": "start", "index": index, "size": size, "addresses": addresses,
            "features": features, "base": base, "regions": self._regions,
            "inflight": self._inflight[1] if self._inflight else None,
            "recipe": (target, kwargs), "state": self.device.process_state(),
            "log": self._log[1:] if self._log is not None else None,
            "log_call": self._log_call is not None, "log_addr": log_addr,
        }
        call_fd = call.fd if call.fd is not None else os.eventfd(0, os.EFD_CLOEXEC)
        err_fd = err.fd if err.fd is not None else os.eventfd(0, os.EFD_CLOEXEC)
        fds = [kick_fd, call_fd, err_fd, *self._region_fds]
        if self._inflight is not None:
            fds.append(self._inflight[0])
        if self._log is not None:
            fds.append(self._log[0])
        if self._log_call is not None:
            fds.append(self._log_call)
        fds.extend(device_fds)
        worker = QueueProcessWorker(index, call, err, self.device)
        try:
            worker.spawn(start, fds)
        finally:
            for fd, mine in ((call_fd, call.fd), (err_fd, err.fd)):
                if mine is None:
                    os.close(fd)
        self.workers[index] = worker
        return worker

    def stopped(self, index: int) -> None:
        self.workers.pop(index, None)

    def _broadcast(self, msg: dict[str, Any], fds: list[int] | None = None) -> list[int]:
        """Send to every running process; wait for each to acknowledge.  The queues whose
        process refused (logged here)."""
        refused = []
        for worker in list(self.workers.values()):
            reply = worker.request(msg, fds)
            if reply.get("kind") == "error":
                log.error("queue %d: %s refused: %s", worker.index, msg["kind"], reply["why"])
                refused.append(worker.index)
        return refused

    # ------------------------------------------------------------------ what processes need
    def set_mem_table(self, regions: list[RegionFields], fds: list[int]) -> None:
        """The table the handler just mapped (``fds`` are the caller's, still open)."""
        self._close_region_fds()
        self._regions = [_raw_region(r) for r in regions]
        self._region_fds = [os.dup(fd) for fd in fds]
        self._broadcast({"kind": "mem_table", "regions": self._regions}, fds)

    def add_region(self, region: RegionFields, fd: int) -> None:
        self._regions.append(_raw_region(region))
        self._region_fds.append(os.dup(fd))
        self._broadcast({"kind": "add_region", "region": _raw_region(region)}, [fd])

    def remove_region(self, region: RegionFields) -> None:
        raw = _raw_region(region)
        for i, known in enumerate(self._regions):
            if known[:3] == raw[:3]:
                del self._regions[i]
                os.close(self._region_fds.pop(i))
                break
        self._broadcast({"kind": "remove_region", "region": raw})

    def set_inflight(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
                     queue_size: int) -> None:
        if self._inflight is not None:
            os.close(self._inflight[0])
        self._inflight = (os.dup(fd), (mmap_size, mmap_offset, num_queues, queue_size))

    def notifier_changed(self, index: int, which: str, fd: int | None) -> None:
        worker = self.workers.get(index)
        if worker is not None:
            worker.request({"kind": "notifier", "which": which}, [fd] if fd is not None else [])

    def device_changed(self) -> None:
        self._broadcast({"kind": "state", "state": self.device.process_state()})

    # ------------------------------------------------------------------ dirty log
    def set_log_base(self, fd: int, size: int, offset: int) -> None:
        """SET_LOG_BASE (``fd`` is the caller's, still open; the handler mapped it already):
        every process maps the new log and stops marking the old one before this returns.
        QueueProcessError if a process could not: its marks would be lost."""
        self._close_log()
        self._log = (os.dup(fd), size, offset)
        refused = self._broadcast({"kind": "log_base", "size": size, "offset": offset}, [fd])
        if refused:
            raise QueueProcessError(f"queue process(es) of queue(s) {refused} cannot map the "
                                    f"dirty log")

    def set_log_fd(self, fd: int | None) -> None:
        """SET_LOG_FD's eventfd (the caller's, still open), signalled after marks."""
        if self._log_call is not None:
            os.close(self._log_call)
        self._log_call = os.dup(fd) if fd is not None else None
        self._broadcast({"kind": "log_fd"}, [fd] if fd is not None else [])

    def set_features(self, features: int) -> None:
        """SET_FEATURES (VHOST_F_LOG_ALL on or off, with the queues running)."""
        self._broadcast({"kind": "features", "features": features})

    def set_log_addr(self, index: int, log_addr: int | None) -> None:
        """SET_VRING_ADDR of a running queue: its used-ring log address."""
        worker = self.workers.get(index)
        if worker is not None:
            reply = worker.request({"kind": "log_addr", "log_addr": log_addr})
            if reply.get("kind") == "error":
                log.error("queue %d: log_addr refused: %s", index, reply["why"])

    def drop_log(self) -> None:
        """The log is gone (device reset, end of the connection): later processes get none."""
        self._close_log()
        if self._log_call is not None:
            os.close(self._log_call)
            self._log_call = None

    def _close_log(self) -> None:
        if self._log is not None:
            os.close(self._log[0])
            self._log = None

    def _close_region_fds(self) -> None:
        for fd in self._region_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._region_fds = []

    def close(self) -> None:
        """After every queue stopped: drop the kept fds."""
        if self.device.refresh_counters == self.refresh_counters:
            self.device.refresh_counters = None
        if self.device.process_state_changed == self.device_changed:
            self.device.process_state_changed = None
        self._close_region_fds()
        self.drop_log()
        if self._inflight is not None:
            os.close(self._inflight[0])
            self._inflight = None
