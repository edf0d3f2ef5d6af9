"""The vhost-user harnesses' engine: a message script played through :class:`BackendHandler`.

An input is a script of operations, read by :class:`~_common.Reader`:

* ``op % 8 == 7``: run one worker pass on every started queue (what a kick does);
* ``op % 8 == 6``: write bytes into guest RAM (the memfd the frontend shares), so rings,
  descriptor tables and request headers are the input's;
* ``op % 8 == 5``: write bytes into the shared in-flight area memfd;
* otherwise one message: request code, flags, payload (laid out field by field from
  :func:`~_common.number`, or raw bytes) and fds of the kinds the input names (memfd, eventfd,
  pipe ends, a regular file, /dev/null, a socket, a directory, an epoll fd).

Queue workers run on the fuzzer's thread (:class:`SyncWorker`): a started queue is served
synchronously, with the real worker's ``_service`` pass, so a ring the input wrote is popped,
handed to the device (a :class:`BlkDevice` on a small raw file, ``inline`` engine) and
completed within the execution.  What the real worker thread would do with an exception (log it
and stop the queue) is what the fuzzer reports as a crash: it is an exception the design says
must never happen.

The oracle, per message: :meth:`BackendHandler.handle` returns (a refusal is a reply or a
disconnect, never an exception), a reply is a well-formed reply to that request, and after
:meth:`BackendHandler.close` no fd the input passed is left open (none leaked, none kept).
"""

from __future__ import annotations

import gc
import os
import select
import struct
import tempfile

from _common import FD_KINDS, FdZoo, Reader, close_all, number

from blockdev.disk import Disk
from vhost.handler import BackendHandler
from vhost.messages import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    HEADER_SIZE,
    VERSION,
    Message,
    Request,
)
from vhost.runner.thread import QueueWorker
from virtio_blk.device import BlkDevice

#: Guest RAM (one memfd) and where the frontend says it is mapped.
RAM_SIZE = 256 << 10
UADDR = 0x7F0000000000
INFLIGHT_SIZE = 64 << 10
#: Numbers the scripts need often: the RAM's size and frontend address, ring spots in it.
EXTRA = (RAM_SIZE, UADDR, UADDR + 0x1000, UADDR + 0x2000, UADDR + 0x3000, 0x1000, 0x2000,
         0x3000, INFLIGHT_SIZE, 1 << 12, 1 << 30, (1 << 30) | (1 << 32) | (1 << 28) | (1 << 29),
         0x1FFFF, 1 << 8)

#: Payload fields per request, as struct codes (``M``: a memory table, ``C``: a config space).
FIELDS: dict[int, str] = {
    Request.SET_FEATURES: "Q", Request.SET_PROTOCOL_FEATURES: "Q", Request.SET_STATUS: "Q",
    Request.SET_VRING_KICK: "Q", Request.SET_VRING_CALL: "Q", Request.SET_VRING_ERR: "Q",
    Request.SET_VRING_NUM: "II", Request.SET_VRING_BASE: "II", Request.GET_VRING_BASE: "II",
    Request.SET_VRING_ENABLE: "II", Request.SET_VRING_ADDR: "IIQQQQ",
    Request.SET_LOG_BASE: "QQ", Request.GET_INFLIGHT_FD: "QQHHxxxx",
    Request.SET_INFLIGHT_FD: "QQHHxxxx", Request.ADD_MEM_REG: "QQQQQ",
    Request.REM_MEM_REG: "QQQQQ", Request.SET_MEM_TABLE: "M", Request.GET_CONFIG: "C",
    Request.SET_CONFIG: "C",
}
REQUESTS = (*tuple(int(r) for r in Request), 41, 1000)


def build_payload(r: Reader, request: int) -> bytes:
    """A payload in the layout of ``request``, each field chosen by the input."""
    code = FIELDS.get(request, "")
    if code == "M":
        n = r.u8() % 10
        return struct.pack("<II", n, number(r, EXTRA) & 0xFFFFFFFF) + b"".join(
            struct.pack("<QQQQ", *(number(r, EXTRA) for _ in range(4))) for _ in range(n))
    if code == "C":
        offset, size, flags = (number(r, EXTRA) & 0xFFFFFFFF for _ in range(3))
        return struct.pack("<III", offset, size, flags) + r.take(r.u8())
    out = []
    for c in code:
        if c == "x":
            out.append(b"\0")
            continue
        width = struct.calcsize("<" + c)
        out.append((number(r, EXTRA) & ((1 << (8 * width)) - 1)).to_bytes(width, "little"))
    return b"".join(out)


