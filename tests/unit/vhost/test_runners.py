"""The handler runs its queues through one :class:`vhost.runner.base.QueueRunner`, whatever it
is: the same handler test passes with queues on threads and in processes, and the handler
hands every change to its runner without asking what kind it is."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tests.unit.vhost.devices import ProcessEchoDevice
from tests.unit.vhost.test_handler import Harness
from tests.vhost_devices import EchoDevice
from vhost import messages as m
from vhost.handler import BackendHandler
from vhost.messages import Request
from vhost.runner.base import QueueKey, QueueRunner, QueueSpec, RunningQueue, Stopped
from vhost.runner.pool import ProcessRunner, QueueProcessWorker
from vhost.runner.thread import QueueWorker
from vhost.runner.thread_runner import ThreadRunner
from vhost_frontend import DriverQueue

SIZE = 8


class RealHarness(Harness):
    """The handler harness with the handler's own runner (real threads or processes)."""

    def __init__(self, processes: bool) -> None:
        super().__init__(num_queues=2)
        self.h.close()
        self.device = ProcessEchoDevice(num_queues=2) if processes else EchoDevice(num_queues=2)
        self.h = BackendHandler(self.device)

    def queue(self, index: int) -> DriverQueue:
        """A driver ring for queue ``index``, handed to the handler; the queue starts."""
        q = DriverQueue(self.mem, index, SIZE, event_idx=True)
        q.start_at(0)
        desc, avail, used = (self.mem.uaddr(g) for g in
                             (q.addresses.desc, q.addresses.avail, q.addresses.used))
        self.ok(Request.SET_VRING_NUM, m.vring_state(index, SIZE))
        self.ok(Request.SET_VRING_BASE, m.vring_state(index, 0))
        self.ok(Request.SET_VRING_ADDR, m.VringAddr.build({
            "index": index, "flags": 0, "desc_user_addr": desc, "used_user_addr": used,
            "avail_user_addr": avail, "log_guest_addr": 0}))
        self.ok(Request.SET_VRING_CALL, m.u64(index), [q.call_fd])
        self.ok(Request.SET_VRING_KICK, m.u64(index), [q.kick_fd])
        self.ok(Request.SET_VRING_ENABLE, m.vring_state(index, 1))
        return q

    def echo(self, q: DriverQueue, text: bytes) -> bytes:
        src, dst = self.mem.alloc(16), self.mem.alloc(16)
        self.mem.write(src, text)
        q.add_chain([(src, 16, False), (dst, 16, True)])
        q.kick()
        assert q.wait_used(1, 10.0)
        return self.mem.read(dst, 16)

    def vring_base(self, index: int) -> int:
        result = self.send(Request.GET_VRING_BASE, m.vring_state(index, 0))
        assert result.reply is not None
        return int.from_bytes(result.reply[m.HEADER_SIZE + 4 : m.HEADER_SIZE + 8], "little")


@pytest.fixture(params=[False, True], ids=["threads", "processes"])
def real(request: pytest.FixtureRequest) -> Iterator[RealHarness]:
    harness = RealHarness(request.param)
    yield harness
    harness.close()


def test_the_same_handler_serves_queues_with_either_runner(real: RealHarness) -> None:
    """One test, both runners: start, serve, a memory table and a call fd changed under a
    running queue, stop with the ring's position, restart where it stopped."""
    processes = isinstance(real.device, ProcessEchoDevice)
    assert isinstance(real.h.runner, ProcessRunner if processes else ThreadRunner)
    real.negotiate()
    real.mem_table()
    q = real.queue(0)
    worker = real.h.vrings[0].worker
    assert isinstance(worker, QueueProcessWorker if processes else QueueWorker)
    assert real.echo(q, b"first request 1!") == b"FIRST REQUEST 1!"
    real.mem_table()  # the same table again, the queue running (QEMU does this)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    real.fds.append(call)
    real.ok(Request.SET_VRING_CALL, m.u64(0), [call])
    assert real.echo(q, b"second request!!") == b"SECOND REQUEST!!"
    assert os.eventfd_read(call) >= 1  # the worker signalled the new call fd
    assert real.h.runner.ring_state(QueueKey(0, 0))["last_avail_idx"] == 2
    assert real.vring_base(0) == 2
    assert not real.h.vrings[0].running and real.h.refused == 0
    # A restart from where it stopped: SET_VRING_BASE, a fresh kick fd.
    real.ok(Request.SET_VRING_BASE, m.vring_state(0, 2))
    q.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    real.ok(Request.SET_VRING_KICK, m.u64(0), [q.kick_fd])
    assert real.echo(q, b"third request!!!") == b"THIRD REQUEST!!!"
    assert real.vring_base(0) == 3
    q.close()


