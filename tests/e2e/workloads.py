"""Guest workloads the e2e tests share: fio command lines, result checks, and the kill -9 drill.

The kill -9 drill is the same for every kind of storage (raw, qcow2, RBD): the guest writes
with fio and a crc32c verify, the server is killed mid-write (several times), a new one is
started on the same socket each time, QEMU reconnects (``reconnect=1``) and the new server
resubmits what the in-flight area says was popped; the restarted servers' logs must show that
some requests were resubmitted, and the verify at the end proves nothing was lost.  Only how a
server is started and what is checked about the storage after a kill differ, so those are
arguments.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.protocol import ConnectError

from blockdev.disk import parse_size
from qemu_guest import VIRTIO_F_RING_PACKED, Guest, GuestResult, features_command
from tests.e2e.conftest import Server

FIO = "fio --filename=/dev/vda --ioengine=libaio --direct=1 --output-format=json"


def fio_job(name: str, rw: str, bs: str, depth: int, runtime: int = 3, extra: str = "") -> str:
    """A time-based fio job reported as ``result NAME``."""
    return (f"result {name} {FIO} --name={name} --rw={rw} --bs={bs} --iodepth={depth} "
            f"--runtime={runtime} --time_based {extra}")


def check_fio(res: GuestResult, name: str) -> float:
    """The job's IOPS, after checking fio succeeded without errors."""
    assert res.rc(name) == 0, f"fio {name} failed:\n{res.text(name)[-2000:]}"
    fio = res.fio(name)
    assert not fio.errors, f"fio {name} errors: {fio.errors}"
    assert fio.iops > 0, f"fio {name} did no IO"
    return fio.iops


def check_packed(res: GuestResult, packed: bool = True) -> None:
    """The guest drives the ring layout it was asked for: with ``packed=on`` QEMU masks
    VIRTIO_F_RING_PACKED when the backend does not offer it and the guest falls back to split
    rings without a word, so a packed test proves nothing unless the bit is set (and a split
    run must not have it).  ``res`` holds :func:`qemu_guest.features_command`'s result."""
    features = res.features()
    bits = "".join("1" if i in features else "0" for i in range(max(features, default=0) + 1))
    assert (VIRTIO_F_RING_PACKED in features) == packed, (
        f"the guest {'does not drive' if packed else 'drives'} the packed ring "
        f"(VIRTIO_F_RING_PACKED, bit {VIRTIO_F_RING_PACKED}); negotiated features {bits}")


def crash_script(size: str = "64M") -> str:
    """The negotiated features (result ``features``), then random 4k writes over ``size``
    verified with crc32c, after a ``FIO-START`` marker."""
    return (f"{features_command()}\n"
            "marker FIO-START\n"
            f"result crash {FIO} --name=crash --rw=randwrite --bs=4k --iodepth=16 "
            f"--size={size} --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0\n")


#: How many times the drill kills the server, each time while fio is still writing (checked).
KILLS = 3


def slow(syscalls: str) -> tuple[str, ...]:
    """A launcher for the servers the drill kills: strace delays each of ``syscalls`` by 5 ms
    -- a slow disk.  A page-cached write takes the server microseconds, so without it a kill
    would mostly find nothing in flight (the TCG guest is the bottleneck); with it the server
    spends most of fio's write phase inside writes it has popped, so a kill leaves requests to
    resubmit.  Nothing else changes: the server cannot tell a slow disk from this."""
    return ("strace", "-f", "-qq", "-o", "/dev/null", "--seccomp-bpf", "-e",
            f"trace={syscalls}", "-e", f"inject={syscalls}:delay_enter=5000")


#: For image files: their writes, and io_uring submissions.  (Not write(2): it would delay the
#: call eventfd after each batch too -- a window with nothing in flight.)
SLOW_FILE_WRITES = slow("pwrite64,pwritev,pwritev2,io_uring_enter")
#: For RBD: how librbd sends to the OSDs (sendmsg) and signals completions (write(2) on its
#: eventfd).
SLOW_RBD_WRITES = slow("sendmsg,write")
RESUBMITTED = re.compile(r"queue \d+: resubmitted (\d+) in-flight requests")


class Writes:
    """The count of writes a server has completed, read over its QMP socket (one session)."""

    def __init__(self, qmp_sock: Path, timeout: float = 30) -> None:
        """Connects as soon as the server listens (its vhost socket comes up first; a killed
        server's QMP socket file may still be there until the new one replaces it)."""
        deadline = time.monotonic() + timeout
        while True:
            self.monitor = QEMUMonitorProtocol(str(qmp_sock))
            try:
                self.monitor.connect()
                break
            except ConnectError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.monitor.settimeout(10)

    def __call__(self) -> int:
        stats = self.monitor.cmd("query-blockstats")
        assert isinstance(stats, list) and len(stats) == 1, stats
        return int(stats[0]["stats"]["wr_operations"])

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self.monitor.close()


