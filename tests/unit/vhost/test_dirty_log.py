"""Dirty-page logging over the protocol, as QEMU 7.2 drives it for a live migration:
VHOST_F_LOG_ALL and LOG_SHMFD offered, SET_LOG_BASE answered, SET_FEATURES toggling logging
with the queues running, VHOST_VRING_F_LOG's used-ring log address, SET_LOG_FD, a new log while
running, and two queues marking while the test (playing QEMU) clears the bitmap."""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator

import pytest

from guestmem import GuestMemory
from tests.qemu_log import PAGE, QemuLog, pages
from tests.unit.vhost.devices import GateDevice
from tests.unit.vhost.helpers import (
    WAIT,
    MiB,
    Session,
    assert_closed_by_peer,
    assert_fresh_frontend_works,
    assert_refused,
    session,
    wait_readable,
)
from tests.vhost_devices import EchoDevice
from vhost import messages as m
from vhost.messages import ProtocolFeature, Request, VirtioFeature
from vhost.queue.base import RingAddresses
from vhost.queue.split import VIRTQ_DESC_F_WRITE, SplitQueue
from vhost_frontend import DriverQueue, DriverRing

MEM = 4 * MiB  # the Session's default guest memory
@pytest.fixture
def qemu_log() -> Iterator[QemuLog]:
    q = QemuLog(MEM)
    yield q
    q.close()


def echo_once(s: Session, q: DriverQueue, data: bytes = b"x" * 100) -> tuple[int, int]:
    """One echo request whose source and destination have pages of their own; (src, dst)."""
    src = s.mem.alloc(PAGE, PAGE)
    dst = s.mem.alloc(PAGE, PAGE)
    s.mem.write(src, data)
    s.mem.alloc(PAGE, PAGE)  # a guard page, so nothing else shares dst's page
    head = s.fe.submit(q, [(src, len(data), False), (dst, len(data), True)])
    assert q.wait_used(1, WAIT) == [(head, len(data))]
    return src, dst


def start_logging(s: Session, ql: QemuLog, **kw: object) -> bytes:
    reply = s.fe.set_log_base(ql.fd, ql.size)
    s.fe.set_logging(True, **kw)  # type: ignore[arg-type]
    return reply


# ---------------------------------------------------------------- negotiation
def test_log_all_and_log_shmfd_are_offered(serve) -> None:
    running = serve(EchoDevice())
    with session(running.path) as s:
        assert s.fe.get_u64(Request.GET_FEATURES) & m.VHOST_F_LOG_ALL
        assert s.fe.get_u64(Request.GET_PROTOCOL_FEATURES) & ProtocolFeature.LOG_SHMFD


def test_set_log_base_is_answered(serve, qemu_log: QemuLog) -> None:
    """QEMU 7.2 waits for a reply to SET_LOG_BASE once LOG_SHMFD is negotiated."""
    running = serve(EchoDevice())
    with session(running.path) as s:
        s.start()
        s.fe.send(Request.SET_LOG_BASE, m.log_base(qemu_log.size, 0), [qemu_log.fd])
        code, flags, payload = s.fe.recv()
        assert code == Request.SET_LOG_BASE and flags == m.VERSION | m.FLAG_REPLY
        assert payload == m.u64(0)
        handler = running.daemon.handler
        mapped = handler.dirty_logging.log
        assert mapped is not None and mapped.pages == qemu_log.size * 8
        assert not handler.logging  # no LOG_ALL yet


@pytest.mark.parametrize("case", ["no-log-shmfd", "log-past-the-fd", "odd-size"])
def test_bad_set_log_base_ends_the_connection(serve, qemu_log: QemuLog, case: str) -> None:
    """A SET_LOG_BASE we cannot honour has no reply we could send: the frontend would wait
    for it, or migrate without a log.  The connection ends; the daemon lives on."""
    running = serve(EchoDevice())
    with session(running.path) as s:
        if case == "no-log-shmfd":
            s.start(protocol=ProtocolFeature(int(s.fe.get_u64(
                Request.GET_PROTOCOL_FEATURES)) & ~ProtocolFeature.LOG_SHMFD))
            size = qemu_log.size
        else:
            s.start()
            size = qemu_log.size + 8 if case == "log-past-the-fd" else 12
        s.fe.send(Request.SET_LOG_BASE, m.log_base(size, 0), [qemu_log.fd])
        assert_closed_by_peer(s.fe)
    assert_fresh_frontend_works(running)


def test_unknown_vring_address_flags_are_refused(serve, caplog) -> None:
    running = serve(EchoDevice())
    with session(running.path) as s:
        s.start()
        payload = m.VringAddr.build({"index": 0, "flags": 2, "desc_user_addr": 0,
                                     "used_user_addr": 0, "avail_user_addr": 0,
                                     "log_guest_addr": 0})
        assert_refused(s.fe, caplog, Request.SET_VRING_ADDR, payload)


