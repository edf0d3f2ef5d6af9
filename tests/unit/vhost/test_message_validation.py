"""Point 5, message half: every message that breaks a rule is refused (failure ack + log line)
while the connection's running queue keeps serving, and framing abuse ends only that connection.

After each case the same checks run: the other queue still echoes, no fd the frontend passed is
leaked, and -- once the abusing frontend is gone -- a fresh frontend negotiates and is served.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from tests.unit.vhost.helpers import (
    SOCKET_TIMEOUT,
    MiB,
    Session,
    ack_of,
    assert_closed_by_peer,
    assert_fresh_frontend_works,
    assert_refused,
    backend_vq,
    fd_count,
    tracebacks,
    wait_disconnected,
    wait_for,
    warnings_since,
)
from tests.vhost_devices import EchoDevice
from vhost import messages as m
from vhost.messages import ProtocolFeature, Request, VirtioFeature
from vhost.queue import inflight as inf
from vhost_frontend import Frontend

NUM_QUEUES = 2


@dataclass
class Ctx:
    """A connection with queue 1 running; queue 0 is left for the test to misconfigure."""

    running: object
    s: Session
    fds_before: int

    @property
    def fe(self) -> Frontend:
        return self.s.fe

    def still_serving(self) -> None:
        """The connection's running queue works, no fd leaked, and the next frontend works."""
        self.s.echo(self.s.fe.queues[1])
        self.s.close()
        wait_disconnected(self.running)
        wait_for(lambda: fd_count() == self.fds_before, "every passed fd to be closed")
        assert_fresh_frontend_works(self.running)

    def dropped(self) -> None:
        """The backend hung up on this frontend (and only it): it cleans up and serves again."""
        assert_closed_by_peer(self.fe)
        self.s.close()
        wait_disconnected(self.running)
        wait_for(lambda: fd_count() == self.fds_before, "every passed fd to be closed")
        assert_fresh_frontend_works(self.running)


@pytest.fixture
def ctx(serve) -> Iterator[Ctx]:
    running = serve(EchoDevice(num_queues=NUM_QUEUES))
    before = fd_count()
    s = Session(running.path, layout=((0, 2 * MiB, 0), (2 * MiB, 2 * MiB, 4096 + 16)))
    try:
        s.start()
        s.echo(s.queue(1, 8))
        yield Ctx(running, s, before)
    finally:
        s.close()


def _table(regions: Sequence, num: int | None = None) -> bytes:
    descs = [r.description() for r in regions]
    return m.MemoryTable.build({"num_regions": len(descs) if num is None else num, "padding": 0,
                                "regions": descs})


def _vring_addr(index: int, desc: int, avail: int, used: int) -> bytes:
    return m.VringAddr.build({"index": index, "flags": 0, "desc_user_addr": desc,
                              "used_user_addr": used, "avail_user_addr": avail,
                              "log_guest_addr": 0})


# ---------------------------------------------------------------------------- queue size


@pytest.mark.parametrize("size", [0, 3, 100, 1 << 16, 1 << 31],
                         ids=["zero", "3", "100", "65536", "2**31"])
def test_queue_size_invalid(ctx, caplog, size) -> None:
    assert_refused(ctx.fe, caplog, Request.SET_VRING_NUM, m.vring_state(0, size))
    assert ctx.running.daemon.handler.vrings[0].size == 0
    ctx.still_serving()


def test_queue_size_above_the_device_maximum(ctx, caplog) -> None:
    assert_refused(ctx.fe, caplog, Request.SET_VRING_NUM, m.vring_state(0, 2048))
    ctx.still_serving()


def test_queue_size_change_while_running(ctx, caplog) -> None:
    assert_refused(ctx.fe, caplog, Request.SET_VRING_NUM, m.vring_state(1, 16))
    assert_refused(ctx.fe, caplog, Request.SET_VRING_BASE, m.vring_state(1, 0))
    q = ctx.fe.queues[1]
    other = ctx.s.mem.alloc(4096, 4096)
    assert_refused(ctx.fe, caplog, Request.SET_VRING_ADDR,
                   _vring_addr(1, ctx.s.mem.uaddr(other), ctx.s.mem.uaddr(q.avail),
                               ctx.s.mem.uaddr(q.used)))
    ctx.still_serving()


