"""The wire between the control process and a queue process, declared in one place.

Two channels, both set up by :mod:`vhost.runner.pool` and used by :mod:`vhost.runner.process`:

* a ``SOCK_SEQPACKET`` socket carrying one message per datagram (fds by SCM_RIGHTS).  Every
  message is one of the dataclasses below -- a :class:`Request` (control -> queue process) or a
  :class:`Reply` (back) -- pickled; :func:`receive` hands on nothing else.  The control process
  numbers every request (``seq``); the queue process answers each with exactly one reply
  carrying the same number.  A reply is matched to its request by that number only -- never by
  arrival order: a reply that comes after its request timed out would otherwise be taken as
  the answer to the next request (a ``LogBase`` counted as applied while the process still
  marked the old log).  :class:`Replies` does the matching.  A queue process looks up what to
  do with a request in a :class:`DispatchTable` (message type -> handler), so a request type
  without a handler is an error reply, never a silent no-op.
* a :class:`CounterBlock`: a small shared-memory block the queue process rewrites after each
  batch of completions (see :mod:`vhost.runner.process`) and the control process reads when its
  counters are scraped -- no message, no wake-up of the queue process, no lock the vhost-user
  control thread needs.  An idle queue writes nothing.

Every request names its queue by :class:`~vhost.runner.base.QueueKey` (connection, index):
a process answers for the keys it runs only, so a pool process can later run queues of many
connections (see :mod:`vhost.runner.base`).
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import pickle
import re
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from vhost.runner.base import QueueKey

log = logging.getLogger(__name__)

#: Largest control message (a pickled memory table of 509 regions fits easily).
MAX_MESSAGE = 1 << 20
MAX_FDS = 600

#: A memory region as it crosses: (guest physical address, size, user address, mmap offset).
RawRegion = tuple[int, int, int, int]


# ---------------------------------------------------------------------- messages
@dataclass(frozen=True, kw_only=True)
class Message:
    """Anything that crosses the socket."""

    #: The request's number (a reply carries its request's).
    seq: int = 0

    @property
    def kind(self) -> str:
        """The message's name in log lines: ``RingState`` -> ``ring_state``."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()


@dataclass(frozen=True, kw_only=True)
class Request(Message):
    """Control process -> queue process; answered by exactly one :class:`Reply`."""

    key: QueueKey


@dataclass(frozen=True, kw_only=True)
class Start(Request):
    """The first message (number 0): everything the process needs to run its queue.

    Its fds, in order: kick, call, err, the counter block, one per region, then the in-flight
    area (if ``inflight``), the dirty log (if ``log``), the log's eventfd (if ``log_call``),
    then the device's own (:meth:`vhost.device.Device.process_recipe`)."""

    size: int
    #: desc, avail, used: frontend addresses (the process translates them with ``regions``).
    ring_uaddrs: tuple[int, int, int]
    features: int
    base: int
    regions: list[RawRegion]
    #: (mmap size, mmap offset, queues, queue size) of the in-flight area, if any.
    inflight: tuple[int, int, int, int] | None
    #: ("module:callable", kwargs): rebuilds the device in the process.
    recipe: tuple[str, dict[str, Any]]
    state: dict[str, Any]
    #: (size, offset) of the dirty log, if one is mapped.
    log: tuple[int, int] | None
    log_call: bool
    log_addr: int | None
    counter_slots: int
    #: A pool worker (:mod:`vhost.runner.poolworker`) already hosts a queue of this
    #: connection: it uses the memory table, in-flight area, dirty log and device it has, and
    #: the fds are the queue's own only (kick, call, err, the counter block).
    hosted: bool = False
    #: The queue's counters so far (a moved or restarted queue counts on from them; empty:
    #: from zero).
    counters: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class MemTable(Request):
    """SET_MEM_TABLE: a new table (its fds, one per region, come along)."""

    regions: list[RawRegion]


@dataclass(frozen=True, kw_only=True)
class AddRegion(Request):
    """ADD_MEM_REG (the region's fd comes along)."""

    region: RawRegion


@dataclass(frozen=True, kw_only=True)
class RemoveRegion(Request):
    """REM_MEM_REG."""

    region: RawRegion


@dataclass(frozen=True, kw_only=True)
class SetNotifier(Request):
    """SET_VRING_CALL/ERR of a running queue (the eventfd comes along; none: nobody listens)."""

    which: str  # "call" or "err"


@dataclass(frozen=True, kw_only=True)
class DeviceState(Request):
    """:meth:`vhost.device.Device.process_state` changed (the cache mode, a resize)."""

    state: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class LogBase(Request):
    """SET_LOG_BASE (the log's memfd comes along)."""

    size: int
    offset: int


@dataclass(frozen=True, kw_only=True)
class LogFd(Request):
    """SET_LOG_FD (the eventfd comes along; none: nobody listens)."""


@dataclass(frozen=True, kw_only=True)
class Features(Request):
    """SET_FEATURES (VHOST_F_LOG_ALL switched with the queue running)."""

    features: int


