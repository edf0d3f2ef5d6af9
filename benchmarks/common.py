"""What both benchmarks share: starting either server, measuring its CPU, printing tables.

Every figure is reported next to qemu-storage-daemon's, measured in the same run, because these
machines are noisy: absolute numbers move from run to run, ratios much less.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

from qemu_guest import accepts_connections
from vhost.queue.split import (
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from vhost_frontend import DriverRing

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (our server's queue processes)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` and of its child processes so far, in seconds
    (from /proc/PID/stat; children that already exited and were reaped count in cutime/cstime).
    """
    total = 0
    for p in process_tree(pid):
        fields = _stat(p)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
            if p == pid:
                total += int(fields[13]) + int(fields[14])
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    """The largest resident set of ``pid`` and its child processes (the target is per
    process)."""
    best = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        best = max(best, int(line.split()[1]) * 1024)
        except FileNotFoundError:
            continue
    return best


def wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            # Its own words say why (e.g. qsd without Debian's qemu-block-extra: no rbd driver).
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise SystemExit(f"the server exited with {proc.returncode} before listening: "
                             f"{err[-2000:] or '(no output)'}")
        if accepts_connections(path):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {path} after {timeout} s")


#: qemu-storage-daemon's file engines worth measuring per cache mode: QEMU's default for the
#: mode and io_uring (aio=native needs O_DIRECT, and aio=threads is what a page-cached file gets
#: by default).  The faster of the two is the reference a figure is compared with.
QSD_ENGINES: dict[bool, tuple[str, ...]] = {False: ("threads", "io_uring"),
                                            True: ("native", "io_uring")}


def qsd_aio(kind: str, direct: bool) -> str:
    """The ``aio=`` of server ``kind``: ``qsd`` (QEMU's default for the cache mode) or
    ``qsd-ENGINE``."""
    engine = kind.partition("-")[2] or QSD_ENGINES[direct][0]
    if engine not in {e for engines in QSD_ENGINES.values() for e in engines}:
        raise ValueError(f"unknown qsd engine {engine!r} in {kind!r}")
    if engine == "native" and not direct:
        raise ValueError("qsd's aio=native needs O_DIRECT (--direct)")
    return engine


def qsd_servers(direct: bool, engines: Sequence[str] | None = None) -> list[str]:
    """Server names for qemu-storage-daemon with each engine (default: both of the mode's)."""
    names = [f"qsd-{e}" for e in (engines or QSD_ENGINES[direct])]
    for name in names:
        qsd_aio(name, direct)  # refuse aio=native without O_DIRECT before anything starts
    return names


def round_order(servers: Sequence[str], rnd: int) -> list[str]:
    """The order to run ``servers`` in round ``rnd`` (0-based): as given, then reversed, and so
    on, so no server always runs first (a cold page cache, a CPU frequency ramp or another
    user's burst lands on each side in turn)."""
    return list(servers) if rnd % 2 == 0 else list(reversed(servers))


