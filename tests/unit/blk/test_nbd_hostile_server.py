"""NbdEngine against a small NBD server written here, which does the fixed-newstyle handshake
libnbd needs and then misbehaves in the transmission phase (the part the engine speaks itself):
a protocol error drops the connection, the requests in flight are reissued on a new one, an
error reply fails its request only, and no exception escapes the engine."""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockdev.engine import IoOp
from blockdev.nbd import wire
from blockdev.nbd.storage import NbdEngine, NbdStorage
from blockdev.ops import OpKind
from blockdev.storage import StorageError
from guestmem import IoBuffer
from tests.unit.blk.test_nbd_engine import BS, Memory, run

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
OPT_ABORT, OPT_GO = 2, 7
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, 0x80000001
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
# HAS_FLAGS | SEND_FLUSH | SEND_FUA
TRANSMISSION_FLAGS = 0x1 | 0x4 | 0x8
SIZE = 1 << 20


def _exactly(conn: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = conn.recv(n - len(got))
        if not chunk:
            raise EOFError
        got += chunk
    return got


class FakeNbdServer:
    """A one-export NBD server on a Unix socket.  ``modes`` says how each connection, in turn,
    answers the ``kind`` command numbered ``trigger`` on it (later connections behave):
    ``ok``, ``bad_magic``, ``structured`` (the never-negotiated structured-reply magic),
    ``unknown_cookie``, ``twice`` (the same reply twice), ``close_mid_reply`` (half a reply,
    then close), ``eof_mid_reply`` (half a reply, then shut down its side cleanly), ``error``
    (NBD error ENOSPC: not a protocol error)."""

    def __init__(self, path: Path, modes: list[str], kind: int = wire.CMD_READ,
                 trigger: int = 1) -> None:
        self.path = str(path)
        self.modes = modes
        self.kind = kind
        self.trigger = trigger
        self.disk = bytearray(SIZE)
        self.connections = 0
        self.commands: list[int] = []  # the kinds of command received, on every connection
        self.errors: list[BaseException] = []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"

    def close(self) -> None:
        if self.listener.fileno() >= 0:
            self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
        for t in self.threads:
            t.join(5)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            mode = self.modes[self.connections] if self.connections < len(self.modes) else "ok"
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn, mode), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, mode: str) -> None:
        try:
            with conn:
                if self._handshake(conn):
                    self._transmission(conn, mode)
        except (EOFError, ConnectionError):
            pass
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def _handshake(self, conn: socket.socket) -> bool:
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                 FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", _exactly(conn, 4))
        assert client_flags & FLAG_FIXED_NEWSTYLE
        while True:
            magic, option, length = struct.unpack(">QII", _exactly(conn, 16))
            assert magic == IHAVEOPT
            _exactly(conn, length)
            if option == OPT_ABORT:
                return False
            if option != OPT_GO:
                conn.sendall(struct.pack(">QIII", REPLY_MAGIC, option, REP_ERR_UNSUP, 0))
                continue
            info = struct.pack(">HQH", 0, SIZE, TRANSMISSION_FLAGS)  # NBD_INFO_EXPORT
            conn.sendall(struct.pack(">QIII", REPLY_MAGIC, option, REP_INFO, len(info)) + info
                         + struct.pack(">QIII", REPLY_MAGIC, option, REP_ACK, 0))
            return True

    def _transmission(self, conn: socket.socket, mode: str) -> None:
        seen = 0
        while True:
            magic, _flags, kind, cookie, offset, length = wire.REQUEST.unpack(
                _exactly(conn, wire.REQUEST.size))
            assert magic == wire.REQUEST_MAGIC
            self.commands.append(kind)
            if kind == wire.CMD_DISC:
                return
            payload = _exactly(conn, length) if kind == wire.CMD_WRITE else b""
            data = bytes(self.disk[offset:offset + length]) if kind == wire.CMD_READ else b""
            if kind == self.kind:
                seen += 1
            act = mode if kind == self.kind and seen == self.trigger else "ok"
            if act == "error":
                conn.sendall(wire.REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 28, cookie))
                continue
            if kind == wire.CMD_WRITE:
                self.disk[offset:offset + length] = payload
            good = wire.REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 0, cookie) + data
            if act == "ok":
                conn.sendall(good)
            elif act == "twice":
                conn.sendall(good + good)
            elif act == "bad_magic":
                conn.sendall(wire.REPLY.pack(0x12345678, 0, cookie) + data)
            elif act == "structured":
                conn.sendall(wire.REPLY.pack(wire.STRUCTURED_REPLY_MAGIC, 0, cookie) + data)
            elif act == "unknown_cookie":
                conn.sendall(wire.REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 0, cookie ^ 0xDEAD)
                             + data)
            elif act == "close_mid_reply":  # (a Unix socket closed unread: ECONNRESET)
                conn.sendall(good[:len(good) // 2 + 3])
                return
            elif act == "eof_mid_reply":  # a clean end of the stream, then read to the end
                conn.sendall(good[:len(good) // 2 + 3])
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(1 << 16):
                    pass
                return
            else:
                raise AssertionError(mode)


Serve = Callable[..., "FakeNbdServer"]


@pytest.fixture
def memory() -> Memory:
    return Memory(64)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    servers: list[FakeNbdServer] = []

    def make(modes: list[str], kind: int = wire.CMD_READ, trigger: int = 1) -> FakeNbdServer:
        s = FakeNbdServer(tmp_path / f"nbd{len(servers)}.sock", modes, kind, trigger)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()
        assert not s.errors, s.errors


PROTOCOL_ERRORS = ["bad_magic", "structured", "unknown_cookie", "twice", "close_mid_reply",
                   "eof_mid_reply"]


@pytest.mark.parametrize("kind", [wire.CMD_READ, wire.CMD_WRITE], ids=["read", "write"])
@pytest.mark.parametrize("mode", PROTOCOL_ERRORS)
def test_a_protocol_error_reissues_the_requests_on_a_new_connection(
        serve: Serve, memory: Memory, mode: str, kind: int) -> None:
    # connection 0 is NbdStorage's handshake, handed to queue 0: it misbehaves on its third
    # ``kind`` command, connection 1 behaves
    server = serve([mode], kind, trigger=3)
    st = NbdStorage(server.uri, reconnect_delay=10.0)
    engine = st.open_engine(0)
    assert isinstance(engine, NbdEngine)
    try:
        for i in range(16):
            memory.view[i * BS:(i + 1) * BS] = bytes([i + 1]) * BS
        writes = [IoOp(OpKind.WRITE, i * BS, [memory.buffer(i)], BS) for i in range(16)]
        run(engine, writes)
        assert [op.result for op in writes] == [BS] * 16
        reads = [IoOp(OpKind.READ, i * BS, [memory.buffer(16 + i)], BS) for i in range(16)]
        run(engine, reads)
        assert [op.result for op in reads] == [BS] * 16
        for i in range(16):
            assert bytes(memory.view[(16 + i) * BS:(17 + i) * BS]) == bytes([i + 1]) * BS, i
        assert bytes(server.disk[:16 * BS]) == bytes(memory.view[:16 * BS])
        assert engine.reconnects == 1
        assert server.connections == 2
    finally:
        engine.close()
        st.close()


def test_an_error_reply_fails_that_request_only(serve: Serve, memory: Memory) -> None:
    server = serve(["error"], wire.CMD_WRITE, trigger=2)
    st = NbdStorage(server.uri)
    engine = st.open_engine(0)
    assert isinstance(engine, NbdEngine)
    try:
        writes = [IoOp(OpKind.WRITE, i * BS, [memory.buffer(i)], BS) for i in range(4)]
        run(engine, writes)
        failed = [op for op in writes if op.result != BS]
        assert len(failed) == 1
        assert isinstance(failed[0].result, OSError) and failed[0].result.errno == errno.ENOSPC
        read = IoOp(OpKind.READ, 0, [memory.buffer(8)], BS)
        run(engine, [read])  # the same connection goes on
        assert read.result == BS
        assert engine.reconnects == 0
        assert server.connections == 1
    finally:
        engine.close()
        st.close()


def test_a_server_that_keeps_breaking_fails_the_requests_after_the_delay(
        serve: Serve, memory: Memory) -> None:
    server = serve(["bad_magic"] * 1000, wire.CMD_READ, trigger=1)
    st = NbdStorage(server.uri, reconnect_delay=0.5)
    engine = st.open_engine(0)
    assert isinstance(engine, NbdEngine)
    try:
        reads = [IoOp(OpKind.READ, i * BS, [memory.buffer(i)], BS) for i in range(4)]
        run(engine, reads, timeout=10.0)
        assert all(isinstance(op.result, OSError) and op.result.errno == errno.EIO
                   for op in reads)
        assert server.connections >= 2
    finally:
        engine.close()
        st.close()


def test_a_large_read_goes_through_whole(serve: Serve, memory: Memory) -> None:
    """A 1 MiB read (received straight into its destination) and reads split at odd sizes."""
    server = serve([])
    server.disk[:] = bytes(range(256)) * (SIZE // 256)
    st = NbdStorage(server.uri)
    engine = st.open_engine(0)
    assert isinstance(engine, NbdEngine)
    big = Memory(SIZE // BS)
    small = Memory(4)
    try:
        op = IoOp(OpKind.READ, 0, [IoBuffer(big.view, big.base)], SIZE)
        run(engine, [op])
        assert op.result == SIZE
        assert bytes(big.view) == bytes(server.disk)
        odd = [IoOp(OpKind.READ, 1000 + 7 * i, [IoBuffer(small.view[i * BS:i * BS + 3000],
                                                         small.base + i * BS)], 3000)
               for i in range(4)]
        run(engine, odd)
        assert [o.result for o in odd] == [3000] * 4
        for i in range(4):
            assert bytes(small.view[i * BS:i * BS + 3000]) == \
                bytes(server.disk[1000 + 7 * i:4000 + 7 * i])
    finally:
        engine.close()
        st.close()


def test_a_tls_uri_is_refused_before_connecting(tmp_path: Path) -> None:
    """The wire is spoken on the plain socket: a TLS session would live inside libnbd, so
    nbds:// is refused (the spec layer refuses it first; this is any other caller)."""
    with pytest.raises(StorageError, match="not permitted"):
        NbdStorage(f"nbds+unix:///?socket={tmp_path}/none.sock")


def test_writes_larger_than_the_socket_takes_and_more_buffers_than_iov_max(
        serve: Serve) -> None:
    """A 1 MiB write does not fit in the socket's buffer (the rest goes out on EPOLLOUT), and a
    write of 1100 separate 512-byte buffers is 2200 pieces to send (sendmsg takes at most
    IOV_MAX): both arrive whole and in place."""
    server = serve([])
    st = NbdStorage(server.uri)
    engine = st.open_engine(0)
    assert isinstance(engine, NbdEngine)
    big = Memory(SIZE // BS)
    big.view[:] = bytes(range(251)) * (SIZE // 251) + bytes(SIZE % 251)
    many = Memory(1100 * 512 // BS + 1)
    many.view[:] = bytes(range(7, 256)) * (len(many.view) // 249) + \
        bytes(len(many.view) % 249)
    try:
        op = IoOp(OpKind.WRITE, 0, [IoBuffer(big.view, big.base)], SIZE)
        run(engine, [op])
        assert op.result == SIZE
        assert bytes(server.disk) == bytes(big.view)
        pieces = [IoBuffer(many.view[i * 512:(i + 1) * 512], many.base + i * 512)
                  for i in range(1100)]
        op = IoOp(OpKind.WRITE, 4096, pieces, 1100 * 512)
        run(engine, [op])
        assert op.result == 1100 * 512
        assert bytes(server.disk[4096:4096 + 1100 * 512]) == bytes(many.view[:1100 * 512])
        assert engine.reconnects == 0
    finally:
        engine.close()
        st.close()


def test_close_flushes_then_says_goodbye(serve: Serve, memory: Memory) -> None:
    """libnbd's nbd_close sends nothing: the engine's close sends NBD_CMD_FLUSH, waits for it,
    then NBD_CMD_DISC."""
    server = serve([])
    st = NbdStorage(server.uri)
    engine = st.open_engine(0)
    try:
        writes = [IoOp(OpKind.WRITE, i * BS, [memory.buffer(i)], BS) for i in range(3)]
        run(engine, writes)
    finally:
        engine.close()
        st.close()
    server.close()  # (joins the connection's thread)
    assert server.commands == [wire.CMD_WRITE] * 3 + [wire.CMD_FLUSH, wire.CMD_DISC]
