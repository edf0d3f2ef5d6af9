"""One virtqueue served in a process of its own: the child side of :mod:`vhost.procpool`.

Why processes: queue workers are Python threads, and two of them share one interpreter lock --
a second queue made the server slower, not faster.  A process per queue uses every core.

The control process (which keeps the vhost-user socket) starts ``python -m vhost.queueproc FD``
with one end of a ``SOCK_SEQPACKET`` socketpair.  Everything this process needs arrives over it
with SCM_RIGHTS: the guest memory fds (mapped here, by this process), the kick/call/err eventfds,
the in-flight area, and the device's own fds (the image).  The device is rebuilt from its
recipe (:meth:`vhost.device.Device.process_recipe`); then the ordinary :class:`QueueWorker` runs
the queue on a thread, exactly as in the single-process server, while the main thread answers
the control process:

* ``mem_table`` / ``add_region`` / ``remove_region``: the same memory table changes the control
  process made, acknowledged once done (the frontend gets its reply only after every queue
  process has acknowledged);
* ``notifier``: a new call or err eventfd (SET_VRING_CALL/ERR while the queue runs);
* ``state``: device state that can change while queues run (the cache mode);
* ``stop``: drain the queue, answer with the next avail index (GET_VRING_BASE) and exit.

Every ``STATS_INTERVAL`` the device's counters for this queue go to the control process, which
sums them with the other queues'; a final snapshot comes with the stop answer.  If the control
process dies (kill -9), the kernel kills this one too (PR_SET_PDEATHSIG), so a restarted server
never races a leftover worker on the same rings; an EOF on the socket stops the queue as well.

The dirty-page log of a live migration reaches a queue process the way a memory table does:
``log_base`` (SET_LOG_BASE's memfd, mapped here), ``log_fd`` (SET_LOG_FD's eventfd),
``features`` (SET_FEATURES: VHOST_F_LOG_ALL on or off while the queue runs) and ``log_addr``
(VHOST_VRING_F_LOG's used-ring address), each acknowledged once done.  They drive the same
:class:`vhost.dirty_logging.DirtyLogging` a threaded server runs, on this process's one queue:
it sets the :class:`~guestmem.dirty_log.DirtyMarker` on the VirtQueue and the device handler
and makes the worker pass a quiescent point before the answer.  Whether it logs and how many
pages it marked go back with the counters and in every answer; the control process sums them.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import pickle
import select
import signal
import socket
import sys
import types
from dataclasses import dataclass
from typing import Any

from guestmem.dirty_log import DirtyLog

from .device import QueueHandler
from .dirty_logging import DirtyLogging
from .inflight import InflightArea
from .memory import MemoryTable
from .virtqueue import RingAddresses, VirtQueue
from .worker import Notifier, QueueWorker

log = logging.getLogger(__name__)

#: Largest control message (a pickled memory table of 509 regions fits easily).
MAX_MESSAGE = 1 << 20
MAX_FDS = 600
STATS_INTERVAL = 0.1
PR_SET_PDEATHSIG = 1


def send(sock: socket.socket, message: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
    """One pickled message (and fds) as one datagram."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def receive(sock: socket.socket) -> tuple[Any, list[int]]:
    """The next message and its fds; EOFError when the peer is gone."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        raise EOFError("control socket closed")
    return pickle.loads(data), fds


def resolve(target: str) -> Any:
    """``"package.module:Name.attr"`` -> the object."""
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def regions_of(raw: list[tuple[int, int, int, int]]) -> list[Any]:
    """Region descriptions as :class:`MemoryTable` reads them."""
    return [types.SimpleNamespace(guest_phys_addr=g, memory_size=s, userspace_addr=u,
                                  mmap_offset=o) for g, s, u, o in raw]


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass
class ProcessQueue:
    """This process's one queue, as :class:`~vhost.dirty_logging.DirtyLogging` sees a vring."""

    index: int
    log_addr: int | None = None
    worker: QueueWorker | None = None
    queue_handler: QueueHandler | None = None