def server_command(kind: str, image: Path, sock: Path, queues: int, direct: bool,
                   extra: Sequence[str] = (), fmt: str = "raw",
                   blockdev: Sequence[str] = (), qsd_blockdev: Sequence[str] = ()) -> list[str]:
    """The command line of our server (``python``; ``python-pure`` is the same server on its
    pure-Python core, see :func:`server_env`) or qemu-storage-daemon (``qsd`` or
    ``qsd-ENGINE``, see :func:`qsd_aio`), serving ``image`` in format ``fmt`` (raw or qcow2).
    ``blockdev``: our server serves the last of these ``--blockdev`` nodes instead of ``image``
    (a plugin, a filter stack), exported writable in QSD's syntax; ``qsd_blockdev`` the same for
    qemu-storage-daemon (e.g. both given one NBD server's export as ``driver=nbd``), so the two
    serve the same storage node rather than our node against qsd's file."""
    if kind == PURE_PYTHON:
        kind = "python"
    if kind == "python" and blockdev:
        return [sys.executable, "-m", "storage_daemon", *_node_export(blockdev, sock, queues),
                "--log-level", "warning", *extra]
    if (kind == "qsd" or kind.startswith("qsd-")) and qsd_blockdev:
        qsd = shutil.which("qemu-storage-daemon")
        if qsd is None:
            raise RuntimeError("qemu-storage-daemon not found (apt-get install qemu-system-common)")
        return [qsd, *_node_export(qsd_blockdev, sock, queues)]
    if kind == "python":
        # ``image`` may be an rbd:/nbd:// spec (benchmarks.remote) as well as a file
        cmd = [sys.executable, "-m", "storage_daemon", "--socket", str(sock), "--image", str(image),
               "--num-queues", str(queues), "--log-level", "warning", "--format", fmt, *extra]
        if direct:
            cmd.append("--direct")
        return cmd
    if kind == "qsd" or kind.startswith("qsd-"):
        qsd = shutil.which("qemu-storage-daemon")
        if qsd is None:
            raise RuntimeError("qemu-storage-daemon not found (apt-get install qemu-system-common)")
        aio = qsd_aio(kind, direct)
        fmt_node = ["--blockdev", "driver=qcow2,node-name=q0,file=f0"] if fmt == "qcow2" else []
        blockdev = remote_blockdev(str(image)) or (
            f"driver=file,node-name=f0,filename={image},cache.direct={'on' if direct else 'off'},"
            f"aio={aio}")
        return [
            qsd,
            "--blockdev",
            blockdev,
            *fmt_node,
            "--export",
            f"type=vhost-user-blk,id=e0,node-name={'q0' if fmt_node else 'f0'},addr.type=unix,"
            f"addr.path={sock},writable=on,num-queues={queues}",
        ]
    raise ValueError(f"unknown server {kind!r}")


def _node_export(blockdev: Sequence[str], sock: Path, queues: int) -> list[str]:
    """``--blockdev`` options and a writable vhost-user-blk ``--export`` of the last node, in
    QSD's syntax (both servers take it)."""
    from blockdev.keyval import parse_option

    node = parse_option(blockdev[-1])["node-name"]
    return [*[arg for b in blockdev for arg in ("--blockdev", b)],
            "--export", f"type=vhost-user-blk,id=bench,node-name={node},addr.type=unix,"
            f"addr.path={sock},writable=on,num-queues={queues}"]


def remote_blockdev(spec: str) -> str | None:
    """qemu-storage-daemon's ``--blockdev`` for an rbd:/nbd:// ``--image`` spec (None for a
    file), so both servers serve the very same image or export."""
    from blockdev.spec import NbdSpec, RbdSpec, parse_image

    parsed = parse_image(spec)
    if isinstance(parsed, RbdSpec):
        out = f"driver=rbd,node-name=f0,pool={parsed.pool},image={parsed.image}"
        if parsed.snapshot:
            out += f",snapshot={parsed.snapshot}"
        if parsed.conf:
            out += f",conf={parsed.conf}"
        if parsed.user:
            out += f",user={parsed.user}"
        return out
    if isinstance(parsed, NbdSpec):
        u = urllib.parse.urlsplit(parsed.uri)
        export = urllib.parse.unquote(u.path.lstrip("/"))
        if u.scheme == "nbd+unix":
            path = urllib.parse.parse_qs(u.query)["socket"][0]
            return f"driver=nbd,node-name=f0,server.type=unix,server.path={path},export={export}"
        return (f"driver=nbd,node-name=f0,server.type=inet,server.host={u.hostname},"
                f"server.port={u.port or 10809},export={export}")
    return None


#: Request shapes: what Linux's virtio_blk sends once VIRTIO_F_RING_INDIRECT_DESC is offered (one
#: descriptor pointing at a table of header, data, status -- virtqueue_use_indirect() picks it
#: for every request of more than one piece), or the same three pieces as a direct chain.
SHAPES = ("indirect", "direct")


