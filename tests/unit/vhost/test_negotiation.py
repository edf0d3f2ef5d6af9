"""Point 1: feature and protocol negotiation, device messages and REPLY_ACK, over a real socket."""

from __future__ import annotations

import os
import struct

from tests.unit.vhost.helpers import (
    MiB,
    ack_of,
    fd_count,
    session,
    socketpair_fd,
    wait_disconnected,
    wait_for,
    worker_threads,
)
from tests.vhost_devices import EchoDevice
from vhost import messages as m
from vhost.messages import MESSAGE_TABLE, ProtocolFeature, Request, VirtioFeature
from vhost_frontend import FrontendMemory

LIBRARY_PROTOCOL = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIG
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.STATUS
    | ProtocolFeature.INFLIGHT_SHMFD
    | ProtocolFeature.BACKEND_REQ
)


def test_get_features_offers_ring_protocol_and_device_bits(serve) -> None:
    running = serve(EchoDevice())
    with session(running.path) as s:
        offered = s.fe.get_u64(Request.GET_FEATURES)
        for bit in (VirtioFeature.VERSION_1, VirtioFeature.RING_INDIRECT_DESC,
                    VirtioFeature.RING_EVENT_IDX, VirtioFeature.RING_PACKED,
                    VirtioFeature.PROTOCOL_FEATURES):
            assert offered & bit, f"{bit!r} not offered"
        assert offered & (1 << 5), "the device's own bit is not offered"
        # Nothing the library does not implement (in-order, platform access).
        assert not offered & (VirtioFeature.IN_ORDER | VirtioFeature.ACCESS_PLATFORM)


def test_set_features_reaches_the_device_without_the_vhost_user_bit(serve) -> None:
    device = EchoDevice()
    running = serve(device)
    with session(running.path) as s:
        s.start()
        features = s.fe.features
        assert features & VirtioFeature.PROTOCOL_FEATURES
        assert device.acked == features & ~VirtioFeature.PROTOCOL_FEATURES
        assert running.daemon.handler.acked_features == features


def test_protocol_features_offered_and_accepted(serve) -> None:
    running = serve(EchoDevice())
    with session(running.path) as s:
        s.fe.get_u64(Request.GET_FEATURES)
        offered = ProtocolFeature(s.fe.get_u64(Request.GET_PROTOCOL_FEATURES))
        assert offered & LIBRARY_PROTOCOL == LIBRARY_PROTOCOL
        # Nothing offered that the library does not implement (host notifiers...); dirty
        # logging because the echo device records its guest writes.
        assert offered == LIBRARY_PROTOCOL | ProtocolFeature.LOG_SHMFD
        s.fe.command(Request.SET_PROTOCOL_FEATURES, m.u64(int(offered)), ack=False)
        assert ack_of(s.fe, Request.SET_OWNER) == 0  # REPLY_ACK is in effect at once
        assert running.daemon.handler.acked_protocol == offered


def test_set_owner_queue_num_and_max_mem_slots(serve) -> None:
    running = serve(EchoDevice(num_queues=3))
    with session(running.path) as s:
        s.start()
        assert running.daemon.handler.owner
        assert s.fe.get_u64(Request.GET_QUEUE_NUM) == 3
        assert s.fe.get_u64(Request.GET_MAX_MEM_SLOTS) == 509


def test_get_and_set_config(serve) -> None:
    device = EchoDevice()
    running = serve(device)
    with session(running.path) as s:
        s.start()
        assert s.fe.get_config(0, 16) == b"ECHO-DEVICE-CFG!"
        assert s.fe.get_config(5, 6) == b"DEVICE"
        # Past the device's 16 bytes but inside the 256-byte space: zeros, as a real device reads.
        assert s.fe.get_config(200, 56) == bytes(56)
        assert s.fe.command(Request.SET_CONFIG, m.config_space(0, b"echo")) == 0
        assert device.cfg.startswith(b"echo")
        assert s.fe.get_config(0, 8) == b"echo-DEV"
        # The device refuses writes past byte 8: the frontend hears it.
        assert s.fe.command(Request.SET_CONFIG, m.config_space(8, b"x")) != 0
        assert s.fe.get_config(8, 1) == b"I"


