"""Run one management scenario against qemu-storage-daemon and against this server; diff them.

``python -m benchmarks.qsd_compat`` starts each daemon with the *same* QSD option list (a raw
file node, a qcow2 node behind a throttle filter, two vhost-user-blk exports, a QMP monitor on a
``--chardev``), drives the same QMP sequence with qemu.qmp and does IO on every export with
:mod:`vhost_frontend`, and writes down what each step answered -- a transcript.  The two
transcripts, normalised, are printed as a unified diff: a difference in behaviour shows up as a
diff line, not as an opinion.  Exit status 0 when they agree, 1 on a diff, 2 on a usage error.

``--daemon qsd`` (or ``server``) runs one daemon and prints its transcript only (exit 0 unless
the scenario itself could not run): a unit test keeps the scenario honest against QSD alone.

The scenario: query-version, query-named-block-nodes, query-block-exports; IO on both exports;
blockdev-add + block-export-add of a third export, IO on it and the bytes read back from the
host file; the error cases (a duplicate node-name, deleting a node an export uses, an unknown
driver, an unknown export type, a duplicate export id, deleting an unknown export / node);
qom-get / qom-set of the throttle group's ``limits``, object-add / object-del of a group (and of
one in use); query-blockstats per node; block_resize by node name and the capacity a connected
frontend then reads; block-export-del with a frontend still connected, its BLOCK_EXPORT_DELETED
event and whether the frontend was hung up; blockdev-del; the queries and IO on the other
exports again; quit and the exit status; ``qemu-img check`` of the qcow2 image.

``--server-command`` / ``--server-cwd`` start another build of the server (an installed
``vhost-user-blk``, another checkout) against the same QSD run.

Normalisation (what the transcript leaves out on purpose, for both daemons alike):

* the version numbers of query-version (its keys stay) and every event's timestamp;
* paths: the run's directory is written ``$WORK``;
* query-named-block-nodes: only ``node-name``, ``drv``, ``ro`` and ``image.virtual-size`` of
  each node, sorted by node-name (QSD reports caches, per-node limits and image details that are
  QEMU internals, and lists nodes newest first); the qcow2 image's file node's size is its file's
  length, which depends on cluster allocation: written ``<file length>``;
* query-block-exports: sorted by id;
* qom-get of a throttle group's ``limits``: only the limits that are set (QSD lists every
  ThrottleLimits member, 0 for "no limit");
* query-blockstats (``query-nodes``): per node only ``device``, ``node-name`` and which of the
  counters of :data:`BLOCKSTATS` it has, not their values: QSD 7.2 counts an export's IO on the
  export's anonymous BlockBackend, which query-blockstats does not list, so its per-node counters
  stay 0 whatever was done; this server counts per node (issue 22).  QSD's timings, histograms and
  internal accounting are dropped.

The allow-list (:data:`ALLOWED`) masks lines that are allowed to differ, each with its reason;
``--explain`` prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vhost.messages import ProtocolFeature, Request, VirtioFeature, u64
from vhost_frontend import Frontend, FrontendError, FrontendMemory
from vhost_frontend.blk import T_FLUSH, T_IN, T_OUT, BlkDriver

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 64 << 20
THROTTLE_IOPS = 1000
NEW_IOPS = 500

#: Lines allowed to differ between the daemons: (regex on a transcript line, why).  A matching
#: line is replaced by ``<allowed: why>`` in both transcripts before they are compared.
ALLOWED: tuple[tuple[str, str], ...] = (
    (r"^  config .*: seg_max=\d+ size_max=\d+$",
     "seg_max/size_max are the backend's own limits (QSD: queue size - 2 and 0); a guest "
     "driver reads them, it does not depend on a value"),
    (r"^exp2 capacity after block_resize: \d+$",
     "qemu-storage-daemon 7.2 does not pass a block_resize on to the vhost-user-blk device's "
     "config space (observed: a connected frontend still reads the old capacity); this server "
     "does, and tells the frontend (its live-resize tests)"),
)

#: Nodes whose "virtual-size" is the length of a file a format driver writes (the qcow2 image's
#: file node): how it grows is the qcow2 driver's allocation, not behaviour a client sees.
FILE_LENGTH_NODES = frozenset({"file1"})

#: The query-blockstats counters whose presence is compared (see the module doc).
BLOCKSTATS = ("rd_operations", "wr_operations", "flush_operations", "rd_bytes", "wr_bytes",
              "failed_rd_operations", "failed_wr_operations")

#: Virtio features the frontend takes (both daemons offer them); QEMU 7.2's choice.
WANT_FEATURES = (VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
                 | VirtioFeature.RING_INDIRECT_DESC)
WANT_PROTOCOL = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG


class ScenarioError(RuntimeError):
    """The scenario could not go on (a daemon that does not start, a dead QMP socket)."""


# --------------------------------------------------------------------------- the daemons


def qsd_options(work: Path) -> list[str]:
    """The option list both daemons get: QSD's syntax, nothing else."""
    return [
        "--blockdev", f"driver=file,node-name=file0,filename={work / 'raw.img'}",
        "--blockdev", f"driver=file,node-name=file1,filename={work / 'disk.qcow2'}",
        "--blockdev", "driver=qcow2,node-name=qcow1,file=file1",
        "--object", f"throttle-group,id=tg0,limits.iops-total={THROTTLE_IOPS}",
        "--blockdev", "driver=throttle,node-name=thr1,throttle-group=tg0,file=qcow1",
        "--export", "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
                    f"addr.path={work / 'exp0.sock'},writable=on,num-queues=2",
        "--export", "type=vhost-user-blk,id=exp1,node-name=thr1,addr.type=unix,"
                    f"addr.path={work / 'exp1.sock'},writable=on,num-queues=2",
        "--chardev", f"socket,id=mon0,path={work / 'qmp.sock'},server=on,wait=off",
        "--monitor", "chardev=mon0",
    ]  # fmt: skip


