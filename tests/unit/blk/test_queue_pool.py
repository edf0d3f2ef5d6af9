"""Queues of several devices served by one shared pool of worker processes
(vhost.runner.workerpool, vhost.runner.poolworker).

Each test runs several servers (daemon threads in this process, one device each) whose devices
share one :class:`PoolRunner`, driven through the project's vhost-user frontend.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.unit.blk.conftest import BlkEnv, MakeBlk, MiB
from vhost.messages import Request
from vhost.runner.base import QueueKey
from vhost.runner.workerpool import PooledQueue, PoolRunner, default_workers
from vhost_frontend import Frontend, FrontendMemory
from vhost_frontend.blk import BlkDriver
from virtio_blk.request import Status


@pytest.fixture
def pool(make_blk: MakeBlk) -> Iterator[PoolRunner]:
    """Ended after the servers using it (make_blk's teardown runs later than this)."""
    runner = PoolRunner(workers=2)
    yield runner
    runner.close()


def _queue(env: BlkEnv, index: int) -> PooledQueue:
    handler = env.daemon.daemon.handler
    assert handler is not None
    worker = handler.vrings[index].worker
    assert isinstance(worker, PooledQueue), worker
    return worker


def _key(env: BlkEnv, index: int) -> QueueKey:
    return _queue(env, index).key


def _wait(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _two_queues(make_blk: MakeBlk, pool: PoolRunner, **kw: object) -> tuple[BlkEnv, BlkDriver]:
    env = make_blk(num_queues=2, queue_pool=pool, **kw)
    q1 = env.frontend.setup_queue(1, size=64)
    return env, BlkDriver(env.frontend, q1, env.mem)


def test_queues_of_several_devices_share_the_pool_processes(make_blk: MakeBlk,
                                                            pool: PoolRunner) -> None:
    envs = [_two_queues(make_blk, pool) for _ in range(3)]
    pids = {_queue(env, i).proc.pid for env, _ in envs for i in (0, 1)}
    assert len(pids) == 2 and os.getpid() not in pids  # 6 queues, 2 processes
    # Placement spreads each device's queues (the least-loaded worker gets the next one).
    assert all(_queue(env, 0).proc.pid != _queue(env, 1).proc.pid for env, _ in envs)
    for n, (env, drv1) in enumerate(envs):
        data = os.urandom(4096) + bytes([n]) * 4096
        assert env.drv.write(8, data).status == Status.OK
        assert drv1.read(8, 8192).data == data
        assert env.file(8 * 512, 8192) == data
        for i in range(n + 1):
            assert drv1.read(i * 8, 512).status == Status.OK
    for n, (env, _) in enumerate(envs):  # each device's counters are its own
        env.device.refresh_counters()
        assert (env.device.stats.writes, env.device.stats.reads) == (1, n + 2)
        assert env.device.queue_stats[1].reads == n + 2


def test_get_vring_base_stops_one_queue_and_the_worker_serves_on(make_blk: MakeBlk,
                                                                 pool: PoolRunner) -> None:
    a, a1 = _two_queues(make_blk, pool)
    b, b1 = _two_queues(make_blk, pool)
    assert _queue(a, 1).proc.pid == _queue(b, 1).proc.pid
    for i in range(7):
        assert a1.read(i, 512).status == Status.OK
    worker = _queue(a, 1).worker
    assert a.frontend.get_vring_base(1) == 7
    assert worker.alive  # the worker stays: it serves other queues
    assert b1.read(0, 512).status == Status.OK  # the other device's queue there serves on
    a.frontend.restart_queue(a1.queue, 7)  # placed again; continues where it stopped
    assert a1.read(0, 512).status == Status.OK
    assert a.frontend.get_vring_base(1) == 8


def test_a_dead_worker_stops_only_its_queues(make_blk: MakeBlk, pool: PoolRunner) -> None:
    a, a1 = _two_queues(make_blk, pool)
    b, b1 = _two_queues(make_blk, pool)
    assert a1.read(0, 512).status == Status.OK
    victim = _queue(a, 1).worker
    assert _queue(b, 1).worker is victim and _queue(a, 0).worker is not victim
    os.kill(victim.pid, signal.SIGKILL)
    # Both devices' queues on it are told (err eventfd), and only those.
    _wait(a1.queue.err_signalled, "the err eventfd of device a's queue 1")
    _wait(b1.queue.err_signalled, "the err eventfd of device b's queue 1")
    assert not a.queue.err_signalled() and not b.queue.err_signalled()
    assert a.drv.read(0, 4096).status == Status.OK
    assert b.drv.read(8, 4096).data == b.file(8 * 512, 4096)
    assert a.frontend.get_u64(Request.GET_QUEUE_NUM) == 2
    assert a.frontend.get_vring_base(1) == 1  # where it was last seen
    # Restarted, the queue goes to a fresh worker; the pool stays at its size.
    a.frontend.restart_queue(a1.queue, 1)
    assert _queue(a, 1).proc.pid != victim.pid
    assert a1.read(8, 4096).data == a.file(8 * 512, 4096)
    assert len({q.worker for q in pool.queues()}) <= pool.size


def test_memory_added_later_reaches_every_worker_of_the_connection(
        make_blk: MakeBlk, pool: PoolRunner) -> None:
    env, drv1 = _two_queues(make_blk, pool)
    region = env.mem.add_region(64 * MiB, 4 * MiB)
    env.mem._cursor.append((region.gpa, region.gpa + region.size))  # let alloc() use it
    assert env.frontend.add_mem_reg(region) in (None, 0)
    for drv in (env.drv, drv1):
        buf = drv.alloc(4096, region=len(env.mem.regions) - 1)
        assert buf >= 64 * MiB
        res = drv.read(0, 4096, pieces=[(buf, 4096)])
        assert res.status == Status.OK and res.data == env.file(0, 4096)


def test_move_queue_continues_where_it_stopped(make_blk: MakeBlk, pool: PoolRunner) -> None:
    env, drv1 = _two_queues(make_blk, pool)
    for i in range(5):
        assert drv1.read(i, 512).status == Status.OK
    queue = _queue(env, 1)
    source = queue.worker
    target = pool.move_queue(queue.key)
    assert target is not source and queue.worker is target  # the handler's object follows
    assert _queue(env, 1).proc.pid == target.pid
    assert queue.key not in source.queues
    data = os.urandom(4096)
    assert drv1.write(16, data).status == Status.OK  # no request lost or repeated
    assert drv1.read(16, 4096).data == data
    assert env.frontend.get_vring_base(1) == 7
    env.device.refresh_counters()
    assert env.device.queue_stats[1].reads == 5 + 1
    assert pool.moves == 1


def test_rebalance_moves_a_busy_queue_to_an_idle_worker(make_blk: MakeBlk,
                                                        pool: PoolRunner) -> None:
    a, _ = _two_queues(make_blk, pool)
    b, _ = _two_queues(make_blk, pool)
    busy = _queue(a, 0).worker
    assert _queue(b, 0).worker is busy  # both queue 0s on one worker, both queue 1s idle
    pool.rates(sample=True)
    for i in range(200):
        assert a.drv.read(i % 64, 512).status == Status.OK
        assert b.drv.read(i % 64, 512).status == Status.OK
    moved = pool.rebalance(min_rate=1.0)
    assert moved in (_key(a, 0), _key(b, 0))
    assert {_queue(a, 0).worker, _queue(b, 0).worker} == set(pool.workers)
    assert a.drv.read(0, 4096).data == a.file(0, 4096)
    assert b.drv.read(0, 4096).data == b.file(0, 4096)
    # Even now: nothing more to move.
    for i in range(100):
        assert a.drv.read(i % 64, 512).status == Status.OK
        assert b.drv.read(i % 64, 512).status == Status.OK
    assert pool.rebalance(min_rate=1.0) is None


def _voluntary_switches(pid: int) -> int:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def test_idle_queues_cost_a_worker_no_wake_ups(make_blk: MakeBlk, pool: PoolRunner) -> None:
    envs = [_two_queues(make_blk, pool) for _ in range(3)]
    for env, drv1 in envs:
        assert env.drv.read(0, 512).status == Status.OK
        assert drv1.read(0, 512).status == Status.OK
    time.sleep(0.3)
    before = {w.pid: _voluntary_switches(w.pid) for w in pool.workers}
    time.sleep(1.0)
    after = {pid: _voluntary_switches(pid) for pid in before}
    assert all(after[pid] - before[pid] <= 1 for pid in before), (before, after)


def test_a_new_connection_after_a_disconnect_is_served(make_blk: MakeBlk,
                                                       pool: PoolRunner) -> None:
    env, _ = _two_queues(make_blk, pool)
    other, other1 = _two_queues(make_blk, pool)
    env.frontend.close()
    _wait(lambda: env.daemon.daemon.handler is None, "the disconnect")
    # The other device's queues were on the same workers and serve on.
    assert other1.read(0, 4096).data == other.file(0, 4096)
    mem = FrontendMemory(((0, 32 * MiB, 0),))
    fe = Frontend(env.daemon.path, timeout=10.0)
    try:
        fe.negotiate()
        fe.set_mem_table(mem)
        for index in (0, 1):
            drv = BlkDriver(fe, fe.setup_queue(index, size=64), mem)
            assert drv.read(8, 4096).data == env.file(8 * 512, 4096)
    finally:
        fe.close()
        mem.close()
    assert len(pool.workers) == 2


def test_dirty_log_reaches_the_workers_and_marks_are_counted_per_queue(
        make_blk: MakeBlk, pool: PoolRunner) -> None:
    from tests.qemu_log import QemuLog
    from tests.unit.blk.test_dirty_log import MEM
    from tests.unit.blk.test_dirty_log_processes import ring_pages, workload

    other, other1 = _two_queues(make_blk, pool)  # shares the workers, does not log
    qlog = QemuLog(MEM)
    try:
        env = make_blk(num_queues=2, queue_pool=pool, serial="migrate-me")
        assert env.frontend.set_log_base(qlog.fd, qlog.size) == b"\0" * 8
        env.frontend.set_logging(True)
        q1 = env.frontend.setup_queue(1, size=64)  # started with the log on: gets it at start
        drv1 = BlkDriver(env.frontend, q1, env.mem)
        qlog.take()
        expected = workload([env.drv, drv1])
        got = qlog.take()
        assert expected <= got, f"pages written but not marked: {expected - got}"
        assert got <= expected | ring_pages(env.queue, q1)
        handler = env.daemon.daemon.handler
        assert handler is not None
        env.device.refresh_counters()
        assert all(_queue(env, i).remote_log.logging for i in (0, 1))
        per_queue = [_queue(env, i).remote_log.pages for i in (0, 1)]
        assert all(per_queue) and handler.pages_marked >= len(got)
        assert handler.pages_marked == sum(per_queue)  # each queue's own, never summed twice
        # A queue moved while logging keeps marking on its new worker, and its count goes on.
        marked = handler.pages_marked
        pool.move_queue(_key(env, 1))
        qlog.take()
        expected = workload([drv1])
        assert expected <= qlog.take()
        env.device.refresh_counters()
        assert handler.pages_marked >= marked + len(expected)
        # The other connection on the same workers never logged.
        assert other1.read(0, 512).status == Status.OK
        other.device.refresh_counters()
        assert not any(_queue(other, i).remote_log.logging for i in (0, 1))
        env.frontend.set_logging(False)
        env.device.refresh_counters()
        assert not any(_queue(env, i).remote_log.logging for i in (0, 1))
    finally:
        qlog.close()


def test_a_worker_outlives_the_connection_thread_that_started_it(make_blk: MakeBlk,
                                                                 pool: PoolRunner) -> None:
    """Workers die with the server (PR_SET_PDEATHSIG), whose 'parent' is the thread that
    forked them: they must not die with the export whose queue happened to start them."""
    first, _ = _two_queues(make_blk, pool)
    other, other1 = _two_queues(make_blk, pool)
    workers = {_queue(other, i).worker for i in (0, 1)}
    first.frontend.close()
    first.daemon.stop()  # its control thread, which placed the first queues, ends
    time.sleep(0.3)
    assert all(w.alive for w in workers)
    assert other.drv.read(0, 4096).data == other.file(0, 4096)
    assert other1.read(8, 4096).data == other.file(8 * 512, 4096)


def _children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.add(int(entry))
            except OSError:
                continue
    return out


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_of_a_pool_server_ends_its_workers_and_a_new_one_resumes(tmp_path) -> None:
    """The command line's pool (--queue-processes pool): kill -9 of the server leaves no
    worker on the rings, and a new server takes over the same rings and in-flight area."""
    from tests.unit.blk.conftest import make_image
    from tests.unit.cli_harness import Server

    image, sock = tmp_path / "disk.img", tmp_path / "s.sock"
    make_image(image, MiB)
    args = ("--socket", sock, "--image", image, "--num-queues", "2",
            "--queue-processes", "pool", "--workers", "2")
    server = Server(*args)
    mem = FrontendMemory(((0, 32 * MiB, 0),))
    try:
        server.started()
        fe = Frontend(sock, timeout=10.0)
        fe.negotiate()
        inflight_fd, inflight_size = fe.get_inflight_fd(2, 64)
        fe.set_inflight_fd(inflight_fd, inflight_size, 2, 64)
        fe.set_mem_table(mem)
        queues = [fe.setup_queue(i, size=64) for i in (0, 1)]
        drivers = [BlkDriver(fe, q, mem) for q in queues]
        data = [os.urandom(4096), os.urandom(4096)]
        for i, drv in enumerate(drivers):
            assert drv.write(8 * i, data[i]).status == Status.OK
        workers = _children(server.proc.pid)
        assert len(workers) == 2
        server.proc.kill()
        server.proc.wait(10)
        _wait(lambda: not any(_running(pid) for pid in workers),
              "the workers to die with the server")
        fe.close(queues=False)
        sock.unlink()
        server = Server(*args)
        server.started()
        fe2 = Frontend(sock, timeout=10.0)
        fe2.negotiate()
        fe2.set_inflight_fd(inflight_fd, inflight_size, 2, 64)
        fe2.set_mem_table(mem)
        for i, q in enumerate(queues):
            fe2.restart_queue(q, base=q.used_idx())
            drv = BlkDriver(fe2, q, mem)
            assert drv.read(8 * i, 4096).data == data[i]
        assert fe2.get_vring_base(1) == 2
        fe2.close()
        os.close(inflight_fd)
    finally:
        server.kill()
        mem.close()


def test_queues_of_one_connection_on_one_worker_stop_and_restart_apart(
        make_blk: MakeBlk) -> None:
    """One worker hosts both queues of a connection (its memory mapped once): stopping one
    leaves the other serving; once both stopped, the connection's state is gone there and a
    restart brings it again."""
    pool = PoolRunner(workers=1)
    try:
        env, drv1 = _two_queues(make_blk, pool)
        assert _queue(env, 0).worker is _queue(env, 1).worker
        assert drv1.read(0, 512).status == Status.OK
        assert env.frontend.get_vring_base(1) == 1
        assert env.drv.read(8, 4096).data == env.file(8 * 512, 4096)  # still mapped for it
        base0 = env.frontend.get_vring_base(0)
        assert not pool.workers[0].conns
        env.frontend.restart_queue(env.queue, base0)
        env.frontend.restart_queue(drv1.queue, 1)
        assert env.drv.read(16, 4096).data == env.file(16 * 512, 4096)
        assert drv1.read(24, 4096).data == env.file(24 * 512, 4096)
        env.frontend.close()
        _wait(lambda: env.daemon.daemon.handler is None, "the disconnect")
    finally:
        pool.close()


@pytest.mark.parametrize(("option", "value", "said"), [
    ("--workers", "0", "--workers 0: must be 1 to 1024"),
    ("--rebalance-interval", "-1", "--rebalance-interval -1.0: must be 0 to 3600"),
    ("--rebalance-interval", "nan", "--rebalance-interval nan: must be 0 to 3600"),
])
def test_pool_options_out_of_range_are_usage_errors(tmp_path, option: str, value: str,
                                                    said: str) -> None:
    from tests.unit.blk.conftest import make_image
    from tests.unit.cli_harness import assert_one_line_error, run

    image = tmp_path / "disk.img"
    make_image(image, MiB)
    proc = run("--socket", tmp_path / "s.sock", "--image", image, "--queue-processes", "pool",
               option, value)
    assert_one_line_error(proc, said)


def test_rebalancing_sleeps_while_idle_and_wakes_with_the_load(make_blk: MakeBlk,
                                                               pool: PoolRunner) -> None:
    a, _ = _two_queues(make_blk, pool)
    b, _ = _two_queues(make_blk, pool)
    assert _queue(a, 0).worker is _queue(b, 0).worker
    pool.start_rebalancing(interval=0.05)
    thread = pool._rebalancer
    assert thread is not None and thread.native_id is not None

    def switches() -> int:
        with open(f"/proc/self/task/{thread.native_id}/status") as f:
            return next(int(line.split()[1]) for line in f
                        if line.startswith("voluntary_ctxt_switches:"))

    time.sleep(1.5)  # a look finds everything idle; the workers sleep past IDLE_SECONDS
    before = switches()
    time.sleep(1.0)
    assert switches() - before <= 1  # no timer while idle (0.05 s would be ~20)
    deadline = time.monotonic() + 10
    i = 0
    while pool.moves == 0:  # both queue 0s busy on one worker: woken, it moves one
        assert time.monotonic() < deadline, "rebalancing did not wake up with the load"
        assert a.drv.read(i % 64, 512).status == Status.OK
        assert b.drv.read(i % 64, 512).status == Status.OK
        i += 1
    assert {_queue(a, 0).worker, _queue(b, 0).worker} == set(pool.workers)
    assert a.drv.read(0, 4096).data == a.file(0, 4096)


def test_a_failed_move_leaves_the_queue_broken_where_it_stopped(make_blk: MakeBlk,
                                                                pool: PoolRunner) -> None:
    from vhost.runner.base import RunnerError

    env, drv1 = _two_queues(make_blk, pool)
    for i in range(3):
        assert drv1.read(i, 512).status == Status.OK
    dead = _queue(env, 0).worker
    assert _queue(env, 1).worker is not dead
    os.kill(dead.pid, signal.SIGKILL)
    _wait(lambda: dead.died, "the worker's death to be noticed")
    with pytest.raises(RunnerError):
        pool.move_queue(_key(env, 1), target=dead)
    _wait(drv1.queue.err_signalled, "the err eventfd of queue 1")
    assert env.frontend.get_vring_base(1) == 3  # where it stopped, for a restart
    env.frontend.restart_queue(drv1.queue, 3)
    assert drv1.read(8, 4096).data == env.file(8 * 512, 4096)


def test_a_packed_ring_with_an_inflight_area_on_the_pool(make_blk: MakeBlk,
                                                        pool: PoolRunner) -> None:
    """The pool's worker maps the in-flight area in the layout the connection negotiated (as a
    queue process does): a packed ring with an in-flight area serves, and its area records the
    requests in the packed layout (QEMU always sends one with reconnect=1)."""
    from vhost.queue import inflight_packed as infp

    env = make_blk(packed=True, num_queues=2, queue_pool=pool)
    fe = env.frontend
    fd, size = fe.get_inflight_fd(2, 128)
    try:
        fe.set_inflight_fd(fd, size, 2, 128)
        q1 = fe.setup_packed_queue(1, size=128)
        drv = BlkDriver(fe, q1, env.mem)
        assert drv.write(8, b"\x6b" * 4096).status == Status.OK
        res = drv.read(8, 4096)
        assert res.status == Status.OK and res.data == b"\x6b" * 4096
        area = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    stride = infp.queue_stride(128)
    # Queue 1's region, read as QueueRegionPacked: the worker kept it in the packed layout
    # (version 1, desc_num 128, used index 6: two chains of 3 descriptors); a split tracker would
    # have written split fields over it instead.
    (_, version, desc_num, _, _, used_idx, _, used_wrap, _, _) = infp.HEADER.unpack_from(
        area, stride)
    assert (version, desc_num, used_idx, used_wrap) == (infp.VERSION, 128, 6, 1)


@pytest.mark.parametrize(("cores", "workers"), [(1, 1), (2, 1), (3, 1), (4, 2), (64, 32)])
def test_the_default_pool_leaves_half_the_cores_to_the_guests(
        monkeypatch: pytest.MonkeyPatch, cores: int, workers: int) -> None:
    """One worker per two cores the daemon may use, never none: on the 2-core hosts one worker
    serving both queues beat two (``default_workers``' docstring has the figures)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert default_workers() == workers
