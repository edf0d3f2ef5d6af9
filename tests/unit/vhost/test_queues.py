"""Point 3: queues run and chains reach the device -- layouts, completion order, several queues,
stop/restart through GET/SET_VRING_BASE, and kick and interrupt suppression."""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.unit.vhost.devices import GateDevice, ReverseDevice
from tests.unit.vhost.helpers import (
    WAIT,
    Session,
    all_features_but,
    backend_vq,
    wait_for,
    worker_threads,
)
from tests.vhost_devices import EchoDevice
from vhost import messages as m
from vhost.messages import Request, VirtioFeature
from vhost.queue.split import VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY
from vhost_frontend import DriverQueue

EVENT_IDX = VirtioFeature.RING_EVENT_IDX
INDIRECT = VirtioFeature.RING_INDIRECT_DESC


def _cuts(rng: random.Random, total: int, pieces: int) -> list[int]:
    """``total`` split into at most ``pieces`` positive lengths."""
    if total <= 1 or pieces <= 1:
        return [total]
    points = sorted(rng.sample(range(1, total), min(pieces, total) - 1))
    return [b - a for a, b in zip([0, *points], [*points, total], strict=True)]


def _random_chain(s: Session, rng: random.Random, data: bytes) -> tuple[list, list]:
    """Readable pieces holding ``data`` and writable pieces with room for it (plus slack), each
    piece in its own allocation; zero-length descriptors sprinkled in (the device never sees
    them)."""
    readable, writable = [], []
    pos = 0
    for n in _cuts(rng, len(data), rng.randint(1, 4)):
        gpa = s.mem.alloc(n, align=rng.choice((1, 2, 16, 512)))
        s.mem.write(gpa, data[pos : pos + n])
        readable.append((gpa, n, False))
        pos += n
    for n in _cuts(rng, len(data) + rng.randint(0, 40), rng.randint(1, 4)):
        writable.append((s.mem.alloc(n, align=rng.choice((1, 8, 4096))), n, True))
    if rng.random() < 0.3:
        readable.insert(rng.randrange(len(readable) + 1), (s.mem.alloc(1), 0, False))
    if rng.random() < 0.3:
        writable.insert(rng.randrange(len(writable) + 1), (s.mem.alloc(1), 0, True))
    return readable, writable


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
@pytest.mark.parametrize("indirect", [True, False], ids=["indirect", "direct"])
def test_random_chains_reach_the_device(serve, open_session, event_idx, indirect) -> None:
    device = EchoDevice()
    running = serve(device)
    s = open_session(running, layout=((0, 16 << 20, 0),))
    features = all_features_but(*([] if event_idx else [EVENT_IDX]),
                                *([] if indirect else [INDIRECT]))
    s.start(features=features)
    q = s.queue(0, 64)
    vq = backend_vq(running, 0)
    assert vq.event_idx == event_idx and vq.indirect == indirect
    rng = random.Random(f"{event_idx}-{indirect}")
    for _ in range(12):
        batch = []
        for _ in range(rng.randint(1, 5)):
            data = rng.randbytes(rng.randint(1, 3000))
            readable, writable = _random_chain(s, rng, data)
            head = s.fe.submit(q, readable + writable, indirect)
            batch.append((head, data, readable, writable))
        used = dict(q.wait_used(len(batch), WAIT))
        assert len(used) == len(batch)
        for head, data, _readable, writable in batch:
            assert used[head] == len(data)
            out = b"".join(s.mem.read(a, n) for a, n, _ in writable)
            assert out[: len(data)] == data.upper()
    # The device saw exactly the non-empty pieces, readable ones first.
    assert len(device.seen) == q.avail_idx
    assert all(n for _, chain in device.seen for _, n in chain.readable + chain.writable)
    assert not vq.broken


def test_direct_and_indirect_chains_in_one_batch(serve, open_session) -> None:
    device = EchoDevice()
    running = serve(device)
    s = open_session(running).start()
    q = s.queue(0, 16)
    heads = []
    for i in range(6):
        src, dst = s.mem.alloc(4), s.mem.alloc(4)
        s.mem.write(src, b"ab%02d" % i)
        q_old = q.avail_idx
        heads.append(q.add_chain([(src, 4, False), (dst, 4, True)], indirect=bool(i % 2)))
        assert q.avail_idx == q_old + 1
    q.kick()
    assert sorted(h for h, _ in q.wait_used(6, WAIT)) == sorted(heads)
    assert [chain.head for _, chain in device.seen] == heads


