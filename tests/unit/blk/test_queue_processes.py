"""Queues served in processes of their own (vhost.runner.pool, vhost.runner.process).

Each test drives a real server (daemon thread in this process, queue processes spawned by it)
through the project's vhost-user frontend.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.unit.blk.conftest import BlkEnv, MakeBlk, MiB
from vhost.messages import Request
from vhost.runner.pool import QueueProcessWorker
from vhost_frontend import Frontend, FrontendMemory
from vhost_frontend.blk import BlkDriver
from virtio_blk.request import Status


def _proc(env: BlkEnv, index: int) -> QueueProcessWorker:
    handler = env.daemon.daemon.handler
    assert handler is not None
    worker = handler.vrings[index].worker
    assert isinstance(worker, QueueProcessWorker), worker
    return worker


def _wait(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_each_queue_gets_a_process_and_counters_are_summed(
        make_blk: MakeBlk, capfd: pytest.CaptureFixture[str]) -> None:
    env = make_blk(num_queues=2, engine="io_uring")
    q1 = env.frontend.setup_queue(1, size=64)
    drv1 = BlkDriver(env.frontend, q1, env.mem)
    pids = {_proc(env, 0).proc.pid, _proc(env, 1).proc.pid}  # type: ignore[union-attr]
    assert len(pids) == 2 and os.getpid() not in pids
    data = os.urandom(8192)
    assert env.drv.write(8, data).status == Status.OK
    assert drv1.read(8, 8192).data == data
    for i in range(5):
        assert drv1.read(i * 8, 4096).status == Status.OK
    stats = env.device.stats
    assert (stats.writes, stats.reads, stats.requests) == (1, 6, 7)
    assert env.device.queue_stats[1].reads == 6
    # The queue processes ran io_uring: one that could not would have said so on stderr.
    assert "io_uring unavailable" not in capfd.readouterr().err


def test_get_vring_base_stops_the_process_and_returns_its_avail_index(make_blk: MakeBlk) -> None:
    env = make_blk(num_queues=2)
    q1 = env.frontend.setup_queue(1, size=64)
    drv1 = BlkDriver(env.frontend, q1, env.mem)
    for i in range(7):
        assert drv1.read(i, 512).status == Status.OK
    proc = _proc(env, 1).proc
    assert env.frontend.get_vring_base(1) == 7
    assert proc is not None and proc.poll() == 0  # exited cleanly
    env.frontend.restart_queue(q1, 7)  # a fresh process continues where the last one stopped
    assert drv1.read(0, 512).status == Status.OK
    assert env.frontend.get_vring_base(1) == 8


def test_memory_added_later_reaches_the_processes(make_blk: MakeBlk) -> None:
    env = make_blk(num_queues=2)
    q1 = env.frontend.setup_queue(1, size=64)
    drv1 = BlkDriver(env.frontend, q1, env.mem)
    region = env.mem.add_region(64 * MiB, 4 * MiB)
    env.mem._cursor.append((region.gpa, region.gpa + region.size))  # let alloc() use it
    assert env.frontend.add_mem_reg(region) in (None, 0)
    buf = drv1.alloc(4096, region=len(env.mem.regions) - 1)
    assert buf >= 64 * MiB
    res = drv1.read(0, 4096, pieces=[(buf, 4096)])
    assert (res.status, res.data) == (Status.OK, env.file(0, 4096))


def test_a_dead_queue_process_breaks_only_its_queue(make_blk: MakeBlk) -> None:
    env = make_blk(num_queues=2)
    q1 = env.frontend.setup_queue(1, size=64)
    drv1 = BlkDriver(env.frontend, q1, env.mem)
    assert drv1.read(0, 512).status == Status.OK
    worker = _proc(env, 1)
    _wait(lambda: worker.last_avail == 1, "the process to report where it is")
    proc = worker.proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGKILL)
    _wait(q1.err_signalled, "the err eventfd of queue 1")
    # The other queue and the control socket go on.
    assert env.drv.read(0, 4096).status == Status.OK
    assert env.frontend.get_u64(Request.GET_QUEUE_NUM) == 2
    assert env.frontend.get_vring_base(1) == 1  # where it was last seen
    # The next connection gets fresh processes.
    env.frontend.close()
    _wait(lambda: env.daemon.daemon.handler is None, "the disconnect")
    mem = FrontendMemory(((0, 32 * MiB, 0),))
    fe = Frontend(env.daemon.path, timeout=10.0)
    try:
        fe.negotiate()
        fe.set_mem_table(mem)
        for index in (0, 1):
            q = fe.setup_queue(index, size=64)
            drv = BlkDriver(fe, q, mem)
            assert drv.read(8, 4096).data == env.file(8 * 512, 4096)
    finally:
        fe.close()
        mem.close()


@pytest.mark.parametrize("setting", [False, True])
def test_one_queue_in_a_process_on_request(make_blk: MakeBlk, setting: bool) -> None:
    env = make_blk(queue_processes=setting)
    worker = env.daemon.daemon.handler.vrings[0].worker  # type: ignore[union-attr]
    assert isinstance(worker, QueueProcessWorker) == setting
    assert env.drv.read(0, 4096).data == env.file(0, 4096)


def test_fast_path_follows_a_memory_table_change(make_blk: MakeBlk) -> None:
    """QEMU sends the memory table again while queues run: the fast path keeps taking requests
    (a region it remembered is gone; it must not hand every request over from then on)."""
    env = make_blk(queue_processes=False)
    assert env.drv.read(0, 4096).data == env.file(0, 4096)
    env.frontend.set_mem_table(env.mem)
    assert env.drv.read(8, 4096).data == env.file(8 * 512, 4096)
    handler = env.daemon.daemon.handler
    assert handler is not None
    fast = handler.vrings[0].queue_handler._fast  # type: ignore[union-attr]
    assert fast is not None and fast.taken == 2


def test_a_qcow2_image_keeps_its_queues_on_threads(tmp_path) -> None:
    """qcow2 allocates clusters in one process: two queue processes would allocate apart."""
    from blockdev.images import create as create_by_format
    from blockdev.images import open_image
    from storage_daemon.cli import main
    from virtio_blk.device import BlkDevice

    image = str(tmp_path / "disk.qcow2")
    create_by_format(image, 1 << 20, "qcow2", None, None)
    disk = open_image(image, "qcow2")
    try:
        assert BlkDevice(disk, num_queues=2).queue_processes is False
        with pytest.raises(ValueError, match="raw image files only"):
            BlkDevice(disk, num_queues=2, queue_processes=True)
    finally:
        disk.close()
    code = main(["--socket", str(tmp_path / "s.sock"), "--image", image, "--format", "qcow2",
                 "--queue-processes", "on"])
    assert code == 2


def test_a_scrape_reads_published_counters_without_asking_the_processes(
        make_blk: MakeBlk, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counters and the metrics scrape come from what the processes published in shared
    memory: no message to a process (which would wait on it, and on the lock the vhost-user
    control thread needs)."""
    from storage_daemon.metrics import BlkCollector
    from vhost.runner import ipc

    env = make_blk(num_queues=2)
    q1 = env.frontend.setup_queue(1, size=64)
    drv1 = BlkDriver(env.frontend, q1, env.mem)
    assert env.drv.write(0, b"x" * 4096).status == Status.OK
    for i in range(3):
        assert drv1.read(i * 8, 4096).status == Status.OK

    def no_ipc(*args: object, **kwargs: object) -> None:
        raise AssertionError("a scrape sent a message to a queue process")

    monkeypatch.setattr(ipc, "send", no_ipc)
    monkeypatch.setattr(QueueProcessWorker, "request", no_ipc)
    stats = env.device.stats
    assert (stats.writes, stats.reads) == (1, 3)
    families = {m.name: m for m in BlkCollector(env.device, None).collect()}
    reads = {s.labels["queue"]: s.value for s in families["vhost_user_blk_requests"].samples
             if s.labels.get("op") == "read" and s.name.endswith("_total")}
    assert reads == {"0": 0, "1": 3}


def _voluntary_switches(pid: int) -> int:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def test_an_idle_queue_process_sleeps(make_blk: MakeBlk) -> None:
    """No timer in a queue process: idle, none of its threads wakes up."""
    env = make_blk(num_queues=2)
    assert env.drv.read(0, 512).status == Status.OK
    proc = _proc(env, 0).proc
    assert proc is not None
    time.sleep(0.2)
    before = _voluntary_switches(proc.pid)
    time.sleep(1.0)
    assert _voluntary_switches(proc.pid) - before <= 1