# ---------------------------------------------------------------------------- ring addresses


def _ring_uaddrs(ctx: Ctx, shift: dict[str, int]) -> bytes:
    """Ring addresses of a fresh, valid layout for queue 0, with some moved by ``shift``."""
    mem = ctx.s.mem
    desc, avail, used = mem.alloc(16 * 8, 16), mem.alloc(6 + 2 * 8, 2), mem.alloc(6 + 8 * 8, 4)
    addrs = {"desc": mem.uaddr(desc), "avail": mem.uaddr(avail), "used": mem.uaddr(used)}
    for name, delta in shift.items():
        addrs[name] += delta
    return _vring_addr(0, addrs["desc"], addrs["avail"], addrs["used"])


@pytest.mark.parametrize(
    "shift",
    [{"desc": 8}, {"desc": 1}, {"avail": 1}, {"used": 2}],
    ids=["desc+8", "desc+1", "avail+1", "used+2"],
)
def test_ring_address_misaligned(ctx, caplog, shift) -> None:
    ctx.fe.checked(Request.SET_VRING_NUM, m.vring_state(0, 8))
    assert_refused(ctx.fe, caplog, Request.SET_VRING_ADDR, _ring_uaddrs(ctx, shift))
    assert ctx.running.daemon.handler.vrings[0].ring_uaddrs is None
    ctx.still_serving()


@pytest.mark.parametrize(
    "shift",
    [{"desc": 64 << 30}, {"avail": -(1 << 40)}, {"used": 1 << 62}],
    ids=["desc", "avail", "used"],
)
def test_ring_address_unmapped(ctx, caplog, shift) -> None:
    ctx.fe.checked(Request.SET_VRING_NUM, m.vring_state(0, 8))
    assert_refused(ctx.fe, caplog, Request.SET_VRING_ADDR, _ring_uaddrs(ctx, shift))
    ctx.still_serving()


def test_ring_running_off_the_end_of_its_region(ctx, caplog) -> None:
    """The ring's first byte is mapped, its last is not (the region after is not adjacent in
    the frontend's address space)."""
    region = ctx.s.mem.regions[0]
    ctx.fe.checked(Request.SET_VRING_NUM, m.vring_state(0, 8))
    desc = region.uaddr + region.size - 64  # a 128-byte table
    payload = _vring_addr(0, desc, region.uaddr, region.uaddr + 4096)
    assert_refused(ctx.fe, caplog, Request.SET_VRING_ADDR, payload)
    ctx.still_serving()


@pytest.mark.parametrize("problem", ["misaligned", "unmapped"])
def test_bad_ring_address_sent_before_the_size_stops_the_queue_at_start(ctx, caplog,
                                                                        problem) -> None:
    """Addresses can only be checked once the size is known; then the start is refused, the
    queue marked broken and its err eventfd signalled."""
    # Queue 0 set up by hand, in an order a sloppy frontend might use.
    shift = {"avail": 1} if problem == "misaligned" else {"used": 1 << 50}
    fe = ctx.fe
    err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        fe.checked(Request.SET_VRING_ADDR, _ring_uaddrs(ctx, shift))
        fe.checked(Request.SET_VRING_NUM, m.vring_state(0, 8))
        fe.checked(Request.SET_VRING_ERR, m.u64(0), [err])
        fe.checked(Request.SET_VRING_KICK, m.u64(0), [kick])
        assert_refused(fe, caplog, Request.SET_VRING_ENABLE, m.vring_state(0, 1))
        vring = ctx.running.daemon.handler.vrings[0]
        assert vring.broken and not vring.running
        assert os.eventfd_read(err) == 1
    finally:
        os.close(err)
        os.close(kick)
    ctx.still_serving()


# ---------------------------------------------------------------------------- queue index