def test_out_of_order_completion(serve, open_session) -> None:
    device = ReverseDevice()
    running = serve(device)
    s = open_session(running).start()
    q = s.queue(0, 16)
    pending = {}
    for i in range(5):
        src, dst = s.mem.alloc(8), s.mem.alloc(8)
        s.mem.write(src, b"request%d" % i)
        pending[q.add_chain([(src, 8, False), (dst, 8, True)])] = dst
    q.kick()
    used = q.wait_used(5, WAIT)
    assert device.seen_batches == [list(pending)]
    assert [h for h, _ in used] == list(reversed(pending)), "completions not in reverse order"
    for i, dst in enumerate(pending.values()):
        assert s.mem.read(dst, 8) == b"REQUEST%d" % i
    # Descriptors freed out of order are reused correctly.
    for _ in range(3):
        s.echo(q)


def test_out_of_order_completion_with_the_async_echo_device(serve, open_session) -> None:
    device = EchoDevice(asynchronous=True, delay=0.02)
    running = serve(device)
    s = open_session(running).start()
    q = s.queue(0, 64)
    expected = {}
    for i in range(20):
        data = b"async %d" % i
        src, dst = s.mem.alloc(len(data)), s.mem.alloc(len(data))
        s.mem.write(src, data)
        expected[s.fe.submit(q, [(src, len(data), False), (dst, len(data), True)])] = (dst, data)
    used = dict(q.wait_used(20, WAIT))
    assert set(used) == set(expected)
    for head, (dst, data) in expected.items():
        assert used[head] == len(data)
        assert s.mem.read(dst, len(data)) == data.upper()


def test_two_queues_at_once(serve, open_session) -> None:
    device = EchoDevice(num_queues=2, asynchronous=True, delay=0.01)
    running = serve(device)
    s = open_session(running).start()
    queues = [s.queue(0, 16), s.queue(1, 16)]
    assert sorted(t.name for t in worker_threads()) == ["vq0", "vq1"]
    expected: dict[int, dict[int, bytes]] = {0: {}, 1: {}}
    dsts: dict[tuple[int, int], int] = {}
    for i in range(10):
        for q in queues:
            data = b"q%d-%d" % (q.index, i)
            src, dst = s.mem.alloc(len(data)), s.mem.alloc(len(data))
            s.mem.write(src, data)
            head = s.fe.submit(q, [(src, len(data), False), (dst, len(data), True)])
            expected[q.index][head] = data
            dsts[q.index, head] = dst
            if len(expected[q.index]) == 8:
                _collect(s, q, expected, dsts)
    for q in queues:
        _collect(s, q, expected, dsts)
    assert {i for i, _ in device.seen} == {0, 1}
    assert sum(1 for i, _ in device.seen if i == 0) == 10


def _collect(s: Session, q: DriverQueue, expected, dsts) -> None:
    want = expected[q.index]
    for head, length in q.wait_used(len(want), WAIT):
        data = want.pop(head)
        assert length == len(data)
        assert s.mem.read(dsts[q.index, head], len(data)) == data.upper()


def test_chains_published_before_the_queue_starts_are_served(serve, open_session) -> None:
    """Kicks sent before the worker listens are lost; the worker looks at the ring on start."""
    running = serve(EchoDevice())
    s = open_session(running).start()
    q = s.queue(0, 8, enable=False)
    src, dst = s.mem.alloc(5), s.mem.alloc(5)
    s.mem.write(src, b"early")
    head = q.add_chain([(src, 5, False), (dst, 5, True)])  # no kick
    s.fe.checked(Request.SET_VRING_ENABLE, m.vring_state(0, 1))
    assert q.wait_used(1, WAIT) == [(head, 5)]
    assert s.mem.read(dst, 5) == b"EARLY"


@pytest.mark.parametrize("size", [1, 2, 1024])
def test_queue_sizes(serve, open_session, size) -> None:
    running = serve(EchoDevice())
    s = open_session(running).start()
    q = s.queue(0, size)
    for _ in range(3):
        s.echo(q, indirect=size == 1)  # a one-entry table only fits two pieces indirectly


# ---------------------------------------------------------------------------- GET/SET_VRING_BASE