class QueueProcess:
    """The state of this process: one device, one queue, its worker."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.memory = MemoryTable()
        self.worker: QueueWorker | None = None
        self.device: Any = None
        self.inflight: InflightArea | None = None
        self.index = -1
        self._last_counters: tuple[dict[str, Any], tuple[bool, int]] | None = None
        self.queue = ProcessQueue(-1)
        self.features = 0
        self.dirty_logging = DirtyLogging()

    def dirty_state(self) -> tuple[bool, int]:
        """(logging now, pages marked so far) as the control process sums them."""
        queues = [self.queue]
        return self.dirty_logging.logging(queues), self.dirty_logging.pages_marked(queues)

    # ------------------------------------------------------------------ start
    def start(self, msg: dict[str, Any], fds: list[int]) -> None:
        """Map memory, rebuild the device, make the queue and start its worker."""
        fds = list(fds)
        kick, call, err = fds[0:3]
        n_regions = len(msg["regions"])
        region_fds = fds[3 : 3 + n_regions]
        rest = fds[3 + n_regions :]
        try:
            self.memory.set_table(regions_of(msg["regions"]), region_fds)
        finally:
            _close(region_fds)
        inflight = msg["inflight"]
        if inflight is not None:
            fd = rest.pop(0)
            try:
                self.inflight = InflightArea.map(fd, *inflight)
            finally:
                os.close(fd)
        self.features = msg["features"]
        if msg["log"] is not None:
            fd = rest.pop(0)
            try:
                self.dirty_logging.set_base(DirtyLog(fd, *msg["log"]), [], self.features)
            finally:
                os.close(fd)
        if msg["log_call"]:
            self.dirty_logging.call.replace(rest.pop(0))
        target, kwargs = msg["recipe"]
        self.device = resolve(target)(kwargs, rest)
        self.device.apply_process_state(msg["state"])
        self.index = index = msg["index"]
        size = msg["size"]
        tracker = self.inflight.queue(index, size) if self.inflight is not None else None
        vq = VirtQueue(self.memory.guest, size, RingAddresses(*msg["addresses"]),
                       msg["features"], msg["base"], index=index, inflight=tracker)
        handler = self.device.create_handler(index, self.memory.guest)
        self.worker = QueueWorker(vq, handler, kick, Notifier(call), Notifier(err),
                                  name=f"vq{index}")
        self.queue = ProcessQueue(index, msg["log_addr"], self.worker, handler)
        self.dirty_logging.queue_starting(self.queue, self.features)
        self.worker.start()

    # ------------------------------------------------------------------ serving
    def serve(self) -> int:
        """Answer the control process until it says stop (or goes away); the exit status."""
        while True:
            ready, _, _ = select.select([self.sock], [], [], STATS_INTERVAL)
            self.send_counters()
            if not ready:
                if self.worker is not None and not self.worker.alive:
                    log.error("queue %d: worker thread ended; exiting", self.index)
                    return 1
                continue
            try:
                msg, fds = receive(self.sock)
            except (EOFError, OSError):
                log.warning("queue %d: control process gone; stopping", self.index)
                self.stop()
                return 0
            if msg["kind"] == "stop":
                self.stop()
                return 0
            if msg["kind"] == "ring_state":  # a diagnostics query: answered on its own channel
                _close(fds)
                self.send_ring_state()
                continue
            if msg["kind"] == "counters":
                _close(fds)
                self._last_counters = None  # answered now, with the counters in the answer
                self.send_counters(kind="ack")
                continue
            try:
                self._dispatch(msg, fds)
                send(self.sock, {"kind": "ack", "dirty": self.dirty_state()})
            except Exception as exc:
                log.exception("queue %d: %s failed", self.index, msg["kind"])
                send(self.sock, {"kind": "error", "why": str(exc)})

    def _dispatch(self, msg: dict[str, Any], fds: list[int]) -> None:
        kind = msg["kind"]
        try:
            if kind == "mem_table":
                self.memory.set_table(regions_of(msg["regions"]), fds)
            elif kind == "add_region":
                self.memory.add(regions_of([msg["region"]])[0], fds[0])
            elif kind == "remove_region":
                self.memory.remove(regions_of([msg["region"]])[0])
            elif kind == "notifier":
                assert self.worker is not None
                notifier = self.worker.call if msg["which"] == "call" else self.worker.err
                if notifier is not None:
                    notifier.replace(os.dup(fds[0]) if fds else None)
            elif kind == "state":
                self.device.apply_process_state(msg["state"])
            elif kind == "log_base":
                new = DirtyLog(fds[0], msg["size"], msg["offset"])  # outlives the fd
                self.dirty_logging.set_base(new, [self.queue], self.features)
            elif kind == "log_fd":
                self.dirty_logging.call.replace(os.dup(fds[0]) if fds else None)
            elif kind == "features":
                self.features = msg["features"]
                self.dirty_logging.update([self.queue], self.features)
            elif kind == "log_addr":
                self.dirty_logging.set_log_addr(self.queue, msg["log_addr"])
            else:
                raise ValueError(f"unknown message {kind!r}")
        finally:
            _close(fds)

    def send_counters(self, kind: str = "counters") -> None:
        """The counters if they changed (``kind="ack"``: always, as an answer)."""
        if self.device is None:
            if kind == "ack":
                send(self.sock, {"kind": "ack"})
            return
        counters = self.device.queue_counters(self.index)
        dirty = self.dirty_state()
        if (counters, dirty) != self._last_counters or kind == "ack":
            self._last_counters = (counters, dirty)
            next_avail = self.worker.vq.next_avail if self.worker is not None else 0
            with contextlib.suppress(OSError):
                send(self.sock, {"kind": kind, "counters": counters,
                                 "next_avail": next_avail, "dirty": dirty})

    def send_ring_state(self) -> None:
        """Answer a ``ring_state`` query: the queue's ring state, or why there is none."""
        answer: dict[str, Any] = {"kind": "ring_state"}
        try:
            if self.worker is None:
                raise ValueError("no queue")
            answer["state"] = self.worker.vq.ring_state()
        except ValueError as exc:
            answer["why"] = str(exc)
        with contextlib.suppress(OSError):
            send(self.sock, answer)

    def stop(self) -> None:
        """Drain the queue and report where it stopped."""
        worker = self.worker
        reply: dict[str, Any] = {"kind": "stopped", "next_avail": 0, "broken": False,
                                 "drained": True, "kicks": 0, "batches": 0, "completed": 0}
        if worker is not None:
            reply["drained"] = worker.stop()
            # Its last flush committed its marks: count them, and say whether it was logging
            # (the end of a migration, for the control process, if it was the last queue).
            logging_ = self.dirty_logging.queue_stopped(self.queue)
            reply["dirty"] = (logging_, self.dirty_logging.pages_marked([self.queue]))
            vq = worker.vq
            reply.update(next_avail=vq.next_avail, broken=vq.broken, kicks=worker.kicks,
                         batches=worker.batches, completed=worker.completed,
                         calls=worker.call.count)
            vq.release()
            worker.handler.close()
            worker.call.close()
            if worker.err is not None:
                worker.err.close()
            with contextlib.suppress(OSError):
                os.close(worker.kick_fd)
        if self.device is not None:
            reply["counters"] = self.device.queue_counters(self.index)
        with contextlib.suppress(OSError):
            send(self.sock, reply)
        if self.inflight is not None:
            self.inflight.close()
        self.dirty_logging.close([self.queue], report=False)  # the control process reports
        self.memory.close()


def _die_with_parent() -> None:
    """SIGKILL this process when the control process dies (Linux PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fd = int(argv[0])
    parent = int(argv[1]) if len(argv) > 1 else None
    _die_with_parent()
    if parent is not None and os.getppid() != parent:
        return 1  # the control process died before we could ask to die with it
    # Signals for the server go to the control process, which stops its queues in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    level = int(os.environ.get("VHOST_QUEUEPROC_LOG_LEVEL", str(logging.INFO)))
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    sock = socket.socket(fileno=fd)
    proc = QueueProcess(sock)
    try:
        msg, fds = receive(sock)
    except (EOFError, OSError):
        return 1
    try:
        proc.start(msg, fds)
    except Exception as exc:
        log.exception("queue process could not start")
        with contextlib.suppress(OSError):
            send(sock, {"kind": "error", "why": str(exc)})
        return 1
    send(sock, {"kind": "started"})
    return proc.serve()


if __name__ == "__main__":
    sys.exit(main())
