"""A fixed pool of worker processes serving the queues of every connection: the control side.

:class:`PoolRunner` is made once per daemon and shared by every export (device) and every
frontend connection; each connection gets a :class:`PoolConnection` from it
(:meth:`PoolRunner.connection`), which is the :class:`~vhost.runner.base.QueueRunner` its
handler talks to.  The worker processes (:mod:`vhost.runner.poolworker`) each run the queues of
any number of connections on one event loop; there are at most ``workers`` of them (default: one
per two cores this process may run on, at least one: :func:`default_workers`).

Placement: a starting queue goes to the worker with the fewest queues (ties: the one that took
the fewest requests since the last look), and a new process is spawned while the pool has fewer
than ``workers``.  A worker hosts a connection's memory table, in-flight area, dirty log and
device once, for all that connection's queues there; connection-wide changes (SET_MEM_TABLE,
SET_LOG_BASE, ...) go to every worker hosting one of its queues and are acknowledged before the
handler replies, exactly as :class:`~vhost.runner.pool.ProcessRunner` does per process.

Rebalancing: :meth:`PoolRunner.move_queue` stops a queue on its worker (drained: its next avail
index is the GET_VRING_BASE value), and starts it on another from that index with the same
kick/call/err eventfds -- the frontend sees nothing.  Kicks made in between are not lost: a
starting queue looks at its ring once.  :meth:`PoolRunner.rebalance` picks what to move: the
request rate of each queue (avail index progress read from its counter block, no message) is
summed per worker, and when the busiest worker runs more than twice the requests of the idlest
one, its queue whose rate best evens them out moves.  :meth:`PoolRunner.start_rebalancing`
runs it on a thread every ``interval`` seconds (one wake-up per interval for the daemon, not
per export; off unless asked for).

A worker that dies (or is killed after a request it did not answer) stops only its queues:
each is marked broken and its err eventfd written; the pool spawns a fresh process for later
queues.  Kill -9 of this process kills the workers (PR_SET_PDEATHSIG); the in-flight areas,
which live in the frontend's memory, let the next server resubmit what was in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue as jobqueue
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

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
from vhost.runner.pool import (
    REPLY_TIMEOUT,
    KeptState,
    QueueProcessError,
    RemoteQueue,
    StartFields,
    send_and_wait,
)

if TYPE_CHECKING:
    from vhost.device import Device
    from vhost.messages import RegionFields

log = logging.getLogger(__name__)


def default_workers() -> int:
    """One worker per two cores this process may run on (``os.sched_getaffinity``), at least one.

    The daemon shares the host with the guests it serves: their vCPU threads and QEMU's own
    threads need the other cores, and a worker that wakes for one request at a time costs as
    much in wake-ups as in work.  On a 2-core host one worker serving both queues of a disk
    beat two (4k QD32 buffered, 2 queues, against qemu-storage-daemon ``aio=io_uring`` in the
    same runs): in-process randread 1.04x its IOPS at 0.97x its CPU per request against 0.85x
    at 1.12x with two workers; a TCG guest's randread 0.73x at 1.66x against 0.64x at 2.45x.
    ``--workers N`` sets any other count.
    """
    return max(1, len(os.sched_getaffinity(0)) // 2)


class WorkerProcess:
    """One pool worker process, seen from the control process."""

    reply_timeout = REPLY_TIMEOUT
    drain_timeout = 30.0

    def __init__(self, number: int, spawn: Callable[[list[str], list[int]],
                                                   subprocess.Popen[bytes]],
                 activity_fd: int) -> None:
        """``spawn(argv, fds)`` starts the process with ``fds`` passed (on the pool's
        spawner thread: see :class:`Spawner`); ``activity_fd``: the eventfd it writes when a
        queue wakes it after a second or more of sleep (see :meth:`PoolRunner.
        start_rebalancing`)."""
        self.number = number
        self.queues: dict[QueueKey, PooledQueue] = {}
        #: Connections whose state this worker has (a queue of theirs runs there).
        self.conns: set[int] = set()
        self.replies = ipc.Replies(f"pool worker {number}")
        self._send_lock = threading.Lock()
        self.died = False
        self.closing = False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = spawn([sys.executable, "-m", "vhost.runner.poolworker",
                               str(theirs.fileno()), str(os.getpid()), str(activity_fd)],
                              [theirs.fileno(), activity_fd])
        finally:
            theirs.close()
        self.sock: socket.socket | None = ours
        self._reader = threading.Thread(target=self._read_loop, name=f"pool{number}-reader",
                                        daemon=True)
        self._reader.start()
        log.info("pool worker %d: process %d", number, self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return not self.died and self.proc.poll() is None

    def request(self, msg: ipc.Request, fds: Sequence[int] = (),
                timeout: float | None = None) -> ipc.Reply:
        """Send ``msg`` and wait for its reply (Gone if the process is gone);
        QueueProcessError if it did not answer in time."""
        sock = self.sock
        if self.died or sock is None:
            return ipc.Gone()
        return send_and_wait(sock, self._send_lock, self.replies, msg, fds,
                             self.reply_timeout if timeout is None else timeout,
                             f"pool worker {self.number}")

    def _read_loop(self) -> None:
        sock = self.sock
        assert sock is not None
        while True:
            try:
                msg, fds = ipc.receive(sock)
            except ValueError as exc:
                log.warning("pool worker %d: dropped a malformed message: %s", self.number, exc)
                continue
            except (EOFError, OSError):
                break
            for fd in fds:
                os.close(fd)
            if isinstance(msg, ipc.Reply):
                self.replies.deliver(msg)
        self.died = True
        self.replies.close(ipc.Gone())
        if not self.closing:
            code = self.proc.wait()
            queues = list(self.queues.values())
            log.error("pool worker %d: process %d died (exit status %s); its %d queue(s) are "
                      "stopped", self.number, self.proc.pid, code, len(queues))
            for queue in queues:
                queue.died()

    def kill(self, why: str) -> None:
        """End a worker that cannot be trusted to have applied a request (logged): every
        queue it runs stops (the reader thread breaks them)."""
        log.error("%s; killing pool worker %d", why, self.number)
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                log.error("pool worker %d: not gone 5 s after SIGKILL", self.number)
        self._reader.join(5)

    def close(self) -> None:
        """End the process (no queue runs there any more)."""
        self.closing = True
        if self.sock is not None:
            self.sock.shutdown(socket.SHUT_RDWR)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class PooledQueue:
    """A queue a pool worker runs, as the handler sees it (a RunningQueue)."""

    def __init__(self, spec: QueueSpec, device: Device, worker: WorkerProcess,
                 counters: ipc.CounterBlock) -> None:
        self.spec = spec
        self.key = spec.key
        self.index = spec.key.index
        self.device = device
        self.worker = worker
        self.counters: ipc.CounterBlock | None = counters
        self.vq = RemoteQueue()
        self.remote_log = RemoteLog()
        self.kicks = self.batches = self.completed = 0
        self.last_avail = spec.base
        self.dead = False
        #: Dirty pages it marked on the workers it ran on before a move (a worker counts its
        #: own from zero).
        self.pages_before = 0
        self._lock = threading.Lock()
        #: (time, avail index) at the last rebalancing look, for the request rate.
        self.sample: tuple[float, int] = (time.monotonic(), spec.base)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The worker process that runs it (tests look at its pid)."""
        return self.worker.proc

    @property
    def alive(self) -> bool:
        return not self.dead and self.worker.alive

    def quiesce(self, timeout: float = 5.0) -> bool:
        return True

    def refresh(self, dirty: bool = True) -> None:
        """Copy what the worker last published for this queue (shared memory only)."""
        with self._lock:
            block = self.counters
            snap = block.read() if block is not None else None
        if snap is None:
            return
        self.device.set_queue_counter_values(self.index, snap.values)
        self.last_avail = snap.next_avail
        self.vq.in_flight_count = snap.in_flight
        if dirty:
            self.remote_log.logging = snap.dirty_logging
            self.remote_log.pages = self.pages_before + snap.dirty_pages

    def ring_state(self, timeout: float = 1.0) -> dict[str, int]:
        if self.dead:
            raise QueueProcessError(f"queue {self.index}: its worker is gone")
        answer = self.worker.request(ipc.RingState(key=self.key), timeout=timeout)
        if not isinstance(answer, ipc.RingStateReply):
            why = answer.why if isinstance(answer, ipc.Error) else "no state"
            raise QueueProcessError(f"queue {self.index}: {why}")
        return dict(answer.state)

    def died(self) -> None:
        """Its worker died: the queue is broken, the driver told."""
        self.refresh()
        self.dead = True
        self.vq.broken = True
        self.spec.err.signal()

    def close_counters(self) -> None:
        with self._lock:
            if self.counters is not None:
                self.counters.close()
                self.counters = None


