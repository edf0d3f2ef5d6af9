"""Many exports in one server: processes, memory and idle wake-ups (issue 22's "Done when").

For each count in ``--exports``, a server process serves that many exports of 2 queues each
(each its own raw image and socket), every queue on one shared pool of ``--workers`` worker
processes (``--mode pool``) or in a process of its own (``--mode processes``, today's
process-per-queue, for comparison).  One vhost-user frontend per export (this project's
``vhost_frontend``, not a guest) connects, starts both queues and reads 4k blocks on them for
``--seconds``; meanwhile the server's processes are counted and their memory read from
``/proc/PID/smaps``: RSS and PSS, and PSS without the guest memory they map (the frontends'
``guest-ram`` memfds, which belong to the guests).  Then the frontends stop issuing requests
(queues stay connected) and the server's voluntary context switches, every thread of every
process, are counted over ``--idle`` seconds: an idle export should cost none.

The multi-export server (QSD's ``--export`` repeated) is being built at the same time; until it
is on main, the server here is this script's own child (``--serve``): several
:class:`~vhost.daemon.VhostUserDaemon` instances in one process, one per export, their devices
sharing one :class:`~vhost.runner.workerpool.PoolRunner` -- the same objects the daemon will
hold.

    python -m benchmarks.many_exports                          # 1, 16, 64 exports, pool
    python -m benchmarks.many_exports --exports 16 --mode processes
    python -m benchmarks.many_exports --exports 64 --workers 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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


# ---------------------------------------------------------------------- the server (child)
def serve(count: int, directory: Path, mode: str, workers: int | None,
          rebalance: float) -> int:
    """Serve ``count`` exports from ``directory`` until stdin closes (``rebalance``: the
    pool's rebalancing interval, 0 for none, as the command line's --rebalance-interval)."""
    from blockdev.disk import Disk
    from vhost.daemon import VhostUserDaemon
    from vhost.runner.workerpool import PoolRunner
    from virtio_blk.device import BlkDevice

    debug = bool(os.environ.get("MANY_EXPORTS_DEBUG"))
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING)
    pool = PoolRunner(workers) if mode == "pool" else None
    daemons = []
    threads = []
    disks = []
    for i in range(count):
        image = directory / f"e{i}.img"
        with open(image, "wb") as f:
            os.truncate(f.fileno(), IMAGE_SIZE)
        disk = Disk(image)
        disks.append(disk)
        device = BlkDevice(disk, num_queues=2, queue_processes=True)
        device.queue_pool = pool
        daemon = VhostUserDaemon(device, directory / f"e{i}.sock")
        thread = threading.Thread(target=daemon.serve_forever, name=f"export{i}", daemon=True)
        thread.start()
        daemons.append(daemon)
        threads.append(thread)
    if pool is not None and rebalance > 0:
        pool.start_rebalancing(rebalance)
    print("ready", flush=True)
    sys.stdin.read()
    for daemon in daemons:
        daemon.shutdown()
    for daemon, thread in zip(daemons, threads, strict=True):
        thread.join(30)
        daemon.close()
    if pool is not None:
        pool.close()
    for disk in disks:
        disk.close()
    return 0


# ---------------------------------------------------------------------- measuring
def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


def memory_kib(pid: int) -> tuple[int, int, int]:
    """(RSS, PSS, PSS of guest memory mappings) of ``pid``, KiB, from /proc/PID/smaps."""
    rss = pss = guest = 0
    name = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if not head.endswith(":"):  # a mapping's first line: address range ... name
                parts = line.split()
                name = parts[5] if len(parts) > 5 else ""
            elif head == "Rss:":
                rss += int(line.split()[1])
            elif head == "Pss:":
                kib = int(line.split()[1])
                pss += kib
                if GUEST_MAPPING in name:
                    guest += kib
    return rss, pss, guest


def voluntary_switches(pid: int) -> int:
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


@dataclass
class Row:
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
            idle: float, rebalance: float) -> Row:
    with tempfile.TemporaryDirectory(prefix="many-exports-") as td:
        directory = Path(td)
        cmd = [sys.executable, "-m", "benchmarks.many_exports", "--serve", str(count),
               "--dir", td, "--mode", mode, "--rebalance-interval", str(rebalance)]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdin is not None
        try:
            if server.stdout.readline().strip() != b"ready":
                raise RuntimeError("the server did not start")
            loads = [ExportLoad(directory / f"e{i}.sock") for i in range(count)]
            stop = threading.Event()
            threads = [threading.Thread(target=q.run, args=(stop,), daemon=True)
                       for ld in loads for q in ld.loads]
            for t in threads:
                t.start()
            time.sleep(seconds / 2)
            pids = [server.pid, *_children(server.pid)]
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
            pids = [server.pid, *_children(server.pid)]
            before = sum(voluntary_switches(pid) for pid in pids)
            time.sleep(idle)
            woke = sum(voluntary_switches(pid) for pid in pids) - before
            for ld in loads:
                ld.close()
        finally:
            server.stdin.close()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    rss, pss, guest = (sum(m[i] for m in mem) for i in range(3))
    return Row(mode, count, workers, len(pids), rss / 1024, pss / 1024, (pss - guest) / 1024,
               iops, woke / idle, woke / idle / count)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.many_exports", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exports", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--mode", choices=("pool", "processes"), default="pool")
    p.add_argument("--workers", type=int, default=None,
                   help="pool size (default: one per core)")
    p.add_argument("--seconds", type=float, default=6.0, help="IO phase")
    p.add_argument("--idle", type=float, default=10.0, help="idle phase")
    p.add_argument("--rebalance-interval", type=float, default=2.0,
                   help="the pool's rebalancing interval (default 2 s as the command line's; "
                   "0: none): its check is the one timer of the server")
    p.add_argument("--json", type=Path)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve is not None:
        return serve(args.serve, args.dir, args.mode, args.workers, args.rebalance_interval)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for count in args.exports:
        row = measure(count, args.mode, args.workers, args.seconds, args.idle,
                      args.rebalance_interval)
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