def test_set_and_get_status(serve) -> None:
    running = serve(EchoDevice())
    with session(running.path) as s:
        s.start()
        assert s.fe.get_u64(Request.GET_STATUS) == 0
        assert s.fe.command(Request.SET_STATUS, m.u64(0x0F)) == 0
        assert s.fe.get_u64(Request.GET_STATUS) == 0x0F
        # Status 0 (QEMU writes it before GET_VRING_BASE) is only recorded.
        q = s.queue(0, 8)
        assert s.fe.command(Request.SET_STATUS, m.u64(0)) == 0
        assert s.fe.get_u64(Request.GET_STATUS) == 0
        s.echo(q)


def test_reset_device_stops_queues_and_allows_renegotiation(serve) -> None:
    device = EchoDevice()
    running = serve(device)
    with session(running.path) as s:
        s.start()
        q = s.queue(0, 8)
        s.echo(q)
        resets = device.resets
        assert s.fe.command(Request.RESET_DEVICE) == 0
        assert device.resets == resets + 1
        assert not worker_threads()
        handler = running.daemon.handler
        assert handler.acked_features == 0 and handler.status == 0
        assert not handler.vrings[0].running
        # The driver starts over on the same connection (memory and ownership kept).
        s.fe.checked(Request.SET_FEATURES, m.u64(s.fe.features))
        s.fe.queues.pop(0).close()
        s.echo(s.queue(0, 8))


def test_reset_owner_disables_rings(serve) -> None:
    running = serve(EchoDevice())
    with session(running.path) as s:
        s.start()
        q = s.queue(0, 8)
        s.echo(q)
        assert s.fe.command(Request.RESET_OWNER) == 0
        vring = running.daemon.handler.vrings[0]
        assert not vring.running and not vring.enabled
        assert not worker_threads()
        # Re-enabling the ring restarts it where it stopped.
        s.fe.checked(Request.SET_VRING_KICK, m.u64(0), [q.kick_fd])
        s.fe.checked(Request.SET_VRING_ENABLE, m.vring_state(0, 1))
        s.echo(q)


def test_set_backend_req_fd_is_accepted_and_closed_with_the_connection(serve) -> None:
    running = serve(EchoDevice())
    before = fd_count()
    other = None
    with session(running.path) as s:
        s.start()
        fd, other = socketpair_fd()
        try:
            assert s.fe.command(Request.SET_BACKEND_REQ_FD, b"", [fd]) == 0
            # A second one replaces the first (which the backend closes).
            assert s.fe.command(Request.SET_BACKEND_REQ_FD, b"", [fd]) == 0
            assert running.daemon.handler.backend_req_fd is not None
        finally:
            os.close(fd)
    wait_disconnected(running)
    other.close()
    wait_for(lambda: fd_count() == before, "the backend to close the request channel fd")


