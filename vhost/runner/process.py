"""One virtqueue served in a process of its own: the child side of :mod:`vhost.runner.pool`.

Why processes: queue workers are Python threads, and two of them share one interpreter lock --
a second queue made the server slower, not faster.  A process per queue uses every core.

The control process (which keeps the vhost-user socket) starts ``python -m vhost.runner.process FD``
with one end of a ``SOCK_SEQPACKET`` socketpair.  Everything this process needs arrives over it
with SCM_RIGHTS: the guest memory fds (mapped here, by this process), the kick/call/err eventfds,
the in-flight area, and the device's own fds (the image).  The device is rebuilt from its
recipe (:meth:`vhost.device.Device.process_recipe`); then the ordinary :class:`QueueWorker` runs
the queue on a thread, exactly as in the single-process server, while the main thread answers
the control process:

* ``MemTable`` / ``AddRegion`` / ``RemoveRegion``: the same memory table changes the control
  process made, acknowledged once done (the frontend gets its reply only after every queue
  process has acknowledged);
* ``SetNotifier``: a new call or err eventfd (SET_VRING_CALL/ERR while the queue runs);
* ``DeviceState``: device state that can change while queues run (the cache mode);
* ``Stop``: drain the queue, answer with the next avail index (GET_VRING_BASE) and exit.

Each request carries a number and gets exactly one reply with the same number
(:mod:`vhost.runner.ipc` declares the wire; :data:`DISPATCH` maps each request type to the
method here that serves it).  The queue is put together by :func:`vhost.runner.assembly.
assemble`, the same code that starts a queue on a thread.

This queue's counters are not sent at all: the worker writes them into a shared
:class:`~vhost.runner.ipc.CounterBlock` once per pass that completed or took requests (just
before it publishes the used index, so a driver that saw a completion finds it counted; a few
microseconds, a prefix when latency is not accounted), where the control process reads them
when scraped.  An idle queue process sleeps: nothing here runs on a timer.  If the control
process dies (kill -9), the kernel kills this one too (PR_SET_PDEATHSIG), so a restarted server
never races a leftover worker on the same rings; an EOF on the socket stops the queue as well.

The dirty-page log of a live migration reaches a queue process the way a memory table does:
``LogBase`` (SET_LOG_BASE's memfd, mapped here), ``LogFd`` (SET_LOG_FD's eventfd),
``Features`` (SET_FEATURES: VHOST_F_LOG_ALL on or off while the queue runs) and ``LogAddr``
(VHOST_VRING_F_LOG's used-ring address), each acknowledged once done.  They drive the same
:class:`vhost.dirty_logging.DirtyLogging` a threaded server runs, on this process's one queue:
it sets the :class:`~guestmem.dirty_log.DirtyMarker` on the queue and the device handler
and makes the worker pass a quiescent point before the answer.  Whether it logs and how many
pages it marked go into the counter block and every answer; the control process sums them.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import select
import signal
import socket
import sys
import threading
import types
from collections.abc import Callable
from typing import Any, NoReturn, Protocol

from guestmem.dirty_log import DirtyLog, DirtyLogError
from vhost.dirty_logging import DirtyLogging
from vhost.fdkinds import FdKindError
from vhost.memory import MemoryTable, MemoryTableError
from vhost.queue.base import QueueError
from vhost.queue.factory import is_packed
from vhost.queue.inflight import InflightArea, InflightError
from vhost.queue.packed import PackedQueue
from vhost.queue.split import SplitQueue
from vhost.runner import ipc
from vhost.runner.assembly import assemble
from vhost.runner.base import Notifier, QueueKey, QueueSpec
from vhost.runner.thread import QueueWorker
from vhost.runner.thread_runner import LocalQueue

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
#: Errors that mean the frontend's input cannot be used (refused), not that this process failed.
REFUSALS = (QueueError, InflightError, MemoryTableError, DirtyLogError, FdKindError)


def resolve(target: str) -> Any:
    """``"package.module:Name.attr"`` -> the object."""
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def regions_of(raw: list[ipc.RawRegion]) -> list[Any]:
    """Region descriptions as :class:`MemoryTable` reads them."""
    return [types.SimpleNamespace(guest_phys_addr=g, memory_size=s, userspace_addr=u,
                                  mmap_offset=o) for g, s, u, o in raw]


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class ConnectionSide(Protocol):
    """What a child keeps per connection: the queue process for its one queue, a pool
    worker's :class:`~vhost.runner.poolworker.HostedConn` for each connection it hosts.  The
    helpers below act on it so both children apply the control process's messages alike."""

    memory: MemoryTable
    inflight: InflightArea | None
    dirty_logging: DirtyLogging