def _restart(s: Session, q: DriverQueue, base: int) -> None:
    """Start a stopped queue again on the same rings, as QEMU does after GET_VRING_BASE."""
    fe = s.fe
    fe.checked(Request.SET_VRING_NUM, m.vring_state(q.index, q.size))
    fe.checked(Request.SET_VRING_BASE, m.vring_state(q.index, base))
    assert fe.set_vring_addr(q.index, s.mem.uaddr(q.desc), s.mem.uaddr(q.avail),
                             s.mem.uaddr(q.used)) == 0
    fe.checked(Request.SET_VRING_KICK, m.u64(q.index), [q.kick_fd])
    fe.checked(Request.SET_VRING_ENABLE, m.vring_state(q.index, 1))


def test_get_vring_base_replies_after_in_flight_requests_complete(serve, open_session) -> None:
    device = EchoDevice(asynchronous=True, delay=0.1)
    running = serve(device)
    s = open_session(running).start()
    q = s.queue(0, 16)
    dsts = []
    for i in range(3):
        src, dst = s.mem.alloc(4), s.mem.alloc(4)
        s.mem.write(src, b"req%d" % i)
        s.fe.submit(q, [(src, 4, False), (dst, 4, True)])
        dsts.append(dst)
    wait_for(lambda: len(device.seen) == 3, "three requests in flight")
    assert q.used_idx() == 0, "the delay is too short for this test"
    t0 = time.monotonic()
    base = s.fe.get_vring_base(0)
    # The reply comes only once every in-flight request is in the used ring.
    assert base == 3
    assert q.used_idx() == 3
    assert time.monotonic() - t0 > 0.05
    assert [s.mem.read(d, 4) for d in dsts] == [b"REQ0", b"REQ1", b"REQ2"]
    assert not worker_threads()
    assert sorted(h for h, _ in q.take_used()) == sorted(c.head for _, c in device.seen)
    # Restarted with SET_VRING_BASE, the queue continues where it stopped.
    _restart(s, q, base)
    for _ in range(2):
        s.echo(q)
    assert q.used_idx() == 5
    assert s.fe.get_vring_base(0) == 5


def test_get_vring_base_of_a_stopped_queue(serve, open_session) -> None:
    running = serve(EchoDevice())
    s = open_session(running).start()
    q = s.queue(0, 8)
    s.echo(q)
    assert s.fe.get_vring_base(0) == 1
    assert s.fe.get_vring_base(0) == 1  # stopping twice changes nothing
    s.fe.checked(Request.SET_VRING_BASE, m.vring_state(0, 7))
    assert s.fe.get_vring_base(0) == 7
    assert running.daemon.handler.vrings[0].kick_fd is None


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
def test_ring_indices_wrap_around(serve, open_session, event_idx) -> None:
    running = serve(EchoDevice())
    s = open_session(running)
    s.start(features=all_features_but(*([] if event_idx else [EVENT_IDX])))
    q = s.queue(0, 4, base=0xFFFD)
    if event_idx:
        q.set_used_event(0xFFFD)  # first completion
    for _ in range(6):
        s.echo(q)
    assert q.used_idx() == 3 and q.avail_idx == 3
    assert s.fe.get_vring_base(0) == 3
    _restart(s, q, 3)
    s.echo(q)


# ---------------------------------------------------------------------------- kick suppression


def test_kick_suppression_without_event_idx(serve, open_session) -> None:
    device = GateDevice()
    running = serve(device)
    s = open_session(running).start(features=all_features_but(EVENT_IDX))
    q = s.queue(0, 16)
    assert q.used_flags() == 0
    src, dst = s.mem.alloc(4), s.mem.alloc(4)
    s.mem.write(src, b"gate")
    first = s.fe.submit(q, [(src, 4, False), (dst, 4, True)])
    assert q.kicks == 1
    assert device.entered.wait(WAIT)
    # Draining: the backend asked not to be kicked, and the driver honours it.
    assert q.used_flags() == VIRTQ_USED_F_NO_NOTIFY
    later = [s.fe.submit(q, [(src, 4, False), (dst, 4, True)]) for _ in range(3)]
    assert q.kicks == 1
    device.gate.set()
    got = q.wait_used(4, WAIT)
    assert [h for h, _ in got] == [first, *later]
    # Idle again: kicks wanted.
    wait_for(lambda: q.used_flags() == 0, "used.flags to clear")
    s.echo(q)
    assert q.kicks == 2