class RecordingRunner:
    """A runner that is neither kind: it records what the handler asks and lets a thread
    runner do it.  A handler that asked ``isinstance(self.runner, ...)`` before forwarding
    would skip it."""

    def __init__(self, inner: QueueRunner) -> None:
        self.inner = inner
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def record(*args: Any) -> Any:
            self.calls.append((name, args[0] if args else None))
            return method(*args)

        return record

    def start(self, spec: QueueSpec) -> RunningQueue:
        self.calls.append(("start", spec.key))
        return self.inner.start(spec)

    def stop(self, key: QueueKey) -> Stopped | None:
        self.calls.append(("stop", key))
        return self.inner.stop(key)


def _names(calls: Sequence[tuple[str, Any]]) -> list[str]:
    return [name for name, _ in calls]


def test_the_handler_hands_every_change_to_its_runner() -> None:
    """Each message that changes what a running queue uses goes to the runner, for any runner
    (the handler has no runner-specific branch), keyed by (connection, queue)."""
    hx = Harness()
    try:
        hx.h.conn = 7
        recorder = RecordingRunner(hx.h.runner)
        hx.h.runner = recorder  # a QueueRunner, structurally
        hx.negotiate()
        assert _names(recorder.calls) == ["device_changed", "set_features"]
        assert recorder.calls[0][1] == 7
        recorder.calls.clear()
        hx.start_queue(0)
        assert _names(recorder.calls) == ["set_mem_table", "notifier_changed", "start"]
        assert recorder.calls[1][1] == QueueKey(7, 0)
        assert recorder.calls[2][1] == QueueKey(7, 0)
        recorder.calls.clear()
        hx.mem_table()
        hx.ok(Request.SET_VRING_CALL, m.u64(0), [hx.eventfd()])
        hx.ok(Request.SET_VRING_ERR, m.u64(0), [hx.eventfd()])
        hx.ok(Request.SET_VRING_ADDR, hx.addr(0))  # a running ring's addresses again
        assert _names(recorder.calls) == ["set_mem_table", "notifier_changed",
                                          "notifier_changed", "set_log_addr"]
        recorder.calls.clear()
        hx.send(Request.GET_VRING_BASE, m.vring_state(0, 0))
        assert recorder.calls == [("stop", QueueKey(7, 0))]
        recorder.calls.clear()
        hx.ok(Request.RESET_DEVICE)
        assert "drop_log" in _names(recorder.calls)
    finally:
        hx.close()


def test_a_device_tells_every_runner_serving_it() -> None:
    """A device's counters and state changes reach each runner attached to it (a daemon may
    serve one device to several connections), and none once it is detached."""
    seen: list[str] = []

    class Remote:
        def __init__(self, name: str) -> None:
            self.name = name

        def refresh_counters(self) -> None:
            seen.append(f"{self.name} refresh")

        def state_changed(self) -> None:
            seen.append(f"{self.name} state")

    device = EchoDevice()
    device.refresh_counters()
    device.process_state_changed()  # no runner: nothing to do
    a, b = Remote("a"), Remote("b")
    device.attach_runner(a)
    device.attach_runner(b)
    device.refresh_counters()
    device.process_state_changed()
    assert seen == ["a refresh", "b refresh", "a state", "b state"]
    seen.clear()
    device.detach_runner(a)
    device.process_state_changed()
    assert seen == ["b state"]
    assert EchoDevice()._remote_runners == ()  # per device, not shared through the class


def test_a_worker_thread_that_cannot_start_refuses_the_queue() -> None:
    """No thread left (a process limit): the queue is refused and marked broken, the driver
    told through its err eventfd, and the connection goes on -- not an exception out of the
    handler."""
    hx = Harness()
    try:
        def no_thread() -> None:
            raise RuntimeError("can't start new thread")

        def factory(*args: Any) -> QueueWorker:
            worker = hx._factory(*args)
            worker.start = no_thread  # type: ignore[method-assign]
            return worker

        assert isinstance(hx.h.runner, ThreadRunner)
        hx.h.runner.worker_factory = factory
        hx.negotiate()
        err = hx.eventfd()
        hx.ok(Request.SET_VRING_ERR, m.u64(0), [err])
        steps = hx.steps(0)
        for name in ("memory", "size", "base", "addr", "call", "kick"):
            hx.do(steps[name])
        refused = hx.h.refused
        hx.send(*steps["enable"])  # the queue starts now
        assert hx.h.refused == refused + 1
        assert hx.h.vrings[0].broken and not hx.h.vrings[0].running
        assert os.eventfd_read(err) == 1
        assert hx.h.runner.workers == {}
        assert hx.ack(Request.GET_QUEUE_NUM) == 2  # the connection goes on
    finally:
        hx.close()