def map_connection(side: ConnectionSide, msg: ipc.Start, rest: list[int]) -> None:
    """Map ``msg``'s memory table, in-flight area and dirty log into ``side`` and take its
    log-call fd, consuming their fds from the front of ``rest`` (in place, in the order the
    control process sends them); the device's fds are what is left.  ``side.inflight`` is set
    as soon as it is mapped, so a caller that cleans ``side`` up on a later failure unmaps it."""
    n = len(msg.regions)
    region_fds, rest[:] = rest[:n], rest[n:]
    try:
        side.memory.set_table(regions_of(msg.regions), region_fds)
    finally:
        _close(region_fds)
    if msg.inflight is not None:
        fd = rest.pop(0)
        try:
            # (made for the layout negotiated before GET_INFLIGHT_FD, which the queue has)
            side.inflight = InflightArea.map(fd, *msg.inflight, packed=is_packed(msg.features))
        finally:
            os.close(fd)
    if msg.log is not None:
        fd = rest.pop(0)
        try:
            side.dirty_logging.set_base(DirtyLog(fd, *msg.log), [], msg.features)
        finally:
            os.close(fd)
    if msg.log_call:
        side.dirty_logging.call.replace(rest.pop(0))


def apply_mem_table(memory: MemoryTable, msg: ipc.MemTable, fds: list[int]) -> None:
    """SET_MEM_TABLE forwarded: the new table mapped (its fds closed either way)."""
    try:
        memory.set_table(regions_of(msg.regions), fds)
    finally:
        _close(fds)


def apply_add_region(memory: MemoryTable, msg: ipc.AddRegion, fds: list[int]) -> None:
    """ADD_MEM_REG forwarded: the region mapped (its fd closed either way)."""
    try:
        if not fds:
            raise ValueError("a region without its fd")
        memory.add(regions_of([msg.region])[0], fds[0])
    finally:
        _close(fds)


def apply_remove_region(memory: MemoryTable, msg: ipc.RemoveRegion, fds: list[int]) -> None:
    """REM_MEM_REG forwarded: the region unmapped."""
    _close(fds)
    memory.remove(regions_of([msg.region])[0])


def apply_notifier(worker: Callable[[], QueueWorker], msg: ipc.SetNotifier,
                   fds: list[int]) -> None:
    """SET_VRING_CALL/ERR forwarded to a running queue (``worker`` finds it; its failure
    fails the request, the fds closed either way)."""
    try:
        if msg.which not in ("call", "err"):
            raise ValueError(f"no notifier {msg.which!r}")
        queue_worker = worker()
        notifier = queue_worker.call if msg.which == "call" else queue_worker.err
        if notifier is not None:
            notifier.replace(os.dup(fds[0]) if fds else None)
    finally:
        _close(fds)


def apply_log_base(dirty_logging: DirtyLogging, queues: Callable[[], list[LocalQueue]],
                   features: int, msg: ipc.LogBase, fds: list[int]) -> None:
    """SET_LOG_BASE forwarded: the log mapped (it outlives its fd) for ``queues``."""
    try:
        if not fds:
            raise ValueError("a dirty log without its fd")
        dirty_logging.set_base(DirtyLog(fds[0], msg.size, msg.offset), queues(), features)
    finally:
        _close(fds)


def apply_log_fd(dirty_logging: DirtyLogging, fds: list[int]) -> None:
    """SET_LOG_FD forwarded: the eventfd the log's marks are announced on (none: no fd)."""
    try:
        dirty_logging.call.replace(os.dup(fds[0]) if fds else None)
    finally:
        _close(fds)


class PublishingQueue(SplitQueue):
    """The queue, telling this process when its counters changed: just before a used-index
    store that moves (the batch's requests are counted by then, and no driver has seen them
    complete yet), or when the avail index moved.  Nothing runs while the queue is idle.

    The worker's end of a pass adds the pass's completions first (they are no longer in
    flight), tells, then runs the split ring's compiled end of a pass (which may publish): the
    counters told are those of the requests completed -- telling before adding would report
    them still in flight until the next change.  Told once more, harmlessly, should the pass go
    on draining (or, while dirty pages are logged, in the Python publish it hands over to).
    """

    changed: Callable[[], None] | None = None
    _seen_avail = -1

    def _tell(self, adding: bool = False) -> None:
        """``changed()`` if the used index is about to move (or entries are, ``adding``) or the
        avail index moved."""
        changed = self.changed
        if changed is not None and (adding or self.next_used != self._published_used
                                    or self.next_avail != self._seen_avail):
            self._seen_avail = self.next_avail
            changed()

    def publish_used(self) -> bool:
        self._tell()
        return super().publish_used()

    def pass_ender(self) -> Callable[[list[tuple[int, int]]], int]:
        compiled = self.compiled_pass_end()
        if compiled is None:
            return self.end_pass
        tell = self._tell

        add = self.add_used_many
        no_more: list[tuple[int, int]] = []

        def end_pass(done: list[tuple[int, int]]) -> int:
            if done:
                add(done)  # counted out of the requests in flight before they are told
            tell(bool(done))
            return compiled(no_more)
        return end_pass



