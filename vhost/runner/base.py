"""What runs a queue, as the protocol handler sees it: the :class:`QueueRunner` protocol.

The handler (:mod:`vhost.handler`) speaks vhost-user; *where* a started queue runs is not its
business.  It holds one runner and calls it the same way whatever the runner is:

* :class:`vhost.runner.thread.ThreadRunner` -- each queue on a thread of this process, sharing
  the handler's memory table, in-flight area and dirty log (forwarding a change is a no-op);
* :class:`vhost.runner.pool.ProcessRunner` -- each queue in a process of its own, which maps
  its own copies: every change the frontend makes is forwarded, acknowledged before the
  handler replies;
* :class:`vhost.runner.workerpool.PoolConnection` -- one connection's queues on the daemon's
  shared :class:`~vhost.runner.workerpool.PoolRunner`: a fixed number of worker processes
  (:mod:`vhost.runner.poolworker`), each running the queues of many connections; changes are
  forwarded as for a process per queue, to the workers hosting the connection.

Both build a queue the same way (:mod:`vhost.runner.assembly`, the one place that turns a
:class:`QueueSpec` into a running worker), the thread runner here, the process runner in its
child (:mod:`vhost.runner.process`).

Queues are named by :class:`QueueKey` -- (connection, queue index), not the index alone -- in
this API and on the process wire (:mod:`vhost.runner.ipc`).  Today a runner serves one
connection (``conn`` is the one it was made for).  The pool (many exports in one daemon,
issue 22) keeps one :class:`~vhost.runner.workerpool.PoolRunner` for the daemon, which hands
out the connection numbers: ``start`` places a key on a worker process (the key says which
device's recipe and which connection's memory table the queue uses there), the
connection-wide changes (``set_mem_table``, ``set_log_base``, ...) go to the workers that host
one of the connection's queues, and a worker answers for its keys only.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from vhost.memory import MemoryTable
    from vhost.messages import RegionFields
    from vhost.queue.inflight import InflightArea

log = logging.getLogger(__name__)

_EVENT = (1).to_bytes(8, "little")


class Notifier:
    """An eventfd the backend writes (call or err), replaceable while a worker uses it.

    The lock makes ``replace`` wait for a ``signal`` in progress: closing an fd under a writer
    could let the number be reused by an unrelated file the write would then hit.
    """

    def __init__(self, fd: int | None = None) -> None:
        self._lock = threading.Lock()
        self._fd = fd
        self.count = 0

    @property
    def fd(self) -> int | None:
        return self._fd

    def replace(self, fd: int | None) -> None:
        """Use ``fd`` from now on (None: nobody listens) and close the previous one."""
        with self._lock:
            old, self._fd = self._fd, fd
        if old is not None and old != fd:
            os.close(old)

    def signal(self) -> None:
        # (The lock taken by hand: a ``with`` block's __enter__/__exit__ cost a quarter of a
        # signal -- 4,300 instructions, 3,300 so, under callgrind -- and a call ends most worker
        # passes of a guest that sends one request per kick.)
        lock = self._lock
        lock.acquire()
        try:
            fd = self._fd
            if fd is not None:
                os.write(fd, _EVENT)
                self.count += 1
        except BlockingIOError:  # the count is full: the reader wakes all the same
            pass
        except OSError as exc:  # the frontend's side went away; nothing to wake
            log.debug("eventfd write failed: %s", exc)
        finally:
            lock.release()

    def close(self) -> None:
        self.replace(None)


@dataclass(frozen=True)
class QueueKey:
    """One queue of one connection (see the module docstring for why not the index alone)."""

    conn: int
    index: int


class RunnerError(Exception):
    """A runner could not start a queue, or could not apply a change to every queue it runs
    (the message that asked for it is refused)."""


@dataclass
class RemoteLog:
    """The dirty-log state a queue running elsewhere last reported (``RunningQueue.
    remote_log``): a queue process maps the log and marks it itself."""

    logging: bool = False
    #: Pages that process marked, over its life (it counts them with the same code).
    pages: int = 0


@dataclass(frozen=True)
class QueueSpec:
    """Everything a runner needs to start one queue (what the frontend said about it)."""

    key: QueueKey
    size: int
    #: desc, avail, used: frontend (user) addresses; translated where the queue is assembled.
    ring_uaddrs: tuple[int, int, int]
    features: int
    #: The next avail index to use (SET_VRING_BASE, or where the queue last stopped).
    base: int
    kick_fd: int
    call: Notifier
    err: Notifier
    #: VHOST_VRING_F_LOG's used-ring log address, if the frontend gave one.
    log_addr: int | None = None


@dataclass(frozen=True)
class Stopped:
    """Where a stopped queue ended."""

    #: GET_VRING_BASE's value (:meth:`vhost.queue.base.Queue.vring_base`).
    base: int
    broken: bool
    #: Every request finished (False: some were abandoned; memory may be pinned).
    drained: bool
    kicks: int = 0
    batches: int = 0
    completed: int = 0


class QueuePosition(Protocol):
    """What is read of a running queue's ring from outside its worker (a snapshot)."""

    @property
    def broken(self) -> bool: ...

    @property
    def in_flight_count(self) -> int: ...


