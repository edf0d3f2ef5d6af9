"""Requests to a queue process and their replies (vhost.runner.pool, vhost.runner.ipc), against a
fake queue process: a thread on the other end of the socketpair that answers late, out of
order or never; and the queue process's dispatch table (vhost.runner.process)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vhost.device import Device
from vhost.runner import ipc
from vhost.runner.base import Notifier, QueueKey
from vhost.runner.ipc import CounterBlock, receive, send
from vhost.runner.pool import ProcessRunner, QueueProcessError, QueueProcessWorker

Answer = Callable[[ipc.Message, socket.socket], None]
KEY = QueueKey(0, 0)


class FakeProcess:
    """Answers each request with ``answer(msg, sock)`` on its own thread."""

    def __init__(self, answer: Answer) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.answer = answer
        self.seen: list[ipc.Message] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                msg, fds = receive(self.theirs)
            except (EOFError, OSError):
                return
            for fd in fds:
                os.close(fd)
            self.seen.append(msg)
            self.answer(msg, self.theirs)

    def close(self) -> None:
        self.theirs.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)
        self.theirs.close()


class _NoDevice(Device):
    """Only what ProcessRunner touches of a device."""

    def features(self) -> int:
        return 0

    def config(self) -> bytes:
        return b""

    def create_handler(self, queue_index: int, memory: Any) -> Any:
        raise NotImplementedError


@pytest.fixture
def fake_worker() -> Iterator[Callable[[Answer], tuple[QueueProcessWorker, FakeProcess]]]:
    made: list[tuple[QueueProcessWorker, FakeProcess]] = []

    def make(answer: Answer) -> tuple[QueueProcessWorker, FakeProcess]:
        fake = FakeProcess(answer)
        worker = QueueProcessWorker(KEY, Notifier(), Notifier(), _NoDevice())
        worker.attach(fake.ours)
        worker.start_reader()
        made.append((worker, fake))
        return worker, fake

    yield make
    for worker, fake in made:
        worker.stopping = True
        fake.close()
        worker._reap()


def _late_first(delay: threading.Event, first: type[ipc.Reply] = ipc.Ack) -> Answer:
    """Answer the first request (with a ``first``) only once ``delay`` is set (after it timed
    out), the others at once (Ack); an Error's ``why`` names the request's type."""

    def answer(msg: ipc.Message, sock: socket.socket) -> None:
        if msg.seq == 1:
            assert delay.wait(10)
        kind = first if msg.seq == 1 else ipc.Ack
        if kind is ipc.Error:
            send(sock, ipc.Error(seq=msg.seq, why="late"))
        else:
            send(sock, ipc.Ack(seq=msg.seq, dirty=(False, msg.seq)))

    return answer


def test_a_late_reply_is_not_taken_for_the_next_request(fake_worker, caplog) -> None:
    release = threading.Event()
    worker, _fake = fake_worker(_late_first(release))
    with pytest.raises(QueueProcessError, match="no answer to mem_table"):
        worker.request(ipc.MemTable(key=KEY, regions=[]), timeout=0.2)
    release.set()  # request 1's reply arrives now, after its timeout ...
    second = worker.request(ipc.LogBase(key=KEY, size=4096, offset=0), timeout=5)
    assert isinstance(second, ipc.Ack) and second.seq == 2  # ... and is not taken as request 2's
    third = worker.request(ipc.Features(key=KEY, features=0), timeout=5)
    assert isinstance(third, ipc.Ack) and third.seq == 3
    assert any("dropped a reply nobody waits for (request 1" in r.message for r in caplog.records)


def test_replies_out_of_order_reach_their_own_requests(fake_worker) -> None:
    """Two requests in flight at once (the control thread and a diagnostics query), answered
    in the opposite order: each waiter gets the reply with its own number."""
    both_sent = threading.Barrier(2, timeout=10)
    held: list[ipc.Message] = []

    def answer(msg: ipc.Message, sock: socket.socket) -> None:
        held.append(msg)
        if len(held) < 2:
            return
        for m in reversed(held):  # the second request's reply first
            if isinstance(m, ipc.RingState):
                send(sock, ipc.RingStateReply(seq=m.seq, state={"next_avail": 7}))
            else:
                send(sock, ipc.Ack(seq=m.seq))

    worker, _fake = fake_worker(answer)
    got: dict[str, ipc.Reply] = {}

    def ask(name: str, msg: ipc.Request) -> None:
        both_sent.wait()
        got[name] = worker.request(msg, timeout=5)

    threads = [threading.Thread(target=ask, args=("features", ipc.Features(key=KEY,
                                                                            features=1))),
               threading.Thread(target=ask, args=("ring", ipc.RingState(key=KEY)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert isinstance(got["features"], ipc.Ack)
    assert isinstance(got["ring"], ipc.RingStateReply) and got["ring"].state == {"next_avail": 7}
    assert got["features"].seq != got["ring"].seq


def test_replies_match_by_number_not_by_arrival() -> None:
    """The matcher alone: a reply for number 2 arriving while 1 and 2 wait goes to 2; one for
    a number nobody waits for goes to nobody."""
    replies = ipc.Replies("test")
    one, two = replies.expect(), replies.expect()
    assert replies.deliver(ipc.Error(seq=two, why="two"))
    assert not replies.deliver(ipc.Error(seq=99, why="stray"))
    assert replies.wait(one, 0.05) is None
    got = replies.wait(two, 1)
    assert isinstance(got, ipc.Error) and got.why == "two"


def test_a_timed_out_log_base_is_a_failure_not_an_acknowledgement(fake_worker) -> None:
    """SET_LOG_BASE is answered only once every process has mapped the log: a process that
    did not answer in time makes it fail (and the late answer does not acknowledge the
    next one)."""
    release = threading.Event()
    worker, fake = fake_worker(_late_first(release, first=ipc.Error))
    runner = ProcessRunner(_NoDevice())
    runner.workers[KEY] = worker
    log_fd = os.memfd_create("log")
    try:
        os.ftruncate(log_fd, 4096)
        worker.reply_timeout = 0.2
        with pytest.raises(QueueProcessError, match="did not map the dirty log"):
            runner.set_log_base(0, log_fd, 4096, 0)
        release.set()
        worker.reply_timeout = 5.0
        runner.set_log_base(0, log_fd, 4096, 0)  # answered by its own ack, not the late refusal
        kinds = [(m.seq, type(m).__name__, getattr(m, "key", None)) for m in fake.seen]
        assert kinds == [(1, "LogBase", KEY), (2, "LogBase", KEY)]
    finally:
        os.close(log_fd)
        runner.workers.clear()
        runner.close()


def test_a_broadcast_goes_to_its_connection_only(fake_worker) -> None:
    """Queues are keyed by (connection, index): a memory table of connection 0 is not sent to
    a process running a queue of connection 1."""
    worker0, fake0 = fake_worker(lambda msg, sock: send(sock, ipc.Ack(seq=msg.seq)))
    worker1, fake1 = fake_worker(lambda msg, sock: send(sock, ipc.Ack(seq=msg.seq)))
    runner = ProcessRunner(_NoDevice())
    runner.workers[QueueKey(0, 1)] = worker0
    runner.workers[QueueKey(1, 1)] = worker1
    try:
        runner.set_features(0, 5)
        assert [(type(m), getattr(m, "key", None)) for m in fake0.seen] == \
            [(ipc.Features, QueueKey(0, 1))]
        assert fake1.seen == []
    finally:
        runner.workers.clear()
        runner.close()


def test_only_typed_requests_are_sent() -> None:
    worker = QueueProcessWorker(KEY, Notifier(), Notifier(), _NoDevice())
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker.attach(ours)
    try:
        with pytest.raises(TypeError):
            worker.request({"kind": "mem_table"})  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            send(ours, {"kind": "ack", "seq": 1})  # type: ignore[arg-type]
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(1)  # nothing was sent
    finally:
        ours.close()
        theirs.close()


def test_receive_refuses_what_is_not_a_message() -> None:
    """A datagram that unpickles to something else (the old dict messages, say) is refused,
    and its fds are closed, not leaked."""
    import pickle

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = os.eventfd(0)
    try:
        socket.send_fds(ours, [pickle.dumps({"seq": 1, "kind": "ack"})], [fd])
        with pytest.raises(ValueError, match="not a queue process message: dict"):
            receive(theirs)
        fds_before = set(os.listdir("/proc/self/fd"))
        send(ours, ipc.Ack(seq=3), [fd])
        msg, fds = receive(theirs)
        assert msg == ipc.Ack(seq=3) and len(fds) == 1
        os.close(fds[0])
        assert set(os.listdir("/proc/self/fd")) == fds_before
    finally:
        os.close(fd)
        ours.close()
        theirs.close()


def test_the_queue_process_serves_every_request_type() -> None:
    """Each request a control process can send has its handler in the queue process's table
    (Start and Stop are the two the serving loop itself takes)."""
    from vhost.runner.process import DISPATCH

    def subclasses(cls: type) -> set[type]:
        out: set[type] = set()
        sub: type
        for sub in cls.__subclasses__():
            out |= {sub} | subclasses(sub)
        return out

    assert DISPATCH.kinds == subclasses(ipc.Request) - {ipc.Start, ipc.Stop}


def test_dispatch_runs_the_handler_of_the_exact_type() -> None:
    table: ipc.DispatchTable[list[str]] = ipc.DispatchTable()

    @table.on(ipc.Features)
    def _features(target: list[str], msg: ipc.Features, fds: list[int]) -> None:
        target.append(f"features {msg.features}")

    @table.on(ipc.LogAddr)
    def _log_addr(target: list[str], msg: ipc.LogAddr, fds: list[int]) -> ipc.Reply:
        target.append(f"log_addr {msg.log_addr}")
        return ipc.Error(seq=msg.seq, why="x")

    seen: list[str] = []
    assert table.dispatch(seen, ipc.Features(key=KEY, features=3), []) is None
    assert table.dispatch(seen, ipc.LogAddr(key=KEY, log_addr=8, seq=4), []) == \
        ipc.Error(seq=4, why="x")
    assert seen == ["features 3", "log_addr 8"]
    fd = os.eventfd(0)
    with pytest.raises(KeyError, match="no handler for LogFd"):
        table.dispatch(seen, ipc.LogFd(key=KEY), [fd])
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the refusal
    with pytest.raises(ValueError, match="two handlers"):
        table.on(ipc.Features)(_features)


def test_a_queue_process_refuses_what_it_cannot_serve() -> None:
    """A request for another queue, or of a type without a handler, gets an Error with its
    number (the control process then reports the refusal), never an Ack."""
    from vhost.runner.process import QueueProcess

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = QueueProcess(theirs)
    proc.key = KEY
    try:
        other = proc.answer(ipc.Features(key=QueueKey(1, 0), features=0, seq=5), [])
        assert isinstance(other, ipc.Error) and other.seq == 5 and "not this process" in other.why
        stray = proc.answer(ipc.Ack(seq=6), [])
        assert isinstance(stray, ipc.Error) and stray.seq == 6
        ok = proc.answer(ipc.Features(key=KEY, features=0, seq=7), [])
        assert isinstance(ok, ipc.Ack) and ok.seq == 7
    finally:
        os.close(proc.ended_fd)
        ours.close()
        theirs.close()


def test_counter_block_round_trip() -> None:
    block, fd = CounterBlock.create(5)
    reader = CounterBlock(fd, 5)
    os.close(fd)
    try:
        assert reader.read() is not None
        block.publish(7, 2, True, 3, [1, 2, 3, 4, 2**64 - 1])
        snap = reader.read()
        assert snap is not None
        assert (snap.next_avail, snap.in_flight, snap.dirty_logging, snap.dirty_pages) == \
            (7, 2, True, 3)
        assert snap.values == (1, 2, 3, 4, 2**64 - 1)
    finally:
        reader.close()
        block.close()
