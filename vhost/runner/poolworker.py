"""One worker process of the queue pool: the child side of :mod:`vhost.runner.workerpool`.

Why: a process per queue (:mod:`vhost.runner.process`) uses every core for one disk, but a host's
worth of disks -- 64 exports of 2 queues -- would be 128 interpreters, over a gigabyte of memory
for interpreters that mostly sleep.  A pool worker is one interpreter running the queues of any
number of devices and connections, the way SPDK's reactors do: the pool keeps a fixed number of
them (one per two cores by default) and places each started queue on one.

One thread, one ``epoll`` over everything it serves: the control socket, and for each hosted
queue its kick eventfd and its IO engine's completion fd.  A wake-up on a queue's fd runs that
queue's pass (:meth:`vhost.runner.thread.QueueWorker._service`: reap, drain the ring, publish,
signal once -- the same code a queue thread runs); a message on the control socket is answered
between passes, so every change the control process forwards (a memory table, a dirty log) is
applied at a point where no queue of this worker is inside a pass: that *is* the quiescent
point the dirty logging needs.  Nothing runs on a timer: an idle queue costs no wake-up.

Per connection (``QueueKey.conn``) the worker keeps one :class:`HostedConn`: the guest memory
mapped once and shared by that connection's queues here, its in-flight area, its dirty logging
and its device (rebuilt from the device's recipe, as a queue process does).  The first queue of
a connection brings all of that (:class:`~vhost.runner.ipc.Start`); a later one says
``hosted`` and brings only its own fds.  When the last queue of a connection here stops, its
state is unmapped and closed.

Messages are :mod:`vhost.runner.ipc`'s: connection-wide ones (``MemTable``, ``LogBase``, ...)
act on ``key.conn``; queue ones (``Stop``, ``SetNotifier``, ``LogAddr``, ``RingState``) on the
key.  ``Stop`` drains that queue only (other queues here wait meanwhile: a drain waits for IO the
engine already has, normally milliseconds; a drain that times out means IO may still write
guest memory, so the whole worker exits at once and the control process breaks its queues).

Kill -9 of the control process kills the workers too (PR_SET_PDEATHSIG); an EOF on the control
socket stops every queue.  Counters go to one shared :class:`~vhost.runner.ipc.CounterBlock`
per queue, as in a queue process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from vhost.device import QueueHandler
from vhost.dirty_logging import DirtyLogging
from vhost.memory import MemoryTable
from vhost.queue.base import Queue
from vhost.queue.inflight import InflightArea
from vhost.runner import ipc
from vhost.runner.assembly import assemble
from vhost.runner.base import Notifier, QueueKey, QueueSpec
from vhost.runner.process import (
    REFUSALS,
    PublishingQueue,
    _close,
    _exit_now,
    apply_add_region,
    apply_log_base,
    apply_log_fd,
    apply_mem_table,
    apply_notifier,
    apply_remove_region,
    child_socket,
    map_connection,
    resolve,
)
from vhost.runner.thread import QueueWorker
from vhost.runner.thread_runner import LocalQueue

log = logging.getLogger(__name__)

_EDGE = select.EPOLLIN | select.EPOLLET
#: Events one wait returns at most (more stay ready for the next wait: the default maxevents
#: sizes a 1023-entry buffer per call).
MAX_EVENTS = 64


class LoopWorker(QueueWorker):
    """A queue whose passes the worker's event loop runs (its thread is never started)."""

    def quiesce(self, timeout: float = 5.0) -> bool:
        """Control messages are served between passes, on the loop's thread: always true."""
        return True

    @property
    def alive(self) -> bool:
        return False

    def run_pass(self) -> None:
        self._service(kick=True)
        self.passes += 1

    def drain(self) -> bool:
        """Wait for this queue's in-flight requests (drain_timeout), publish, signal; True
        if none is left."""
        ep = select.epoll()
        try:
            cfd = self.handler.completion_fd
            if cfd is not None:
                ep.register(cfd, _EDGE)
            self._finish(ep)
        finally:
            ep.close()
            with contextlib.suppress(OSError):
                os.close(self._wake_fd)
            self._wake_fd = -1
        return self.vq.in_flight_count == 0


@dataclass
class HostedQueue:
    key: QueueKey
    worker: LoopWorker
    local: LocalQueue
    counters: ipc.CounterBlock
    fds: tuple[int, ...] = ()


@dataclass
class HostedConn:
    """One connection's state in this worker, shared by its queues here."""

    memory: MemoryTable
    device: Any
    inflight: InflightArea | None
    features: int
    dirty_logging: DirtyLogging
    queues: dict[int, HostedQueue] = field(default_factory=dict)

    def locals(self) -> list[LocalQueue]:
        return [q.local for q in self.queues.values()]


