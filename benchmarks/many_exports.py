"""Many exports in one real server: processes, memory, IOPS and idle wake-ups (issue 22).

For each count in ``--exports``, ONE server process is started the way a user starts it --
``python -m storage_daemon`` (the ``vhost-user-blk`` command) with one ``--blockdev
driver=file,...`` and one ``--export type=vhost-user-blk,...,num-queues=2`` per export, all in
an ``@FILE`` argument file -- or, with ``--daemon qsd``, ``qemu-storage-daemon`` with the same
image layout and ``aio=io_uring``.  ``--mode pool`` (default) leaves the server its default
placement (the shared worker pool, ``--workers`` default one per two cores); ``--mode processes``
passes ``--queue-processes on`` (a process per queue, the layout issue 22 measured at 1.17 GiB).

One vhost-user frontend per export (this project's ``vhost_frontend``, not a guest; all in this
driver process) connects, starts both queues and reads 4k blocks on them.  Halfway through the
IO phase the server's processes -- the server and every descendant -- are counted and their
memory read from ``/proc/PID/smaps``: RSS and PSS, and PSS without the guest memory they map
(the frontends' ``guest-ram`` memfds, which belong to the guests).  Then the frontends stop
issuing requests (queues stay connected) and the context switches, voluntary and
non-voluntary, of every thread of every server process are counted over ``--idle`` seconds: an
idle export should cost none.

    python -m benchmarks.many_exports                              # 1, 16, 64 exports, pool
    python -m benchmarks.many_exports --daemon qsd                 # the same, qemu-storage-daemon
    python -m benchmarks.many_exports --exports 16 --mode processes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("many_exports")

IMAGE_SIZE = 64 << 20
GUEST_MEMORY = 8 << 20
GUEST_MAPPING = "guest-ram"
START_TIMEOUT = 120.0


# ---------------------------------------------------------------------- the servers
def blockdev_options(i: int, image: Path, aio: str | None) -> str:
    """One export's block node, QSD's syntax (the same for both daemons)."""
    opts = f"driver=file,node-name=n{i},filename={image}"
    return opts + (f",aio={aio}" if aio else "")


def export_options(i: int, sock: Path) -> str:
    return (f"type=vhost-user-blk,id=e{i},node-name=n{i},addr.type=unix,addr.path={sock},"
            "writable=on,num-queues=2")


def server_command(daemon: str, count: int, directory: Path, mode: str,
                   workers: int | None, rebalance: float) -> list[str]:
    """The command line serving ``count`` exports from images and sockets in ``directory``.

    This server gets its options from an ``@FILE`` (one per line), as a user with 64 exports
    would write them; QSD 7.2 has no argument files, so it gets them on its command line."""
    pidfile = directory / "server.pid"
    if daemon == "qsd":
        exe = shutil.which("qemu-storage-daemon")
        if exe is None:
            raise RuntimeError("qemu-storage-daemon is not installed")
        cmd = [exe, "--pidfile", str(pidfile)]
        for i in range(count):
            cmd += ["--blockdev", blockdev_options(i, directory / f"e{i}.img", "io_uring"),
                    "--export", export_options(i, directory / f"e{i}.sock")]
        return cmd
    lines = []
    for i in range(count):
        lines += ["--blockdev", blockdev_options(i, directory / f"e{i}.img", None),
                  "--export", export_options(i, directory / f"e{i}.sock")]
    lines += ["--pidfile", str(pidfile), "--rebalance-interval", str(rebalance)]
    lines += ["--queue-processes", "on" if mode == "processes" else "auto"]
    if workers is not None:
        lines += ["--workers", str(workers)]
    argfile = directory / "exports.args"
    argfile.write_text("\n".join(lines) + "\n")
    return [sys.executable, "-m", "storage_daemon", f"@{argfile}"]


def wait_ready(server: subprocess.Popen[bytes], pidfile: Path, timeout: float) -> None:
    """Both daemons write the pid file once every export listens: wait for it (or the
    server's exit, which is a failure to start)."""
    deadline = time.monotonic() + timeout
    while not pidfile.exists() or not pidfile.read_text().strip():
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} at start")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not write {pidfile} in {timeout:.0f} s")
        time.sleep(0.05)


# ---------------------------------------------------------------------- measuring
def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (queue processes and pool workers are the server's
    children; counting only the server would hide them)."""
    parents = {int(e): _parent(int(e)) for e in os.listdir("/proc") if e.isdigit()}
    tree = [pid]
    for p in tree:  # grows while iterated: breadth first
        tree += [c for c, parent in parents.items() if parent == p and c not in tree]
    return tree


def memory_kib(pid: int) -> tuple[int, int, int]:
    """(RSS, PSS, PSS of guest memory mappings) of ``pid``, KiB, from /proc/PID/smaps."""
    rss = pss = guest = 0
    name = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if not head.endswith(":"):  # a mapping's first line: address range ... name
                parts = line.split()
                name = " ".join(parts[5:])
            elif head == "Rss:":
                rss += int(line.split()[1])
            elif head == "Pss:":
                kib = int(line.split()[1])
                pss += kib
                if GUEST_MAPPING in name:
                    guest += kib
    return rss, pss, guest


def context_switches(pid: int) -> int:
    """Voluntary + non-voluntary context switches of every thread of ``pid``: a thread that
    wakes up for nothing shows up in one of them."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches:",
                                        "nonvoluntary_ctxt_switches:")):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