class PublishingPackedQueue(PackedQueue):
    """:class:`PublishingQueue` for a packed ring: the same moments, told by the packed ring's
    own state (completions waiting to be published; the avail position with its wrap)."""

    changed: Callable[[], None] | None = None
    _seen_avail = -1

    def publish_used(self) -> bool:
        changed = self.changed
        if changed is not None:
            avail = self.next_avail | self.avail_wrap << 15
            if self._pending or avail != self._seen_avail:
                self._seen_avail = avail
                changed()
        return super().publish_used()

class ProcessWorker(QueueWorker):
    """The ordinary worker, which also says when its thread ends (the main thread exits then)."""

    def __init__(self, *args: Any, ended_fd: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ended_fd = ended_fd

    def _run(self) -> None:
        try:
            super()._run()
        finally:
            os.eventfd_write(self._ended_fd, 1)


#: Request type -> the :class:`QueueProcess` method that serves it.
DISPATCH: ipc.DispatchTable[QueueProcess] = ipc.DispatchTable()


class QueueProcess:
    """The state of this process: one device, one queue, its worker."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.memory = MemoryTable()
        self.worker: QueueWorker | None = None
        self.device: Any = None
        self.inflight: InflightArea | None = None
        self.key = QueueKey(-1, -1)
        self.queue = LocalQueue(-1, None, None)
        self.features = 0
        self.dirty_logging = DirtyLogging()
        self.dirty_logging.on_marks = self.publish  # the pages marked, once committed
        self.counters: ipc.CounterBlock | None = None
        self._publish_lock = threading.Lock()
        #: Readable once the worker thread ended (serve() returns then).
        self.ended_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @property
    def index(self) -> int:
        return self.key.index

    def dirty_state(self) -> tuple[bool, int]:
        """(logging now, pages marked so far) as the control process sums them."""
        queues = [self.queue]
        return self.dirty_logging.logging(queues), self.dirty_logging.pages_marked(queues)

    def publish(self) -> None:
        """This queue's counters, its avail index, its requests in flight and its dirty-log
        state into the block (the worker thread just before it publishes a batch, or as it
        commits dirty-log marks; the main thread after a request it answered)."""
        block = self.counters
        if block is None or self.device is None:
            return
        with self._publish_lock:  # one writer at a time (the block's sequence lock needs it)
            logging_, pages = self.dirty_state()
            vq = self.worker.vq if self.worker is not None else None
            block.publish(vq.vring_base() if vq is not None else 0,
                          vq.in_flight_count if vq is not None else 0, logging_, pages,
                          self.device.queue_counter_values(self.index))

    # ------------------------------------------------------------------ start
    def start(self, msg: ipc.Start, fds: list[int]) -> None:
        """Map memory, rebuild the device, make the queue and start its worker."""
        fds = list(fds)
        kick, call, err, counters = fds[0:4]
        rest = fds[4:]
        try:
            self.counters = ipc.CounterBlock(counters, msg.counter_slots)
        finally:
            os.close(counters)
        self.features = msg.features
        map_connection(self, msg, rest)
        target, kwargs = msg.recipe
        self.device = resolve(target)(kwargs, rest)
        self.device.apply_process_state(msg.state)
        self.key = key = msg.key
        spec = QueueSpec(key, msg.size, msg.ring_uaddrs, msg.features, msg.base, kick,
                         Notifier(call), Notifier(err), msg.log_addr)

        def make_worker(*args: Any) -> QueueWorker:
            return ProcessWorker(*args, name=f"vq{key.index}", ended_fd=self.ended_fd)

        worker = assemble(self.memory, self.inflight, self.device, spec, make_worker,
                          split_class=PublishingQueue, packed_class=PublishingPackedQueue)
        if isinstance(worker.vq, PublishingQueue | PublishingPackedQueue):
            worker.vq.changed = self.publish
        self.worker = worker
        self.queue = LocalQueue(key.index, msg.log_addr, worker)
        self.dirty_logging.queue_starting(self.queue, self.features)
        self.publish()
        worker.start()

    # ------------------------------------------------------------------ serving
    def serve(self) -> int:
        """Answer the control process until it says stop (or goes away); the exit status.

        Sleeps until a request comes or the worker thread ends: no timer, so an idle queue
        costs nothing."""
        sock = self.sock.fileno()
        while True:
            ready, _, _ = select.select([sock, self.ended_fd], [], [])
            if sock not in ready:
                log.error("queue %d: worker thread ended; exiting", self.index)
                return 1
            try:
                msg, fds = ipc.receive(self.sock)
            except ValueError as exc:
                log.error("queue %d: %s; ignored", self.index, exc)
                continue
            except (EOFError, OSError):
                log.warning("queue %d: control process gone; stopping", self.index)
                return 0 if self.stop(None) else _exit_now()
            if isinstance(msg, ipc.Stop) and msg.key == self.key:
                _close(fds)
                return 0 if self.stop(msg) else _exit_now()
            answer = self.answer(msg, fds)
            with contextlib.suppress(OSError):
                ipc.send(self.sock, answer)

    def answer(self, msg: ipc.Message, fds: list[int]) -> ipc.Reply:
        """The reply to one request (``fds`` are its, owned here): its handler's in
        :data:`DISPATCH`, an :class:`~vhost.runner.ipc.Ack` if it returned none, an
        :class:`~vhost.runner.ipc.Error` if it failed, is not for this queue or has no
        handler."""
        seq = msg.seq
        try:
            if not isinstance(msg, ipc.Request):
                raise TypeError(f"{type(msg).__name__} is not a request")
            if msg.key != self.key:
                raise KeyError(f"{msg.key} is not this process's queue {self.key}")
            reply = DISPATCH.dispatch(self, msg, fds)
            fds = []
        except Exception as exc:
            log.exception("queue %d: %s failed", self.index, msg.kind)
            _close(fds)
            return ipc.Error(seq=seq, why=str(exc))
        self.publish()
        return reply if reply is not None else ipc.Ack(seq=seq, dirty=self.dirty_state())

    @DISPATCH.on(ipc.MemTable)
    def _mem_table(self, msg: ipc.MemTable, fds: list[int]) -> None:
        apply_mem_table(self.memory, msg, fds)

    @DISPATCH.on(ipc.AddRegion)
    def _add_region(self, msg: ipc.AddRegion, fds: list[int]) -> None:
        apply_add_region(self.memory, msg, fds)

    @DISPATCH.on(ipc.RemoveRegion)
    def _remove_region(self, msg: ipc.RemoveRegion, fds: list[int]) -> None:
        apply_remove_region(self.memory, msg, fds)

    def _worker(self) -> QueueWorker:
        assert self.worker is not None
        return self.worker

    @DISPATCH.on(ipc.SetNotifier)
    def _notifier(self, msg: ipc.SetNotifier, fds: list[int]) -> None:
        apply_notifier(self._worker, msg, fds)

    @DISPATCH.on(ipc.DeviceState)
    def _state(self, msg: ipc.DeviceState, fds: list[int]) -> None:
        _close(fds)
        self.device.apply_process_state(msg.state)

    @DISPATCH.on(ipc.LogBase)
    def _log_base(self, msg: ipc.LogBase, fds: list[int]) -> None:
        apply_log_base(self.dirty_logging, lambda: [self.queue], self.features, msg, fds)

    @DISPATCH.on(ipc.LogFd)
    def _log_fd(self, msg: ipc.LogFd, fds: list[int]) -> None:
        apply_log_fd(self.dirty_logging, fds)

    @DISPATCH.on(ipc.Features)
    def _features(self, msg: ipc.Features, fds: list[int]) -> None:
        _close(fds)
        self.features = msg.features
        self.dirty_logging.update([self.queue], self.features)

    @DISPATCH.on(ipc.LogAddr)
    def _log_addr(self, msg: ipc.LogAddr, fds: list[int]) -> None:
        _close(fds)
        self.dirty_logging.set_log_addr(self.queue, msg.log_addr)

    @DISPATCH.on(ipc.RingState)
    def _ring_state(self, msg: ipc.RingState, fds: list[int]) -> ipc.Reply:
        """A diagnostics query: the queue's ring state, or why there is none."""
        _close(fds)
        if self.worker is None:
            return ipc.Error(seq=msg.seq, why="no queue")
        try:
            return ipc.RingStateReply(seq=msg.seq, state=self.worker.vq.ring_state())
        except ValueError as exc:
            return ipc.Error(seq=msg.seq, why=str(exc))

    def stop(self, msg: ipc.Stop | None) -> bool:
        """Drain the queue and report where it stopped (``msg``: the stop request, None if the
        control process is gone); False if requests may still be in flight (then nothing is
        unmapped or closed: the caller must end the process at once)."""
        worker = self.worker
        answer = ipc.StopReply(seq=msg.seq if msg is not None else 0)
        if worker is not None:
            drained = worker.stop()
            # Its last flush committed its marks: count them, and say whether it was logging
            # (the end of a migration, for the control process, if it was the last queue).
            logging_ = self.dirty_logging.queue_stopped(self.queue)
            vq = worker.vq
            if drained and worker.alive:
                drained = False
            if drained:
                worker.vq.release()
                # Engine ops the drain gave up on may still be running: the engine says.
                drained = worker.handler.close()
            answer = ipc.StopReply(
                seq=answer.seq, base=vq.vring_base(), broken=vq.broken, drained=drained,
                kicks=worker.kicks, batches=worker.batches, completed=worker.completed,
                calls=worker.call.count,
                dirty=(logging_, self.dirty_logging.pages_marked([self.queue])))
        self.publish()  # the final counters, read by the control process with this answer
        if msg is not None:
            with contextlib.suppress(OSError):
                ipc.send(self.sock, answer)
        if not answer.drained:
            # Requests (IO threads, librbd, the kernel) may still write guest memory: do not
            # unmap it or the log, or close the engine's fds under them.  The control process
            # kills this process on this answer (the caller exits at once too); the kernel
            # takes everything down with it.
            log.error("queue %d: not drained; leaving memory mapped until the process ends",
                      self.index)
            return False
        if worker is not None:
            worker.call.close()
            if worker.err is not None:
                worker.err.close()
            with contextlib.suppress(OSError):
                os.close(worker.kick_fd)
        if self.inflight is not None:
            self.inflight.close()
        self.dirty_logging.close([self.queue], report=False)  # the control process reports
        self.memory.close()
        return True


def _exit_now() -> NoReturn:
    """End the process without the interpreter's cleanup, which would unmap guest memory and
    the dirty log (by freeing their objects) under IO that may still be running."""
    logging.shutdown()
    os._exit(2)


def _die_with_parent() -> None:
    """SIGKILL this process when the control process dies (Linux PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def child_socket(argv: list[str]) -> socket.socket | None:
    """A child's start (a queue process's or a pool worker's): ``argv`` is its control socket's
    fd and the control process's pid; die with that process, leave SIGINT/SIGTERM to it, log
    at ``VHOST_QUEUEPROC_LOG_LEVEL``.  The control socket, None if the control process died
    before this one could ask to die with it."""
    fd = int(argv[0])
    parent = int(argv[1]) if len(argv) > 1 else None
    _die_with_parent()
    if parent is not None and os.getppid() != parent:
        return None  # the control process died before we could ask to die with it
    # Signals for the server go to the control process, which stops its queues in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    level = int(os.environ.get("VHOST_QUEUEPROC_LOG_LEVEL", str(logging.INFO)))
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    return socket.socket(fileno=fd)


def main(argv: list[str] | None = None) -> int:
    sock = child_socket(sys.argv[1:] if argv is None else argv)
    if sock is None:
        return 1
    proc = QueueProcess(sock)
    try:
        msg, fds = ipc.receive(sock)
    except (EOFError, OSError, ValueError):
        return 1
    if not isinstance(msg, ipc.Start):
        log.error("queue process: the first message is %s, not Start", type(msg).__name__)
        _close(fds)
        return 1
    try:
        proc.start(msg, fds)
    except REFUSALS as exc:
        # What the frontend handed over (a ring, a memory table, an in-flight area) cannot be
        # used: a refusal, not a failure of this process -- one line, the reason to the control
        # process (which refuses the queue's start), exit status 0.
        log.error("queue %s refused to start: %s", msg.key.index, exc)
        with contextlib.suppress(OSError):
            ipc.send(sock, ipc.Error(seq=msg.seq, why=str(exc)))
        return 0
    except Exception as exc:
        log.exception("queue process could not start")
        with contextlib.suppress(OSError):
            ipc.send(sock, ipc.Error(seq=msg.seq, why=str(exc)))
        return 1
    ipc.send(sock, ipc.Started(seq=msg.seq))
    return proc.serve()


if __name__ == "__main__":
    sys.exit(main())
