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
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVERS = ("python", "qsd")


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
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                return
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {path} after {timeout} s")


def server_command(kind: str, image: Path, sock: Path, queues: int, direct: bool,
                   extra: Sequence[str] = (), fmt: str = "raw") -> list[str]:
    """The command line of our server (``python``) or qemu-storage-daemon (``qsd``), serving
    ``image`` in format ``fmt`` (raw or qcow2)."""
    if kind == "python":
        # ``image`` may be an rbd:/nbd:// spec (benchmarks.remote) as well as a file
        cmd = [sys.executable, "-m", "virtio_blk", "--socket", str(sock), "--image", str(image),
               "--num-queues", str(queues), "--log-level", "warning", "--format", fmt, *extra]
        if direct:
            cmd.append("--direct")
        return cmd
    if kind == "qsd":
        qsd = shutil.which("qemu-storage-daemon")
        if qsd is None:
            raise RuntimeError("qemu-storage-daemon not found (apt-get install qemu-system-common)")
        aio = "native" if direct else "threads"
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


def remote_blockdev(spec: str) -> str | None:
    """qemu-storage-daemon's ``--blockdev`` for an rbd:/nbd:// ``--image`` spec (None for a
    file), so both servers serve the very same image or export."""
    from virtio_blk.spec import NbdSpec, RbdSpec, parse_image

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


@contextlib.contextmanager
def running_server(kind: str, image: Path, sock: Path, queues: int, direct: bool,
                   extra: Sequence[str] = (), fmt: str = "raw") -> Iterator[subprocess.Popen]:
    """Start a server, wait until it listens, stop it (SIGTERM, then SIGKILL) afterwards."""
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(server_command(kind, image, sock, queues, direct, extra, fmt),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    """A raw image; ``fill`` writes pseudo-random data so reads hit real blocks, not holes."""
    with open(path, "wb") as f:
        f.truncate(size)
        if fill:
            chunk = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


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


def print_table(rows: list[Measurement], title: str) -> None:
    """Python vs qsd per workload (medians over rounds), with the ratios the targets are
    stated in."""
    print(f"\n{title}")
    hdr = (f"{'workload':<22}{'q':>2}{'dio':>4} {'py IOPS':>9} {'qsd IOPS':>9} {'ratio':>6}  "
           f"{'py MB/s':>8} {'qsd MB/s':>8} {'ratio':>6}  {'py us/op':>8} {'qsd us/op':>9} "
           f"{'ratio':>6} {'py RSS MB':>9}")
    print(hdr)
    print("-" * len(hdr))
    keys = sorted({(r.workload, r.queues, r.direct) for r in rows}, key=str)
    for wl, q, d in keys:
        py = [r for r in rows if (r.server, r.workload, r.queues, r.direct) == ("python", wl, q, d)]
        qs = [r for r in rows if (r.server, r.workload, r.queues, r.direct) == ("qsd", wl, q, d)]
        if not py or not qs:
            continue
        p_ops = median(r.ops for r in py)
        q_ops = median(r.ops for r in qs)
        p_bw = median(r.bandwidth for r in py)
        q_bw = median(r.bandwidth for r in qs)
        p_cpu = median(r.cpu_us_per_op for r in py)
        q_cpu = median(r.cpu_us_per_op for r in qs)
        rss = max(r.rss for r in py) / 2**20
        print(f"{wl:<22}{q:>2}{'on' if d else 'off':>4} {p_ops:>9.0f} {q_ops:>9.0f} "
              f"{ratio(p_ops, q_ops):>6.2f}  {p_bw / 1e6:>8.1f} {q_bw / 1e6:>8.1f} "
              f"{ratio(p_bw, q_bw):>6.2f}  {p_cpu:>8.1f} {q_cpu:>9.1f} {ratio(p_cpu, q_cpu):>6.2f} "
              f"{rss:>9.1f}")


def write_json(rows: list[Measurement], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in rows], indent=2))
