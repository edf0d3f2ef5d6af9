"""benchmarks.many_exports: the real server command (and QSD) with several exports, its
process count, memory without guest RAM and idle wake-ups."""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import many_exports

MiB = 1 << 20


def test_guest_memory_is_counted_apart() -> None:
    """The guests' memory is left out of the server's PSS by the mapping's name: a touched
    guest-ram memfd shows up as guest memory."""
    fd = os.memfd_create("guest-ram-0x0", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4 * MiB)
        with mmap.mmap(fd, 4 * MiB) as mm:
            _, _, guest_before = many_exports.memory_kib(os.getpid())
            mm[:] = b"x" * (4 * MiB)
            rss, pss, guest = many_exports.memory_kib(os.getpid())
            assert guest - guest_before >= 4096 - 64  # KiB
            assert pss >= guest and rss >= pss
    finally:
        os.close(fd)


def test_the_process_tree_holds_grandchildren() -> None:
    """Queue processes may be children of children; all are the server's processes."""
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(30)']); print(p.pid, flush=True); p.wait()")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    grandchild = 0
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        tree = many_exports.process_tree(os.getpid())
        assert tree[0] == os.getpid()
        assert child.pid in tree and grandchild in tree
    finally:
        if grandchild:
            os.kill(grandchild, signal.SIGKILL)
        child.kill()
        child.wait()


def test_a_busy_thread_counts_involuntary_switches() -> None:
    """A spinning thread is switched out without sleeping: it shows up only in
    nonvoluntary_ctxt_switches, which the idle count must include.  Two spinners pinned to
    one CPU make the switches certain however idle the machine is."""
    cpu = min(os.sched_getaffinity(0))
    code = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    try:
        time.sleep(0.3)
        before = many_exports.context_switches(spinners[0].pid)
        time.sleep(1.0)
        assert many_exports.context_switches(spinners[0].pid) > before
    finally:
        for spin in spinners:
            spin.kill()
            spin.wait()


def test_the_server_gets_every_export_from_an_argument_file(tmp_path: Path) -> None:
    cmd = many_exports.server_command("ours", 3, tmp_path, "pool", 2, 0.0)
    assert cmd[1:3] == ["-m", "storage_daemon"] and cmd[3] == f"@{tmp_path / 'exports.args'}"
    args = (tmp_path / "exports.args").read_text().splitlines()
    exports = [args[i + 1] for i, a in enumerate(args) if a == "--export"]
    assert len(exports) == 3 and all("num-queues=2" in e for e in exports)
    assert args[args.index("--workers") + 1] == "2"
    qsd = many_exports.server_command("qsd", 3, tmp_path, "pool", None, 0.0)
    assert sum(a.startswith("driver=file") and a.endswith(",aio=io_uring") for a in qsd) == 3


def test_two_exports_of_the_real_server() -> None:
    """Two exports in one server with a pool of two workers: three processes, IO on both, the
    guest's memory seen and left out, and no wake-up while idle (no rebalancing timer)."""
    row = many_exports.measure(2, "pool", 2, seconds=1.0, idle=1.0, rebalance=0.0)
    assert row.processes == 3  # the server and its two workers
    assert row.iops > 0
    assert row.pss_mib > row.pss_without_guest_mib > 10
    assert row.idle_wakeups_per_s <= 1


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                    reason="qemu-storage-daemon is not installed")
def test_two_exports_of_qsd() -> None:
    row = many_exports.measure(2, "pool", None, seconds=1.0, idle=1.0, rebalance=0.0,
                               daemon="qsd")
    assert row.processes == 1 and row.mode == "qsd"
    assert row.iops > 0 and row.pss_mib > row.pss_without_guest_mib > 0