#: How the server is started (``--server-command`` overrides it, e.g. another checkout's).
SERVER_COMMAND = (sys.executable, "-m", "storage_daemon")


def daemon_command(daemon: str, work: Path,
                   server_command: Sequence[str] = SERVER_COMMAND) -> list[str]:
    if daemon == "qsd":
        qsd = shutil.which("qemu-storage-daemon")
        if qsd is None:
            raise ScenarioError("qemu-storage-daemon not found (apt-get install "
                                "qemu-system-common)")
        return [qsd, *qsd_options(work)]
    return [*server_command, *qsd_options(work)]


def make_images(work: Path) -> None:
    with (work / "raw.img").open("wb") as f:
        f.truncate(IMAGE_SIZE)
    with (work / "hot.img").open("wb") as f:
        f.truncate(IMAGE_SIZE)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(work / "disk.qcow2"),
                    str(IMAGE_SIZE)], check=True)


@contextlib.contextmanager
def running(daemon: str, work: Path, server_command: Sequence[str] = SERVER_COMMAND,
            cwd: Path = REPO) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon, started; killed on the way out if it is still there."""
    errlog = (work / "daemon.log").open("wb")
    proc = subprocess.Popen(daemon_command(daemon, work, server_command), cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=errlog, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        errlog.close()


def wait_listening(proc: subprocess.Popen[bytes], paths: Sequence[Path],
                   timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None:
            raise ScenarioError(f"the daemon exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise ScenarioError("the daemon did not listen on every socket within "
                                f"{timeout:.0f} s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- the transcript


@dataclass
class Transcript:
    """What one daemon answered, line by line, normalised as it is written."""

    work: Path
    lines: list[str]

    def add(self, text: str) -> None:
        self.lines.append(text.replace(str(self.work), "$WORK"))

    def json(self, value: Any) -> str:
        return json.dumps(value, sort_keys=True)


def normalise(name: str, value: Any) -> Any:
    """One QMP command's return value, without what the module doc says is left out."""
    if name == "query-version" and isinstance(value, dict):
        return {key: "<version>" for key in sorted(value)}
    if name == "query-named-block-nodes" and isinstance(value, list):
        nodes = [{"node-name": n.get("node-name"), "drv": n.get("drv"), "ro": n.get("ro"),
                  "virtual-size": "<file length>" if n.get("node-name") in FILE_LENGTH_NODES
                  else (n.get("image") or {}).get("virtual-size")}
                 for n in value if isinstance(n, dict)]
        return sorted(nodes, key=lambda n: str(n["node-name"]))
    if name == "query-block-exports" and isinstance(value, list):
        return sorted(value, key=lambda e: str(e.get("id")) if isinstance(e, dict) else "")
    if name == "query-blockstats" and isinstance(value, list):
        return sorted(({"device": b.get("device"), "node-name": b.get("node-name"),
                        "counters": sorted(k for k in BLOCKSTATS if k in (b.get("stats") or {}))}
                       for b in value if isinstance(b, dict)),
                      key=lambda b: str(b["node-name"]))
    if name == "qom-get" and isinstance(value, dict):
        return {key: v for key, v in sorted(value.items()) if v}
    return value