def resubmitted(log: str) -> list[int]:
    """Requests each restarted queue resubmitted, from the servers' log lines."""
    return [int(n) for n in RESUBMITTED.findall(log)]


def kill_and_restart_under_fio(start: Callable[..., Server], workdir: Path, *,
                               size: str = "64M",
                               timeout: float = 600, kills: int = KILLS,
                               launcher: Sequence[str] = SLOW_FILE_WRITES,
                               after_kill: Callable[[Server], None] | None = None,
                               packed: bool = False,
                               ) -> tuple[GuestResult, Server]:
    """kill -9 the server ``kills`` times during the guest's verified writes, each time
    starting another in its place; returns the guest's result and the last server, stopped.

    ``start(*args, launcher=...)`` starts a server on the same socket and image with ``args``
    added (the drill adds a QMP socket in ``workdir``), under ``launcher`` (one that slows the
    storage's writes: :data:`SLOW_FILE_WRITES`, :data:`SLOW_RBD_WRITES`) unless it is the
    last.  The kills are
    spread over the first half of fio's write phase: each waits until the servers together
    have completed the next share of its writes, read over QMP.  Since every server's count is
    at most what the guest finished, and fio writes ``size`` once before it starts reading
    back, a count under half of it proves the kill landed while fio was writing.
    ``after_kill(dead)`` runs after each kill (e.g. to check the image a dead server left).
    ``packed``: the guest's device has ``packed=on`` and must drive packed rings.

    Checked: at least one kill landed in the write phase, the restarted servers resubmitted
    more than zero requests in all (their ``resubmitted N in-flight requests`` lines), fio's
    crc32c verify is clean, the last server exits 0 having served a reconnected frontend, and
    the guest drove the ring layout asked for (:func:`check_packed`; checked last, so that a
    server without packed rings fails only there, with the drill run on split rings).
    """
    qmp = ("--qmp", str(workdir / "qmp.sock"))
    total_writes = parse_size(size) // 4096
    srv = start(*qmp, launcher=launcher)
    done = 0  # writes completed by the servers killed so far (at their last reading)
    kills_in_write_phase = 0
    with Guest(srv.sock, crash_script(size), reconnect=True, packed=packed,
               timeout=timeout) as g:
        g.wait_for(r"^@@FIO-START$")
        for k in range(1, kills + 1):
            target = total_writes * k // (2 * (kills + 1))
            writes = Writes(workdir / "qmp.sock")
            try:
                now = writes()
                deadline = time.monotonic() + 300
                while done + now < target and g.running() and time.monotonic() < deadline:
                    time.sleep(0.05)
                    now = writes()
                if done + now < target:
                    break  # fio stalled or ended: the checks below say what happened
                os.kill(srv.pid, signal.SIGKILL)
            finally:
                writes.close()
            assert srv.proc is not None
            srv.proc.wait(30)
            done += now
            assert done < total_writes // 2, (done, total_writes)
            kills_in_write_phase += 1
            if after_kill is not None:
                after_kill(srv)
            # The last server is not killed: it runs at full speed.
            srv = start(*qmp, launcher=launcher if k < kills else ())
            # A restarted queue resubmits before it takes anything new: wait for new writes.
            writes = Writes(workdir / "qmp.sock")
            try:
                deadline = time.monotonic() + 120
                while not writes() and g.running() and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                writes.close()
        counts = resubmitted(srv.log)
        if not kills_in_write_phase or not sum(counts):
            g.kill()  # (requests not resubmitted would hang the guest until its timeout)
        try:
            res = g.wait()
        finally:
            rc = srv.stop()
    assert kills_in_write_phase >= 1, f"no kill landed while fio wrote:\n{srv.log[-3000:]}"
    assert sum(counts) > 0, (f"{kills_in_write_phase} kills during fio's writes, nothing "
                             f"resubmitted after any restart ({counts}):\n{srv.log[-3000:]}")
    assert rc == 0, srv.log
    check_fio(res, "crash")
    assert srv.log.count("frontend connected") >= kills_in_write_phase + 1, srv.log
    check_packed(res, packed)
    print(f"kills during fio's writes: {kills_in_write_phase}; resubmitted per restarted queue: "
          f"{counts}")
    return res, srv
