"""Point 6: BackendHandler's state transitions with no socket and a fake worker factory that
records starts and stops (so no thread runs and every transition is synchronous)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence

import pytest

from tests.vhost_devices import EchoDevice
from vhost import messages as m
from vhost.device import QueueHandler
from vhost.handler import LIBRARY_PROTOCOL_FEATURES, BackendHandler, HandlerResult
from vhost.messages import Message, ProtocolFeature, Request, VirtioFeature
from vhost.queue.base import Queue
from vhost.queue.split import ring_sizes
from vhost.runner.thread import Notifier, QueueWorker
from vhost_frontend import FrontendMemory

FEATURES = int(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX
               | VirtioFeature.RING_INDIRECT_DESC)
PROTO = int(VirtioFeature.PROTOCOL_FEATURES)


class FakeWorker(QueueWorker):
    """Stands in for QueueWorker: records start/stop in a shared event list, runs nothing.

    A subclass so that it is a worker to the handler's factory type, but QueueWorker.__init__
    is not called: no thread, no eventfd."""

    def __init__(self, events: list[tuple[str, int]], vq: Queue, handler: QueueHandler,
                 kick_fd: int, call: Notifier, err: Notifier | None) -> None:
        self.events = events
        self.vq = vq
        self.handler = handler
        self.kick_fd = kick_fd
        self.call = call
        self.err = err
        self.kicks = self.batches = self.completed = 0  # QueueWorker's counters

    @property
    def alive(self) -> bool:
        return False  # QueueWorker's: its thread ended (after stop); it never had one

    def start(self) -> None:
        self.events.append(("start", self.vq.index))

    def stop(self, timeout: float | None = None) -> bool:
        self.events.append(("stop", self.vq.index))
        return True


class Harness:
    """A BackendHandler plus the frontend-side resources messages refer to."""

    def __init__(self, num_queues: int = 2) -> None:
        self.events: list[tuple[str, int]] = []
        self.workers: list[FakeWorker] = []
        self.device = EchoDevice(num_queues=num_queues)
        self.h = BackendHandler(self.device, self._factory)
        self.mem = FrontendMemory(((0, 1 << 20, 0), (1 << 20, 1 << 20, 4096 + 48)))
        self.rings: dict[int, tuple[int, int, int]] = {}
        self.fds: list[int] = []

    def _factory(self, vq: Queue, handler: QueueHandler, kick_fd: int, call: Notifier,
                 err: Notifier | None) -> FakeWorker:
        worker = FakeWorker(self.events, vq, handler, kick_fd, call, err)
        self.workers.append(worker)
        return worker

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fds.append(fd)
        return fd

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
             need_reply: bool = True) -> HandlerResult:
        flags = m.VERSION | (m.FLAG_NEED_REPLY if need_reply else 0)
        passed = [os.dup(fd) for fd in fds]  # what the socket would deliver: fresh fds
        result = self.h.handle(Message(request, flags, payload), passed)
        for fd in passed:  # the caller closes what the handler did not keep
            os.close(fd)
        return result

    def ack(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        result = self.send(request, payload, fds)
        assert result.reply is not None, f"no ack for {Request(request).name}"
        return struct.unpack("<Q", result.reply[m.HEADER_SIZE:])[0]

    def ok(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """``request`` is accepted (an ack of 0 when REPLY_ACK is on, no refusal either way)."""
        refused = self.h.refused
        result = self.send(request, payload, fds)
        if result.reply is not None:
            assert struct.unpack("<Q", result.reply[m.HEADER_SIZE:])[0] == 0
        assert self.h.refused == refused, f"{Request(request).name} refused"

    # -- the usual steps
    def negotiate(self, features: int = FEATURES | PROTO, reply_ack: bool = True) -> None:
        proto = LIBRARY_PROTOCOL_FEATURES
        if not reply_ack:
            proto &= ~ProtocolFeature.REPLY_ACK
        self.send(Request.SET_PROTOCOL_FEATURES, m.u64(int(proto)), need_reply=False)
        self.send(Request.SET_OWNER, need_reply=False)
        self.send(Request.SET_FEATURES, m.u64(features), need_reply=False)

    def mem_table(self) -> None:
        regions = [r.description() for r in self.mem.regions]
        self.ok(Request.SET_MEM_TABLE, m.MemoryTable.build(
            {"num_regions": len(regions), "padding": 0, "regions": regions}),
            [r.fd for r in self.mem.regions])

    def addr(self, index: int, size: int = 8, shift: int = 0) -> bytes:
        if index not in self.rings:
            d, a, u = ring_sizes(size)
            self.rings[index] = (self.mem.alloc(d, 16), self.mem.alloc(a, 2),
                                 self.mem.alloc(u, 4))
        desc, avail, used = (self.mem.uaddr(g) for g in self.rings[index])
        return m.VringAddr.build({"index": index, "flags": 0, "desc_user_addr": desc + shift,
                                  "used_user_addr": used, "avail_user_addr": avail,
                                  "log_guest_addr": 0})

    def steps(self, index: int = 0, size: int = 8) -> dict[str, tuple]:
        """Every message a queue needs, by name (in the order QEMU sends them)."""
        return {
            "memory": (None,),
            "size": (Request.SET_VRING_NUM, m.vring_state(index, size)),
            "base": (Request.SET_VRING_BASE, m.vring_state(index, 0)),
            "addr": (Request.SET_VRING_ADDR, self.addr(index, size)),
            "call": (Request.SET_VRING_CALL, m.u64(index), [self.eventfd()]),
            "kick": (Request.SET_VRING_KICK, m.u64(index), [self.eventfd()]),
            "enable": (Request.SET_VRING_ENABLE, m.vring_state(index, 1)),
        }

    def do(self, step: tuple) -> None:
        if step[0] is None:
            self.mem_table()
        else:
            self.ok(*step)

    def start_queue(self, index: int = 0, skip: Sequence[str] = ()) -> None:
        for name, step in self.steps(index).items():
            if name not in skip:
                self.do(step)

    def close(self) -> None:
        self.h.close()
        self.mem.close()
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def hx() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.close()


# ---------------------------------------------------------------------------- starting


def test_queue_starts_when_everything_is_set(hx) -> None:
    hx.negotiate()
    hx.start_queue(0)
    assert hx.events == [("start", 0)]
    worker = hx.workers[0]
    assert worker.vq.size == 8 and worker.vq.event_idx and worker.vq.indirect
    assert worker.vq.addresses.desc == hx.rings[0][0]  # translated to guest physical
    assert worker.call is hx.h.vrings[0].call and worker.err is hx.h.vrings[0].err
    assert hx.h.vrings[0].running and not hx.h.vrings[1].running


@pytest.mark.parametrize("missing", ["memory", "size", "addr", "kick", "enable"])
def test_queue_does_not_start_until_the_missing_piece_arrives(hx, missing) -> None:
    hx.negotiate()
    steps = hx.steps(0)
    # Addresses before the size (so they are accepted even without memory).
    order = ["memory", "addr", "size", "base", "call", "kick", "enable"]
    for name in order:
        if name != missing:
            hx.do(steps[name])
    assert hx.events == [], f"started without {missing}"
    hx.do(steps[missing])
    if missing not in ("kick", "enable"):
        hx.do(steps["enable"])  # only KICK and ENABLE re-evaluate the queue
    assert hx.events == [("start", 0)]


def test_set_vring_enable_0_stops_and_1_restarts(hx) -> None:
    hx.negotiate()
    hx.start_queue(0)
    hx.workers[0].vq.next_avail = 5  # as if five requests had been served
    hx.ok(Request.SET_VRING_ENABLE, m.vring_state(0, 0))
    assert hx.events == [("start", 0), ("stop", 0)]
    assert not hx.h.vrings[0].running and hx.h.vrings[0].base == 5
    hx.ok(Request.SET_VRING_ENABLE, m.vring_state(0, 0))  # already stopped: nothing
    hx.ok(Request.SET_VRING_ENABLE, m.vring_state(0, 1))
    assert hx.events[-1] == ("start", 0)
    assert hx.workers[1].vq.next_avail == 5


def test_kick_alone_does_not_start_a_ring_when_protocol_features_are_on(hx) -> None:
    hx.negotiate()
    hx.start_queue(0, skip=["enable"])
    assert hx.events == [] and not hx.h.vrings[0].enabled


@pytest.mark.parametrize("set_features", [True, False], ids=["features", "no-set-features"])
def test_kick_without_protocol_features_enables_the_ring(hx, set_features) -> None:
    if set_features:
        hx.send(Request.SET_FEATURES, m.u64(FEATURES), need_reply=False)
    hx.start_queue(0, skip=["enable"])
    assert hx.events == [("start", 0)]
    assert hx.h.vrings[0].enabled
    # SET_VRING_ENABLE is a protocol-features message: without them it is refused.
    refused = hx.h.refused
    hx.send(Request.SET_VRING_ENABLE, m.vring_state(0, 0))
    assert hx.h.refused == refused + 1
    assert hx.h.vrings[0].running


def test_get_vring_base_stops_and_forgets_the_kick_fd(hx) -> None:
    hx.negotiate()
    hx.start_queue(0)
    hx.workers[0].vq.next_avail = 0xFFFF
    result = hx.send(Request.GET_VRING_BASE, m.vring_state(0, 0))
    assert result.reply == m.encode_reply(Request.GET_VRING_BASE, m.vring_state(0, 0xFFFF))
    assert hx.events == [("start", 0), ("stop", 0)]
    vring = hx.h.vrings[0]
    assert vring.kick_fd is None and vring.enabled
    # A new kick restarts it from there.
    hx.ok(Request.SET_VRING_KICK, m.u64(0), [hx.eventfd()])
    assert hx.events[-1] == ("start", 0)
    assert hx.workers[1].vq.next_avail == 0xFFFF


def test_a_new_kick_fd_restarts_a_running_queue(hx) -> None:
    hx.negotiate()
    hx.start_queue(0)
    first = hx.h.vrings[0].kick_fd
    hx.ok(Request.SET_VRING_KICK, m.u64(0), [hx.eventfd()])
    assert hx.events == [("start", 0), ("stop", 0), ("start", 0)]
    assert hx.workers[1].kick_fd == hx.h.vrings[0].kick_fd != first


def test_running_queue_refuses_reconfiguration(hx) -> None:
    hx.negotiate()
    hx.start_queue(0)
    assert hx.ack(Request.SET_VRING_NUM, m.vring_state(0, 16)) != 0
    assert hx.ack(Request.SET_VRING_BASE, m.vring_state(0, 3)) != 0
    hx.ok(Request.SET_VRING_ADDR, hx.addr(0))  # the same addresses: fine (QEMU resends them)
    assert hx.ack(Request.SET_VRING_ADDR, hx.addr(0, shift=16)) != 0
    assert hx.events == [("start", 0)]


def test_failed_start_marks_the_queue_broken_and_signals_err(hx) -> None:
    hx.negotiate()
    err = hx.eventfd()
    hx.mem_table()
    hx.ok(Request.SET_VRING_ADDR, hx.addr(0, shift=1 << 40))  # unmapped; size not known yet
    hx.ok(Request.SET_VRING_NUM, m.vring_state(0, 8))
    hx.ok(Request.SET_VRING_ERR, m.u64(0), [err])
    hx.ok(Request.SET_VRING_KICK, m.u64(0), [hx.eventfd()])
    assert hx.ack(Request.SET_VRING_ENABLE, m.vring_state(0, 1)) != 0
    assert hx.h.vrings[0].broken and hx.events == []
    assert os.eventfd_read(err) == 1
    # Broken until the driver gives new addresses.
    hx.ok(Request.SET_VRING_KICK, m.u64(0), [hx.eventfd()])
    assert hx.events == []
    hx.ok(Request.SET_VRING_ADDR, hx.addr(0))
    assert not hx.h.vrings[0].broken
    hx.ok(Request.SET_VRING_KICK, m.u64(0), [hx.eventfd()])
    assert hx.events == [("start", 0)]


def test_two_queues_are_independent(hx) -> None:
    hx.negotiate()
    hx.start_queue(1)
    hx.start_queue(0, skip=["memory"])
    assert hx.events == [("start", 1), ("start", 0)]
    hx.ok(Request.SET_VRING_ENABLE, m.vring_state(1, 0))
    assert hx.events[-1] == ("stop", 1) and hx.h.vrings[0].running


# ---------------------------------------------------------------------------- resets and close


def test_reset_device_stops_everything_and_forgets_features(hx) -> None:
    hx.negotiate()
    hx.start_queue(0)
    hx.start_queue(1, skip=["memory"])
    hx.ok(Request.RESET_DEVICE)
    assert sorted(hx.events[2:]) == [("stop", 0), ("stop", 1)]
    assert hx.h.acked_features == 0 and hx.device.resets == 1
    assert all(v.kick_fd is None and not v.running and v.size == 0 for v in hx.h.vrings)
    assert len(hx.h.memory) == 2, "memory survives a device reset"


def test_reset_owner_stops_and_disables(hx) -> None:
    hx.negotiate()
    hx.start_queue(0)
    hx.ok(Request.RESET_OWNER)
    assert hx.events == [("start", 0), ("stop", 0)]
    assert not hx.h.vrings[0].enabled


def test_close_stops_queues_closes_fds_and_unmaps(hx) -> None:
    hx.negotiate()
    hx.start_queue(0)
    call = hx.h.vrings[0].call
    assert call.fd is not None
    hx.h.close()
    assert hx.events == [("start", 0), ("stop", 0)]
    assert len(hx.h.memory) == 0
    assert call.fd is None and hx.h.vrings[0].kick_fd is None
    assert hx.device.resets == 1


# ---------------------------------------------------------------------------- replies and fds


def test_reply_ack_only_when_negotiated_and_asked() -> None:
    harness = Harness()
    try:
        # Before REPLY_ACK is negotiated: NEED_REPLY is ignored.
        assert harness.send(Request.SET_OWNER).reply is None
        harness.negotiate()
        assert harness.send(Request.SET_OWNER, need_reply=False).reply is None
        assert harness.ack(Request.SET_OWNER) == 0
        assert harness.ack(Request.SET_VRING_NUM, m.vring_state(9, 8)) == 1
        # A message with its own reply answers only with it, NEED_REPLY or not.
        result = harness.send(Request.GET_QUEUE_NUM)
        assert result.reply == m.encode_reply(Request.GET_QUEUE_NUM, m.u64(2))
        assert harness.h.refused == 1
    finally:
        harness.close()


def test_refused_requests_with_their_own_reply() -> None:
    harness = Harness()
    try:
        harness.negotiate()
        get_config = harness.send(Request.GET_CONFIG, m.config_space(250, bytes(7)))
        assert get_config.reply == m.encode_reply(Request.GET_CONFIG, b"")
        assert not get_config.disconnect
        bad_base = harness.send(Request.GET_VRING_BASE, m.vring_state(2, 0))
        assert bad_base.disconnect and bad_base.reply is None
        # An inflight area for a queue size that is not a power of two cannot be made.
        assert harness.send(Request.GET_INFLIGHT_FD, m.inflight(0, 0, 1, 3)).disconnect
        # Nor one for rings larger than the device allows (no such ring can start).
        too_big = harness.device.max_queue_size * 2
        assert harness.send(Request.GET_INFLIGHT_FD, m.inflight(0, 0, 1, too_big)).disconnect
    finally:
        harness.close()


def test_fds_are_kept_only_by_accepted_messages(hx) -> None:
    hx.negotiate()
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    fds = [kick]
    hx.h.handle(Message(Request.SET_VRING_KICK, m.VERSION, m.u64(0)), fds)
    assert fds == [] and hx.h.vrings[0].kick_fd == kick
    refused = os.eventfd(0, os.EFD_CLOEXEC)
    fds = [refused]
    hx.h.handle(Message(Request.SET_VRING_KICK, m.VERSION, m.u64(5)), fds)
    assert fds == [refused], "a refused message must leave its fd to the caller"
    os.close(refused)
    # The memory table fds are mapped, not kept.
    regions = [r.description() for r in hx.mem.regions]
    fds = [os.dup(r.fd) for r in hx.mem.regions]
    hx.h.handle(Message(Request.SET_MEM_TABLE, m.VERSION, m.MemoryTable.build(
        {"num_regions": 2, "padding": 0, "regions": regions})), fds)
    assert len(fds) == 2 and len(hx.h.memory) == 2
    for fd in fds:
        os.close(fd)


def test_set_features_without_protocol_bit_enables_every_ring(hx) -> None:
    hx.send(Request.SET_FEATURES, m.u64(FEATURES), need_reply=False)
    assert all(v.enabled for v in hx.h.vrings)
    assert hx.device.acked == FEATURES


def test_status_is_recorded_only(hx) -> None:
    hx.negotiate()
    hx.start_queue(0)
    hx.ok(Request.SET_STATUS, m.u64(0x10F))
    assert hx.h.status == 0x0F
    hx.ok(Request.SET_STATUS, m.u64(0))
    assert hx.h.vrings[0].running
