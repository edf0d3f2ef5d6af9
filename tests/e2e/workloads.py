"""Guest workloads the e2e tests share: fio command lines, result checks, and the kill -9 drill.

The kill -9 drill is the same for every kind of storage (raw, qcow2, RBD): the guest writes
with fio and a crc32c verify, the server is killed mid-write, a new one is started on the same
socket, QEMU reconnects (``reconnect=1``) and the new server resubmits what the in-flight area
says was popped; the verify at the end proves nothing was lost.  Only how the server is
restarted and what is checked about the storage after the kill differ, so those are arguments.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from qemu_guest import Guest, GuestResult

from .conftest import Server

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


def crash_script(size: str = "64M") -> str:
    """Random 4k writes over ``size`` verified with crc32c, after a ``FIO-START`` marker."""
    return ("marker FIO-START\n"
            f"result crash {FIO} --name=crash --rw=randwrite --bs=4k --iodepth=16 "
            f"--size={size} --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0\n")


def kill_and_restart_under_fio(srv: Server, restart: Callable[[], Server], *,
                               size: str = "64M", timeout: float = 600,
                               after_kill: Callable[[], None] | None = None,
                               ) -> tuple[GuestResult, Server]:
    """kill -9 ``srv`` 5 s into the guest's verified writes, start ``restart()`` in its place.

    ``after_kill`` runs between the two (e.g. to check the image a dead server left).  Returns
    the guest's result, already checked (fio succeeded, verify clean), and the restarted
    server, stopped (it must have exited 0 and have served a reconnected frontend).
    """
    with Guest(srv.sock, crash_script(size), reconnect=True, timeout=timeout) as g:
        g.wait_for(r"^@@FIO-START$")
        time.sleep(5)
        assert srv.proc is not None
        srv.proc.kill()
        srv.proc.wait(10)
        if after_kill is not None:
            after_kill()
        restarted = restart()
        try:
            res = g.wait()
        finally:
            rc = restarted.stop()
    assert rc == 0, restarted.log
    check_fio(res, "crash")
    assert restarted.log.count("frontend connected") >= 1, restarted.log
    return res, restarted
