"""Live migration with queues in processes of their own: the dirty log reaches every queue
process (vhost.runner.pool forwards it, vhost.runner.process runs vhost.dirty_logging on it),
and the
pages marked are the ones a threaded server marks for the same requests.

Each test drives a real server (daemon thread here, queue processes spawned by it) through the
project's vhost-user frontend, with a log QEMU would hand over mapped here to read and clear.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Iterator

import pytest

from tests.qemu_log import PAGE, QemuLog, pages, pieces_pages
from tests.unit.blk.conftest import BlkEnv, MakeBlk
from tests.unit.blk.test_dirty_log import MEM
from tests.unit.blk.test_queue_processes import _proc, _wait
from vhost.messages import VHOST_F_LOG_ALL, ProtocolFeature, Request, vring_state
from vhost.runner.pool import ProcessRunner, QueueProcessWorker
from vhost_frontend import DriverQueue
from vhost_frontend.blk import T_GET_ID, T_IN, T_OUT, BlkDriver
from vhost_frontend.packed import PackedDriverQueue


@pytest.fixture
def qlog() -> Iterator[QemuLog]:
    q = QemuLog(MEM)
    yield q
    q.close()


def two_queues_logging(make_blk: MakeBlk, qlog: QemuLog,
                       processes: bool) -> tuple[BlkEnv, BlkDriver, DriverQueue]:
    """Two queues, logging on (queue 0 running when it was switched on, queue 1 started
    after); the marks made while switching are taken."""
    env = make_blk(num_queues=2, queue_processes=processes, serial="migrate-me")
    assert env.frontend.set_log_base(qlog.fd, qlog.size) == b"\0" * 8
    env.frontend.set_logging(True)
    q1 = env.frontend.setup_queue(1, size=64)
    drv1 = BlkDriver(env.frontend, q1, env.mem)
    handler = env.daemon.daemon.handler
    assert handler is not None
    assert isinstance(handler.vrings[1].worker, QueueProcessWorker) == processes
    qlog.take()
    return env, drv1, q1


def workload(drivers: list[BlkDriver]) -> set[int]:
    """Reads (one run; bounced pieces split mid-sector), GET_ID, a write, on every queue:
    the guest pages the backend must mark (data it wrote, status bytes, the ID string)."""
    expected: set[int] = set()
    for drv in drivers:
        requests = [
            drv.start(T_IN, 8, in_len=3 * PAGE),
            drv.start(T_IN, 0, in_len=PAGE,
                      in_pieces=drv.pieces([1000, 3000, 96], offsets=[100, 0, 4050])),
            drv.start(T_GET_ID, 0, in_len=20),
            drv.start(T_OUT, 0, out=b"w" * 8192),
        ]
        for pending in requests:
            assert drv.wait([pending])[0].status == 0
            expected |= pieces_pages(pending.writable)
    return expected


def ring_pages(*queues: DriverQueue | PackedDriverQueue) -> set[int]:
    out: set[int] = set()
    for q in queues:
        assert isinstance(q, DriverQueue), "split rings here"
        out |= pages(q.used, 6 + 8 * q.size)
    return out


def refresh(env: BlkEnv) -> None:
    """Read what every queue process published (its counters and marks, written to shared
    memory as they are made)."""
    handler = env.daemon.daemon.handler
    assert handler is not None and isinstance(handler.runner, ProcessRunner)
    handler.runner.refresh_counters()


def test_migration_is_offered_with_queue_processes(make_blk: MakeBlk) -> None:
    env = make_blk(num_queues=2)
    assert isinstance(_proc(env, 0), QueueProcessWorker)
    assert env.frontend.get_u64(Request.GET_FEATURES) & VHOST_F_LOG_ALL
    assert env.frontend.get_u64(Request.GET_PROTOCOL_FEATURES) & ProtocolFeature.LOG_SHMFD


def test_processes_mark_what_threads_mark(make_blk: MakeBlk) -> None:
    """The same requests on two queues mark the same pages with queue processes as with
    threads: every page the backend wrote, and nothing but those and the used rings."""
    marked: dict[bool, set[int]] = {}
    for processes in (False, True):
        qlog = QemuLog(MEM)
        try:
            env, drv1, q1 = two_queues_logging(make_blk, qlog, processes)
            expected = workload([env.drv, drv1])
            marked[processes] = got = qlog.take()
            assert expected <= got, f"pages written but not marked: {expected - got}"
            assert got <= expected | ring_pages(env.queue, q1)
            assert got & ring_pages(q1) and got & ring_pages(env.queue)
            handler = env.daemon.daemon.handler
            assert handler is not None and handler.logging
            if processes:
                refresh(env)
                assert all(_proc(env, i).remote_log.logging for i in (0, 1))
            assert handler.pages_marked >= len(got)
            env.frontend.close()
            _wait(lambda: env.daemon.daemon.handler is None, "the disconnect")  # noqa: B023
        finally:
            qlog.close()
    assert marked[True] == marked[False]


def test_pages_marked_are_summed_across_processes(make_blk: MakeBlk, qlog: QemuLog,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    env, drv1, _ = two_queues_logging(make_blk, qlog, processes=True)
    workload([env.drv])
    refresh(env)
    handler = env.daemon.daemon.handler
    assert handler is not None
    only_q0 = handler.pages_marked
    assert only_q0 > 0 and _proc(env, 1).remote_log.pages < only_q0
    workload([drv1])
    refresh(env)
    per_process = [_proc(env, i).remote_log.pages for i in (0, 1)]
    assert all(per_process)
    total = handler.pages_marked
    assert total == sum(per_process)
    # Stopped queues hand their final counts over; the connection's total goes on the log.
    # Only a used ring's pages may be marked after the refresh: a pass that found nothing new
    # (a late wake-up) re-enables notifications, and that avail_event / used-flags write is
    # committed to the log at the next publish -- at the latest the stop's.  Each ring's used
    # area spans at most two pages; anything more (counts handed over twice) is a bug, as is
    # anything less (counts lost at the stop).
    env.frontend.get_vring_base(0)
    env.frontend.get_vring_base(1)
    final = handler.pages_marked
    assert total <= final <= total + 2 * 2, (total, final)
    with caplog.at_level(logging.INFO, logger="vhost.dirty_logging"):
        env.frontend.close()
        _wait(lambda: env.daemon.daemon.handler is None, "the disconnect")
    closed = [int(n) for n in re.findall(r"dirty log closed: (\d+) pages marked", caplog.text)]
    assert closed == [final]


def test_logging_off_and_on_again_reaches_the_processes(make_blk: MakeBlk,
                                                        qlog: QemuLog) -> None:
    """Migration cancelled (LOG_ALL off with the queues running), then started again."""
    env, drv1, q1 = two_queues_logging(make_blk, qlog, processes=True)
    handler = env.daemon.daemon.handler
    assert handler is not None
    env.frontend.set_logging(False)
    assert not handler.logging
    assert not any(_proc(env, i).remote_log.logging for i in (0, 1))
    qlog.take()
    workload([env.drv, drv1])
    assert qlog.take() == set()
    env.frontend.set_logging(True)
    assert handler.logging
    qlog.take()
    expected = workload([env.drv, drv1])
    got = qlog.take()
    assert expected <= got <= expected | ring_pages(env.queue, q1)


def test_a_new_log_base_replaces_the_old_log(make_blk: MakeBlk, qlog: QemuLog) -> None:
    """QEMU hands over a bigger log (memory hot-plug) mid-migration: every queue process marks
    the new one from the reply on, and never the old one again."""
    env, drv1, q1 = two_queues_logging(make_blk, qlog, processes=True)
    workload([env.drv, drv1])
    new = QemuLog(MEM)
    try:
        assert env.frontend.set_log_base(new.fd, new.size) == b"\0" * 8
        qlog.take()
        new.take()
        expected = workload([env.drv, drv1])
        assert qlog.take() == set()
        got = new.take()
        assert expected <= got <= expected | ring_pages(env.queue, q1)
        # A queue process started now gets the new log with its start.
        env.frontend.restart_queue(q1, env.frontend.get_vring_base(1))
        new.take()
        expected = workload([drv1])
        assert qlog.take() == set()
        assert expected <= new.take()
    finally:
        new.close()


def test_a_queue_process_started_later_gets_the_log(make_blk: MakeBlk, qlog: QemuLog) -> None:
    env, drv1, q1 = two_queues_logging(make_blk, qlog, processes=True)
    old_pid = _proc(env, 1).proc.pid  # type: ignore[union-attr]
    base = env.frontend.get_vring_base(1)
    assert base == 0
    env.frontend.restart_queue(q1, base)
    assert _proc(env, 1).proc.pid != old_pid  # type: ignore[union-attr]
    qlog.take()
    expected = workload([drv1])
    got = qlog.take()
    assert expected <= got <= expected | ring_pages(q1)


def test_a_dead_queue_process_while_logging_breaks_only_its_queue(make_blk: MakeBlk,
                                                                  qlog: QemuLog) -> None:
    env, drv1, q1 = two_queues_logging(make_blk, qlog, processes=True)
    workload([drv1])
    refresh(env)
    worker = _proc(env, 1)
    marked_by_1 = worker.remote_log.pages
    assert marked_by_1 > 0
    assert worker.proc is not None
    os.kill(worker.proc.pid, signal.SIGKILL)
    _wait(q1.err_signalled, "the err eventfd of queue 1")
    qlog.take()
    expected = workload([env.drv])  # the other queue goes on, and goes on marking
    assert expected <= qlog.take()
    handler = env.daemon.daemon.handler
    assert handler is not None
    env.frontend.get_vring_base(1)
    refresh(env)
    assert handler.pages_marked >= marked_by_1 + _proc(env, 0).remote_log.pages


def test_stopping_processes_while_logging_flushes_the_disk(make_blk: MakeBlk, qlog: QemuLog,
                                                           fdatasync_calls: list[int]) -> None:
    """The end of a migration: the last logged queue process stops, the control process
    makes what the queues completed durable before the destination runs the guest."""
    env, drv1, _ = two_queues_logging(make_blk, qlog, processes=True)
    workload([env.drv, drv1])
    before = len(fdatasync_calls)
    env.frontend.get_vring_base(0)
    assert len(fdatasync_calls) == before  # one queue still runs
    env.frontend.get_vring_base(1)
    assert fdatasync_calls[before:] == [env.disk.fd]


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_disabling_the_rings_while_logging_flushes_the_disk(
        make_blk: MakeBlk, qlog: QemuLog, fdatasync_calls: list[int], processes: bool) -> None:
    """QEMU 7.2 stops a vhost-user device by disabling its rings (SET_VRING_ENABLE 0) before
    GET_VRING_BASE: the end of a migration is seen there too."""
    env, drv1, _ = two_queues_logging(make_blk, qlog, processes)
    workload([env.drv, drv1])
    before = len(fdatasync_calls)
    for index in (0, 1):
        env.frontend.checked(Request.SET_VRING_ENABLE, vring_state(index, 0))
    assert fdatasync_calls[before:] == [env.disk.fd]
    env.frontend.get_vring_base(0)
    env.frontend.get_vring_base(1)
    assert fdatasync_calls[before:] == [env.disk.fd]  # once