@dataclass(frozen=True, kw_only=True)
class LogAddr(Request):
    """SET_VRING_ADDR of a running queue: VHOST_VRING_F_LOG's used-ring log address."""

    log_addr: int | None


@dataclass(frozen=True, kw_only=True)
class RingState(Request):
    """A diagnostics query: read-only, answered at once with :class:`RingStateReply`."""


@dataclass(frozen=True, kw_only=True)
class Stop(Request):
    """Drain the queue and exit; answered with :class:`StopReply`."""


@dataclass(frozen=True, kw_only=True)
class Reply(Message):
    """Queue process -> control process, the answer to request ``seq``."""


@dataclass(frozen=True, kw_only=True)
class Started(Reply):
    """The answer to :class:`Start`: the queue runs."""


@dataclass(frozen=True, kw_only=True)
class Ack(Reply):
    """Done.  ``dirty``: (logging now, pages marked so far) of the process's queue."""

    dirty: tuple[bool, int] = (False, 0)


@dataclass(frozen=True, kw_only=True)
class Error(Reply):
    """Refused or failed, and why."""

    why: str


@dataclass(frozen=True, kw_only=True)
class StopReply(Reply):
    """The answer to :class:`Stop`: where the queue ended and what it did."""

    #: GET_VRING_BASE's value (:meth:`vhost.queue.base.Queue.vring_base`).
    base: int = 0
    broken: bool = False
    drained: bool = True
    kicks: int = 0
    batches: int = 0
    completed: int = 0
    calls: int = 0
    #: (was logging until it stopped, pages marked), None if no queue ran.
    dirty: tuple[bool, int] | None = None


@dataclass(frozen=True, kw_only=True)
class RingStateReply(Reply):
    """The answer to :class:`RingState`."""

    state: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Gone(Reply):
    """Never sent: what a waiter gets when the process is gone (EOF on the socket)."""


# ---------------------------------------------------------------------- the socket
def send(sock: socket.socket, message: Message, fds: Sequence[int] = ()) -> None:
    """One message (and fds) as one datagram."""
    if not isinstance(message, Message):
        raise TypeError(f"not a queue process message: {message!r}")
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def receive(sock: socket.socket) -> tuple[Message, list[int]]:
    """The next message and its fds; EOFError when the peer is gone, ValueError (its fds
    closed) for a datagram that is not one of this module's messages."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        raise EOFError("control socket closed")
    try:
        message = pickle.loads(data)
    except Exception as exc:
        message = exc
    if not isinstance(message, Message):
        for fd in fds:
            os.close(fd)
        raise ValueError(f"not a queue process message: {type(message).__name__}")
    return message, fds


def numbered(request: RequestT, seq: int) -> RequestT:
    """``request`` carrying number ``seq``."""
    return dataclasses.replace(request, seq=seq)


RequestT = TypeVar("RequestT", bound=Request)
TargetT = TypeVar("TargetT")
#: What a request's handler returns: its reply, or None for a plain :class:`Ack`.
Handler = Callable[[TargetT, Any, list[int]], "Reply | None"]


class DispatchTable(Generic[TargetT]):
    """Request type -> the method of ``TargetT`` that serves it.

    ``@table.on(MemTable)`` registers a handler ``(target, request, fds) -> Reply | None``;
    :meth:`dispatch` runs the one registered for the request's exact type.  A request whose
    type has no handler is refused (an :class:`Error` reply), so a message added on one side
    only is seen at once, not dropped."""

    def __init__(self) -> None:
        self._handlers: dict[type[Request], Handler[TargetT]] = {}

    def on(self, kind: type[RequestT]) -> Callable[[Callable[[TargetT, RequestT, list[int]],
                                                             Reply | None]],
                                                   Callable[[TargetT, RequestT, list[int]],
                                                            Reply | None]]:
        def register(fn: Callable[[TargetT, RequestT, list[int]], Reply | None]
                     ) -> Callable[[TargetT, RequestT, list[int]], Reply | None]:
            if kind in self._handlers:
                raise ValueError(f"two handlers for {kind.__name__}")
            self._handlers[kind] = fn
            return fn
        return register

    @property
    def kinds(self) -> frozenset[type[Request]]:
        return frozenset(self._handlers)

    def dispatch(self, target: TargetT, request: Request, fds: list[int]) -> Reply | None:
        """Run ``request``'s handler (it owns ``fds``); KeyError if there is none (``fds``
        are closed then)."""
        handler = self._handlers.get(type(request))
        if handler is None:
            for fd in fds:
                os.close(fd)
            raise KeyError(f"no handler for {type(request).__name__}")
        return handler(target, request, fds)


# ---------------------------------------------------------------------- reply matching
class _Slot:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: Reply | None = None


class Replies:
    """Replies matched to requests by number: a waiter gets its own reply or none.

    ``expect`` registers a number before the request is sent, ``wait`` takes that number's
    reply (None on timeout: the number is forgotten, so a late reply is dropped by
    :meth:`deliver` with a log line rather than handed to anyone), ``deliver`` is called by the
    reader thread for each reply, ``close`` wakes every waiter with ``final`` (the process is
    gone).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}
        self._next = 0
        self._final: Reply | None = None

    def expect(self) -> int:
        with self._lock:
            self._next += 1
            self._slots[self._next] = _Slot()
            return self._next

    def wait(self, seq: int, timeout: float | None) -> Reply | None:
        with self._lock:
            slot = self._slots.get(seq)
            if slot is None or self._final is not None:  # the process is gone already
                self._slots.pop(seq, None)
                return slot.reply if slot is not None and slot.reply else self._final
        slot.event.wait(timeout)
        with self._lock:
            self._slots.pop(seq, None)
            if slot.reply is not None:
                return slot.reply
            return self._final if self._final is not None and slot.event.is_set() else None

    def forget(self, seq: int) -> None:
        """The request was never sent: its number will get no reply."""
        with self._lock:
            self._slots.pop(seq, None)

    def deliver(self, msg: Reply, taken: Callable[[Reply], None] | None = None) -> bool:
        """Hand ``msg`` to whoever waits for its number, calling ``taken(msg)`` first (before
        the waiter can run on); False (logged) if nobody waits."""
        seq = msg.seq
        with self._lock:
            slot = self._slots.get(seq)
            if slot is not None and slot.reply is None:
                if taken is not None:
                    taken(msg)
                slot.reply = msg
                slot.event.set()
                return True
        log.warning("%s: dropped a reply nobody waits for (request %s, %s): late, after its "
                    "request timed out, or unasked", self.name, seq, msg.kind)
        return False

    def close(self, final: Reply) -> None:
        with self._lock:
            self._final = final
            for slot in self._slots.values():
                slot.event.set()