class Spawner:
    """Starts the worker processes from one thread that lives as long as the pool.

    Why: a worker asks the kernel to kill it when its parent dies (PR_SET_PDEATHSIG, so a
    kill -9 of the server leaves no worker on the rings), and the kernel takes the *thread*
    that forked it as the parent.  Spawned from a connection's control thread, a worker
    serving every export would be killed when that one connection's thread ends.
    """

    def __init__(self) -> None:
        self._jobs: jobqueue.SimpleQueue[
            tuple[list[str], list[int], Future[subprocess.Popen[bytes]]] | None
        ] = jobqueue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pool-spawner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            argv, fds, future = job
            try:
                proc = subprocess.Popen(argv, pass_fds=fds, env={
                    **os.environ,
                    "VHOST_QUEUEPROC_LOG_LEVEL": str(logging.getLogger().getEffectiveLevel())})
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(proc)

    def spawn(self, argv: list[str], fds: list[int]) -> subprocess.Popen[bytes]:
        future: Future[subprocess.Popen[bytes]] = Future()
        self._jobs.put((argv, fds, future))
        return future.result()

    def close(self) -> None:
        """After every worker ended (the thread's end would kill them)."""
        self._jobs.put(None)
        self._thread.join(5)


class PoolRunner:
    """The daemon's pool of queue worker processes (see the module docstring)."""

    def __init__(self, workers: int | None = None) -> None:
        self.size = default_workers() if workers is None else workers
        if self.size < 1:
            raise ValueError(f"a pool of {self.size} workers")
        self.workers: list[WorkerProcess] = []
        self._spawned = 0
        self._next_conn = 0
        self._lock = threading.RLock()
        self.connections: dict[int, PoolConnection] = {}
        self._rebalancer: threading.Thread | None = None
        self._stop_rebalancing = threading.Event()
        #: Queues moved so far (by rebalance or move_queue).
        self.moves = 0
        self._spawner: Spawner | None = None
        #: Written by a worker when a queue wakes it after a second or more of sleep.
        self._activity = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: Wakes the rebalancing thread to end.
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: Requests per second over every worker at the last rebalancing look.
        self.last_rate = 0.0

    def connection(self, device: Device, state: ConnectionState | None = None) -> PoolConnection:
        """The runner of one new frontend connection to ``device``."""
        with self._lock:
            self._next_conn += 1
            conn = PoolConnection(self, device, state, self._next_conn)
            self.connections[conn.conn] = conn
            return conn

    # ------------------------------------------------------------------ placement
    def _live_workers(self) -> list[WorkerProcess]:
        self.workers = [w for w in self.workers if w.alive]
        return self.workers

    def place(self, exclude: WorkerProcess | None = None) -> WorkerProcess:
        """The worker a new queue goes to: a new process while the pool is not full, else
        the one with the fewest queues (ties: the lowest request rate)."""
        with self._lock:
            workers = [w for w in self._live_workers() if w is not exclude]
            if len(self.workers) < self.size:
                self._spawned += 1
                if self._spawner is None:
                    self._spawner = Spawner()
                worker = WorkerProcess(self._spawned, self._spawner.spawn, self._activity)
                self.workers.append(worker)
                return worker
            if not workers:
                raise RunnerError("no other pool worker to place a queue on")
            rates = self.rates()
            return min(workers, key=lambda w: (len(w.queues), rates.get(w, 0.0), w.number))

    def queues(self) -> list[PooledQueue]:
        return [q for w in self.workers for q in list(w.queues.values())]

    def rates(self, sample: bool = False) -> dict[WorkerProcess, float]:
        """Requests per second each worker took since the last sample (``sample``: start a
        new one), from the avail indexes its queues publish."""
        now = time.monotonic()
        out: dict[WorkerProcess, float] = {}
        for worker in list(self.workers):
            total = 0.0
            for queue in list(worker.queues.values()):
                total += self._rate(queue, now, sample)
            out[worker] = total
        return out

    @staticmethod
    def _rate(queue: PooledQueue, now: float, sample: bool) -> float:
        queue.refresh()
        then, avail = queue.sample
        rate = ((queue.last_avail - avail) & 0xFFFF) / max(now - then, 1e-3)
        if sample:
            queue.sample = (now, queue.last_avail)
        return rate

    # ------------------------------------------------------------------ moving
    def move_queue(self, key: QueueKey, target: WorkerProcess | None = None) -> WorkerProcess:
        """Move a running queue to ``target`` (default: where :meth:`place` puts it, another
        worker than its own): stopped at a quiescent point, restarted from its next avail
        index.  RunnerError if it is not running or could not be moved (then it is broken
        and its err eventfd written, as after any failed start)."""
        conn = self.connections.get(key.conn)
        if conn is None:
            raise RunnerError(f"no connection {key.conn}")
        return conn.move(key, target)

    def rebalance(self, ratio: float = 2.0, min_rate: float = 100.0) -> QueueKey | None:
        """Even out the busiest and the idlest worker once, if the busiest took more than
        ``ratio`` times the idlest's requests and at least ``min_rate`` per second: the
        queue moved, or None."""
        with self._lock:
            now = time.monotonic()
            per_queue: dict[PooledQueue, float] = {}
            loads: dict[WorkerProcess, float] = {}
            for worker in self._live_workers():
                loads[worker] = 0.0
                for queue in list(worker.queues.values()):
                    per_queue[queue] = self._rate(queue, now, sample=True)
                    loads[worker] += per_queue[queue]
            self.last_rate = sum(loads.values())
            if len(loads) < 2:
                return None
            busy = max(loads, key=lambda w: loads[w])
            idle = min(loads, key=lambda w: loads[w])
            gap = loads[busy] - loads[idle]
            if loads[busy] < min_rate or loads[busy] <= ratio * loads[idle]:
                return None
            # The queue that best halves the gap without swapping the two workers' roles.
            candidates = [q for q in busy.queues.values() if 0 < per_queue.get(q, 0) < gap]
            if len(busy.queues) < 2 or not candidates:
                return None
            queue = min(candidates, key=lambda q: abs(per_queue[q] - gap / 2))
            key = queue.key
        self.move_queue(key, idle)
        return key

    def start_rebalancing(self, interval: float = 1.0) -> None:
        """Call :meth:`rebalance` every ``interval`` seconds on a thread of its own -- while
        any queue takes requests: after a look that found every queue idle, the thread sleeps
        until a worker says a queue woke it after a second or more of sleep (an eventfd each
        worker writes then, and only then), so an idle server has no timer at all.  (A worker
        that woke just before a look and had not published its first batch yet is taken for
        idle; it says so again after its next second of sleep.)"""
        def idle_wait() -> bool:
            """Sleep until a worker is active again; False if rebalancing is to end."""
            ready, _, _ = select.select([self._activity, self._wake], [], [])
            if self._wake in ready:
                return False
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._activity)
            self.rates(sample=True)  # the rate from now on, not over the idle time
            return True

        def loop() -> None:
            while not self._stop_rebalancing.wait(interval):
                with contextlib.suppress(BlockingIOError):  # activity from now on counts
                    os.eventfd_read(self._activity)
                try:
                    moved = self.rebalance()
                except RunnerError as exc:  # (the queue stopped meanwhile, say)
                    log.error("rebalancing: %s", exc)
                    continue
                except Exception:  # never the end of rebalancing
                    log.exception("rebalancing failed")
                    continue
                if moved is not None:
                    log.info("rebalancing: moved queue %s", moved)
                elif self.last_rate == 0.0 and not idle_wait():
                    return

        self._stop_rebalancing.clear()
        self._rebalancer = threading.Thread(target=loop, name="pool-rebalance", daemon=True)
        self._rebalancer.start()

    def close(self) -> None:
        """End every worker process (the daemon is stopping; its queues stopped first)."""
        self._stop_rebalancing.set()
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)
        if self._rebalancer is not None:
            self._rebalancer.join(5)
        with self._lock:
            for worker in self.workers:
                worker.close()
            self.workers = []
            if self._spawner is not None:
                self._spawner.close()
                self._spawner = None
            for fd in (self._activity, self._wake):
                if fd >= 0:
                    os.close(fd)
            self._activity = self._wake = -1

    def _drop_if_empty(self, worker: WorkerProcess) -> None:
        """A dead worker leaves the pool once its queues are stopped."""
        with self._lock:
            if not worker.alive and not worker.queues and worker in self.workers:
                self.workers.remove(worker)