#: Request type -> the :class:`PoolWorker` method that serves it.
DISPATCH: ipc.DispatchTable[PoolWorker] = ipc.DispatchTable()


class PoolWorker:
    """The queues of any number of connections on one event loop."""

    #: A wake-up after this long asleep is reported on the activity eventfd.
    IDLE_SECONDS = 1.0

    def __init__(self, sock: socket.socket, activity_fd: int | None = None) -> None:
        self.sock = sock
        #: Written when a queue wakes this worker after IDLE_SECONDS or more of sleep (the
        #: pool's rebalancing sleeps while every worker is idle).
        self.activity_fd = activity_fd
        self.ep = select.epoll()
        self.conns: dict[int, HostedConn] = {}
        self.queues: dict[QueueKey, HostedQueue] = {}
        #: epoll'd fd -> the queue it wakes (the control socket is not in here).
        self.by_fd: dict[int, HostedQueue] = {}
        self.ep.register(sock.fileno(), select.EPOLLIN)

    # ------------------------------------------------------------------ counters
    def publish(self, hosted: HostedQueue) -> None:
        conn = self.conns.get(hosted.key.conn)
        if conn is None:
            return
        queues = [hosted.local]
        vq = hosted.worker.vq
        hosted.counters.publish(vq.vring_base(), vq.in_flight_count,
                                conn.dirty_logging.logging(queues),
                                conn.dirty_logging.pages_marked(queues),
                                conn.device.queue_counter_values(hosted.key.index))

    def publish_conn(self, conn_id: int) -> None:
        conn = self.conns.get(conn_id)
        if conn is not None:
            for hosted in list(conn.queues.values()):
                self.publish(hosted)

    # ------------------------------------------------------------------ start
    def _new_conn(self, msg: ipc.Start, rest: list[int]) -> HostedConn:
        """Map the connection's memory, in-flight area and dirty log; rebuild its device.
        ``rest``: the fds after the queue's own (consumed)."""
        conn = HostedConn(MemoryTable(), None, None, msg.features, DirtyLogging())
        try:
            map_connection(conn, msg, rest)
            target, kwargs = msg.recipe
            device_fds, rest[:] = list(rest), []
            conn.device = resolve(target)(kwargs, device_fds)
            conn.device.apply_process_state(msg.state)
        except BaseException:
            _close(rest)
            self._drop_conn(conn)
            raise
        conn.dirty_logging.on_marks = lambda: self.publish_conn(msg.key.conn)
        return conn

    def start(self, msg: ipc.Start, fds: list[int]) -> None:
        """Host ``msg.key``'s queue (its connection's state made first if new here)."""
        key = msg.key
        kick, call, err, counters_fd = fds[0:4]
        rest = fds[4:]
        created = False
        try:
            if key in self.queues:
                raise ValueError(f"queue {key} is hosted here already")
            counters = ipc.CounterBlock(counters_fd, msg.counter_slots)
        except BaseException:
            _close(fds)
            raise
        os.close(counters_fd)
        try:
            conn = self.conns.get(key.conn)
            if msg.hosted:
                _close(rest)
                if conn is None:
                    raise ValueError(f"connection {key.conn} is not hosted here")
            else:
                if conn is not None:  # (the control process keeps track: never happens)
                    raise ValueError(f"connection {key.conn} is hosted here already")
                conn = self._new_conn(msg, rest)
                self.conns[key.conn] = conn
                created = True
            if msg.counters:
                conn.device.set_queue_counter_values(key.index, msg.counters)
            spec = QueueSpec(key, msg.size, msg.ring_uaddrs, msg.features, msg.base, kick,
                             Notifier(call), Notifier(err), msg.log_addr)
            call = err = -1  # the notifiers own them now

            def make_worker(vq: Queue, handler: QueueHandler, kick_fd: int, call: Notifier,
                            err: Notifier) -> QueueWorker:
                return LoopWorker(vq, handler, kick_fd, call, err, f"vq{key.conn}.{key.index}")

            worker = assemble(conn.memory, conn.inflight, conn.device, spec, make_worker,
                              split_class=PublishingQueue)
            assert isinstance(worker, LoopWorker)
        except BaseException:
            counters.close()
            _close([fd for fd in (kick, call, err) if fd >= 0])
            if created:
                self._drop_conn(self.conns.pop(key.conn))
            raise
        hosted = HostedQueue(key, worker, LocalQueue(key.index, msg.log_addr, worker), counters)
        if isinstance(worker.vq, PublishingQueue):
            worker.vq.changed = lambda: self.publish(hosted)
        conn.queues[key.index] = hosted
        self.queues[key] = hosted
        conn.dirty_logging.queue_starting(hosted.local, conn.features)
        watched = [kick]
        if worker.handler.completion_fd is not None:
            watched.append(worker.handler.completion_fd)
        try:
            for fd in watched:
                self.ep.register(fd, _EDGE)
                self.by_fd[fd] = hosted
                hosted.fds += (fd,)  # (so a stop unregisters exactly what was registered)
        except OSError as exc:
            worker._cannot_watch_kick(exc)
        self.publish(hosted)
        if worker.vq.broken:
            return
        # As a queue thread does first: look at the ring once (kicks before we listened).
        if worker.vq.ring_state()["used_idx"]:
            worker.call.signal()
        self._run(hosted)

    def _run(self, hosted: HostedQueue) -> None:
        """One pass of ``hosted``'s queue; a failure stops that queue only."""
        worker = hosted.worker
        if worker.vq.broken:
            return
        try:
            worker.run_pass()
        except Exception:
            log.exception("queue %s: pass failed; the queue is stopped", hosted.key)
            worker.vq.broken = True
            if worker.err is not None:
                worker.err.signal()
            self._unwatch(hosted)

    def _unwatch(self, hosted: HostedQueue) -> None:
        for fd in hosted.fds:
            if self.by_fd.get(fd) is hosted:
                del self.by_fd[fd]
                with contextlib.suppress(OSError, ValueError):
                    self.ep.unregister(fd)
        hosted.fds = ()

    # ------------------------------------------------------------------ serving
    def serve(self) -> int:
        """Run until the control process goes away; the exit status."""
        sock_fd = self.sock.fileno()
        activity = self.activity_fd
        while True:
            slept = time.monotonic()
            try:
                events = self.ep.poll(-1, MAX_EVENTS)
            except InterruptedError:
                continue
            if activity is not None and time.monotonic() - slept >= self.IDLE_SECONDS:
                with contextlib.suppress(OSError):
                    os.eventfd_write(activity, 1)
            if len(events) == 1:  # the common case: one queue's kick or completion
                fd = events[0][0]
                if fd == sock_fd:
                    if not self._control():
                        return self._shutdown()
                    continue
                hosted = self.by_fd.get(fd)
                if hosted is not None:
                    self._run(hosted)
                continue
            # Several: a queue whose kick and completion fds both fired gets one pass (it
            # reaps everything and drains the whole ring, so both edges are served by it; a
            # second pass would find nothing).
            served: set[QueueKey] = set()
            for fd, _ in events:
                if fd == sock_fd:
                    if not self._control():
                        return self._shutdown()
                    continue
                hosted = self.by_fd.get(fd)
                if hosted is not None and hosted.key not in served:
                    served.add(hosted.key)
                    self._run(hosted)

    def _control(self) -> bool:
        """One control message; False once the control process is gone."""
        try:
            msg, fds = ipc.receive(self.sock)
        except ValueError as exc:
            log.error("pool worker: %s; ignored", exc)
            return True
        except (EOFError, OSError):
            # (the pool closing ends an idle worker this way too)
            log.log(logging.WARNING if self.queues else logging.INFO,
                    "pool worker: control process gone; stopping %d queue(s)", len(self.queues))
            return False
        answer = self.answer(msg, fds)
        with contextlib.suppress(OSError):
            ipc.send(self.sock, answer)
        if isinstance(answer, ipc.StopReply) and not answer.drained:
            _exit_now()  # IO may still write guest memory: nothing may be unmapped
        return True

    def answer(self, msg: ipc.Message, fds: list[int]) -> ipc.Reply:
        """The reply to one request (``fds`` are its, owned here)."""
        seq = msg.seq
        try:
            if not isinstance(msg, ipc.Request):
                raise TypeError(f"{type(msg).__name__} is not a request")
            if isinstance(msg, ipc.Start):
                try:
                    self.start(msg, fds)
                except REFUSALS as exc:
                    log.error("queue %s refused to start: %s", msg.key, exc)
                    return ipc.Error(seq=seq, why=str(exc))
                return ipc.Started(seq=seq)
            if msg.key.conn not in self.conns:
                raise KeyError(f"connection {msg.key.conn} has no queue here")
            reply = DISPATCH.dispatch(self, msg, fds)
            fds = []
        except Exception as exc:
            log.exception("pool worker: %s failed", msg.kind)
            _close(fds)
            return ipc.Error(seq=seq, why=str(exc))
        if isinstance(msg, ipc.Request):
            self.publish_conn(msg.key.conn)
        return reply if reply is not None else ipc.Ack(seq=seq)

    def _conn(self, msg: ipc.Request) -> HostedConn:
        return self.conns[msg.key.conn]

    def _queue(self, msg: ipc.Request) -> HostedQueue:
        hosted = self.queues.get(msg.key)
        if hosted is None:
            raise KeyError(f"queue {msg.key} is not hosted here")
        return hosted

    @DISPATCH.on(ipc.MemTable)
    def _mem_table(self, msg: ipc.MemTable, fds: list[int]) -> None:
        apply_mem_table(self._conn(msg).memory, msg, fds)

    @DISPATCH.on(ipc.AddRegion)
    def _add_region(self, msg: ipc.AddRegion, fds: list[int]) -> None:
        apply_add_region(self._conn(msg).memory, msg, fds)

    @DISPATCH.on(ipc.RemoveRegion)
    def _remove_region(self, msg: ipc.RemoveRegion, fds: list[int]) -> None:
        apply_remove_region(self._conn(msg).memory, msg, fds)

    @DISPATCH.on(ipc.SetNotifier)
    def _notifier(self, msg: ipc.SetNotifier, fds: list[int]) -> None:
        apply_notifier(lambda: self._queue(msg).worker, msg, fds)

    @DISPATCH.on(ipc.DeviceState)
    def _state(self, msg: ipc.DeviceState, fds: list[int]) -> None:
        _close(fds)
        self._conn(msg).device.apply_process_state(msg.state)

    @DISPATCH.on(ipc.LogBase)
    def _log_base(self, msg: ipc.LogBase, fds: list[int]) -> None:
        conn = self._conn(msg)
        apply_log_base(conn.dirty_logging, conn.locals, conn.features, msg, fds)

    @DISPATCH.on(ipc.LogFd)
    def _log_fd(self, msg: ipc.LogFd, fds: list[int]) -> None:
        apply_log_fd(self._conn(msg).dirty_logging, fds)

    @DISPATCH.on(ipc.Features)
    def _features(self, msg: ipc.Features, fds: list[int]) -> None:
        _close(fds)
        conn = self._conn(msg)
        conn.features = msg.features
        conn.dirty_logging.update(conn.locals(), conn.features)

    @DISPATCH.on(ipc.LogAddr)
    def _log_addr(self, msg: ipc.LogAddr, fds: list[int]) -> None:
        _close(fds)
        self._conn(msg).dirty_logging.set_log_addr(self._queue(msg).local, msg.log_addr)

    @DISPATCH.on(ipc.RingState)
    def _ring_state(self, msg: ipc.RingState, fds: list[int]) -> ipc.Reply:
        _close(fds)
        try:
            return ipc.RingStateReply(seq=msg.seq, state=self._queue(msg).worker.vq.ring_state())
        except ValueError as exc:
            return ipc.Error(seq=msg.seq, why=str(exc))

    @DISPATCH.on(ipc.Stop)
    def _stop(self, msg: ipc.Stop, fds: list[int]) -> ipc.Reply:
        _close(fds)
        return self.stop(self._queue(msg), msg.seq)

    # ------------------------------------------------------------------ stopping
    def stop(self, hosted: HostedQueue, seq: int = 0) -> ipc.StopReply:
        """Drain one queue and release it (and its connection's state if it was the last
        one here).  Not drained: nothing is released (the caller exits the process)."""
        key = hosted.key
        conn = self.conns[key.conn]
        worker = hosted.worker
        self._unwatch(hosted)
        drained = worker.drain()
        logging_ = conn.dirty_logging.queue_stopped(hosted.local)
        vq = worker.vq
        if drained:
            vq.release()
            drained = worker.handler.close()
        answer = ipc.StopReply(
            seq=seq, base=vq.vring_base(), broken=vq.broken, drained=drained,
            kicks=worker.kicks, batches=worker.batches, completed=worker.completed,
            calls=worker.call.count,
            dirty=(logging_, conn.dirty_logging.pages_marked([hosted.local])))
        self.publish(hosted)
        if not drained:
            log.error("queue %s: not drained; this worker ends with its memory mapped", key)
            return answer
        del self.queues[key]
        del conn.queues[key.index]
        worker.call.close()
        if worker.err is not None:
            worker.err.close()
        with contextlib.suppress(OSError):
            os.close(worker.kick_fd)
        hosted.counters.close()
        if not conn.queues:
            self._drop_conn(self.conns.pop(key.conn))
        return answer

    def _drop_conn(self, conn: HostedConn) -> None:
        if conn.inflight is not None:
            conn.inflight.close()
        conn.dirty_logging.close([], report=False)  # the control process reports
        # The device rebuilt here holds its own storage (the image fd): a pool worker lives
        # on after the connection, so it is closed (a queue process just exits).
        storage = getattr(conn.device, "storage", None)
        close = getattr(storage, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("closing a connection's storage in the pool worker")
        conn.memory.close()

    def _shutdown(self) -> int:
        """The control process is gone: stop every queue (exit at once if one cannot)."""
        for hosted in list(self.queues.values()):
            if not self.stop(hosted).drained:
                _exit_now()
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sock = child_socket(argv)
    if sock is None:
        return 1
    activity = int(argv[2]) if len(argv) > 2 else None
    return PoolWorker(sock, activity).serve()


if __name__ == "__main__":
    sys.exit(main())