VRING_MESSAGES = {
    Request.SET_VRING_NUM: lambda i: (m.vring_state(i, 8), 0),
    Request.SET_VRING_BASE: lambda i: (m.vring_state(i, 0), 0),
    Request.SET_VRING_ADDR: lambda i: (_vring_addr(i, 0, 0, 0), 0),
    Request.SET_VRING_ENABLE: lambda i: (m.vring_state(i, 1), 0),
    Request.SET_VRING_KICK: lambda i: (m.u64(i), 1),
    Request.SET_VRING_CALL: lambda i: (m.u64(i), 1),
    Request.SET_VRING_ERR: lambda i: (m.u64(i), 1),
}


@pytest.mark.parametrize("request_", list(VRING_MESSAGES), ids=lambda r: r.name)
@pytest.mark.parametrize("index", [NUM_QUEUES, 255])
def test_vring_message_with_queue_index_out_of_range(ctx, caplog, request_, index) -> None:
    payload, nfds = VRING_MESSAGES[request_](index)
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
    try:
        assert_refused(ctx.fe, caplog, request_, payload, fds)
    finally:
        for fd in fds:
            os.close(fd)
    ctx.still_serving()


def test_vring_fd_message_with_unknown_bits(ctx, caplog) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        assert_refused(ctx.fe, caplog, Request.SET_VRING_CALL, m.u64(1 | 1 << 9), [fd])
    finally:
        os.close(fd)
    ctx.still_serving()