class Session:
    """One daemon's run of the scenario."""

    def __init__(self, daemon: str, work: Path, server_command: Sequence[str] = SERVER_COMMAND,
                 cwd: Path = REPO) -> None:
        self.daemon = daemon
        self.work = work
        self.server_command = server_command
        self.cwd = cwd
        self.out = Transcript(work, [])
        self.qmp: Any = None

    # -- QMP
    def connect(self) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.qmp = QEMUMonitorProtocol(str(self.work / "qmp.sock"))
        self.qmp.connect()
        self.qmp.settimeout(10.0)

    def cmd(self, name: str, **args: Any) -> Any:
        """Run ``name``; write down its normalised return value or its error class and text."""
        shown = f" {self.out.json(args)}" if args else ""
        try:
            reply = self.qmp.cmd_raw(name, args or None)
        except Exception as exc:  # a connection that drops is a finding, not a crash
            self.out.add(f"{name}{shown} -> connection: {type(exc).__name__}")
            raise ScenarioError(f"QMP {name}: {exc}") from exc
        if "error" in reply:
            err = reply["error"]
            self.out.add(f"{name}{shown} -> error {err.get('class')}: {err.get('desc')}")
            return None
        value = normalise(name, reply.get("return"))
        self.out.add(f"{name}{shown} -> {self.out.json(value)}")
        return value

    def event(self, name: str, timeout: float = 5.0) -> None:
        """Wait for event ``name``; write it down without its timestamp."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self.qmp.pull_event(wait=max(deadline - time.monotonic(), 0.01))
            except TimeoutError:  # qemu.qmp's way of saying "none"
                break
            if ev is None:
                break
            if ev.get("event") == name:
                self.out.add(f"event {name} {self.out.json(ev.get('data', {}))}")
                return
        self.out.add(f"event {name}: not seen within {timeout:.0f} s")

    # -- IO through a vhost-user frontend
    def io(self, export: str, sector: int, host_file: Path | None = None) -> None:
        """Write a pattern on each queue of ``export``, read it back, flush; write down the
        device's config and the statuses (and, for ``host_file``, whether the host sees it)."""
        fe = Frontend(self.work / f"{export}.sock", timeout=10.0)
        mem = FrontendMemory([(0, 16 << 20, 0)])
        try:
            offered = fe.get_u64(Request.GET_FEATURES)
            proto = ProtocolFeature(fe.get_u64(Request.GET_PROTOCOL_FEATURES)) & WANT_PROTOCOL
            fe.command(Request.SET_PROTOCOL_FEATURES, u64(int(proto)), ack=False)
            fe.protocol = proto
            fe.checked(Request.SET_OWNER)
            fe.features = offered & WANT_FEATURES
            fe.checked(Request.SET_FEATURES, u64(fe.features))
            fe.set_mem_table(mem)
            cfg = fe.get_config(0, 60)
            capacity = int.from_bytes(cfg[0:8], "little")
            size_max = int.from_bytes(cfg[8:12], "little")
            seg_max = int.from_bytes(cfg[12:16], "little")
            blk_size = int.from_bytes(cfg[20:24], "little")
            queues = int.from_bytes(cfg[34:36], "little")
            self.out.add(f"io {export}: capacity={capacity} blk_size={blk_size} "
                         f"num_queues={queues}")
            self.out.add(f"  config {export}: seg_max={seg_max} size_max={size_max}")
            for qi in range(max(1, min(queues, 4))):
                q = fe.setup_queue(qi, size=128)
                drv = BlkDriver(fe, q, mem, timeout=10.0)
                data = bytes([0x40 + qi]) * 512 + f"{export} q{qi}".encode().ljust(3584, b".")
                s = sector + qi * 8
                wr = drv.request(T_OUT, s, out=data)
                rd = drv.request(T_IN, s, in_len=len(data))
                fl = drv.request(T_FLUSH, 0)
                same = rd.data == data
                self.out.add(f"  queue {qi}: write={wr.status} read={rd.status} "
                             f"match={same} flush={fl.status}")
                if host_file is not None:
                    with host_file.open("rb") as f:
                        seen = os.pread(f.fileno(), len(data), s * 512) == data
                    self.out.add(f"  queue {qi}: host sees the bytes={seen}")
        except (OSError, FrontendError) as exc:
            self.out.add(f"io {export}: failed: {type(exc).__name__}")
            log.info("%s io on %s: %s", self.daemon, export, exc)
        finally:
            fe.close()
            mem.close()

    # -- the scenario
    def run(self) -> list[str]:
        make_images(self.work)
        with running(self.daemon, self.work, self.server_command, self.cwd) as proc:
            try:
                wait_listening(proc, [self.work / n for n in ("qmp.sock", "exp0.sock",
                                                               "exp1.sock")])
                self.connect()
                self.scenario(proc)
            except ScenarioError as exc:
                self.out.add(f"scenario stopped: {exc}")
                tail = (self.work / "daemon.log").read_text(errors="replace").strip()
                for line in tail.splitlines()[-3:]:
                    self.out.add(f"  daemon: {line}")
            finally:
                if self.qmp is not None:
                    with contextlib.suppress(Exception):
                        self.qmp.close()
        rc = subprocess.run(["qemu-img", "check", "-q", str(self.work / "disk.qcow2")],
                            capture_output=True, text=True)
        self.out.add(f"qemu-img check disk.qcow2 -> rc={rc.returncode} {rc.stdout.strip()}"
                     .rstrip())
        return self.out.lines

    def scenario(self, proc: subprocess.Popen[bytes]) -> None:
        w = self.work
        self.cmd("query-version")
        self.cmd("query-named-block-nodes")
        self.cmd("query-block-exports")
        self.io("exp0", 64, w / "raw.img")
        self.io("exp1", 64)
        # A third export at run time, as an orchestrator adds a disk.
        self.cmd("blockdev-add", driver="file", **{"node-name": "hot0"},
                 filename=str(w / "hot.img"))
        self.cmd("block-export-add", type="vhost-user-blk", id="exp2",
                 **{"node-name": "hot0"}, addr={"type": "unix", "path": str(w / "exp2.sock")},
                 writable=True)
        self.cmd("query-block-exports")
        self.io("exp2", 128, w / "hot.img")
        # What a mistaken orchestrator gets.
        self.cmd("blockdev-add", driver="file", **{"node-name": "hot0"},
                 filename=str(w / "hot.img"))
        self.cmd("blockdev-del", **{"node-name": "hot0"})
        self.cmd("blockdev-add", driver="no-such-driver", **{"node-name": "bad0"})
        self.cmd("block-export-add", type="no-such-type", id="exp9", **{"node-name": "hot0"})
        self.cmd("block-export-add", type="vhost-user-blk", id="exp2",
                 **{"node-name": "file0"}, addr={"type": "unix", "path": str(w / "exp9.sock")})
        self.cmd("block-export-del", id="no-such-export")
        self.cmd("blockdev-del", **{"node-name": "no-such-node"})
        # The throttle group's limits, read and changed at run time.
        self.cmd("qom-get", path="tg0", property="limits")
        self.cmd("qom-set", path="tg0", property="limits", value={"iops-total": NEW_IOPS})
        self.cmd("qom-get", path="tg0", property="limits")
        self.cmd("qom-set", path="tg0", property="limits", value={"iops-total": -1})
        self.cmd("qom-get", path="no-such-object", property="limits")
        # A second group at run time, and groups that cannot go.
        self.cmd("object-add", **{"qom-type": "throttle-group", "id": "tg1",
                                  "limits": {"iops-total": 300}})
        self.cmd("qom-get", path="tg1", property="limits")
        self.cmd("object-add", **{"qom-type": "throttle-group", "id": "tg1"})
        self.cmd("object-del", id="tg1")
        self.cmd("object-del", id="tg0")
        self.cmd("object-del", id="no-such-object")
        # Per-node statistics (of the IO above), and a resize by node name that a connected
        # frontend sees in the device's config space.
        self.cmd("query-blockstats", **{"query-nodes": True})
        fe = Frontend(w / "exp2.sock", timeout=5.0)
        try:
            fe.negotiate()
            self.cmd("block_resize", **{"node-name": "hot0"}, size=IMAGE_SIZE * 2)
            capacity = int.from_bytes(fe.get_config(0, 8), "little")
            self.out.add(f"exp2 capacity after block_resize: {capacity}")
            self.cmd("block_resize", **{"node-name": "no-such-node"}, size=IMAGE_SIZE)
            self.cmd("query-named-block-nodes")
            # The third export goes, as it came -- with a frontend still connected (what a
            # too-early block-export-del does to a guest): QSD drops the connection in the
            # default mode "safe".
            self.cmd("block-export-del", id="exp2")
            self.event("BLOCK_EXPORT_DELETED")
            self.out.add(f"frontend of exp2 after block-export-del: {hung_up(fe)}")
        finally:
            fe.close()
        self.cmd("blockdev-del", **{"node-name": "hot0"})
        self.cmd("query-named-block-nodes")
        self.cmd("query-block-exports")
        self.io("exp0", 256, w / "raw.img")
        self.io("exp1", 256)
        self.cmd("quit")
        try:
            rc = proc.wait(20)
        except subprocess.TimeoutExpired:
            self.out.add("exit: still running 20 s after quit")
            return
        self.out.add(f"exit status {rc}")


