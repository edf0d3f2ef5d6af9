"""``x-query-vhost-queues``: each queue's ring state, read while the queues run.

What a failed migration test prints next to QEMU's own view of the rings: the server's last
avail index, the used index it published, what it has in flight and both indices as guest
memory holds them -- from the worker thread's queue, or over IPC from a queue process, which
must answer within 1 s or make the query fail (never hang, never disturb the queue).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from storage_daemon.export import BlockExport
from storage_daemon.plane import ControlPlane
from storage_daemon.qmp_protocol import QmpError
from tests.unit.blk.conftest import BlkEnv, MakeBlk
from vhost.daemon import QueueStateError
from vhost.runner.pool import QueueProcessWorker
from vhost_frontend.blk import BlkDriver
from virtio_blk.request import Status


def _running(env: BlkEnv, index: int) -> dict:
    states = env.daemon.daemon.queue_states(timeout=1.0)
    return states[index]


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_ring_state_of_each_queue(make_blk: MakeBlk, processes: bool) -> None:
    env = make_blk(num_queues=2, queue_processes=processes)
    for i in range(3):
        assert env.drv.read(i, 512).status == Status.OK
    states = env.daemon.daemon.queue_states(timeout=1.0)
    assert [s["index"] for s in states] == [0, 1]
    q0, q1 = states
    assert q0["enabled"] and q0["running"] and not q0["broken"]
    assert (q0["last_avail_idx"], q0["used_idx"], q0["in_flight"]) == (3, 3, 0)
    assert (q0["guest_avail_idx"], q0["guest_used_idx"]) == (3, 3)
    assert q0["size"] == 128
    assert not q1["running"] and "last_avail_idx" not in q1  # never set up
    # Queue 1 in a different place: the two queues are not mixed up.
    q = env.frontend.setup_queue(1, size=64)
    drv1 = BlkDriver(env.frontend, q, env.mem)
    assert drv1.read(0, 512).status == Status.OK
    q1 = _running(env, 1)
    assert (q1["last_avail_idx"], q1["used_idx"], q1["guest_avail_idx"], q1["size"]) == \
        (1, 1, 1, 64)
    # A stopped queue reports where it will start again.
    assert env.frontend.get_vring_base(1) == 1
    q1 = _running(env, 1)
    assert not q1["running"] and q1["base"] == 1 and "used_idx" not in q1


def test_a_silent_queue_process_fails_the_query_in_time_and_stays_in_step(
        make_blk: MakeBlk) -> None:
    """A queue process that does not answer: an error after ~1 s, not a hang; its late answer
    is never taken for the answer to the next request (GET_VRING_BASE's stop)."""
    env = make_blk(num_queues=2, queue_processes=True)
    for i in range(4):
        assert env.drv.read(i, 512).status == Status.OK
    handler = env.daemon.daemon.handler
    assert handler is not None
    worker = handler.vrings[0].worker
    assert isinstance(worker, QueueProcessWorker) and worker.proc is not None
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(QueueStateError, match="no answer to ring_state"):
            env.daemon.daemon.queue_states(timeout=1.0)
        assert time.monotonic() - t0 < 3.0
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    # The late answer arrives now; the stop below must get its own answer, not that one.
    assert env.frontend.get_vring_base(0) == 4
    assert worker.proc.poll() == 0 or worker.proc.wait(5) == 0  # stopped cleanly, not killed
    assert not handler.vrings[0].broken  # its answer was "stopped", drained, not taken as lost
    env.frontend.restart_queue(env.queue, 4)  # and the queue starts again where it stopped
    assert env.drv.read(0, 512).status == Status.OK
    assert _running(env, 0)["last_avail_idx"] == 5


def test_the_export_turns_a_silent_queue_into_a_qmp_error() -> None:
    class Daemon:
        def queue_states(self, timeout: float) -> list:
            assert timeout == 1.0
            raise QueueStateError("queue 1: no ring state in 1 s")

    export = BlockExport("e0", "n0", None, Daemon())  # type: ignore[arg-type]
    with pytest.raises(QmpError) as info:
        export.queue_states()
    assert info.value.cls == "GenericError"
    assert "queue 1: no ring state in 1 s" in info.value.desc


def test_the_qmp_command_of_a_running_server(make_blk: MakeBlk) -> None:
    """The control plane answers ``x-query-vhost-queues`` from the daemon (read only: the
    queue keeps serving), lists it, and checks its arguments as QAPI would."""
    env = make_blk(num_queues=2, queue_processes=True)
    assert env.drv.read(0, 512).status == Status.OK
    plane = ControlPlane.for_one(env.device, env.daemon.daemon, export_id="e0", node_name="n0")
    try:
        assert {"name": "x-query-vhost-queues"} in plane.commands("query-commands", {})
        states = plane.commands("x-query-vhost-queues", {})
        assert [(s["index"], s.get("last_avail_idx")) for s in states] == [(0, 1), (1, None)]
        with pytest.raises(QmpError, match="Parameter 'queue' is unexpected"):
            plane.commands("x-query-vhost-queues", {"queue": 0})
        assert env.drv.read(0, 512).status == Status.OK  # the queue went on
        assert plane.commands("x-query-vhost-queues", {})[0]["used_idx"] == 2
    finally:
        plane.stop()