# ---------------------------------------------------------------- what gets marked
@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_writes_are_marked_while_logging(serve, qemu_log: QemuLog, event_idx: bool) -> None:
    running = serve(EchoDevice())
    with session(running.path) as s:
        offered = s.fe.get_u64(Request.GET_FEATURES)
        features = offered if event_idx else offered & ~int(VirtioFeature.RING_EVENT_IDX)
        s.start(features=features)
        q = s.queue(0, 16)
        echo_once(s, q)  # before logging: nothing is marked anywhere
        assert qemu_log.take() == set()
        start_logging(s, qemu_log)
        handler = running.daemon.handler
        assert handler.logging
        qemu_log.take()  # QEMU's first pass sends everything anyway
        src, dst = echo_once(s, q)
        marked = qemu_log.take()
        used_pages = pages(q.used, 6 + 8 * q.size)
        assert pages(dst, 100) <= marked  # the device's write
        assert marked & used_pages  # the used entry and used.idx
        assert marked <= pages(dst, 100) | used_pages, "marked pages the backend never wrote"
        assert src // PAGE not in marked  # only read by the backend
        assert handler.pages_marked >= 2

        s.fe.set_logging(False)  # migration done or cancelled
        assert not handler.logging
        qemu_log.take()
        echo_once(s, q)
        assert qemu_log.take() == set()


def test_used_entry_and_index_pages_are_marked(serve, qemu_log: QemuLog) -> None:
    """A 1024-entry used ring spans three pages: the entry written (slot 600, in the middle
    page), used.idx (first page) and avail_event (last page) are each marked."""
    running = serve(EchoDevice())
    with session(running.path) as s:
        s.start()
        q = s.queue(0, 1024, base=600)
        start_logging(s, qemu_log)
        qemu_log.take()
        _, dst = echo_once(s, q)
        marked = qemu_log.take()
        elem_page = (q.used + 4 + 8 * 600) // PAGE
        idx_page = (q.used + 2) // PAGE
        event_page = (q.used + 4 + 8 * 1024) // PAGE
        assert len({elem_page, idx_page, event_page}) == 3
        assert {elem_page, idx_page, event_page} <= marked
        assert marked == {elem_page, idx_page, event_page} | pages(dst, 100)


def test_used_ring_is_logged_at_its_log_address(serve, qemu_log: QemuLog) -> None:
    """VHOST_VRING_F_LOG: the used ring's writes are logged at log_guest_addr, as QEMU says."""
    running = serve(EchoDevice())
    with session(running.path) as s:
        s.start()
        q = s.queue(0, 16)
        elsewhere = 3 * MiB
        start_logging(s, qemu_log, log_addrs={0: elsewhere})
        qemu_log.take()
        _, dst = echo_once(s, q)
        marked = qemu_log.take()
        assert marked - pages(dst, 100) <= pages(elsewhere, 6 + 8 * q.size)
        assert marked & pages(elsewhere, 6 + 8 * q.size)
        assert not marked & pages(q.used, 6 + 8 * q.size)


def test_log_fd_is_signalled(serve, qemu_log: QemuLog) -> None:
    running = serve(EchoDevice())
    with session(running.path) as s:
        s.start()
        q = s.queue(0, 16)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            s.fe.checked(Request.SET_LOG_FD, b"", [call])
            start_logging(s, qemu_log)
            echo_once(s, q)
            assert wait_readable(call)
            assert struct.unpack("<Q", os.read(call, 8))[0] >= 1
        finally:
            os.close(call)


def test_new_log_while_running(serve, qemu_log: QemuLog) -> None:
    """QEMU resizes the log (memory hot-plug) with logging on: marks move to the new log and
    the old mapping is dropped once no worker can use it."""
    running = serve(EchoDevice())
    with session(running.path) as s:
        s.start()
        q = s.queue(0, 16)
        start_logging(s, qemu_log)
        handler = running.daemon.handler
        first = handler.dirty_logging.log
        echo_once(s, q)
        second = QemuLog(2 * MEM)
        try:
            assert s.fe.set_log_base(second.fd, second.size) == m.u64(0)
            assert handler.dirty_logging.log is not first and first.closed
            assert handler.dirty_logging.retired == []
            qemu_log.take()
            _, dst = echo_once(s, q)
            assert pages(dst, 100) <= second.take()
            assert qemu_log.take() == set()
        finally:
            second.close()


def test_queue_restarted_while_logging_keeps_logging(serve, qemu_log: QemuLog) -> None:
    running = serve(EchoDevice())
    with session(running.path) as s:
        s.start()
        q = s.queue(0, 16)
        start_logging(s, qemu_log)
        echo_once(s, q)
        base = s.fe.get_vring_base(0)
        s.fe.restart_queue(q, base)
        qemu_log.take()
        _, dst = echo_once(s, q)
        assert pages(dst, 100) <= qemu_log.take()