def descriptors_per_request(shape: str) -> int:
    """Ring descriptors one request of ``shape`` takes (its slot's head is slot * this)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown request shape {shape!r}")
    return 1 if shape == "indirect" else 3


def lay_out_request(ring: DriverRing, slot: int, pieces: Sequence[tuple[int, int, bool]],
                    table: int | None) -> int:
    """Lay out one fixed request of (gpa, length, device-writable) ``pieces`` for ``slot``: an
    indirect table at ``table`` referenced by descriptor ``slot``, or (``table`` None) a direct
    chain in descriptors ``len(pieces) * slot`` onwards.  Its head, to publish again and again.

    A load generator reuses its requests, so the layout is written once; Linux writes a fresh
    table per request, which costs the device the same reads and checks.
    """
    n = len(pieces)
    entries = [(addr, length,
                (VIRTQ_DESC_F_WRITE if writable else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < n else 0),
                i + 1 if i + 1 < n else 0)
               for i, (addr, length, writable) in enumerate(pieces)]
    if table is not None:
        ring.write_table(table, entries)
        ring.write_desc(slot, table, DESC_SIZE * n, VIRTQ_DESC_F_INDIRECT)
        return slot
    first = n * slot
    for i, (addr, length, flags, nxt) in enumerate(entries):
        ring.write_desc(first + i, addr, length, flags, first + nxt if nxt else 0)
    return first


#: Our server on its pure-Python core (``VHOST_USER_BLK_CORE=python``); ``python`` runs the core
#: the environment chooses (by default the compiled one where it is built).
PURE_PYTHON = "python-pure"


def server_env(kind: str) -> dict[str, str]:
    """The environment a server of ``kind`` runs in."""
    if kind == PURE_PYTHON:
        return {**os.environ, "VHOST_USER_BLK_CORE": "python"}
    return dict(os.environ)


@contextlib.contextmanager
def running_server(kind: str, image: Path, sock: Path, queues: int, direct: bool,
                   extra: Sequence[str] = (), fmt: str = "raw",
                   blockdev: Sequence[str] = (),
                   qsd_blockdev: Sequence[str] = ()) -> Iterator[subprocess.Popen]:
    """Start a server, wait until it listens, stop it (SIGTERM, then SIGKILL) afterwards."""
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(server_command(kind, image, sock, queues, direct, extra, fmt,
                                           blockdev, qsd_blockdev),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=server_env(kind))
    try:
        wait_for_socket(sock, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sock.unlink(missing_ok=True)


def make_image(path: Path, size: int, fill: bool) -> None:
    """A raw image; ``fill`` writes pseudo-random data so reads hit real blocks, not holes
    (reading a hole copies the zero page and skips the page-cache lookup of real data)."""
    with open(path, "wb") as f:
        f.truncate(size)
        if fill:
            chunk = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def warm_page_cache(path: Path) -> None:
    """Read ``path`` once so a buffered run starts with the image in the page cache, for
    every server alike (what was just written usually is, but memory pressure may differ)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass


@dataclass
class Measurement:
    """One workload on one server."""

    server: str
    workload: str
    queues: int
    direct: bool
    ops: float  # IOPS (or requests/s)
    bandwidth: float  # bytes/s
    cpu_s: float  # backend CPU seconds during the run
    cpu_us_per_op: float
    rss: int = 0
    extra: dict = field(default_factory=dict)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def is_reference(server: str) -> bool:
    """qemu-storage-daemon's rows are the references our server is compared with."""
    return server == "qsd" or server.startswith("qsd-")


@dataclass
class Summary:
    """One server on one workload: medians over the rounds, and how far the rounds spread."""

    server: str
    ops: float
    ops_spread: float  # (max - min) / median of the rounds, 0.05 = 5 %
    bandwidth: float
    cpu_us_per_op: float
    cpu_spread: float
    rss: int
    rounds: int
    #: round number -> (IOPS, CPU us/req) of that round, for ratios paired within a round
    by_round: dict[int, tuple[float, float]] = field(default_factory=dict)


def _spread(values: list[float]) -> float:
    mid = median(values)
    return (max(values) - min(values)) / mid if mid else float("nan")