class RunningQueue(Protocol):
    """A started queue, as the handler, the dirty logging and the daemon's diagnostics see it
    (:class:`~vhost.runner.thread.QueueWorker` or :class:`~vhost.runner.pool.
    QueueProcessWorker`)."""

    @property
    def vq(self) -> QueuePosition: ...

    @property
    def alive(self) -> bool: ...

    @property
    def remote_log(self) -> RemoteLog | None:
        """The dirty-log state it reports, if it logs elsewhere (None: it logs here)."""

    def quiesce(self, timeout: float = 5.0) -> bool: ...

    def ring_state(self, timeout: float = 1.0) -> dict[str, int]: ...


class ConnectionState(Protocol):
    """What a runner reads of its connection (:class:`vhost.handler.BackendHandler`): the
    mapped memory table and in-flight area (the thread runner's queues use them; the process
    runner checks a ring against them before it spawns)."""

    @property
    def memory(self) -> MemoryTable: ...

    @property
    def inflight(self) -> InflightArea | None: ...


class QueueRunner(Protocol):
    """Starts, stops and keeps in step the queues of a connection (see the module docstring).

    Every method that forwards a frontend's change returns once every queue it runs has it
    (the frontend gets its reply only then); fds are the caller's, still open.
    """

    def start(self, spec: QueueSpec) -> RunningQueue:
        """Start a queue; RunnerError (or the queue's own validation error: QueueError,
        MemoryTableError, InflightError) if it cannot run."""

    def stop(self, key: QueueKey) -> Stopped | None:
        """Drain and stop ``key``'s queue; where it ended (None: it was not running)."""

    def ring_state(self, key: QueueKey, timeout: float = 1.0) -> dict[str, int]:
        """A running queue's ring state; RunnerError if it is not running or did not say."""

    def set_mem_table(self, conn: int, regions: Sequence[RegionFields],
                      fds: Sequence[int]) -> None: ...

    def add_region(self, conn: int, region: RegionFields, fd: int) -> None: ...

    def remove_region(self, conn: int, region: RegionFields) -> None: ...

    def set_inflight(self, conn: int, fd: int, mmap_size: int, mmap_offset: int,
                     num_queues: int, queue_size: int) -> None: ...

    def notifier_changed(self, key: QueueKey, which: str, fd: int | None) -> None:
        """A running queue's ``"call"`` or ``"err"`` eventfd was replaced."""

    def device_changed(self, conn: int) -> None:
        """The device state queues follow (:meth:`vhost.device.Device.process_state`)."""

    def set_features(self, conn: int, features: int) -> None: ...

    def set_log_base(self, conn: int, fd: int, size: int, offset: int) -> None:
        """RunnerError if a queue could not map the log (its marks would be lost)."""

    def set_log_fd(self, conn: int, fd: int | None) -> None: ...

    def set_log_addr(self, key: QueueKey, log_addr: int | None) -> None: ...

    def drop_log(self, conn: int) -> None: ...

    def close(self) -> None:
        """After every queue stopped: drop what the runner kept."""