def _reply_ack_script(running, fe, mem: FrontendMemory) -> dict[Request, int]:
    """Send every request without a reply of its own, each with NEED_REPLY; their acks."""
    acks: dict[Request, int] = {}

    def send(request: Request, payload: bytes = b"", fds=()) -> None:
        acks[request] = ack_of(fe, request, payload, fds)

    fe.get_u64(Request.GET_FEATURES)
    proto = fe.get_u64(Request.GET_PROTOCOL_FEATURES)
    fe.command(Request.SET_PROTOCOL_FEATURES, m.u64(proto), ack=False)
    send(Request.SET_PROTOCOL_FEATURES, m.u64(proto))
    send(Request.SET_OWNER)
    features = fe.get_u64(Request.GET_FEATURES) & ~int(VirtioFeature.RING_PACKED)  # split rings
    send(Request.SET_FEATURES, m.u64(features))
    fe.features = features
    regions = [r.description() for r in mem.regions[:1]]
    table = m.MemoryTable.build({"num_regions": 1, "padding": 0, "regions": regions})
    send(Request.SET_MEM_TABLE, table, [mem.regions[0].fd])
    extra = mem.regions[1]
    one = m.SingleMemoryRegion.build({"padding": 0, "region": extra.description()})
    send(Request.ADD_MEM_REG, one, [extra.fd])
    send(Request.REM_MEM_REG, one)
    fe.memory = mem
    fe.setup_queue(0, 8, region=0, enable=False)  # NUM/BASE/ADDR/CALL/ERR/KICK, all acked
    for request in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.SET_VRING_ADDR,
                    Request.SET_VRING_CALL, Request.SET_VRING_ERR, Request.SET_VRING_KICK):
        acks[request] = 0  # Frontend.checked() raised otherwise
    send(Request.SET_VRING_ENABLE, m.vring_state(0, 1))
    assert running.daemon.handler.vrings[0].running
    send(Request.SET_CONFIG, m.config_space(0, b"ab"))
    send(Request.SET_STATUS, m.u64(0x0F))
    fd, other = socketpair_fd()
    try:
        send(Request.SET_BACKEND_REQ_FD, b"", [fd])
    finally:
        os.close(fd)
        other.close()
    inflight = os.memfd_create("inflight", os.MFD_CLOEXEC)
    os.ftruncate(inflight, 4096)
    try:
        send(Request.SET_INFLIGHT_FD, m.inflight(4096, 0, 1, 8), [inflight])
    finally:
        os.close(inflight)
    log_call = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        send(Request.SET_LOG_FD, b"", [log_call])
    finally:
        os.close(log_call)
    send(Request.RESET_OWNER)
    send(Request.RESET_DEVICE)
    return acks


def test_reply_ack_on_every_message_without_its_own_reply(serve) -> None:
    running = serve(EchoDevice())
    with session(running.path, layout=((0, 2 * MiB, 0), (4 * MiB, MiB, 0))) as s:
        acks = _reply_ack_script(running, s.fe, s.mem)
    no_reply = {r for r, spec in MESSAGE_TABLE.items() if not spec.reply}
    assert set(acks) == no_reply, f"not exercised: {no_reply - set(acks)}"
    assert all(status == 0 for status in acks.values()), acks


def test_no_ack_when_reply_ack_was_not_negotiated(serve) -> None:
    running = serve(EchoDevice())
    with session(running.path) as s:
        s.start(protocol=LIBRARY_PROTOCOL & ~ProtocolFeature.REPLY_ACK)
        # NEED_REPLY set anyway, on a good and on a refused message: neither is answered, so
        # the next reply on the wire is GET_FEATURES'.
        s.fe.send(Request.SET_OWNER, flags=m.VERSION | m.FLAG_NEED_REPLY)
        s.fe.send(Request.SET_VRING_NUM, m.vring_state(7, 8), flags=m.VERSION | m.FLAG_NEED_REPLY)
        s.fe.send(Request.GET_FEATURES)
        code, flags, payload = s.fe.recv()
        assert code == Request.GET_FEATURES
        assert flags & m.FLAG_REPLY
        assert struct.unpack("<Q", payload)[0] & VirtioFeature.VERSION_1
        assert running.daemon.handler.refused == 1


def test_failure_ack_without_need_reply_is_silent(serve) -> None:
    """A refused message without NEED_REPLY gets no answer even with REPLY_ACK negotiated."""
    running = serve(EchoDevice())
    with session(running.path) as s:
        s.start()
        s.fe.send(Request.SET_VRING_NUM, m.vring_state(7, 8))
        assert s.fe.get_u64(Request.GET_QUEUE_NUM) == 1
        assert running.daemon.handler.refused == 1