class PoolConnection:
    """One connection's queues on the pool: the :class:`~vhost.runner.base.QueueRunner` its
    handler holds.  Keeps what a worker new to this connection needs (duplicates of the
    memory, in-flight and log fds), as :class:`~vhost.runner.pool.ProcessRunner` does."""

    def __init__(self, pool: PoolRunner, device: Device, state: ConnectionState | None,
                 conn: int) -> None:
        self.pool = pool
        self.device = device
        self.state = state
        self.conn = conn
        self.kept = KeptState()
        self.queues: dict[QueueKey, PooledQueue] = {}
        #: One change at a time per connection (the handler's thread, a rebalancing move).
        self._lock = threading.RLock()
        device.attach_runner(self)

    def refresh_counters(self) -> None:
        for queue in list(self.queues.values()):
            queue.refresh()

    # ------------------------------------------------------------------ queues
    def start(self, spec: QueueSpec) -> RunningQueue:
        if spec.key.conn != self.conn:
            raise RunnerError(f"queue {spec.key} is not of connection {self.conn}")
        if self.state is not None:
            preflight(self.state.memory, self.state.inflight, spec)
        with self._lock:
            return self._start_on(spec, self.pool.place())

    def _start_on(self, spec: QueueSpec, worker: WorkerProcess) -> PooledQueue:
        hosted = self.conn in worker.conns
        target, kwargs, device_fds = self.device.process_recipe()
        start = ipc.Start(
            key=spec.key, size=spec.size, ring_uaddrs=spec.ring_uaddrs,
            features=spec.features, base=spec.base,
            # (a worker that hosts this connection already has its memory, in-flight and log)
            **(_nothing_kept() if hosted else self.kept.start_fields()),
            recipe=(target, kwargs), state=self.device.process_state(), log_addr=spec.log_addr,
            counter_slots=self.device.counter_slots(), hosted=hosted,
            # Where this device's counters for the queue are (the control process's copy):
            # the worker counts on from there, so a move or a restart loses no count.
            counters=tuple(self._counts(spec.key.index)),
        )
        counters, counters_fd = ipc.CounterBlock.create(start.counter_slots)
        call, err = spec.call, spec.err
        call_fd = call.fd if call.fd is not None else os.eventfd(0, os.EFD_CLOEXEC)
        err_fd = err.fd if err.fd is not None else os.eventfd(0, os.EFD_CLOEXEC)
        fds = [spec.kick_fd, call_fd, err_fd, counters_fd]
        if not hosted:
            fds += self.kept.fds()
            fds += device_fds
        try:
            reply = worker.request(start, fds)
        except QueueProcessError as exc:
            counters.close()
            worker.kill(str(exc))
            raise
        finally:
            os.close(counters_fd)
            for fd, mine in ((call_fd, call.fd), (err_fd, err.fd)):
                if mine is None:
                    os.close(fd)
        if not isinstance(reply, ipc.Started):
            counters.close()
            self.pool._drop_if_empty(worker)
            raise QueueProcessError(reply.why if isinstance(reply, ipc.Error) else
                                    f"pool worker {worker.number} gone")
        queue = PooledQueue(spec, self.device, worker, counters)
        worker.conns.add(self.conn)
        worker.queues[spec.key] = queue
        self.queues[spec.key] = queue
        log.info("queue %d started on pool worker %d (process %d): size %d, avail from %d "
                 "(connection %d)", spec.key.index, worker.number, worker.pid, spec.size,
                 spec.base, self.conn)
        return queue

    def _counts(self, index: int) -> list[int]:
        """The device's counters of queue ``index``, whole (a prefix is what it left out
        because it is all zeros: see :meth:`vhost.device.Device.queue_counter_values`)."""
        full = self.device.counter_slots()
        values = list(self.device.queue_counter_values(index))
        return values + [0] * (full - len(values)) if 0 < len(values) <= full else []

    def _stop_queue(self, queue: PooledQueue) -> tuple[Stopped, bool]:
        """Stop ``queue`` on its worker: where it ended, and whether it drained."""
        worker = queue.worker
        reply: ipc.Reply = ipc.Gone()
        if not queue.dead:
            try:
                reply = worker.request(ipc.Stop(key=queue.key),
                                       timeout=worker.drain_timeout + 5)
            except QueueProcessError as exc:
                worker.kill(str(exc))
        queue.refresh(dirty=False)
        worker.queues.pop(queue.key, None)
        if not any(k.conn == self.conn for k in worker.queues):
            worker.conns.discard(self.conn)
        queue.close_counters()
        if isinstance(reply, ipc.StopReply):
            if reply.dirty is not None:
                queue.remote_log.logging = reply.dirty[0]
                queue.remote_log.pages = queue.pages_before + reply.dirty[1]
            queue.vq = RemoteQueue(reply.base, reply.broken)
            queue.kicks, queue.batches = reply.kicks, reply.batches
            queue.completed = reply.completed
            queue.spec.call.count += reply.calls
            drained = reply.drained
            if not drained:  # the worker exits on this answer: reap it
                worker.kill(f"queue {queue.index}: requests still in flight at stop")
        else:
            queue.vq = RemoteQueue(queue.last_avail, True)
            drained = False
        self.pool._drop_if_empty(worker)
        return Stopped(queue.vq.base, queue.vq.broken, drained, queue.kicks, queue.batches,
                       queue.completed), drained

    def stop(self, key: QueueKey) -> Stopped | None:
        with self._lock:
            queue = self.queues.pop(key, None)
            if queue is None:
                return None
            return self._stop_queue(queue)[0]

    def move(self, key: QueueKey, target: WorkerProcess | None) -> WorkerProcess:
        """See :meth:`PoolRunner.move_queue`."""
        with self._lock:
            queue = self.queues.get(key)
            if queue is None or not queue.alive:
                raise RunnerError(f"queue {key} is not running")
            source = queue.worker
            if target is None:
                target = self.pool.place(exclude=source)
            if target is source:
                return source
            del self.queues[key]
            stopped, drained = self._stop_queue(queue)
            if not drained or stopped.broken:
                self._moved_broken(queue, stopped.base)
                raise RunnerError(f"queue {key} did not stop cleanly on pool worker "
                                  f"{source.number}; not moved")
            spec = dataclasses.replace(queue.spec, base=stopped.base)
            try:
                moved = self._start_on(spec, target)
            except Exception as exc:
                log.error("queue %s: could not restart on pool worker %d: %s", key,
                          target.number, exc)
                self._moved_broken(queue, stopped.base)
                raise RunnerError(f"queue {key} could not restart on pool worker "
                                  f"{target.number}: {exc}") from exc
            # The handler's vring keeps the object it got at start: carry it over.
            carried = queue.remote_log.pages
            queue.__dict__.update(moved.__dict__)
            queue.pages_before = queue.remote_log.pages = carried
            self.queues[key] = queue
            target.queues[key] = queue
            self.pool.moves += 1
            log.info("queue %s moved from pool worker %d to %d at avail %d", key,
                     source.number, target.number, stopped.base)
            return target

    def _moved_broken(self, queue: PooledQueue, base: int) -> None:
        """A move failed: the queue stays known, stopped and broken at ``base`` (what the
        handler's GET_VRING_BASE then answers), and the driver is told."""
        queue.dead = True
        queue.last_avail = base
        queue.vq = RemoteQueue(base, True)
        self.queues[queue.key] = queue
        queue.spec.err.signal()

    def ring_state(self, key: QueueKey, timeout: float = 1.0) -> dict[str, int]:
        queue = self.queues.get(key)
        if queue is None:
            raise QueueProcessError(f"queue {key.index} is not running")
        return queue.ring_state(timeout)

    def _broadcast(self, msg: ipc.Request, fds: Sequence[int] = ()) -> list[int]:
        """Send to every worker hosting a queue of this connection; wait for each.  The
        queues on workers that refused or did not answer (a silent one is killed)."""
        failed: list[int] = []
        by_worker: dict[WorkerProcess, list[PooledQueue]] = {}
        for queue in self.queues.values():
            by_worker.setdefault(queue.worker, []).append(queue)
        for worker, queues in by_worker.items():
            request = dataclasses.replace(msg, key=queues[0].key)
            try:
                reply = worker.request(request, fds)
            except QueueProcessError as exc:
                worker.kill(str(exc))
                failed += [q.index for q in queues]
                continue
            if isinstance(reply, ipc.Error):
                log.error("pool worker %d: %s refused: %s", worker.number, msg.kind, reply.why)
                failed += [q.index for q in queues]
            for queue in queues:
                queue.refresh()
        return failed

    def _ask(self, key: QueueKey, msg: ipc.Request, fds: Sequence[int] = ()) -> None:
        queue = self.queues.get(key)
        if queue is None or queue.dead:
            return
        try:
            reply = queue.worker.request(msg, fds)
        except QueueProcessError as exc:
            queue.worker.kill(str(exc))
            return
        if isinstance(reply, ipc.Error):
            log.error("queue %d: %s refused: %s", key.index, msg.kind, reply.why)
        queue.refresh()

    # ------------------------------------------------------------------ what workers need
    def set_mem_table(self, conn: int, regions: Sequence[RegionFields],
                      fds: Sequence[int]) -> None:
        with self._lock:
            self.kept.set_mem_table(regions, fds)
            self._broadcast(ipc.MemTable(key=_ANY, regions=self.kept.regions), fds)

    def add_region(self, conn: int, region: RegionFields, fd: int) -> None:
        with self._lock:
            raw = self.kept.add_region(region, fd)
            self._broadcast(ipc.AddRegion(key=_ANY, region=raw), [fd])

    def remove_region(self, conn: int, region: RegionFields) -> None:
        with self._lock:
            raw = self.kept.remove_region(region)
            self._broadcast(ipc.RemoveRegion(key=_ANY, region=raw))

    def set_inflight(self, conn: int, fd: int, mmap_size: int, mmap_offset: int,
                     num_queues: int, queue_size: int) -> None:
        with self._lock:
            self.kept.set_inflight(fd, (mmap_size, mmap_offset, num_queues, queue_size))

    def notifier_changed(self, key: QueueKey, which: str, fd: int | None) -> None:
        with self._lock:
            self._ask(key, ipc.SetNotifier(key=key, which=which), [fd] if fd is not None else [])

    def device_changed(self, conn: int) -> None:
        with self._lock:
            self._broadcast(ipc.DeviceState(key=_ANY, state=self.device.process_state()))

    def state_changed(self) -> None:
        self.device_changed(self.conn)

    def set_log_base(self, conn: int, fd: int, size: int, offset: int) -> None:
        with self._lock:
            self.kept.set_log_base(fd, size, offset)
            failed = self._broadcast(ipc.LogBase(key=_ANY, size=size, offset=offset), [fd])
            if failed:
                raise QueueProcessError(f"the pool worker(s) of queue(s) {failed} did not map "
                                        f"the dirty log")

    def set_log_fd(self, conn: int, fd: int | None) -> None:
        with self._lock:
            self.kept.set_log_fd(fd)
            self._broadcast(ipc.LogFd(key=_ANY), [fd] if fd is not None else [])

    def set_features(self, conn: int, features: int) -> None:
        with self._lock:
            self._broadcast(ipc.Features(key=_ANY, features=features))

    def set_log_addr(self, key: QueueKey, log_addr: int | None) -> None:
        with self._lock:
            queue = self.queues.get(key)
            if queue is not None:  # a move restarts it with the new address
                queue.spec = dataclasses.replace(queue.spec, log_addr=log_addr)
            self._ask(key, ipc.LogAddr(key=key, log_addr=log_addr))

    def drop_log(self, conn: int) -> None:
        with self._lock:
            self.kept.drop_log()

    def close(self) -> None:
        """After every queue stopped: drop the kept fds (the workers stay for others)."""
        with self._lock:
            self.device.detach_runner(self)
            self.kept.close()
        self.pool.connections.pop(self.conn, None)


def _nothing_kept() -> StartFields:
    """The Start fields for a worker that already hosts the connection: nothing kept."""
    return {"regions": [], "inflight": None, "log": None, "log_call": False}


#: The key of a connection-wide message (each worker gets one of the connection's keys).
_ANY = QueueKey(-1, -1)