def test_get_vring_base_with_queue_index_out_of_range_disconnects(ctx, caplog) -> None:
    """A request with its own reply cannot be refused with an ack; a wrong reply would
    desynchronise the frontend, so the backend hangs up (and keeps serving others later)."""
    ctx.fe.send(Request.GET_VRING_BASE, m.vring_state(NUM_QUEUES, 0))
    ctx.dropped()
    assert any("refused GET_VRING_BASE" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- features


@pytest.mark.parametrize(
    "bit",
    [VirtioFeature.IN_ORDER, VirtioFeature.ACCESS_PLATFORM,
     VirtioFeature.NOTIFY_ON_EMPTY, 1 << 63, 1 << 6],
    ids=["in_order", "access_platform", "notify_on_empty", "bit63", "device-bit6"],
)
def test_set_features_with_bits_never_offered(ctx, caplog, bit) -> None:
    acked = ctx.running.daemon.handler.acked_features
    assert_refused(ctx.fe, caplog, Request.SET_FEATURES, m.u64(ctx.fe.features | int(bit)))
    assert ctx.running.daemon.handler.acked_features == acked
    ctx.still_serving()


def test_ring_layout_cannot_change_under_running_queues(ctx, caplog) -> None:
    """RING_PACKED is offered, but a running split queue cannot become packed."""
    acked = ctx.running.daemon.handler.acked_features
    packed = int(VirtioFeature.RING_PACKED)
    assert ctx.running.daemon.handler.offered_features & packed
    assert_refused(ctx.fe, caplog, Request.SET_FEATURES, m.u64(ctx.fe.features | packed))
    assert ctx.running.daemon.handler.acked_features == acked
    ctx.still_serving()


def test_set_protocol_features_with_bits_never_offered(ctx, caplog) -> None:
    proto = int(ctx.fe.protocol | ProtocolFeature.PAGEFAULT)
    assert_refused(ctx.fe, caplog, Request.SET_PROTOCOL_FEATURES, m.u64(proto))
    ctx.still_serving()


# ---------------------------------------------------------------------------- config space


@pytest.mark.parametrize(("offset", "size"), [(0, 0), (250, 7), (256, 1), (0, 257),
                                              ((1 << 32) - 1, 2)])
def test_config_access_out_of_bounds(ctx, caplog, offset, size) -> None:
    payload = m.ConfigSpace.build({"offset": offset, "size": size, "flags": 0,
                                   "payload": bytes(size)})
    # GET_CONFIG has a reply of its own: a refusal is an empty payload, as the spec says.
    assert ctx.fe.request(Request.GET_CONFIG, payload) == b""
    assert any("refused GET_CONFIG" in r.getMessage() for r in caplog.records)
    assert_refused(ctx.fe, caplog, Request.SET_CONFIG, payload)
    ctx.still_serving()


def test_config_payload_not_matching_its_size(ctx, caplog) -> None:
    payload = m.ConfigSpace.build({"offset": 0, "size": 8, "flags": 0, "payload": bytes(4)})
    assert ctx.fe.request(Request.GET_CONFIG, payload) == b""
    assert_refused(ctx.fe, caplog, Request.SET_CONFIG, payload)
    ctx.still_serving()


def test_config_access_at_the_limit_is_valid(ctx) -> None:
    assert ctx.fe.get_config(255, 1) == b"\0"
    assert ctx.fe.get_config(0, 256)[:16] == b"ECHO-DEVICE-CFG!"
    ctx.still_serving()


# ---------------------------------------------------------------------------- memory table


def test_set_mem_table_with_zero_regions(ctx, caplog) -> None:
    region = ctx.s.mem.regions[0]
    assert_refused(ctx.fe, caplog, Request.SET_MEM_TABLE, _table([], 0), [region.fd])
    assert_refused(ctx.fe, caplog, Request.SET_MEM_TABLE, _table([], 0))
    assert len(ctx.running.daemon.handler.memory) == 2
    ctx.still_serving()


def test_set_mem_table_with_more_than_8_regions(ctx, caplog) -> None:
    regions = ctx.s.mem.regions[:1] * 9
    assert_refused(ctx.fe, caplog, Request.SET_MEM_TABLE, _table(regions),
                   [regions[0].fd] * 8)
    assert len(ctx.running.daemon.handler.memory) == 2
    ctx.still_serving()


def test_set_mem_table_claiming_more_regions_than_it_carries(ctx, caplog) -> None:
    regions = ctx.s.mem.regions
    assert_refused(ctx.fe, caplog, Request.SET_MEM_TABLE, _table(regions[:1], 2),
                   [r.fd for r in regions])
    ctx.still_serving()


def test_set_mem_table_with_overlapping_regions(ctx, caplog) -> None:
    r = ctx.s.mem.regions[0]
    assert_refused(ctx.fe, caplog, Request.SET_MEM_TABLE, _table([r, r]), [r.fd, r.fd])
    ctx.still_serving()


# ---------------------------------------------------------------------------- fd counts


def test_set_mem_table_with_fewer_fds_than_regions(ctx, caplog) -> None:
    regions = ctx.s.mem.regions
    assert_refused(ctx.fe, caplog, Request.SET_MEM_TABLE, _table(regions), [regions[0].fd])
    ctx.still_serving()


def test_set_mem_table_with_more_fds_than_regions(ctx, caplog) -> None:
    regions = ctx.s.mem.regions
    assert_refused(ctx.fe, caplog, Request.SET_MEM_TABLE, _table(regions[:1]),
                   [r.fd for r in regions])
    ctx.still_serving()


@pytest.mark.parametrize("request_", [Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                                      Request.SET_VRING_ERR], ids=lambda r: r.name)
def test_vring_fd_with_the_no_fd_flag_and_an_fd(ctx, caplog, request_) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        assert_refused(ctx.fe, caplog, request_, m.u64(0 | m.VRING_NOFD_MASK), [fd])
    finally:
        os.close(fd)
    ctx.still_serving()


@pytest.mark.parametrize("request_", [Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                                      Request.SET_VRING_ERR], ids=lambda r: r.name)
def test_vring_fd_with_neither_flag_nor_fd(ctx, caplog, request_) -> None:
    assert_refused(ctx.fe, caplog, request_, m.u64(0))
    ctx.still_serving()


def test_vring_kick_polling_mode_is_refused(ctx, caplog) -> None:
    """No-fd flag alone is well-formed, but polling is not supported: refused, not ignored."""
    assert_refused(ctx.fe, caplog, Request.SET_VRING_KICK, m.u64(0 | m.VRING_NOFD_MASK))
    ctx.still_serving()


def test_vring_call_without_fd_is_accepted(ctx) -> None:
    """The no-fd flag alone on CALL/ERR means "nobody listens": accepted."""
    assert ctx.fe.command(Request.SET_VRING_CALL, m.u64(0 | m.VRING_NOFD_MASK)) == 0
    assert ctx.fe.command(Request.SET_VRING_ERR, m.u64(0 | m.VRING_NOFD_MASK)) == 0
    ctx.still_serving()


@pytest.mark.parametrize(
    ("request_", "payload", "nfds"),
    [
        (Request.SET_VRING_CALL, m.u64(0), 2),
        (Request.SET_OWNER, b"", 1),
        (Request.SET_FEATURES, m.u64(1 << 32), 1),
        (Request.ADD_MEM_REG, bytes(40), 0),
        (Request.SET_BACKEND_REQ_FD, b"", 0),
        (Request.SET_BACKEND_REQ_FD, b"", 2),
        (Request.SET_MEM_TABLE, bytes(8 + 32), 0),
    ],
    ids=["call-2fds", "owner-1fd", "features-1fd", "add_mem_reg-0fds", "backend_req-0fds",
         "backend_req-2fds", "mem_table-0fds"],
)
def test_wrong_fd_count(ctx, caplog, request_, payload, nfds) -> None:
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
    try:
        assert_refused(ctx.fe, caplog, request_, payload, fds)
    finally:
        for fd in fds:
            os.close(fd)
    ctx.still_serving()


def test_fd_with_a_request_that_has_a_reply_disconnects(ctx, caplog) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        ctx.fe.send(Request.GET_FEATURES, fds=[fd])
    finally:
        os.close(fd)
    ctx.dropped()


# ---------------------------------------------------------------------------- framing abuse


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x5 | 0x8 | 0x2], ids=hex)
def test_header_with_bad_version(ctx, flags) -> None:
    ctx.fe.send(Request.GET_FEATURES, flags=flags)
    ctx.dropped()


