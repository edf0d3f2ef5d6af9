"""A vhost-user *frontend* in Python: plays QEMU and the guest driver, for tests and benchmarks.

It creates guest RAM in memfds (several regions, any mmap offset), negotiates like QEMU 7.2, lays
out split rings, places descriptor chains (direct or indirect, any split), kicks, and reads the
used ring when the backend signals.  Every layer can also be misused on purpose -- raw messages
with any header, size or fds; raw descriptors and avail entries -- because the backend's job is to
survive a hostile peer and the tests need to be that peer.

Nothing here is on the backend's path: the backend never imports this module.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scsi_buffers import GuestMemory
from scsi_buffers.guestmem import buffer_address

from . import messages as m
from .connection import recv_exact, send_message
from .messages import ProtocolFeature, Request, VirtioFeature
from .virtqueue import (
    DESC,
    DESC_SIZE,
    USED_ELEM,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    full_fence,
    ring_sizes,
)

log = logging.getLogger(__name__)

PAGE = 4096


class FrontendError(Exception):
    """The backend answered something unexpected (or not at all)."""


# ---------------------------------------------------------------------------- guest memory


@dataclass
class FrontendRegion:
    """One memfd-backed guest RAM region as the frontend mapped it."""

    gpa: int
    size: int
    mmap_offset: int
    fd: int
    mapping: mmap.mmap
    uaddr: int  # where the region's first byte is in this process (QEMU's "user address")

    def description(self) -> dict[str, int]:
        return m.memory_region(self.gpa, self.size, self.uaddr, self.mmap_offset)


class FrontendMemory:
    """Guest RAM made of memfd regions, with a bump allocator for rings and buffers.

    ``layout`` is a list of ``(gpa, size, mmap_offset)``; the memfd of each region is made
    ``mmap_offset + size`` long so the backend maps the region at that offset, as QEMU does for
    RAM blocks that share one file.
    """

    def __init__(self, layout: Sequence[tuple[int, int, int]] = ((0, 64 << 20, 0),)) -> None:
        self.regions: list[FrontendRegion] = []
        self.guest = GuestMemory()
        for gpa, size, mmap_offset in layout:
            self.add_region(gpa, size, mmap_offset)
        self._cursor = [(r.gpa, r.gpa + r.size) for r in self.regions]
        self._next = 0

    def add_region(self, gpa: int, size: int, mmap_offset: int = 0) -> FrontendRegion:
        fd = os.memfd_create(f"guest-ram-{gpa:#x}", os.MFD_CLOEXEC)
        os.ftruncate(fd, mmap_offset + size)
        base = mmap_offset - mmap_offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, size + mmap_offset - base, offset=base)
        delta = mmap_offset - base
        region_view = memoryview(mapping)[delta : delta + size]
        uaddr = buffer_address(region_view)
        region_view.release()
        self.guest.add_buffer(gpa, mapping, size=size, offset=delta, userspace_addr=uaddr,
                              mmap_offset=mmap_offset)
        region = FrontendRegion(gpa, size, mmap_offset, fd, mapping, uaddr)
        self.regions.append(region)
        return region

    def remove_region(self, region: FrontendRegion) -> None:
        self.regions.remove(region)
        self.guest.remove_region(region.gpa).close()
        os.close(region.fd)

    def uaddr(self, gpa: int) -> int:
        """The frontend virtual address of a guest physical address."""
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r.uaddr + gpa - r.gpa
        raise ValueError(f"gpa {gpa:#x} is in no region")

    def alloc(self, size: int, align: int = 16, region: int | None = None) -> int:
        """A fresh guest range (never freed: tests are short); in ``region`` if given."""
        order = [region] if region is not None else list(range(len(self._cursor)))
        for i in order:
            start, end = self._cursor[i]
            gpa = -(-start // align) * align
            if gpa + size <= end:
                self._cursor[i] = (gpa + size, end)
                return gpa
        raise MemoryError(f"no room for {size} bytes of guest memory")

    def read(self, gpa: int, n: int) -> bytes:
        return self.guest.read(gpa, n)

    def write(self, gpa: int, data: bytes) -> None:
        self.guest.write(gpa, data)

    def close(self) -> None:
        self.guest.close()
        for r in self.regions:
            with contextlib.suppress(OSError):
                os.close(r.fd)
        self.regions.clear()


# ---------------------------------------------------------------------------- driver-side ring


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: did [old, new) pass ``event``?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class DriverQueue:
    """The driver's side of one split virtqueue living in :class:`FrontendMemory`."""

    def __init__(self, mem: FrontendMemory, index: int, size: int, event_idx: bool,
                 region: int | None = None) -> None:
        self.mem = mem
        self.index = index
        self.size = size
        self.event_idx = event_idx
        desc_len, avail_len, used_len = ring_sizes(size)
        self.desc = mem.alloc(desc_len, 16, region)
        self.avail = mem.alloc(avail_len, 2, region)
        self.used = mem.alloc(used_len, 4, region)
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.kicks = 0
        self.calls = 0
        self._chain_desc: dict[int, list[int]] = {}
        self._avail_h = mem.guest.view(self.avail, avail_len).cast("H")
        self._used_h = mem.guest.view(self.used, used_len).cast("H")
        self._used_b = mem.guest.view(self.used, used_len)
        self._desc_b = mem.guest.view(self.desc, desc_len)
        if event_idx:
            self._avail_h[2 + size] = 0  # used_event: interrupt on the first completion

    # -- descriptors
    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        """Write descriptor ``i`` of the table as given (no checks: for malformed rings too)."""
        DESC.pack_into(self._desc_b, i * DESC_SIZE, addr, length, flags, nxt)

    def publish(self, head: int) -> None:
        """Put ``head`` in the avail ring and bump avail.idx (one 16-bit store)."""
        self._avail_h[2 + (self.avail_idx % self.size)] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._avail_h[1] = self.avail_idx

    def set_avail_idx(self, value: int) -> None:
        """Force avail.idx (malformed-ring tests)."""
        self.avail_idx = value & 0xFFFF
        self._avail_h[1] = self.avail_idx

    def set_avail_flags(self, flags: int) -> None:
        self._avail_h[0] = flags

    def add_chain(self, pieces: Sequence[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Lay out a chain of (gpa, length, writable) pieces and make it available; its head."""
        if indirect:
            table = self.mem.alloc(DESC_SIZE * len(pieces), 16)
            for i, (addr, length, writable) in enumerate(pieces):
                flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (
                    VIRTQ_DESC_F_NEXT if i + 1 < len(pieces) else 0)
                self.mem.write(table + i * DESC_SIZE,
                               DESC.pack(addr, length, flags, i + 1 if i + 1 < len(pieces) else 0))
            head = self.free.pop()
            self.write_desc(head, table, DESC_SIZE * len(pieces), VIRTQ_DESC_F_INDIRECT)
            self._chain_desc[head] = [head]
        else:
            if len(pieces) > len(self.free):
                raise FrontendError("queue full")
            ids = [self.free.pop() for _ in pieces]
            for i, (addr, length, writable) in enumerate(pieces):
                last = i + 1 == len(pieces)
                flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                self.write_desc(ids[i], addr, length, flags, 0 if last else ids[i + 1])
            head = ids[0]
            self._chain_desc[head] = ids
        self.publish(head)
        return head

    # -- notifications
    def kick_needed(self, old_avail: int) -> bool:
        full_fence()  # avail.idx store before the avail_event / flags load
        if self.event_idx:
            avail_event = self._used_h[2 + 4 * self.size]
            return need_event(avail_event, self.avail_idx, old_avail)
        return not self._used_h[0] & 1

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)
        self.kicks += 1

    def used_idx(self) -> int:
        return self._used_h[1]

    def used_flags(self) -> int:
        return self._used_h[0]

    def avail_event(self) -> int:
        return self._used_h[2 + 4 * self.size]

    def take_used(self) -> list[tuple[int, int]]:
        """Used entries not seen yet, as (head, length); their descriptors are freed."""
        out = []
        idx = self._used_h[1]
        while self.last_used != idx:
            head, length = USED_ELEM.unpack_from(self._used_b, 4 + 8 * (self.last_used % self.size))
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
            self.free.extend(self._chain_desc.pop(head, [head]))
        if self.event_idx:
            self._avail_h[2 + self.size] = self.last_used
        return out

    def wait_call(self, timeout: float) -> bool:
        """Wait for the call eventfd; True if it fired."""
        ready, _, _ = select.select([self.call_fd], [], [], timeout)
        if ready:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.call_fd)
            self.calls += 1
            return True
        return False

    def wait_used(self, count: int, timeout: float = 10.0) -> list[tuple[int, int]]:
        """Collect ``count`` used entries, waiting for calls; FrontendError on timeout."""
        got = self.take_used()
        deadline = time.monotonic() + timeout
        while len(got) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FrontendError(
                    f"queue {self.index}: {len(got)} of {count} completions after {timeout} s "
                    f"(used.idx {self.used_idx()}, avail.idx {self.avail_idx})"
                )
            self.wait_call(min(remaining, 0.05))
            got.extend(self.take_used())
        return got

    def err_signalled(self) -> bool:
        try:
            return os.eventfd_read(self.err_fd) > 0
        except BlockingIOError:
            return False

    def close(self) -> None:
        for view in (self._avail_h, self._used_h, self._used_b, self._desc_b):
            view.release()
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


# ---------------------------------------------------------------------------- the frontend


class Frontend:
    """A vhost-user frontend connected to a backend's socket."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self.features = 0
        self.protocol = ProtocolFeature(0)
        self.queues: dict[int, DriverQueue] = {}
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
                  protocol: ProtocolFeature | None = None) -> None:
        """GET/SET features and protocol features, SET_OWNER; None takes all that is offered."""
        offered = self.get_u64(Request.GET_FEATURES)
        if offered & VirtioFeature.PROTOCOL_FEATURES:
            offered_proto = ProtocolFeature(self.get_u64(Request.GET_PROTOCOL_FEATURES))
            want = offered_proto if protocol is None else protocol
            self.command(Request.SET_PROTOCOL_FEATURES, m.u64(int(want)), ack=False)
            self.protocol = want
        self.checked(Request.SET_OWNER)
        self.features = offered if features is None else features
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
        q = DriverQueue(self.memory, index, size,
                        bool(self.features & VirtioFeature.RING_EVENT_IDX), region)
        q.avail_idx = base
        q.last_used = base
        q._avail_h[1] = base
        q._used_h[1] = base
        self.restart_queue(q, base, enable)
        return q

    def restart_queue(self, q: DriverQueue, base: int, enable: bool = True) -> None:
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
                       flags: int = 0) -> int | None:
        payload = m.VringAddr.build({"index": index, "flags": flags, "desc_user_addr": desc,
                                     "used_user_addr": used, "avail_user_addr": avail,
                                     "log_guest_addr": 0})
        return self.command(Request.SET_VRING_ADDR, payload)

    def get_vring_base(self, index: int) -> int:
        reply = self.request(Request.GET_VRING_BASE, m.vring_state(index, 0))
        got_index, num = struct.unpack("<II", reply)
        if got_index != index:
            raise FrontendError(f"GET_VRING_BASE for {index} answered for {got_index}")
        return num

    def get_config(self, offset: int = 0, size: int = 60) -> bytes:
        reply = self.request(Request.GET_CONFIG, m.config_space(offset, bytes(size)))
        return reply[m.CONFIG_HEADER_SIZE:]

    def submit(self, q: DriverQueue, pieces: Sequence[tuple[int, int, bool]],
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
