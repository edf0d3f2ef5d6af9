"""Requests to a queue process and their replies (vhost.runner.pool, vhost.runner.ipc), against a
fake queue process: a thread on the other end of the socketpair that answers late or never."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vhost.device import Device
from vhost.runner.ipc import CounterBlock, receive, reply, send
from vhost.runner.pool import QueueProcessError, QueueProcesses, QueueProcessWorker
from vhost.runner.thread import Notifier

Answer = Callable[[dict[str, Any], socket.socket], None]


class FakeProcess:
    """Answers each request with ``answer(msg, sock)`` on its own thread."""

    def __init__(self, answer: Answer) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.answer = answer
        self.seen: list[dict[str, Any]] = []
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
    """Only what QueueProcesses touches of a device."""

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
        worker = QueueProcessWorker(0, Notifier(), Notifier(), _NoDevice())
        worker.attach(fake.ours)
        worker.start_reader()
        made.append((worker, fake))
        return worker, fake

    yield make
    for worker, fake in made:
        worker.stopping = True
        fake.close()
        worker._reap()


def _late_first(delay: threading.Event, first: str = "ack") -> Answer:
    """Answer the first request (with ``first``) only once ``delay`` is set (after it timed
    out), the others at once (``ack``)."""

    def answer(msg: dict[str, Any], sock: socket.socket) -> None:
        if msg["seq"] == 1:
            assert delay.wait(10)
            send(sock, reply(msg, first, echo=msg.get("tag"), why="late"))
            return
        send(sock, reply(msg, "ack", echo=msg.get("tag")))

    return answer


def test_a_late_reply_is_not_taken_for_the_next_request(fake_worker, caplog) -> None:
    release = threading.Event()
    worker, _fake = fake_worker(_late_first(release))
    with pytest.raises(QueueProcessError, match="no answer to mem_table"):
        worker.request({"kind": "mem_table", "tag": "first"}, timeout=0.2)
    release.set()  # request 1's reply arrives now, after its timeout ...
    second = worker.request({"kind": "log_base", "tag": "second"}, timeout=5)
    assert second["echo"] == "second"  # ... and is not taken as request 2's
    assert second["seq"] == 2
    third = worker.request({"kind": "features", "tag": "third"}, timeout=5)
    assert third["echo"] == "third"
    assert any("dropped a reply nobody waits for (request 1" in r.message for r in caplog.records)


def test_a_timed_out_log_base_is_a_failure_not_an_acknowledgement(fake_worker) -> None:
    """SET_LOG_BASE is answered only once every process has mapped the log: a process that
    did not answer in time makes it fail (and the late answer does not acknowledge the
    next one)."""
    release = threading.Event()
    worker, fake = fake_worker(_late_first(release, first="error"))
    pool = QueueProcesses(_NoDevice())
    pool.workers[0] = worker
    log_fd = os.memfd_create("log")
    try:
        os.ftruncate(log_fd, 4096)
        worker.reply_timeout = 0.2
        with pytest.raises(QueueProcessError, match="did not map the dirty log"):
            pool.set_log_base(log_fd, 4096, 0)
        release.set()
        worker.reply_timeout = 5.0
        pool.set_log_base(log_fd, 4096, 0)  # answered by its own ack, not the late refusal
        kinds = [(m["seq"], m["kind"]) for m in fake.seen]
        assert kinds == [(1, "log_base"), (2, "log_base")]
    finally:
        os.close(log_fd)
        pool.workers.clear()
        pool.close()


def test_an_unknown_request_kind_is_refused_before_it_is_sent(fake_worker) -> None:
    worker, fake = fake_worker(lambda msg, sock: send(sock, reply(msg, "ack")))
    with pytest.raises(ValueError, match="unknown queue process request"):
        worker.request({"kind": "bogus"})
    assert fake.seen == []


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