# ---------------------------------------------------------------------- counters
#: Header words of a counter block: seqlock sequence, next avail index, requests in flight,
#: dirty logging on, dirty pages marked; the device's counters follow.
_HEADER = struct.Struct("<QQQQQ")
_WORD = struct.Struct("<Q")
_MAX_READ_TRIES = 1000


@dataclass(frozen=True)
class CounterSnapshot:
    """What a queue process last published."""

    next_avail: int
    in_flight: int
    dirty_logging: bool
    dirty_pages: int
    values: tuple[int, ...]


class CounterBlock:
    """A queue process's counters in shared memory, under a sequence lock.

    One writer (the queue process's worker thread, after a batch), any number of readers (the
    control process's scrapes).  The writer makes the sequence odd, writes, makes it even
    again; a reader retries while the sequence is odd or moved during its copy.  The values
    are unsigned 64-bit words (the device's counters only grow).
    """

    def __init__(self, fd: int, slots: int) -> None:
        """Map the block behind ``fd`` (the caller keeps ``fd``), ``slots`` device counters."""
        self.slots = slots
        self._values = struct.Struct(f"<{slots}Q")
        self._prefixes: dict[int, struct.Struct] = {slots: self._values}
        self.size = _HEADER.size + self._values.size
        self._mm = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._seq = _WORD.unpack_from(self._mm, 0)[0]

    @classmethod
    def create(cls, slots: int) -> tuple[CounterBlock, int]:
        """A new zeroed block and its memfd (to pass to the queue process, then close)."""
        fd = os.memfd_create("vhost-queue-counters", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _HEADER.size + 8 * slots)
            return cls(fd, slots), fd
        except BaseException:
            os.close(fd)
            raise

    def publish(self, next_avail: int, in_flight: int, dirty_logging: bool, dirty_pages: int,
                values: Sequence[int]) -> None:
        """Write a snapshot (one writer at a time).  ``values`` may be a prefix of the
        counters: the rest keep what they last were (a device leaves out what did not
        change, such as histograms that are not kept)."""
        mm = self._mm
        n = len(values)
        fmt = self._prefixes.get(n)
        if fmt is None:
            if n > self.slots:
                raise ValueError(f"{n} counter values for a block of {self.slots}")
            fmt = self._prefixes[n] = struct.Struct(f"<{n}Q")
        seq = self._seq + 1
        _WORD.pack_into(mm, 0, seq)  # odd: being written
        _HEADER.pack_into(mm, 0, seq, next_avail, in_flight, int(dirty_logging), dirty_pages)
        fmt.pack_into(mm, _HEADER.size, *values)
        self._seq = seq = seq + 1
        _WORD.pack_into(mm, 0, seq)  # even: whole

    def read(self) -> CounterSnapshot | None:
        """The last whole snapshot (None if the writer kept it busy for every try)."""
        mm = self._mm
        for _ in range(_MAX_READ_TRIES):
            seq, avail, in_flight, logging_, pages = _HEADER.unpack_from(mm, 0)
            if seq & 1:
                continue
            values = self._values.unpack_from(mm, _HEADER.size)
            if _WORD.unpack_from(mm, 0)[0] == seq:
                return CounterSnapshot(avail, in_flight, bool(logging_), pages, values)
        return None

    def close(self) -> None:
        self._mm.close()
