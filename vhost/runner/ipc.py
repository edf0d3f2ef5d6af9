"""The wire between the control process and a queue process, declared in one place.

Two channels, both set up by :mod:`vhost.runner.pool` and used by :mod:`vhost.runner.process`:

* a ``SOCK_SEQPACKET`` socket carrying one pickled message per datagram (fds by SCM_RIGHTS).
  The control process numbers every request (``seq``); the queue process answers each with
  exactly one reply carrying the same number.  A reply is matched to its request by that
  number only -- never by arrival order: a reply that comes after its request timed out
  would otherwise be taken as the answer to the next request (a ``log_base`` counted as
  applied while the process still marked the old log).  :class:`Replies` does the matching.
* a :class:`CounterBlock`: a small shared-memory block the queue process rewrites after each
  batch of completions (see :mod:`vhost.runner.process`) and the control process reads when its
  counters are scraped -- no message, no wake-up of the queue process, no lock the vhost-user
  control thread needs.  An idle queue writes nothing.

Requests (control -> queue process; replies are ``ack`` or ``error`` unless said):
``start`` (answered ``started``/``error``, before any numbering: the first message),
``mem_table``, ``add_region``, ``remove_region``, ``notifier``, ``state``, ``log_base``,
``log_fd``, ``features``, ``log_addr``, ``stop`` (answered ``stopped``).
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Largest control message (a pickled memory table of 509 regions fits easily).
MAX_MESSAGE = 1 << 20
MAX_FDS = 600

#: Every request kind a queue process answers, in one place (both sides check against it).
REQUESTS = frozenset({
    "mem_table", "add_region", "remove_region", "notifier", "state", "log_base", "log_fd",
    "features", "log_addr", "stop", "ring_state",
})


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


def request(seq: int, kind: str, **body: Any) -> dict[str, Any]:
    """A numbered request (``kind`` must be one of :data:`REQUESTS`)."""
    if kind not in REQUESTS:
        raise ValueError(f"unknown queue process request {kind!r}")
    return {"seq": seq, "kind": kind, **body}


def reply(to: dict[str, Any], kind: str, **body: Any) -> dict[str, Any]:
    """The reply to request ``to``: it carries the request's number."""
    return {"seq": to.get("seq"), "kind": kind, **body}


class _Slot:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: dict[str, Any] | None = None


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
        self._final: dict[str, Any] | None = None

    def expect(self) -> int:
        with self._lock:
            self._next += 1
            self._slots[self._next] = _Slot()
            return self._next

    def wait(self, seq: int, timeout: float | None) -> dict[str, Any] | None:
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

    def deliver(self, msg: dict[str, Any],
                taken: Callable[[dict[str, Any]], None] | None = None) -> bool:
        """Hand ``msg`` to whoever waits for its number, calling ``taken(msg)`` first (before
        the waiter can run on); False (logged) if nobody waits."""
        seq = msg.get("seq")
        with self._lock:
            slot = self._slots.get(seq) if isinstance(seq, int) else None
            if slot is not None and slot.reply is None:
                if taken is not None:
                    taken(msg)
                slot.reply = msg
                slot.event.set()
                return True
        log.warning("%s: dropped a reply nobody waits for (request %s, %s): late, after its "
                    "request timed out, or unasked", self.name, seq, msg.get("kind"))
        return False

    def close(self, final: dict[str, Any]) -> None:
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