def test_payload_size_above_4096(ctx) -> None:
    ctx.fe.send(Request.SET_MEM_TABLE, bytes(64), size=4097)
    ctx.dropped()


def test_payload_size_of_4096_is_read_and_refused(ctx, caplog) -> None:
    """At the limit the payload is read whole (the stream stays in sync) and refused."""
    assert_refused(ctx.fe, caplog, Request.SET_FEATURES, bytes(4096))
    ctx.still_serving()


@pytest.mark.parametrize("cut", [3, 11, 12, 30], ids=lambda c: f"{c}-bytes")
def test_truncated_message_then_close(ctx, cut) -> None:
    region = ctx.s.mem.regions[0]
    data = m.encode(Request.SET_MEM_TABLE, _table([region]), m.VERSION | m.FLAG_NEED_REPLY)
    # Fds ride with the first byte: the backend must close them when the rest never comes.
    ctx.fe.sock.sendmsg([data[:cut]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        struct.pack("i", region.fd))])
    ctx.fe.sock.shutdown(socket.SHUT_WR)
    ctx.dropped()


def test_more_than_8_fds(ctx) -> None:
    regions = ctx.s.mem.regions[:1] * 9
    ctx.fe.send(Request.SET_MEM_TABLE, _table(regions[:8]), [regions[0].fd] * 9)
    ctx.dropped()


@pytest.mark.parametrize("code", [0, 7, 19, 22, 33, 35, 41, 99, 0xFFFFFFFF],
                         ids=lambda c: f"request-{c}")
def test_unknown_or_unsupported_request(ctx, caplog, code) -> None:
    assert_refused(ctx.fe, caplog, code, bytes(8))
    ctx.still_serving()


@pytest.mark.parametrize(
    ("request_", "size"),
    [(Request.SET_FEATURES, 4), (Request.SET_FEATURES, 12), (Request.SET_VRING_NUM, 4),
     (Request.SET_VRING_ADDR, 32), (Request.SET_OWNER, 8), (Request.SET_MEM_TABLE, 7),
     (Request.SET_CONFIG, 11), (Request.REM_MEM_REG, 32), (Request.SET_STATUS, 0)],
    ids=lambda v: v.name if isinstance(v, Request) else str(v),
)
def test_wrong_payload_size_for_a_request_without_reply(ctx, caplog, request_, size) -> None:
    assert_refused(ctx.fe, caplog, request_, bytes(size))
    ctx.still_serving()