def hung_up(fe: Frontend) -> str:
    """Whether the daemon closed ``fe``'s connection (within 5 s)."""
    try:
        return "disconnected" if fe.sock.recv(1) == b"" else "sent data"
    except TimeoutError:
        return "still connected"
    except OSError as exc:
        return f"disconnected ({type(exc).__name__})"


def run_daemon(daemon: str, keep: bool = False, server_command: Sequence[str] = SERVER_COMMAND,
               cwd: Path = REPO) -> list[str]:
    """The normalised transcript of ``daemon`` (qsd or server) running the scenario."""
    work = Path(tempfile.mkdtemp(prefix=f"qsd-compat-{daemon}-"))
    try:
        return Session(daemon, work, server_command, cwd).run()
    finally:
        if keep:
            log.warning("%s run kept in %s", daemon, work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def mask_allowed(lines: Sequence[str]) -> list[str]:
    out = []
    for line in lines:
        for pattern, why in ALLOWED:
            if re.search(pattern, line):
                line = f"<allowed: {why}>"
                break
        out.append(line)
    return out


def compare(qsd: Sequence[str], server: Sequence[str]) -> list[str]:
    """The unified diff of the two transcripts after the allow-list (empty: they agree)."""
    return list(difflib.unified_diff(mask_allowed(qsd), mask_allowed(server),
                                     "qemu-storage-daemon", "server", lineterm=""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.qsd_compat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--daemon", choices=("qsd", "server", "both"), default="both",
                   help="run one daemon and print its transcript, or both and diff them")
    p.add_argument("--keep", action="store_true", help="keep each run's directory")
    p.add_argument("--server-command", type=shlex.split, default=list(SERVER_COMMAND),
                   metavar="CMD", help="how to start the server (default: %(default)s), "
                   "e.g. 'vhost-user-blk'; QSD's options are appended")
    p.add_argument("--server-cwd", type=Path, default=REPO, metavar="DIR",
                   help="its working directory (default: this checkout)")
    p.add_argument("--explain", action="store_true", help="print the allow-list and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.explain:
        for pattern, why in ALLOWED:
            print(f"{pattern}\n    {why}")
        return 0
    try:
        server_run = {"server_command": args.server_command, "cwd": args.server_cwd}
        if args.daemon != "both":
            print("\n".join(run_daemon(args.daemon, args.keep, **server_run)))
            return 0
        qsd = run_daemon("qsd", args.keep)
        server = run_daemon("server", args.keep, **server_run)
    except (ScenarioError, OSError, subprocess.CalledProcessError) as exc:
        print(f"qsd_compat: {exc}", file=sys.stderr)
        return 2
    diff = compare(qsd, server)
    if diff:
        print("\n".join(diff))
        return 1
    print(f"no difference ({len(qsd)} transcript lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