def test_two_queues_mark_while_qemu_clears(serve, qemu_log: QemuLog) -> None:
    """Two workers mark the log while the test takes bits as QEMU's sync does: every page a
    request wrote is seen by some sync."""
    running = serve(EchoDevice(num_queues=2, asynchronous=True, delay=0.0))
    with session(running.path) as s:
        s.start()
        queues = [s.queue(i, 64) for i in range(2)]
        start_logging(s, qemu_log)
        qemu_log.take()
        taken: set[int] = set()
        stop = threading.Event()

        def sync() -> None:
            while not stop.is_set():
                taken.update(qemu_log.take())

        syncer = threading.Thread(target=sync)
        syncer.start()
        expected: set[int] = set()
        try:
            for _ in range(20):
                heads = []
                for q in queues:
                    for _ in range(4):
                        src = s.mem.alloc(PAGE, PAGE)
                        dst = s.mem.alloc(PAGE, PAGE)
                        s.mem.write(src, b"y" * 64)
                        heads.append((q, s.fe.submit(q, [(src, 64, False), (dst, 64, True)])))
                        expected |= pages(dst, 64)
                for q in queues:
                    assert len(q.wait_used(4, WAIT)) == 4
        finally:
            stop.set()
            syncer.join(10)
        taken.update(qemu_log.take())
        assert expected - taken == set()
        assert running.daemon.handler.pages_marked >= len(expected)


# ---------------------------------------------------------------- the ring, sans IO
class _Recorder:
    """Stands in for a DirtyMarker: what the ring records, commits and marks, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []

    def record(self, gpa: int, length: int) -> None:
        self.events.append(("record", gpa, length))

    def commit(self) -> None:
        self.events.append(("commit", 0, 0))

    def mark(self, gpa: int, length: int) -> None:
        self.events.append(("mark", gpa, length))


def test_used_entries_across_the_ring_end_are_recorded_before_used_idx() -> None:
    """Four completions from slot 6 of an 8-entry ring wrap: two ranges recorded, committed,
    then used.idx stored and marked (in that order: the entries are marked before the index
    that publishes them)."""
    mem = GuestMemory.anonymous(1 << 20)
    addrs = RingAddresses(0x1000, 0x2000, 0x3000)
    drv = DriverRing(mem, 8, addrs, event_idx=True)
    drv.start_at(6)
    vq = SplitQueue(mem, 8, addrs, int(VirtioFeature.RING_EVENT_IDX), next_avail=6)
    try:
        for i in range(4):
            drv.write_desc(i, 0x10000 + i * PAGE, 1, VIRTQ_DESC_F_WRITE)
        drv.publish(0, 1, 2, 3)
        chains = vq.pop_batch()
        for chain in chains:
            vq.add_used(chain.head, 1)
        recorder = _Recorder()
        vq.dirty = recorder  # type: ignore[assignment]
        used_idx_at_commit: list[int] = []
        real_commit = recorder.commit

        def commit() -> None:
            used_idx_at_commit.append(drv.used_idx())
            real_commit()

        recorder.commit = commit  # type: ignore[method-assign]
        vq.publish_used()
        assert recorder.events == [
            ("record", 0x3000 + 4 + 8 * 6, 16),  # slots 6, 7
            ("record", 0x3000 + 4, 16),  # slots 0, 1
            ("commit", 0, 0),
            ("mark", 0x3000 + 2, 2),  # used.idx, after its store
        ]
        assert used_idx_at_commit == [6]  # not yet published when the entries were marked
        assert drv.used_idx() == 10
        vq.used_log_addr = 0x8000  # VHOST_VRING_F_LOG's address
        recorder.events.clear()
        vq.enable_notifications()
        assert recorder.events == [("record", 0x8000 + 4 + 8 * 8, 2)]  # avail_event
    finally:
        drv.release()
        vq.release()
        mem.close()


# ---------------------------------------------------------------- quiescence
def test_quiesce_waits_for_the_pass_in_progress(serve) -> None:
    """QueueWorker.quiesce: an idle worker is woken and passes at once; one inside a pass (a
    device blocked in submit) is waited for -- False at the deadline, True once it finishes."""
    device = GateDevice()
    running = serve(device)
    with session(running.path) as s:
        s.start()
        q = s.queue(0, 16)
        worker = running.daemon.handler.vrings[0].worker
        assert worker.quiesce(timeout=WAIT)  # idle: woken, one pass
        src, dst = s.mem.alloc(16), s.mem.alloc(16)
        s.mem.write(src, b"z" * 16)
        s.fe.submit(q, [(src, 16, False), (dst, 16, True)])
        assert device.entered.wait(WAIT)  # the worker is inside a pass now
        assert not worker.quiesce(timeout=0.2)
        done = []
        waiter = threading.Thread(target=lambda: done.append(worker.quiesce(timeout=WAIT)))
        waiter.start()
        device.gate.set()
        waiter.join(WAIT + 1)
        assert done == [True]
        assert len(q.wait_used(1, WAIT)) == 1
