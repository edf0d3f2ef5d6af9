"""A vhost-user frontend connected to a backend's socket: QEMU's side of the protocol.

It negotiates like QEMU 7.2, sends the memory table and each ring's setup, and can send any
message raw -- any header, size or fds -- because the tests need to be a hostile peer.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterable, Sequence

from vhost import messages as m
from vhost.connection import recv_exact, send_message
from vhost.messages import ProtocolFeature, Request, VirtioFeature
from vhost.queue.packed import FRESH_BASE
from vhost_frontend.errors import FrontendError
from vhost_frontend.memory import FrontendMemory, FrontendRegion
from vhost_frontend.packed import PackedDriverQueue
from vhost_frontend.ring import DriverQueue

#: A queue the frontend drives, of either layout.
AnyQueue = DriverQueue | PackedDriverQueue
PACKED = int(VirtioFeature.RING_PACKED)


class Frontend:
    """A vhost-user frontend connected to a backend's socket."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self.features = 0
        self.protocol = ProtocolFeature(0)
        self.queues: dict[int, AnyQueue] = {}
        self.memory: FrontendMemory | None = None

    # -- raw messages
    def send(self, request: int, payload: bytes = b"", fds: Iterable[int] = (),
             flags: int = m.VERSION, size: int | None = None) -> None:
        """Send one message exactly as described (``size`` overrides the header's size)."""
        header = m.HEADER.pack(int(request), flags, len(payload) if size is None else size)
        send_message(self.sock, header + payload, list(fds))

    def recv(self) -> tuple[int, int, bytes]:
        """One reply: (request, flags, payload)."""
        request, flags, size = m.HEADER.unpack(recv_exact(self.sock, m.HEADER_SIZE))
        payload = recv_exact(self.sock, size) if size else b""
        if not flags & m.FLAG_REPLY:
            raise FrontendError(f"reply to {request} without the reply flag")
        return request, flags, payload

    def request(self, request: Request, payload: bytes = b"", fds: Iterable[int] = ()) -> bytes:
        """A request with a reply of its own; the reply's payload."""
        self.send(request, payload, fds)
        code, _, reply = self.recv()
        if code != request:
            raise FrontendError(f"reply to {Request(code).name} while waiting for {request.name}")
        return reply

    def command(self, request: Request, payload: bytes = b"", fds: Iterable[int] = (),
                ack: bool | None = None) -> int | None:
        """A request without a reply of its own; with REPLY_ACK, the ack status (0 = ok)."""
        if ack is None:
            ack = bool(self.protocol & ProtocolFeature.REPLY_ACK)
        flags = m.VERSION | (m.FLAG_NEED_REPLY if ack else 0)
        self.send(request, payload, fds, flags)
        if not ack:
            return None
        code, _, reply = self.recv()
        if code != request or len(reply) != 8:
            raise FrontendError(f"bad ack for {request.name}: {Request(code).name} {reply!r}")
        return struct.unpack("<Q", reply)[0]

    def checked(self, request: Request, payload: bytes = b"", fds: Iterable[int] = ()) -> None:
        status = self.command(request, payload, fds)
        if status:
            raise FrontendError(f"{request.name} failed with status {status}")

    def get_u64(self, request: Request) -> int:
        return struct.unpack("<Q", self.request(request))[0]

    # -- negotiation, as QEMU 7.2 does it
    def negotiate(self, features: int | None = None,
                  protocol: ProtocolFeature | None = None, packed: bool = False) -> None:
        """GET/SET features and protocol features, SET_OWNER; None takes all that is offered.

        VIRTIO_F_RING_PACKED is acked only with ``packed`` (QEMU's ``packed=on``): queues are
        then packed rings (:meth:`setup_packed_queue`); FrontendError if it is not offered.
        """
        offered = self.get_u64(Request.GET_FEATURES)
        if offered & VirtioFeature.PROTOCOL_FEATURES:
            offered_proto = ProtocolFeature(self.get_u64(Request.GET_PROTOCOL_FEATURES))
            want = offered_proto if protocol is None else protocol
            self.command(Request.SET_PROTOCOL_FEATURES, m.u64(int(want)), ack=False)
            self.protocol = want
        self.checked(Request.SET_OWNER)
        self.features = (offered if features is None else features) & ~PACKED
        if packed:
            if not offered & PACKED:
                raise FrontendError("the backend does not offer VIRTIO_F_RING_PACKED")
            self.features |= PACKED
        self.checked(Request.SET_FEATURES, m.u64(self.features))

    def set_mem_table(self, mem: FrontendMemory) -> None:
        self.memory = mem
        regions = [r.description() for r in mem.regions]
        payload = m.MemoryTable.build({"num_regions": len(regions), "padding": 0,
                                       "regions": regions})
        self.checked(Request.SET_MEM_TABLE, payload, [r.fd for r in mem.regions])

    def add_mem_reg(self, region: FrontendRegion) -> int | None:
        payload = m.SingleMemoryRegion.build({"padding": 0, "region": region.description()})
        return self.command(Request.ADD_MEM_REG, payload, [region.fd])

    def rem_mem_reg(self, region: FrontendRegion) -> int | None:
        payload = m.SingleMemoryRegion.build({"padding": 0, "region": region.description()})
        return self.command(Request.REM_MEM_REG, payload)

    def setup_queue(self, index: int, size: int = 128, base: int = 0,
                    region: int | None = None, enable: bool = True) -> DriverQueue:
        """SET_VRING_NUM/BASE/ADDR/KICK/CALL/ERR (and ENABLE) for a fresh ring."""
        assert self.memory is not None, "set_mem_table first"
        if self.features & PACKED:
            raise FrontendError("packed rings were negotiated: setup_packed_queue")
        q = DriverQueue(self.memory, index, size,
                        bool(self.features & VirtioFeature.RING_EVENT_IDX), region)
        q.start_at(base)
        self.restart_queue(q, base, enable)
        return q

    def setup_packed_queue(self, index: int, size: int = 128, base: int = FRESH_BASE,
                           region: int | None = None, enable: bool = True) -> PackedDriverQueue:
        """:meth:`setup_queue` for a packed ring (``negotiate(packed=True)`` first); ``base``
        in SET_VRING_BASE's packed encoding (default: a fresh ring, both wrap counters 1)."""
        assert self.memory is not None, "set_mem_table first"
        if not self.features & PACKED:
            raise FrontendError("packed rings were not negotiated")
        q = PackedDriverQueue(self.memory, index, size,
                              bool(self.features & VirtioFeature.RING_EVENT_IDX), region)
        q.start_at(base)
        self.restart_queue(q, base, enable)
        return q

    def restart_queue(self, q: AnyQueue, base: int, enable: bool = True) -> None:
        """SET_VRING_NUM/BASE/ADDR/CALL/ERR/KICK (and ENABLE) for ring ``q``, from avail ``base``.

        Used for a fresh ring, and for handing an existing one to a backend that came back
        (what QEMU does: the rings stay in guest memory with their contents; only the
        backend's state is set up again).
        """
        assert self.memory is not None, "set_mem_table first"
        self.queues[q.index] = q
        self.checked(Request.SET_VRING_NUM, m.vring_state(q.index, q.size))
        self.checked(Request.SET_VRING_BASE, m.vring_state(q.index, base))
        self.set_vring_addr(q.index, self.memory.uaddr(q.desc), self.memory.uaddr(q.avail),
                            self.memory.uaddr(q.used))
        self.checked(Request.SET_VRING_CALL, m.u64(q.index), [q.call_fd])
        self.checked(Request.SET_VRING_ERR, m.u64(q.index), [q.err_fd])
        self.checked(Request.SET_VRING_KICK, m.u64(q.index), [q.kick_fd])
        if enable and self.features & VirtioFeature.PROTOCOL_FEATURES:
            self.checked(Request.SET_VRING_ENABLE, m.vring_state(q.index, 1))

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, int]:
        """GET_INFLIGHT_FD: (memfd, mmap_size) of the area the backend made."""
        self.send(Request.GET_INFLIGHT_FD, m.inflight(0, 0, num_queues, queue_size))
        data, ancdata, _, _ = self.sock.recvmsg(m.HEADER_SIZE + m.INFLIGHT_SIZE,
                                                socket.CMSG_SPACE(4))
        fds = [int.from_bytes(d[:4], "little") for lvl, typ, d in ancdata
               if lvl == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS]
        request, _, size = m.HEADER.unpack_from(data)
        if request != Request.GET_INFLIGHT_FD or size != m.INFLIGHT_SIZE or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise FrontendError(f"bad GET_INFLIGHT_FD reply: {request} size {size} "
                                f"{len(fds)} fds")
        fields = m.Inflight.parse(data[m.HEADER_SIZE:])
        return fds[0], fields.mmap_size

    def set_inflight_fd(self, fd: int, mmap_size: int, num_queues: int, queue_size: int) -> None:
        self.checked(Request.SET_INFLIGHT_FD, m.inflight(mmap_size, 0, num_queues, queue_size),
                     [fd])

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int,
                       flags: int = 0, log_addr: int = 0) -> int | None:
        payload = m.VringAddr.build({"index": index, "flags": flags, "desc_user_addr": desc,
                                     "used_user_addr": used, "avail_user_addr": avail,
                                     "log_guest_addr": log_addr})
        return self.command(Request.SET_VRING_ADDR, payload)

    # -- dirty logging (live migration), as QEMU 7.2's vhost_migration_log does it
    def set_log_base(self, fd: int, size: int, offset: int = 0) -> bytes:
        """SET_LOG_BASE with the log memfd; with LOG_SHMFD QEMU waits for a reply."""
        return self.request(Request.SET_LOG_BASE, m.log_base(size, offset), [fd])

    def set_logging(self, on: bool, log_addrs: dict[int, int] | None = None) -> None:
        """SET_FEATURES with/without VHOST_F_LOG_ALL, then each queue's addresses with/without
        VHOST_VRING_F_LOG (``log_addrs``: queue -> log address; default its used ring)."""
        assert self.memory is not None
        self.features = (self.features | m.VHOST_F_LOG_ALL if on
                         else self.features & ~m.VHOST_F_LOG_ALL)
        self.checked(Request.SET_FEATURES, m.u64(self.features))
        for index, q in self.queues.items():
            log_addr = (log_addrs or {}).get(index, q.used)
            self.set_vring_addr(index, self.memory.uaddr(q.desc), self.memory.uaddr(q.avail),
                                self.memory.uaddr(q.used), m.VRING_ADDR_F_LOG if on else 0,
                                log_addr if on else 0)

    def get_vring_base(self, index: int) -> int:
        reply = self.request(Request.GET_VRING_BASE, m.vring_state(index, 0))
        got_index, num = struct.unpack("<II", reply)
        if got_index != index:
            raise FrontendError(f"GET_VRING_BASE for {index} answered for {got_index}")
        return num

    def get_config(self, offset: int = 0, size: int = 60) -> bytes:
        reply = self.request(Request.GET_CONFIG, m.config_space(offset, bytes(size)))
        return reply[m.CONFIG_HEADER_SIZE:]

    def submit(self, q: AnyQueue, pieces: Sequence[tuple[int, int, bool]],
               indirect: bool = False) -> int:
        """Add a chain and kick if the backend wants a kick."""
        old = q.avail_idx
        head = q.add_chain(pieces, indirect)
        if q.kick_needed(old):
            q.kick()
        return head

    def close(self, queues: bool = True) -> None:
        """Hang up; ``queues=False`` keeps the rings (a frontend waiting for a backend to
        come back, as QEMU with ``reconnect=1`` does)."""
        with contextlib.suppress(OSError):
            self.sock.close()
        if queues:
            for q in self.queues.values():
                q.close()
        self.queues.clear()