def test_kick_suppression_with_event_idx(serve, open_session) -> None:
    device = GateDevice()
    running = serve(device)
    s = open_session(running).start()
    q = s.queue(0, 16)
    src, dst = s.mem.alloc(4), s.mem.alloc(4)
    first = s.fe.submit(q, [(src, 4, False), (dst, 4, True)])
    assert q.kicks == 1
    assert device.entered.wait(WAIT)
    # avail_event still says 0: buffers 1..3 need no kick, the backend finds them anyway.
    assert q.avail_event() == 0
    later = [s.fe.submit(q, [(src, 4, False), (dst, 4, True)]) for _ in range(3)]
    assert q.kicks == 1
    assert q.used_flags() == 0  # EVENT_IDX uses avail_event, never the flag
    device.gate.set()
    assert [h for h, _ in q.wait_used(4, WAIT)] == [first, *later]
    wait_for(lambda: q.avail_event() == 4, "avail_event to follow the drained ring")
    s.echo(q)
    assert q.kicks == 2


# ---------------------------------------------------------------------------- interrupt suppression


def _complete_quietly(s: Session, q: DriverQueue) -> None:
    """One request, waited for by polling used.idx (so the driver never moves used_event)."""
    src, dst = s.mem.alloc(4), s.mem.alloc(4)
    want = q.used_idx() + 1
    s.fe.submit(q, [(src, 4, False), (dst, 4, True)])
    wait_for(lambda: q.used_idx() == want, "a completion")


def test_event_idx_batch_gets_fewer_calls_than_completions(serve, open_session) -> None:
    running = serve(EchoDevice())
    s = open_session(running).start()
    q = s.queue(0, 16)
    call = running.daemon.handler.vrings[0].call
    heads = []
    for _ in range(8):
        src, dst = s.mem.alloc(4), s.mem.alloc(4)
        heads.append(q.add_chain([(src, 4, False), (dst, 4, True)]))  # no kicks
    q.kick()
    assert sorted(h for h, _ in q.wait_used(8, WAIT)) == sorted(heads)
    assert s.fe.get_vring_base(0) == 8  # joins the worker: every call it made is counted
    assert call.count == 1


def test_event_idx_calls_only_when_used_event_says_so(serve, open_session) -> None:
    running = serve(EchoDevice())
    s = open_session(running).start()
    q = s.queue(0, 16)
    call = running.daemon.handler.vrings[0].call
    # used_event stays 0: the first completion (0 -> 1) crosses it, later ones do not.
    for _ in range(5):
        _complete_quietly(s, q)
    # used_event = 5: the 6th completion (5 -> 6) gets a call.
    q.set_used_event(5)
    _complete_quietly(s, q)
    wait_for(lambda: call.count == 2, "the call asked for by used_event")
    # used_event = 7 with used.idx 6: the 7th completion is quiet, the 8th calls.
    q.set_used_event(7)
    _complete_quietly(s, q)
    _complete_quietly(s, q)
    wait_for(lambda: call.count == 3, "the call for the 8th completion")
    assert s.fe.get_vring_base(0) == 8  # joins the worker: no call can still be on its way
    assert call.count == 3
    assert os.eventfd_read(q.call_fd) == 3  # what the driver was actually sent


def test_no_interrupt_flag_suppresses_calls_without_event_idx(serve, open_session) -> None:
    running = serve(EchoDevice())
    s = open_session(running).start(features=all_features_but(EVENT_IDX))
    q = s.queue(0, 16)
    call = running.daemon.handler.vrings[0].call
    q.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    for _ in range(3):
        _complete_quietly(s, q)
    q.set_avail_flags(0)
    _complete_quietly(s, q)
    # The worker is sequential: had any of the first three called, the count would be > 1.
    wait_for(lambda: call.count >= 1, "the call after the flag was cleared")
    assert s.fe.get_vring_base(0) == 4  # joins the worker: no call can still be on its way
    assert call.count == 1
    assert q.wait_call(0)
    assert not q.wait_call(0)


def test_no_interrupt_flag_is_ignored_with_event_idx(serve, open_session) -> None:
    """With EVENT_IDX the device must ignore avail.flags (virtio 2.7.10)."""
    running = serve(EchoDevice())
    s = open_session(running).start()
    q = s.queue(0, 16)
    q.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    s.echo(q)
    assert s.fe.get_vring_base(0) == 1  # joins the worker: every call it made is counted
    assert running.daemon.handler.vrings[0].call.count == 1
