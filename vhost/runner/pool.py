"""Queue processes, the control side: start one per queue, keep them in step, notice deaths.

:class:`ProcessRunner` is the :class:`~vhost.runner.base.QueueRunner` that serves each queue in
a process of its own; it belongs to one frontend connection (:class:`vhost.handler.
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

A queue is started by spawning ``python -m vhost.runner.process`` (fork+exec through
:mod:`subprocess`, safe with the control process's threads: nothing runs between fork and exec
but the C code of ``_posixsubprocess``) on one end of a ``SOCK_SEQPACKET`` socketpair
(:mod:`vhost.runner.ipc` declares what crosses it).  Each process has a reader thread here that
hands each reply to the request with the same number (a late reply, whose request timed out
and was reported failed, is dropped with a log line); an EOF while the queue is meant to run is
a death: logged, the queue marked broken and the driver told through the err eventfd -- the
other queues and the control socket go on, and the next connection starts fresh processes.

A process that does not answer a request in time is killed: a request it may or may not have
applied (a memory table, a dirty log) cannot be left in doubt, and a dead process touches no
memory.  Its queue is then broken like after any death.

Counters are not asked for: each process writes them into a shared
:class:`~vhost.runner.ipc.CounterBlock` after each batch, and :meth:`ProcessRunner.
refresh_counters` (what a scrape calls) only copies those blocks into the device's per-queue
statistics -- no message, no lock the vhost-user control thread takes.

GET_VRING_BASE stops a queue's process cleanly: it drains the queue and answers with its next
avail index, which the handler returns.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypedDict

from vhost.queue.factory import base_text
from vhost.runner import ipc
from vhost.runner.assembly import preflight
from vhost.runner.base import (
    ConnectionState,
    QueueKey,
    QueueSpec,
    RemoteLog,
    RunnerError,
    RunningQueue,
    Stopped,
)

if TYPE_CHECKING:
    from vhost.device import Device
    from vhost.messages import RegionFields
    from vhost.runner.base import Notifier

log = logging.getLogger(__name__)

#: How long a queue process may take to start, or to answer a memory table change.
REPLY_TIMEOUT = 30.0


class QueueProcessError(RunnerError):
    """A queue process could not be started or did not answer."""


class RemoteQueue:
    """A queue a process runs, as the handler sees it: where it stopped (after ``stop``)."""

    def __init__(self, base: int = 0, broken: bool = False) -> None:
        #: GET_VRING_BASE's value, as the process answered ``stop`` with it.
        self.base = base
        self.broken = broken
        self.in_flight_count = 0


def _raw_region(region: RegionFields) -> ipc.RawRegion:
    return (region.guest_phys_addr, region.memory_size, region.userspace_addr,
            region.mmap_offset)


def send_and_wait(sock: socket.socket, send_lock: threading.Lock, replies: ipc.Replies,
                  msg: ipc.Request, fds: Sequence[int], timeout: float,
                  who: str) -> ipc.Reply:
    """Send ``msg`` numbered by ``replies`` and wait for *its* reply: Gone if the send fails
    (the process is gone), QueueProcessError naming ``who`` if no answer comes in ``timeout``
    (a reply coming later is dropped, never taken for another request's).  One copy for a
    queue process and a pool worker."""
    seq = replies.expect()
    with send_lock:
        try:
            ipc.send(sock, ipc.numbered(msg, seq), fds)
        except OSError:
            replies.forget(seq)
            return ipc.Gone()
    reply = replies.wait(seq, timeout)
    if reply is None:
        raise QueueProcessError(f"{who}: no answer to {msg.kind} (request {seq}) in "
                                f"{timeout:g} s")
    return reply


class StartFields(TypedDict):
    """The part of :class:`~vhost.runner.ipc.Start` that :class:`KeptState` describes."""

    regions: list[ipc.RawRegion]
    inflight: tuple[int, int, int, int] | None
    log: tuple[int, int] | None
    log_call: bool


class KeptState:
    """What a control process keeps of one connection for the queue processes it starts later
    (duplicates of the memory-table region fds, the in-flight area's, the dirty log's and the
    log-call eventfd, with what each maps): the one copy :class:`ProcessRunner` (a process per
    queue) and :class:`~vhost.runner.workerpool.PoolConnection` (a pool of workers) share.
    It only keeps fds; the runner forwards each change to its processes itself."""

    def __init__(self) -> None:
        self.regions: list[ipc.RawRegion] = []
        self.region_fds: list[int] = []
        self.inflight: tuple[int, tuple[int, int, int, int]] | None = None
        #: The dirty log (a duplicate of SET_LOG_BASE's fd, its size and offset) and
        #: SET_LOG_FD's eventfd (a duplicate), for processes started later.
        self.log: tuple[int, int, int] | None = None
        self.log_call: int | None = None

    def start_fields(self) -> StartFields:
        """The :class:`~vhost.runner.ipc.Start` fields that describe what :meth:`fds` holds."""
        return {"regions": list(self.regions),
                "inflight": self.inflight[1] if self.inflight else None,
                "log": self.log[1:] if self.log is not None else None,
                "log_call": self.log_call is not None}

    def fds(self) -> list[int]:
        """The kept fds in the order a child takes them after the queue's own (regions,
        in-flight area, dirty log, log call): still owned here."""
        fds = list(self.region_fds)
        if self.inflight is not None:
            fds.append(self.inflight[0])
        if self.log is not None:
            fds.append(self.log[0])
        if self.log_call is not None:
            fds.append(self.log_call)
        return fds

    def set_mem_table(self, regions: Sequence[RegionFields], fds: Sequence[int]) -> None:
        """A new table (``fds`` are the caller's, still open: duplicated)."""
        self.close_region_fds()
        self.regions = [_raw_region(r) for r in regions]
        self.region_fds = [os.dup(fd) for fd in fds]

    def add_region(self, region: RegionFields, fd: int) -> ipc.RawRegion:
        raw = _raw_region(region)
        self.regions.append(raw)
        self.region_fds.append(os.dup(fd))
        return raw

    def remove_region(self, region: RegionFields) -> ipc.RawRegion:
        """Forget the region at ``region``'s addresses (if kept); what to forward."""
        raw = _raw_region(region)
        for i, known in enumerate(self.regions):
            if known[:3] == raw[:3]:
                del self.regions[i]
                os.close(self.region_fds.pop(i))
                break
        return raw

    def set_inflight(self, fd: int, geometry: tuple[int, int, int, int]) -> None:
        if self.inflight is not None:
            os.close(self.inflight[0])
        self.inflight = (os.dup(fd), geometry)

    def set_log_base(self, fd: int, size: int, offset: int) -> None:
        self.close_log()
        self.log = (os.dup(fd), size, offset)

    def set_log_fd(self, fd: int | None) -> None:
        if self.log_call is not None:
            os.close(self.log_call)
        self.log_call = os.dup(fd) if fd is not None else None

    def drop_log(self) -> None:
        """The log is gone (device reset, end of the connection): later processes get none."""
        self.close_log()
        if self.log_call is not None:
            os.close(self.log_call)
            self.log_call = None

    def close_log(self) -> None:
        if self.log is not None:
            os.close(self.log[0])
            self.log = None

    def close_region_fds(self) -> None:
        for fd in self.region_fds:
            try:
                os.close(fd)
            except OSError as exc:
                log.debug("closing a kept region fd: %s", exc)
        self.region_fds = []

    def close(self) -> None:
        """Drop every kept fd."""
        self.close_region_fds()
        self.drop_log()
        if self.inflight is not None:
            os.close(self.inflight[0])
            self.inflight = None


class QueueProcessWorker:
    """A running queue process, seen from the control process (a
    :class:`~vhost.runner.base.RunningQueue`)."""

    drain_timeout = 30.0
    #: How long a request may wait for its reply (the process is killed after that).
    reply_timeout = REPLY_TIMEOUT

    def __init__(self, key: QueueKey, call: Notifier, err: Notifier, device: Device,
                 counters: ipc.CounterBlock | None = None) -> None:
        self.key = key
        self.index = key.index
        self.call = call
        self.err = err
        self.device = device
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.replies = ipc.Replies(f"queue {key.index}")
        #: Where the process publishes its counters (None: a test's fake process).
        self.counters = counters
        self.vq = RemoteQueue()
        #: The process's dirty logging, as it last reported (vhost.dirty_logging sums these).
        self.remote_log = RemoteLog()
        self.kicks = self.batches = self.completed = 0
        self._last_avail = 0
        self.stopping = False
        self.died = False
        self._reader: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self._frozen = False  # after the stop answer: the block no longer overrides it
        self._block_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def spawn(self, start: ipc.Start, fds: list[int]) -> None:
        """Start the process and hand it the queue; QueueProcessError if it does not start."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vhost.runner.process", str(theirs.fileno()),
                 str(os.getpid())],
                pass_fds=[theirs.fileno()],
                env={**os.environ,
                     "VHOST_QUEUEPROC_LOG_LEVEL": str(logging.getLogger().getEffectiveLevel())},
            )
        finally:
            theirs.close()
        self.attach(ours)
        ipc.send(ours, start, fds)
        reply = self._read_one(REPLY_TIMEOUT)
        if not isinstance(reply, ipc.Started):
            self._reap()
            raise QueueProcessError(reply.why if isinstance(reply, ipc.Error) else
                                    f"unexpected answer {type(reply).__name__}")
        self.start_reader()
        log.info("queue %d: serving in process %d", self.index, self.proc.pid)

    def attach(self, sock: socket.socket) -> None:
        """Talk to the process over ``sock`` (ours; a test may attach a fake's)."""
        self.sock = sock

    def start_reader(self) -> None:
        self._reader = threading.Thread(target=self._read_loop, name=f"vq{self.index}-proc",
                                        daemon=True)
        self._reader.start()

    def _read_one(self, timeout: float) -> ipc.Message:
        """The start answer, read directly (before the reader thread runs)."""
        assert self.sock is not None
        self.sock.settimeout(timeout)
        try:
            msg, fds = ipc.receive(self.sock)
            for fd in fds:
                os.close(fd)
            return msg
        except (EOFError, OSError, ValueError) as exc:
            return ipc.Error(why=f"queue process gone before starting ({exc})")
        finally:
            self.sock.settimeout(None)

    def _read_loop(self) -> None:
        assert self.sock is not None
        while True:
            try:
                msg, fds = ipc.receive(self.sock)
            except ValueError as exc:
                log.warning("queue %d: dropped a malformed message from its process: %s",
                            self.index, exc)
                continue
            except (EOFError, OSError):
                break
            for fd in fds:
                os.close(fd)
            if not isinstance(msg, ipc.Reply):
                log.warning("queue %d: dropped a %s from its process (not a reply)",
                            self.index, type(msg).__name__)
                continue
            # (the dirty-log state a reply reports is taken before its waiter goes on)
            self.replies.deliver(msg, self._note_dirty)
        self.replies.close(ipc.Gone())
        if not self.stopping:
            self.died = True
            code = self.proc.wait() if self.proc is not None else None
            log.error("queue %d: its process died (exit status %s); the queue is stopped",
                      self.index, code)
            self.err.signal()

    def _note_dirty(self, msg: ipc.Reply) -> None:
        """Take the dirty-log state a reply reports."""
        dirty = msg.dirty if isinstance(msg, (ipc.Ack, ipc.StopReply)) else None
        if dirty is not None:
            self.remote_log.logging, self.remote_log.pages = bool(dirty[0]), int(dirty[1])

    def refresh(self, dirty: bool = True) -> None:
        """Copy what the process last published (counters, avail index, and with ``dirty``
        its dirty-log state) -- shared memory only, nothing asked of the process."""
        with self._block_lock:  # (_reap may be closing it on the control thread)
            block = self.counters
            if block is None or self._frozen:
                return
            snap = block.read()
        if snap is None:
            return
        self.device.set_queue_counter_values(self.index, snap.values)
        self._last_avail = snap.next_avail
        self.vq.in_flight_count = snap.in_flight  # (the in-flight gauge a scrape reads)
        if dirty:
            self.remote_log.logging, self.remote_log.pages = snap.dirty_logging, snap.dirty_pages

    @property
    def last_avail(self) -> int:
        """The avail index the process last published (a dead process cannot say where it
        stopped)."""
        self.refresh()
        return self._last_avail

    def request(self, msg: ipc.Request, fds: Sequence[int] = (),
                timeout: float | None = None) -> ipc.Reply:
        """Send ``msg`` (numbered here) and wait for *its* reply: :class:`~vhost.runner.ipc.
        Gone` if the process is gone, QueueProcessError if it did not answer in ``timeout`` (a
        reply coming later is dropped, never taken for another request's)."""
        if not isinstance(msg, ipc.Request) or isinstance(msg, ipc.Start):
            raise TypeError(f"not a request to a running queue process: {msg!r}")
        if self.died or self.sock is None:
            return ipc.Gone()
        return send_and_wait(self.sock, self._send_lock, self.replies, msg, fds,
                             self.reply_timeout if timeout is None else timeout,
                             f"queue {self.index}")

    def kill(self, why: str) -> None:
        """End a process that cannot be trusted to have applied a request (logged)."""
        log.error("%s; killing the queue process", why)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:  # gone (and its memory with it) before the caller replies to the frontend
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                log.error("queue %d: process %d not gone 5 s after SIGKILL", self.index,
                          self.proc.pid)

    def ring_state(self, timeout: float = 1.0) -> dict[str, int]:
        """The process's queue's ring state (see :meth:`vhost.queue.split.SplitQueue.ring_state`).

        A numbered request like any other, so an answer that comes after ``timeout`` is
        dropped by the reply matcher and never taken for another request's; QueueProcessError
        if the process does not answer in time: a diagnostics query must not hang on the queue
        it is there to diagnose (and, being read-only, a late answer is no reason to kill it).
        """
        if self.died or self.sock is None:
            raise QueueProcessError(f"queue {self.index}: process not running")
        answer = self.request(ipc.RingState(key=self.key), timeout=timeout)
        if not isinstance(answer, ipc.RingStateReply):
            why = answer.why if isinstance(answer, ipc.Error) else "no state"
            raise QueueProcessError(f"queue {self.index}: {why}")
        return dict(answer.state)

    def stop(self, timeout: float | None = None) -> bool:
        """Drain and stop the process; True if every request finished."""
        self.stopping = True
        reply: ipc.Reply = ipc.Gone()
        if not self.died:
            try:
                reply = self.request(ipc.Stop(key=self.key),
                                     timeout=self.drain_timeout + 5 if timeout is None else timeout)
            except QueueProcessError as exc:
                self.kill(str(exc))
        # Its final counters (published before its answer; the answer's dirty-log state, which
        # says whether it was logging until it stopped, stays).
        self.refresh(dirty=False)
        self._frozen = True
        if isinstance(reply, ipc.StopReply):
            self.vq = RemoteQueue(reply.base, reply.broken)
            self.kicks, self.batches = reply.kicks, reply.batches
            self.completed = reply.completed
            self.call.count += reply.calls  # the process signalled through its own copy
            drained = reply.drained
            if not drained and self.proc is not None:
                # Requests may still run in it: only its end stops them touching guest memory.
                self.kill(f"queue {self.index}: requests still in flight at stop")
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
        with self._block_lock:
            if self.counters is not None:
                self.counters.close()
                self.counters = None

    def quiesce(self, timeout: float = 5.0) -> bool:
        """Nothing of the control process's is used by a queue process between passes."""
        return True

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ProcessRunner:
    """Every queue process of one connection (``conn``), and what a new one needs."""

    def __init__(self, device: Device, state: ConnectionState | None = None,
                 conn: int = 0) -> None:
        self.device = device
        #: The connection's own memory table and in-flight area: a ring is checked against
        #: them before a process is spawned for it (None: a test's runner, no checks).
        self.state = state
        self.conn = conn
        self.kept = KeptState()
        self.workers: dict[QueueKey, QueueProcessWorker] = {}
        device.attach_runner(self)

    def refresh_counters(self) -> None:
        """Every running process's counters as it last published them (shared memory: no
        message to any process, so a scrape never waits for one or for the control thread)."""
        for worker in list(self.workers.values()):
            worker.refresh()

    # ------------------------------------------------------------------ queues
    def start(self, spec: QueueSpec) -> RunningQueue:
        """Start ``spec``'s queue in a process of its own (which validates the ring as a
        thread would; it is checked here first, so a bad one is refused without a spawn)."""
        if self.state is not None:
            preflight(self.state.memory, self.state.inflight, spec)
        target, kwargs, device_fds = self.device.process_recipe()
        start = ipc.Start(
            key=spec.key, size=spec.size, ring_uaddrs=spec.ring_uaddrs,
            features=spec.features, base=spec.base, **self.kept.start_fields(),
            recipe=(target, kwargs), state=self.device.process_state(), log_addr=spec.log_addr,
            counter_slots=self.device.counter_slots(),
        )
        call, err = spec.call, spec.err
        counters, counters_fd = ipc.CounterBlock.create(start.counter_slots)
        call_fd = call.fd if call.fd is not None else os.eventfd(0, os.EFD_CLOEXEC)
        err_fd = err.fd if err.fd is not None else os.eventfd(0, os.EFD_CLOEXEC)
        fds = [spec.kick_fd, call_fd, err_fd, counters_fd, *self.kept.fds(), *device_fds]
        worker = QueueProcessWorker(spec.key, call, err, self.device, counters)
        try:
            worker.spawn(start, fds)
        except BaseException:
            counters.close()
            raise
        finally:
            os.close(counters_fd)
            for fd, mine in ((call_fd, call.fd), (err_fd, err.fd)):
                if mine is None:
                    os.close(fd)
        self.workers[spec.key] = worker
        log.info("queue %d started in a process: size %d, avail from %s", spec.key.index,
                 spec.size, base_text(spec.base, spec.features))
        return worker

    def stop(self, key: QueueKey) -> Stopped | None:
        worker = self.workers.pop(key, None)
        if worker is None:
            return None
        drained = worker.stop()
        return Stopped(worker.vq.base, worker.vq.broken, drained, worker.kicks,
                       worker.batches, worker.completed)

    def ring_state(self, key: QueueKey, timeout: float = 1.0) -> dict[str, int]:
        worker = self.workers.get(key)
        if worker is None:
            raise QueueProcessError(f"queue {key.index} is not running")
        return worker.ring_state(timeout)

    def _broadcast(self, conn: int, msg: ipc.Request, fds: Sequence[int] = ()) -> list[int]:
        """Send to every running process of connection ``conn`` (``msg``'s key is set per
        process); wait for each to acknowledge.  The queues whose process refused or did not
        answer in time (logged here; a silent one is killed: it may or may not have applied
        the change, and only a dead process surely does not act on the old state)."""
        failed = []
        for key, worker in list(self.workers.items()):
            if key.conn != conn:
                continue
            reply = self._ask(worker, dataclasses.replace(msg, key=key), fds)
            if not isinstance(reply, (ipc.Ack, ipc.Gone)):
                failed.append(worker.index)
        return failed

    @staticmethod
    def _ask(worker: QueueProcessWorker, msg: ipc.Request,
             fds: Sequence[int] = ()) -> ipc.Reply | None:
        """One request; a refusal is logged, a timeout kills the process (both are failures:
        the answer is never an acknowledgement; None for a timeout)."""
        try:
            reply = worker.request(msg, fds)
        except QueueProcessError as exc:
            worker.kill(str(exc))
            return None
        if isinstance(reply, ipc.Error):
            log.error("queue %d: %s refused: %s", worker.index, msg.kind, reply.why)
        return reply

    # ------------------------------------------------------------------ what processes need
    def set_mem_table(self, conn: int, regions: Sequence[RegionFields],
                      fds: Sequence[int]) -> None:
        """The table the handler just mapped (``fds`` are the caller's, still open)."""
        self.kept.set_mem_table(regions, fds)
        self._broadcast(conn, ipc.MemTable(key=_ANY, regions=self.kept.regions), fds)

    def add_region(self, conn: int, region: RegionFields, fd: int) -> None:
        raw = self.kept.add_region(region, fd)
        self._broadcast(conn, ipc.AddRegion(key=_ANY, region=raw), [fd])

    def remove_region(self, conn: int, region: RegionFields) -> None:
        raw = self.kept.remove_region(region)
        self._broadcast(conn, ipc.RemoveRegion(key=_ANY, region=raw))

    def set_inflight(self, conn: int, fd: int, mmap_size: int, mmap_offset: int,
                     num_queues: int, queue_size: int) -> None:
        self.kept.set_inflight(fd, (mmap_size, mmap_offset, num_queues, queue_size))

    def notifier_changed(self, key: QueueKey, which: str, fd: int | None) -> None:
        worker = self.workers.get(key)
        if worker is not None:
            self._ask(worker, ipc.SetNotifier(key=key, which=which),
                      [fd] if fd is not None else [])

    def device_changed(self, conn: int) -> None:
        self._broadcast(conn, ipc.DeviceState(key=_ANY, state=self.device.process_state()))

    def state_changed(self) -> None:
        """The device's process state changed outside a vhost-user message (a resize)."""
        self.device_changed(self.conn)

    # ------------------------------------------------------------------ dirty log
    def set_log_base(self, conn: int, fd: int, size: int, offset: int) -> None:
        """SET_LOG_BASE (``fd`` is the caller's, still open; the handler mapped it already):
        every process maps the new log and stops marking the old one before this returns.
        QueueProcessError if a process could not: its marks would be lost."""
        self.kept.set_log_base(fd, size, offset)
        failed = self._broadcast(conn, ipc.LogBase(key=_ANY, size=size, offset=offset), [fd])
        if failed:
            raise QueueProcessError(f"queue process(es) of queue(s) {failed} did not map the "
                                    f"dirty log")

    def set_log_fd(self, conn: int, fd: int | None) -> None:
        """SET_LOG_FD's eventfd (the caller's, still open), signalled after marks."""
        self.kept.set_log_fd(fd)
        self._broadcast(conn, ipc.LogFd(key=_ANY), [fd] if fd is not None else [])

    def set_features(self, conn: int, features: int) -> None:
        """SET_FEATURES (VHOST_F_LOG_ALL on or off, with the queues running)."""
        self._broadcast(conn, ipc.Features(key=_ANY, features=features))

    def set_log_addr(self, key: QueueKey, log_addr: int | None) -> None:
        """SET_VRING_ADDR of a running queue: its used-ring log address."""
        worker = self.workers.get(key)
        if worker is not None:
            self._ask(worker, ipc.LogAddr(key=key, log_addr=log_addr))

    def drop_log(self, conn: int) -> None:
        """The log is gone (device reset, end of the connection): later processes get none."""
        self.kept.drop_log()

    def close(self) -> None:
        """After every queue stopped: drop the kept fds."""
        self.device.detach_runner(self)
        self.kept.close()


#: The key of a message sent to every process of a connection (each gets its own key).
_ANY = QueueKey(-1, -1)
