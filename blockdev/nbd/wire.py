"""NBD's transmission phase without IO: packing requests, parsing a stream of simple replies.

Why our own and not libnbd's: libnbd costs several ctypes calls and several syscalls per
command (a send per command, a recv per reply header and another per read's data, a peek and a
retire per completion); a queue's batch here is packed into one ``sendmsg`` and whatever replies
arrived are taken with one ``recv_into`` and parsed in Python, at about a third of the CPU per
command.  libnbd still does the handshake (URI parsing, option negotiation, block sizes), asked
not to negotiate structured replies, so the server sends simple replies only (NBD spec,
doc/proto.md, "Simple reply message").

Sans-IO: :class:`ReplyParser` is fed whatever bytes arrived, split anywhere, and hands back the
commands they completed; the engine (:mod:`.storage`) owns the socket.  The server is hostile:
anything but a simple reply to a command in flight whose bytes are all sent is a
:class:`ProtocolError`, after which the connection is unusable (the engine drops it and
reissues the commands in flight on a new one).
"""

from __future__ import annotations

import errno
import struct

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
#: Never negotiated here, so as much a protocol error as any other magic.
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6

CMD_FLAG_FUA = 0x01
CMD_FLAG_NO_HOLE = 0x02

#: magic, command flags, type, cookie, offset, length (then a write's payload).
REQUEST = struct.Struct(">IHHQQI")
#: magic, error, cookie (then a successful read's data).
REPLY = struct.Struct(">IIQ")

#: The error values the NBD spec defines, as this host's errno values (the spec's numbers are
#: Linux's, but the mapping keeps them meaning the same on any host); anything else is EIO.
NBD_ERRORS = {
    1: errno.EPERM,
    5: errno.EIO,
    12: errno.ENOMEM,
    22: errno.EINVAL,
    28: errno.ENOSPC,
    75: errno.EOVERFLOW,
    95: errno.ENOTSUP,
    108: errno.ESHUTDOWN,
}

_HEAD = REPLY.size
_pack_request = REQUEST.pack
_unpack_reply = REPLY.unpack_from


def request(kind: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
    """One request header.  The caller has checked offset and length against the export
    (struct raises ``struct.error`` for a value outside its field, it never wraps)."""
    return _pack_request(REQUEST_MAGIC, flags, kind, cookie, offset, length)


def errno_of(nbd_error: int) -> int:
    """The errno a reply's error value stands for."""
    return NBD_ERRORS.get(nbd_error, errno.EIO)


class ProtocolError(Exception):
    """The server broke the protocol: the connection cannot be trusted any further."""


class ReplyParser:
    """Turns the bytes of a connection's replies into ``(cookie, errno)`` completions (errno 0:
    success).

    Every command sent is announced with :meth:`expect` first: its cookie, for a read the view
    its data goes to (written as it arrives, never anywhere else), and the stream position at
    which its request ends -- a reply to a command whose bytes are not all sent yet (the
    engine tells :attr:`sent`) is a protocol error, so a write's payload (guest memory) is never
    still being sent after its request completed.
    """

    __slots__ = ("_data_cookie", "_dest", "_expected", "_got", "_head", "_head_have", "_left",
                 "sent")

    def __init__(self) -> None:
        #: cookie -> (read destination or None, data length, end of its request in the stream)
        self._expected: dict[int, tuple[memoryview | None, int, int]] = {}
        self._head = bytearray(_HEAD)
        self._head_have = 0
        self._dest: memoryview | None = None  # where the current read's data goes (or None)
        self._got = 0  # bytes of the current read's data already placed
        self._left = 0  # bytes of the current read's data still to come
        self._data_cookie = 0
        #: Bytes of requests the engine has handed to the socket so far.
        self.sent = 0

    def expect(self, cookie: int, dest: memoryview | None, length: int, end: int) -> None:
        """Announce a command: ``dest`` (``length`` bytes) takes a read's data; ``end`` is the
        stream position just past its request (and payload)."""
        self._expected[cookie] = (dest, length, end)

    @property
    def in_flight(self) -> int:
        """Commands announced and not answered (the one whose data is arriving included)."""
        return len(self._expected) + (1 if self._left else 0)

    @property
    def mid_reply(self) -> bool:
        """Part of a reply has arrived, not all of it."""
        return bool(self._head_have or self._left)

    def forget_destinations(self) -> None:
        """From now on read data is discarded, not written: the commands' requests were failed
        (the queue is closing) and their buffers are no longer ours to write."""
        self._expected = {c: (None, n, e) for c, (_d, n, e) in self._expected.items()}
        self._dest = None

    def direct_target(self, at_least: int) -> memoryview | None:
        """If a read's data is arriving and at least ``at_least`` bytes of it are still to
        come: the part of its destination they go to, for the engine to ``recv_into`` directly
        (then :meth:`advance`).  Skips a copy for large reads."""
        if self._left >= at_least and self._dest is not None:
            return self._dest[self._got:]
        return None

    def advance(self, n: int) -> list[tuple[int, int]]:
        """``n`` bytes were received straight into :meth:`direct_target`'s view."""
        if not 0 < n <= self._left:
            raise ValueError(f"advance({n}) with {self._left} bytes of data due")
        self._got += n
        self._left -= n
        if self._left:
            return []
        self._dest = None
        return [(self._data_cookie, 0)]

    def feed(self, data: memoryview) -> list[tuple[int, int]]:
        """Parse the bytes ``data`` holds; the commands they completed, in order.  Raises
        :class:`ProtocolError` for anything but a simple reply to an expected command (the
        completions before it in ``data`` are then lost with the connection: their commands
        are reissued like every other one in flight)."""
        done: list[tuple[int, int]] = []
        pos = 0
        size = len(data)
        expected = self._expected
        while pos < size:
            left = self._left
            if left:  # a read's data
                take = min(left, size - pos)
                dest = self._dest
                if dest is not None:
                    got = self._got
                    dest[got:got + take] = data[pos:pos + take]
                self._got += take
                pos += take
                self._left = left - take
                if take == left:
                    self._dest = None
                    done.append((self._data_cookie, 0))
                continue
            have = self._head_have
            if have == 0 and size - pos >= _HEAD:  # the common case: a whole header here
                magic, error, cookie = _unpack_reply(data, pos)
                pos += _HEAD
            else:
                take = min(_HEAD - have, size - pos)
                self._head[have:have + take] = data[pos:pos + take]
                pos += take
                have += take
                if have < _HEAD:
                    self._head_have = have
                    break
                self._head_have = 0
                magic, error, cookie = _unpack_reply(self._head, 0)
            if magic != SIMPLE_REPLY_MAGIC:
                what = "structured reply (never negotiated)" \
                    if magic == STRUCTURED_REPLY_MAGIC else f"reply magic {magic:#x}"
                raise ProtocolError(what)
            entry = expected.pop(cookie, None)
            if entry is None:
                raise ProtocolError(f"reply to cookie {cookie}, which is not in flight")
            dest, length, end = entry
            if end > self.sent:
                raise ProtocolError(f"reply to cookie {cookie} before its request was sent")
            if error:
                done.append((cookie, errno_of(error)))  # no data follows an error
            elif length:
                self._dest, self._got, self._left = dest, 0, length
                self._data_cookie = cookie
            else:
                done.append((cookie, 0))
        return done
