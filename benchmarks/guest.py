"""Guest benchmark: a Linux guest runs fio on this server and on qemu-storage-daemon, alternately.

Each round boots the test guest (qemu_guest; QEMU under TCG) once per server on the same
image, queue count and cache mode, and runs fio 4k randread and randwrite at QD32 and 1M
sequential read and write.  qemu-storage-daemon runs with both engines of the cache mode
(buffered: aio=threads and aio=io_uring; ``--direct``: aio=native and aio=io_uring; the faster is
the reference), and the server order is reversed every other round.  For every workload it
reports the guest's IOPS and bandwidth and the backend process's CPU seconds (utime + stime of
all its threads, /proc) per IO, for every server, and the ratios -- the figures the performance
targets are written in.

    python -m benchmarks.guest                          # 1 and 2 queues, buffered, 1 round
    python -m benchmarks.guest --qsd-aio io_uring       # one qsd engine only (shorter)
    python -m benchmarks.guest --queues 1 2 --direct --rounds 3 --runtime 5
    python -m benchmarks.guest --json results.json --plot results.png
    python -m benchmarks.guest --format qcow2          # qcow2 vs QSD's qcow2 driver

With ``--format qcow2`` each server writes (randwrite, seqwrite) into a fresh, empty qcow2
image of its own -- every first write to a cluster allocates -- and reads (randread, seqread)
from a fully allocated qcow2 made with ``qemu-img convert``; our server also reads the raw
image it was converted from, for the CPU-per-IO cost of the format (row ``*-raw``).

The server's CPU is sampled when the guest announces a workload and when its result comes back,
so boot, fio start-up and the console traffic in between cost nothing to either server.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import (
    Measurement,
    cpu_seconds,
    is_reference,
    make_image,
    print_table,
    qsd_servers,
    round_order,
    rss_bytes,
    running_server,
)
from benchmarks.common import write_json as write_rows
from qemu_guest import Guest, ensure_guest

log = logging.getLogger("benchmarks.guest")

#: name -> (fio rw, block size, iodepth)
WORKLOADS = {
    "randread-4k": ("randread", "4k", 32),
    "randwrite-4k": ("randwrite", "4k", 32),
    "seqread-1m": ("read", "1m", 8),
    "seqwrite-1m": ("write", "1m", 8),
}


def workload_script(names: list[str], runtime: float, jobs: int) -> str:
    lines = []
    for name in names:
        rw, bs, depth = WORKLOADS[name]
        fio = (f"fio --name={name} --filename=/dev/vda --rw={rw} --bs={bs} --iodepth={depth} "
               f"--ioengine=libaio --direct=1 --runtime={runtime} --time_based "
               f"--numjobs={jobs} --group_reporting --output-format=json")
        if jobs > 1:
            fio += " --cpus_allowed_policy=split --cpus_allowed=0-" + str(jobs - 1)
        lines.append(f"marker BENCH-START {name}")
        lines.append(f"result {name} {fio}")
    return "\n".join(lines) + "\n"


def run_one(server: str, image: Path, tmp: Path, queues: int, direct: bool, names: list[str],
            runtime: float, extra: list[str], fmt: str = "raw") -> list[Measurement]:
    sock = tmp / f"{server}.sock"
    rows = []
    with running_server(server, image, sock, queues, direct, extra, fmt) as proc:
        script = workload_script(names, runtime, queues)
        timeout = 240 + len(names) * (runtime + 60)
        with Guest(sock, script, num_queues=queues, smp=queues, timeout=timeout) as g:
            windows = {}
            for name in names:
                g.wait_for(rf"^@@BENCH-START {name}$")
                cpu0 = cpu_seconds(proc.pid)
                g.wait_for(rf"^@@RESULT-END {name} rc=")
                windows[name] = cpu_seconds(proc.pid) - cpu0
            rss = rss_bytes(proc.pid)
            result = g.wait()
        for name in names:
            fio = result.fio(name)
            if fio.errors:
                raise RuntimeError(f"{server} {name}: fio errors {fio.errors}")
            ios = sum(j.raw[d]["total_ios"] for j in fio.jobs for d in ("read", "write"))
            runtime_s = max(j.raw[d]["runtime"] for j in fio.jobs for d in ("read", "write"))
            runtime_s = runtime_s / 1000 or runtime
            cpu = windows[name]
            rows.append(Measurement(server, name, queues, direct, fio.iops, fio.bw, cpu,
                                    cpu / max(ios, 1) * 1e6, rss,
                                    {"ios": ios, "runtime_s": runtime_s}))
    return rows


def _log_rows(rnd: int, got: list[Measurement]) -> None:
    """Log a round's rows, and tag them with it (the table pairs ratios within a round)."""
    for m in got:
        m.extra["round"] = rnd + 1
        log.info("round %d %-12s %-13s q=%d: %8.0f IOPS %7.1f MB/s %6.1f us CPU/IO", rnd + 1,
                 m.server, m.workload, m.queues, m.ops, m.bandwidth / 1e6, m.cpu_us_per_op)