@pytest.mark.parametrize(
    ("request_", "size"),
    [(Request.GET_FEATURES, 8), (Request.GET_VRING_BASE, 4), (Request.GET_QUEUE_NUM, 1),
     (Request.GET_PROTOCOL_FEATURES, 8), (Request.GET_INFLIGHT_FD, 0)],
    ids=lambda v: v.name if isinstance(v, Request) else str(v),
)
def test_wrong_payload_size_for_a_request_with_reply_disconnects(ctx, request_, size) -> None:
    ctx.fe.send(request_, bytes(size))
    ctx.dropped()


def test_garbage_stream(ctx) -> None:
    ctx.fe.sock.sendall(os.urandom(64) + b"\xff" * 4096)
    ctx.dropped()


def test_abuse_before_negotiation_then_fresh_frontend(serve) -> None:
    """The very first message is garbage: the daemon survives and the next frontend works."""
    running = serve(EchoDevice())
    fe = Frontend(running.path, timeout=SOCKET_TIMEOUT)
    try:
        fe.send(12345, b"x" * 10, flags=0x7)
        assert_closed_by_peer(fe)
    finally:
        fe.close()
    assert_fresh_frontend_works(running)
    assert running.daemon.connections == 2
    wait_disconnected(running)
    assert backend_vq(running, 0) is None

# ---------------------------------------------------------------------------- fd kinds
# Every message that carries an fd, against fds of every wrong kind (issue 25).
# The table: for each fd-carrying request, the kind its fd must be and what the frontend may
# hand over instead.  A wrong kind, or a range that does not fit the file, is refused at that
# message -- a failed REPLY_ACK (or, for SET_LOG_BASE, whose reply cannot say no, the frontend
# dropped) and one log line -- never acknowledged and left to fail where the fd is used.  The
# right kind is accepted (so the check does not refuse everything).  After each case the
# connection's running queue still echoes, no fd leaked, and a fresh frontend is served.
# (REM_MEM_REG may carry one fd that is closed unused, so it has no kind to check.)


@contextmanager
def _fd_of(kind: str, ctx: Ctx) -> Iterator[int]:
    """An fd of ``kind``, closed (with anything it needs kept open) afterwards."""
    extra: list[int] = []
    if kind == "region-0":  # the session's first guest RAM memfd
        fd = os.dup(ctx.s.mem.regions[0].fd)
    elif kind == "eventfd":
        fd = os.eventfd(0, os.EFD_CLOEXEC)
    elif kind.startswith("memfd"):  # "memfd" (1 MiB) or "memfd-4k"
        fd = os.memfd_create("fd-kinds", os.MFD_CLOEXEC)
        os.ftruncate(fd, 4096 if kind == "memfd-4k" else MiB)
    elif kind == "read-only-memfd":
        rw = os.memfd_create("fd-kinds", os.MFD_CLOEXEC)
        os.ftruncate(rw, MiB)
        extra.append(rw)
        fd = os.open(f"/proc/self/fd/{rw}", os.O_RDONLY | os.O_CLOEXEC)
    elif kind == "pipe":
        fd, w = os.pipe2(os.O_CLOEXEC)
        extra.append(w)
    elif kind in ("unix-stream", "unix-dgram"):
        kind_ = socket.SOCK_STREAM if kind == "unix-stream" else socket.SOCK_DGRAM
        a, b = socket.socketpair(socket.AF_UNIX, kind_)
        fd = a.detach()
        extra.append(b.detach())
    elif kind in ("dev-zero", "dev-null"):
        fd = os.open(f"/dev/{kind[4:]}", os.O_RDWR | os.O_CLOEXEC)
    elif kind == "epoll":
        ep = select.epoll()
        fd = os.dup(ep.fileno())
        ep.close()
    else:  # pragma: no cover - a typo in the table
        raise AssertionError(kind)
    try:
        yield fd
    finally:
        for f in (fd, *extra):
            os.close(f)