def summarize(rows: list[Measurement]) -> dict[tuple[str, int, bool], list[Summary]]:
    """Per (workload, queues, direct): a Summary per server, in the order servers first ran."""
    out: dict[tuple[str, int, bool], list[Summary]] = {}
    for key in sorted({(r.workload, r.queues, r.direct) for r in rows}, key=str):
        servers = list(dict.fromkeys(r.server for r in rows
                                     if (r.workload, r.queues, r.direct) == key))
        # our server first, then the references in name order: a stable table across rounds
        servers.sort(key=lambda s: (is_reference(s), s))
        out[key] = []
        for server in servers:
            got = [r for r in rows if (r.server, r.workload, r.queues, r.direct) == (server, *key)]
            ops = [r.ops for r in got]
            cpu = [r.cpu_us_per_op for r in got]
            by_round = {r.extra["round"]: (r.ops, r.cpu_us_per_op) for r in got
                        if "round" in r.extra}
            out[key].append(Summary(server, median(ops), _spread(ops),
                                    median(r.bandwidth for r in got), median(cpu), _spread(cpu),
                                    max(r.rss for r in got), len(got), by_round))
    return out


def round_ratios(ours: Summary, ref: Summary) -> tuple[list[float], list[float]]:
    """Our IOPS and CPU-per-request ratios against ``ref`` within each round both ran in.

    Two servers measured minutes apart see different load on a shared machine; within one
    round they are seconds apart, so these ratios spread much less than the absolute figures.
    """
    both = sorted(set(ours.by_round) & set(ref.by_round))
    return ([ratio(ours.by_round[r][0], ref.by_round[r][0]) for r in both],
            [ratio(ours.by_round[r][1], ref.by_round[r][1]) for r in both])


def reference(summaries: list[Summary]) -> Summary | None:
    """The faster qemu-storage-daemon engine (higher median IOPS): the figure to beat."""
    refs = [s for s in summaries if is_reference(s.server)]
    return max(refs, key=lambda s: s.ops) if refs else None


def print_table(rows: list[Measurement], title: str, project: str = "python") -> None:
    """Every server per workload (medians over rounds, with their spread), then our server's
    ratios against each qemu-storage-daemon engine, the faster one (the reference) first.

    IOPS ratio = ours / qsd (above 1: we serve more); CPU ratio = ours / qsd per request (above
    1: we spend more CPU per request).
    """
    print(f"\n{title}")
    hdr = (f"{'workload':<14}{'q':>2}{'dio':>4}  {'server':<14}{'IOPS':>9}{'spread':>8}"
           f"{'MB/s':>8}{'CPU us/req':>11}{'spread':>8}{'RSS MB':>8}{'rounds':>7}")
    print(hdr)
    print("-" * len(hdr))
    for (wl, q, d), summaries in summarize(rows).items():
        lead = f"{wl:<14}{q:>2}{'on' if d else 'off':>4}"
        ref = reference(summaries)
        for s in summaries:
            mark = " *" if s is ref else ""
            print(f"{lead}  {s.server + mark:<14}{s.ops:>9.0f}{s.ops_spread:>8.0%}"
                  f"{s.bandwidth / 1e6:>8.1f}{s.cpu_us_per_op:>11.1f}{s.cpu_spread:>8.0%}"
                  f"{s.rss / 2**20:>8.1f}{s.rounds:>7}")
            lead = " " * len(lead)
        if ref is None:
            continue
        others = [s for s in summaries if is_reference(s.server) and s is not ref]
        # Our server, and the same on its pure-Python core if it ran.
        for ours in [s for s in summaries if s.server in (project, PURE_PYTHON)]:
            for s in (ref, *others):
                label = f"{ours.server} / {s.server}" + (" (reference)" if s is ref else "")
                ops_r, cpu_r = round_ratios(ours, s)
                ops_range = f" [{min(ops_r):.2f}..{max(ops_r):.2f}]" if ops_r else ""
                cpu_range = f" [{min(cpu_r):.2f}..{max(cpu_r):.2f}]" if cpu_r else ""
                print(f"{'':>20}  {label:<34} IOPS {ratio(ours.ops, s.ops):5.2f}{ops_range:<14} "
                      f"CPU/req {ratio(ours.cpu_us_per_op, s.cpu_us_per_op):5.2f}{cpu_range}")
    print("* = the reference: the faster qemu-storage-daemon engine (higher median IOPS); "
          "spread = (max - min) / median over the rounds;\nratios are of the medians, "
          "[lowest..highest] the same ratio within single rounds")


def write_json(rows: list[Measurement], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in rows], indent=2))


def read_json(path: Path) -> list[Measurement]:
    """Measurements saved by :func:`write_json` (to print their table again)."""
    return [Measurement(**row) for row in json.loads(path.read_text())]