@dataclass
class Row:
    daemon: str
    mode: str
    exports: int
    workers: int | None
    processes: int
    rss_mib: float
    pss_mib: float
    pss_without_guest_mib: float
    iops: float
    idle_wakeups_per_s: float
    idle_wakeups_per_export_s: float


class ExportLoad:
    """One export's frontend: both queues, ``DEPTH`` 4k reads in flight on each until told to
    stop (:class:`benchmarks.inprocess.QueueLoad`, 3-descriptor chains)."""

    DEPTH = 2

    def __init__(self, sock: Path) -> None:
        from benchmarks.inprocess import QueueLoad
        from vhost_frontend import Frontend, FrontendMemory

        self.mem = FrontendMemory([(0, GUEST_MEMORY, 0)])
        self.fe = Frontend(sock, timeout=30.0)
        self.fe.negotiate()
        self.fe.set_mem_table(self.mem)
        self.loads = [QueueLoad(self.mem, self.fe.setup_queue(i, size=64), self.DEPTH, 4096,
                                IMAGE_SIZE // 512, False, "direct") for i in (0, 1)]

    @property
    def done(self) -> int:
        return sum(ld.completed for ld in self.loads)

    @property
    def errors(self) -> int:
        return sum(ld.errors for ld in self.loads)

    def close(self) -> None:
        for ld in self.loads:
            ld.release()
        self.fe.close()
        self.mem.close()


def measure(count: int, mode: str, workers: int | None, seconds: float,
            idle: float, rebalance: float, daemon: str = "ours") -> Row:
    with tempfile.TemporaryDirectory(prefix="many-exports-") as td:
        directory = Path(td)
        for i in range(count):
            with open(directory / f"e{i}.img", "wb") as f:
                os.truncate(f.fileno(), IMAGE_SIZE)
        cmd = server_command(daemon, count, directory, mode, workers, rebalance)
        logfile = directory / "server.log"
        with open(logfile, "wb") as stderr:
            server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=stderr)
        loads: list[ExportLoad] = []
        try:
            wait_ready(server, directory / "server.pid", START_TIMEOUT)
            loads = [ExportLoad(directory / f"e{i}.sock") for i in range(count)]
            stop = threading.Event()
            threads = [threading.Thread(target=q.run, args=(stop,), daemon=True)
                       for ld in loads for q in ld.loads]
            for t in threads:
                t.start()
            time.sleep(seconds / 2)
            pids = process_tree(server.pid)
            mem = [memory_kib(pid) for pid in pids]
            d0, t0 = sum(ld.done for ld in loads), time.monotonic()
            time.sleep(seconds / 2)
            iops = (sum(ld.done for ld in loads) - d0) / (time.monotonic() - t0)
            stop.set()
            for t in threads:
                t.join(30)
            errors = sum(ld.errors for ld in loads)
            if errors:
                raise RuntimeError(f"{errors} requests completed with an error status")
            if any(ld.done == 0 for ld in loads):
                raise RuntimeError("an export served no request")
            # The last completions settle, and rebalancing takes its last look (which finds
            # every queue idle: it then sleeps until a queue is busy again).
            time.sleep(1.0 + 2 * rebalance)
            pids = process_tree(server.pid)
            before = sum(context_switches(pid) for pid in pids)
            time.sleep(idle)
            woke = sum(context_switches(pid) for pid in pids) - before
        except Exception:
            log.error("the server's log:\n%s", logfile.read_text(errors="replace")[-4000:])
            raise
        finally:
            for ld in loads:
                ld.close()
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                log.warning("the server did not exit on SIGTERM in 60 s: killed")
                server.kill()
                server.wait()
    rss, pss, guest = (sum(m[i] for m in mem) for i in range(3))
    return Row(daemon, mode if daemon == "ours" else "qsd", count, workers, len(pids),
               rss / 1024, pss / 1024, (pss - guest) / 1024, iops, woke / idle,
               woke / idle / count)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.many_exports", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exports", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--daemon", choices=("ours", "qsd"), default="ours")
    p.add_argument("--mode", choices=("pool", "processes"), default="pool",
                   help="this server's queue placement: its default (the pool) or "
                   "--queue-processes on (a process per queue)")
    p.add_argument("--workers", type=int, default=None,
                   help="pool size (default: the server's, one per two cores)")
    p.add_argument("--seconds", type=float, default=6.0, help="IO phase")
    p.add_argument("--idle", type=float, default=10.0, help="idle phase")
    p.add_argument("--rebalance-interval", type=float, default=2.0,
                   help="the pool's rebalancing interval (default 2 s as the command line's; "
                   "0: none): its check is the one timer of the server")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for count in args.exports:
        row = measure(count, args.mode, args.workers, args.seconds, args.idle,
                      args.rebalance_interval, args.daemon)
        log.info("%s", row)
        rows.append(row)
    print(f"{'mode':9} {'exports':>7} {'procs':>5} {'RSS MiB':>8} {'PSS MiB':>8} "
          f"{'PSS-guest':>9} {'IOPS':>7} {'idle wake/s':>11} {'per export':>10}")
    for r in rows:
        print(f"{r.mode:9} {r.exports:7d} {r.processes:5d} {r.rss_mib:8.1f} {r.pss_mib:8.1f} "
              f"{r.pss_without_guest_mib:9.1f} {r.iops:7.0f} {r.idle_wakeups_per_s:11.1f} "
              f"{r.idle_wakeups_per_export_s:10.2f}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