# ---------------------------------------------------------------------------- the table

Payload = Callable[[Ctx], bytes]


def _mem_table(ctx: Ctx) -> bytes:
    """The session's table again (its first region's fd is the one under test: the valid
    case passes that region's own memfd, so the running queue keeps its memory)."""
    return m.MemoryTable.build({"num_regions": 2, "padding": 0,
                                "regions": [r.description() for r in ctx.s.mem.regions]})


def _add_region(ctx: Ctx) -> bytes:
    """One MiB more at 64 MiB, at a frontend address far from the others."""
    return m.SingleMemoryRegion.build({"padding": 0, "region": m.memory_region(
        64 * MiB, MiB, 0x7F00_0000_0000, 0)})


def _inflight(ctx: Ctx) -> bytes:
    """An area of 1 MiB (more than the queues need, all of it inside a valid memfd)."""
    assert inf.area_size(NUM_QUEUES, 8) < MiB
    return m.inflight(MiB, 0, NUM_QUEUES, 8)


#: request -> (payload, the kind its fd must be)
FD_MESSAGES: dict[Request, tuple[Payload, str]] = {
    Request.SET_VRING_KICK: (lambda ctx: m.u64(0), "eventfd"),
    Request.SET_VRING_CALL: (lambda ctx: m.u64(0), "eventfd"),
    Request.SET_VRING_ERR: (lambda ctx: m.u64(0), "eventfd"),
    Request.SET_LOG_FD: (lambda ctx: b"", "eventfd"),
    Request.SET_MEM_TABLE: (_mem_table, "region-0"),
    Request.ADD_MEM_REG: (_add_region, "memfd"),
    Request.SET_INFLIGHT_FD: (_inflight, "memfd"),
    Request.SET_LOG_BASE: (lambda ctx: m.log_base(8192, 0), "memfd"),
    Request.SET_BACKEND_REQ_FD: (lambda ctx: b"", "unix-stream"),
}

#: what a frontend may pass instead, per kind wanted
WRONG_KINDS = {
    "eventfd": ["memfd", "pipe", "unix-stream", "dev-null", "epoll"],
    "memfd": ["eventfd", "pipe", "unix-stream", "dev-zero", "read-only-memfd", "memfd-4k"],
    "region-0": ["memfd-4k", "eventfd", "pipe", "unix-stream", "dev-zero", "read-only-memfd"],
    "unix-stream": ["eventfd", "memfd", "pipe", "unix-dgram"],
}

CASES = [(request, kind, kind == wanted)
         for request, (_, wanted) in FD_MESSAGES.items()
         for kind in [wanted, *WRONG_KINDS[wanted]]]


@pytest.mark.parametrize(("request_", "kind", "valid"), CASES,
                         ids=[f"{r.name}-{k}" for r, k, _ in CASES])
def test_fd_kind_is_checked_when_the_message_arrives(ctx: Ctx, caplog: pytest.LogCaptureFixture,
                                                     request_: Request, kind: str,
                                                     valid: bool) -> None:
    payload = FD_MESSAGES[request_][0](ctx)
    start = len(caplog.records)
    with _fd_of(kind, ctx) as fd:
        fds = [fd]
        if request_ == Request.SET_MEM_TABLE:
            fds.append(ctx.s.mem.regions[1].fd)
        if request_ == Request.SET_LOG_BASE:
            # Its reply is the ack and has no way to say no: a refusal ends the connection.
            ctx.fe.send(request_, payload, fds)
            if valid:
                assert ctx.fe.recv()[0] == request_
            else:
                assert_closed_by_peer(ctx.fe)
        else:
            status = ack_of(ctx.fe, request_, payload, fds)
            assert (status == 0) == valid, f"status {status}"
    lines = warnings_since(caplog, start)
    if valid:
        assert lines == []
    else:
        assert len(lines) == 1 and f"refused {request_.name}" in lines[0], lines
    assert tracebacks(caplog) == []
    if request_ == Request.SET_LOG_BASE and not valid:
        ctx.dropped()
    else:
        ctx.still_serving()