class SyncWorker(QueueWorker):
    """A queue worker that runs on the caller's thread: :meth:`start` does what the thread's
    first pass does (watch the fds, serve the ring), :meth:`kick` another pass, :meth:`stop`
    the drain.  No exception is caught: the real thread's catch-all is the crash we look for."""

    started = False

    def start(self) -> None:
        ep = select.epoll()
        try:
            edge = select.EPOLLIN | select.EPOLLET
            ep.register(self.kick_fd, edge)
            ep.register(self._wake_fd, edge)
            cfd = self.handler.completion_fd
            if cfd is not None:
                ep.register(cfd, edge)
            self.started = True
            self._service(kick=True)
            self.passes += 1
        finally:
            ep.close()

    def kick(self) -> None:
        self._service(kick=True)
        self.passes += 1

    @property
    def alive(self) -> bool:
        return False

    def stop(self, timeout: float | None = None) -> bool:
        vq = self.vq
        for _ in range(100):  # the inline engine finishes everything at once
            if not vq.in_flight_count:
                break
            vq.add_used_many(self.handler.reap())
        if vq.publish_used():
            self.call.signal()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1
        return vq.in_flight_count == 0


class VhostRig:
    """Everything made once per process: the fd zoo, the device, its disk."""

    def __init__(self) -> None:
        self.zoo = FdZoo(RAM_SIZE)
        self.inflight_fd = os.memfd_create("fuzz-inflight", os.MFD_CLOEXEC)
        os.ftruncate(self.inflight_fd, INFLIGHT_SIZE)
        self.zoo.fds["inflight"] = self.inflight_fd
        fd, self.image = tempfile.mkstemp(prefix="fuzz-vhost-", suffix=".img",
                                          dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.ftruncate(fd, 1 << 20)
        os.close(fd)
        self.disk = Disk(self.image)
        self.device = BlkDevice(self.disk, engine="inline", serial="fuzz", queue_processes=False,
                                bounce_pages=64)
        self._zero_ram = bytes(RAM_SIZE)
        self._zero_inflight = bytes(INFLIGHT_SIZE)

    def reset(self) -> None:
        """Every shared file back to zero, every notification drained: inputs stay independent."""
        os.pwrite(self.zoo.memfd, self._zero_ram, 0)
        os.pwrite(self.inflight_fd, self._zero_inflight, 0)
        os.pwrite(self.zoo.fds["memfd_small"], bytes(4096), 0)
        os.pwrite(self.zoo.fds["file"], bytes(8192), 0)
        # (A call/err fd whose reader never reads fills up and then blocks the worker's write --
        # found by this harness as a -timeout after ~50k inputs of history; each input now
        # starts with empty buffers so that one input, not the process's past, decides.)
        for fd in (self.zoo.fds["eventfd"], self.zoo.fds["pipe_r"], self.zoo.peer.fileno()):
            os.set_blocking(fd, False)
            try:
                while os.read(fd, 65536):
                    pass
            except BlockingIOError:
                pass

    def fd(self, r: Reader) -> int:
        kinds = (*FD_KINDS, "inflight")
        return self.zoo.dup(kinds[r.u8() % len(kinds)])

    def new_handler(self) -> BackendHandler:
        return BackendHandler(self.device, worker_factory=SyncWorker)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def check_no_leak(before: int) -> None:
    """As many fds open as ``before``.  A mapping (mmap keeps a dup of its fd) still held by a
    reference cycle -- an exception's traceback, say -- is closed by the next collection: not
    a leak, so collect once before calling it one."""
    if open_fds() != before:
        gc.collect()
        after = open_fds()
        assert after == before, f"{after - before} fds leaked"


def check_reply(request: int, data: bytes | None) -> None:
    """A reply is one header (a reply to ``request``) and the payload it announces."""
    if data is None:
        return
    assert len(data) >= HEADER_SIZE, f"short reply {data!r}"
    code, flags, size = HEADER.unpack_from(data)
    assert code == request, f"reply to {code} for request {request}"
    assert flags & FLAG_REPLY and flags & 3 == VERSION, f"reply flags {flags:#x}"
    assert size == len(data) - HEADER_SIZE, f"reply announces {size} bytes, has {len(data)}"


def play(rig: VhostRig, handler: BackendHandler, r: Reader, max_ops: int = 64) -> None:
    """Play the script in ``r`` (see the module docstring) through ``handler``."""
    for _ in range(max_ops):
        if not r.left:
            return
        op = r.u8()
        kind = op % 8
        if kind == 7:
            for vring in handler.vrings:
                worker = vring.worker
                if isinstance(worker, SyncWorker):
                    worker.kick()
            continue
        if kind in (5, 6):
            fd = rig.inflight_fd if kind == 5 else rig.zoo.memfd
            size = INFLIGHT_SIZE if kind == 5 else RAM_SIZE
            offset = r.u32() % size
            os.pwrite(fd, r.take(r.u8())[: size - offset], offset)
            continue
        sel = r.u8()
        request = REQUESTS[sel % len(REQUESTS)] if sel < 0xF0 else r.u32()
        fl = r.u8()
        flags = VERSION | (FLAG_NEED_REPLY if fl & 1 else 0)
        if fl & 0x80:
            flags = r.u32()
        payload = r.take(r.u16() % 400) if fl & 0x40 else build_payload(r, request)
        nfds = r.u8() % 10
        fds = [rig.fd(r) for _ in range(nfds)] if nfds < 9 else []
        try:
            result = handler.handle(Message(request, flags, payload), fds)
        finally:
            close_all(fds)
        check_reply(request, result.reply)
        close_all(result.reply_fds)
        if result.disconnect:
            return


def run_one(rig: VhostRig, data: bytes, prefix: bytes = b"") -> None:
    """One execution: a fresh handler plays ``prefix`` then ``data``; nothing may leak."""
    rig.reset()
    before = open_fds()
    handler = rig.new_handler()
    try:
        if prefix:
            play(rig, handler, Reader(prefix), max_ops=1000)
        play(rig, handler, Reader(data))
    finally:
        handler.close()
    check_no_leak(before)


# ---------------------------------------------------------------------------- whole sessions

#: Where the structured session puts the rings (guest physical = frontend address - UADDR).
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000
FEATURES = (1 << 32) | (1 << 30) | (1 << 28) | (1 << 29)  # VERSION_1, PROTOCOL, INDIRECT, EVENT
PROTOCOL = (1 << 3) | (1 << 12) | (1 << 9) | (1 << 15)  # REPLY_ACK, INFLIGHT_SHMFD, CONFIG, SLOTS
SIZES = (16, 8, 4, 1, 2, 32, 64, 256)


def send(handler: BackendHandler, request: int, payload: bytes = b"",
         fds: list[int] | None = None) -> None:
    """One well-formed message (the harness's own, not the input's): it must not fail."""
    fds = fds or []
    try:
        result = handler.handle(Message(request, VERSION | FLAG_NEED_REPLY, payload), fds)
    finally:
        close_all(fds)
    check_reply(request, result.reply)
    close_all(result.reply_fds)


def start_session(rig: VhostRig, handler: BackendHandler, r: Reader) -> int:
    """Negotiate, share the RAM, set up queue 0 as the input says (size, base, in-flight area,
    notifier fds of the input's kinds) and enable it; the queue size."""
    send(handler, Request.GET_FEATURES)
    extra = r.u8()
    features = FEATURES & ~(((extra & 1) << 28) | ((extra & 2) << 28))
    send(handler, Request.SET_FEATURES, struct.pack("<Q", features))
    send(handler, Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", PROTOCOL))
    send(handler, Request.SET_MEM_TABLE, struct.pack("<IIQQQQ", 1, 0, 0, RAM_SIZE, UADDR, 0),
         [rig.zoo.dup("memfd")])
    size = SIZES[r.u8() % len(SIZES)]
    # The hostile in-flight area: contents, then SET_INFLIGHT_FD with the input's fields.
    for _ in range(r.u8() % 4):
        offset = r.u16() % INFLIGHT_SIZE
        os.pwrite(rig.inflight_fd, r.take(r.u16() % 2048), offset)
    mmap_size = number(r, (0, INFLIGHT_SIZE, 4096, 1 << 63))
    mmap_offset = number(r, (0, 4096))
    num_queues = number(r, (1,)) & 0xFFFF
    queue_size = number(r, (size,)) & 0xFFFF
    send(handler, Request.SET_INFLIGHT_FD,
         struct.pack("<QQHH4x", mmap_size, mmap_offset, num_queues, queue_size), [rig.fd(r)])
    # Ring contents (descriptor table, avail ring, used ring, headers and data after them).
    for _ in range(r.u8() % 6):
        offset = r.u32() % RAM_SIZE
        os.pwrite(rig.zoo.memfd, r.take(r.u8())[: RAM_SIZE - offset], offset)
    send(handler, Request.SET_VRING_NUM, struct.pack("<II", 0, size))
    send(handler, Request.SET_VRING_ADDR, struct.pack(
        "<IIQQQQ", 0, 0, UADDR + DESC_GPA, UADDR + USED_GPA, UADDR + AVAIL_GPA, 0))
    send(handler, Request.SET_VRING_BASE, struct.pack("<II", 0, number(r, (0,)) & 0xFFFFFFFF))
    send(handler, Request.SET_VRING_CALL, struct.pack("<Q", 0), [rig.fd(r)])
    send(handler, Request.SET_VRING_ERR, struct.pack("<Q", 0), [rig.fd(r)])
    send(handler, Request.SET_VRING_KICK, struct.pack("<Q", 0), [rig.fd(r)])
    send(handler, Request.SET_VRING_ENABLE, struct.pack("<II", 0, 1))
    return size


def restart(rig: VhostRig, handler: BackendHandler, kick_fd: int) -> None:
    """Stop queue 0 (GET_VRING_BASE) and start it again with ``kick_fd``: the second start
    recovers from whatever the first left in the in-flight area."""
    send(handler, Request.GET_VRING_BASE, struct.pack("<II", 0, 0))
    send(handler, Request.SET_VRING_KICK, struct.pack("<Q", 0), [kick_fd])
    send(handler, Request.SET_VRING_ENABLE, struct.pack("<II", 0, 1))