def run_qcow2(args: argparse.Namespace, raw: Path, tmp: Path) -> list[Measurement]:
    """Writes on a fresh qcow2 per server, reads on a fully allocated one (and on raw)."""
    full = tmp / "full.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(full)], check=True)
    writes = [w for w in args.workloads if "write" in w]
    reads = [w for w in args.workloads if "read" in w]
    rows: list[Measurement] = []
    for rnd in range(args.rounds):
        for queues in args.queues:
            for server in round_order(args.servers, rnd):
                if writes:
                    fresh = tmp / f"fresh-{server}.qcow2"
                    fresh.unlink(missing_ok=True)
                    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(fresh),
                                    args.size], check=True)
                    got = run_one(server, fresh, tmp, queues, args.direct, writes,
                                  args.runtime, args.server_args.split(), "qcow2")
                    _log_rows(rnd, got)
                    rows.extend(got)
                    check = subprocess.run(["qemu-img", "check", str(fresh)],
                                           capture_output=True, text=True, check=False)
                    log.info("qemu-img check after %s: rc %d, %s", server, check.returncode,
                             check.stdout.strip().splitlines()[0] if check.stdout else "")
                if reads:
                    got = run_one(server, full, tmp, queues, args.direct, reads, args.runtime,
                                  args.server_args.split(), "qcow2")
                    _log_rows(rnd, got)
                    rows.extend(got)
            if reads:
                got = run_one("python", raw, tmp, queues, args.direct, reads, args.runtime,
                              args.server_args.split(), "raw")
                for m in got:
                    m.server = "python-raw"
                _log_rows(rnd, got)
                rows.extend(got)
    return rows


def print_format_cost(rows: list[Measurement]) -> None:
    """Our CPU per IO on qcow2 against our CPU per IO on raw, per read workload."""
    keys = sorted({(r.workload, r.queues) for r in rows if r.server == "python-raw"}, key=str)
    if not keys:
        return
    print("\nqcow2 cost (our server): CPU us per IO on qcow2 / on raw")
    for wl, q in keys:
        def mean(server: str, wl: str = wl, q: int = q) -> float:
            vals = [r.cpu_us_per_op for r in rows
                    if (r.server, r.workload, r.queues) == (server, wl, q)]
            return sum(vals) / len(vals) if vals else float("nan")
        qc, rw = mean("python"), mean("python-raw")
        print(f"{wl:<22}{q:>2}  qcow2 {qc:6.1f} us  raw {rw:6.1f} us  ratio {qc / rw:5.2f}")


def plot(rows: list[Measurement], path: Path) -> None:
    """Bar charts of IOPS and CPU per IO per workload, every server side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r.workload, r.queues, r.direct) for r in rows}, key=str)
    labels = [f"{w}\nq{q} {'dio' if d else 'buf'}" for w, q, d in keys]
    servers = sorted({r.server for r in rows}, key=lambda s: (is_reference(s), s))
    width = 0.8 / len(servers)

    def mean(server: str, attr: str, key: tuple) -> float:
        vals = [getattr(r, attr) for r in rows if (r.workload, r.queues, r.direct) == key
                and r.server == server]
        return sum(vals) / len(vals) if vals else 0.0

    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2 * len(keys)), 4.5))
    for ax, attr, title in ((axes[0], "ops", "IOPS (higher is better)"),
                            (axes[1], "cpu_us_per_op", "backend CPU us per IO (lower is better)")):
        xs = range(len(keys))
        for i, server in enumerate(servers):
            ax.bar([x - 0.4 + width * (i + 0.5) for x in xs],
                   [mean(server, attr, k) for k in keys], width, label=server)
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.guest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queues", type=int, nargs="+", default=[1, 2])
    p.add_argument("--direct", action="store_true", help="O_DIRECT (qsd: cache.direct=on, "
                   "aio=native and aio=io_uring) instead of the page cache (qsd: aio=threads and "
                   "aio=io_uring)")
    p.add_argument("--qsd-aio", nargs="+", choices=("threads", "native", "io_uring"),
                   help="qsd engines to measure (default: both of the cache mode's)")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS),
                   help="default: all (raw); randwrite-4k and randread-4k (qcow2)")
    p.add_argument("--runtime", type=float, default=4.0, help="seconds per fio workload")
    p.add_argument("--rounds", type=int, default=1, help="alternate the servers this many times")
    p.add_argument("--size", default="2G", help="image size (filled with data)")
    p.add_argument("--dir", default=None, help="where to put the image (default: a temp dir)")
    p.add_argument("--server-args", default="", help="extra arguments for our server")
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                   help="image format both servers serve (qcow2: see above)")
    p.add_argument("--json", type=Path, help="also write the measurements here")
    p.add_argument("--plot", type=Path, help="also draw a PNG (needs matplotlib)")
    args = p.parse_args(argv)
    if args.format == "qcow2" and args.direct:
        p.error("--direct is not supported with --format qcow2 (our server refuses it)")
    if args.workloads is None:
        args.workloads = (["randwrite-4k", "randread-4k"] if args.format == "qcow2"
                          else list(WORKLOADS))
    try:
        args.servers = ["python", *qsd_servers(args.direct, args.qsd_aio)]
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from blockdev.disk import parse_size

    ensure_guest()
    rows: list[Measurement] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as td:
        tmp = Path(td)
        image = tmp / "bench.img"
        log.info("filling a %s image in %s", args.size, tmp)
        make_image(image, parse_size(args.size), fill=True)
        if args.format == "qcow2":
            rows = run_qcow2(args, image, tmp)
        for rnd in range(args.rounds if args.format == "raw" else 0):
            for queues in args.queues:
                for server in round_order(args.servers, rnd):
                    got = run_one(server, image, tmp, queues, args.direct, args.workloads,
                                  args.runtime, args.server_args.split())
                    _log_rows(rnd, got)
                    rows.extend(got)
    print_table(rows, f"guest fio, {args.format}, {'O_DIRECT' if args.direct else 'buffered'}, "
                      f"{args.rounds} rounds in alternating order")
    print_format_cost(rows)
    if args.json:
        write_rows(rows, args.json)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
