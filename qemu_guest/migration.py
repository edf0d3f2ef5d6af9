"""The live-migration scenario, for any of three disk backends, in one place.

A guest writing to its disk moves to another QEMU and back, losing nothing:

1. QEMU 1 boots and runs fio (rate-limited write, then verify, then verify passes until quit);
   QEMU 2 waits with ``-incoming``; a few seconds into the write the guest migrates to QEMU 2;
2. QEMU 2 finishes the write and a full verify (crc32c) with zero errors;
3. while QEMU 2 verifies again (reads: the backend writes read data into guest memory), the guest
   migrates back to a QEMU 3, which finishes the pass that was running with zero errors.

The disk behind each QEMU is, by backend:

* ``server``: this project's server (two of them on one image, ``--locking off``; the default
  queue mode: 2 queues run in 2 queue processes);
* ``qsd``: qemu-storage-daemon, two of them on one image (``locking=off``);
* ``builtin``: QEMU's own virtio-blk-pci on the image (no vhost-user) -- the reference that tells
  a QEMU/TCG guest crash from a backend bug.

With ``packed=True`` every QEMU's device has ``packed=on`` and the guest must drive packed
rings (VIRTIO_F_RING_PACKED, read back from ``/sys/block/vda/device/features``; checked at the
end, so that a backend without packed rings, which QEMU silently lets fall back to split rings,
fails there after the scenario ran).

Same guest, workload, image size and QEMU memory backend for all three.  :func:`run_scenario`
never raises for what the guest, QEMU or a backend did: it returns an :class:`Outcome` with a
one-line signature (ok, verify error, hang in phase X, guest panic with the first oops line,
migration failed, backend error) and, on failure, the diagnostics gathered *before* anything was
killed: for each live QEMU ``x-query-virtio-status`` and ``x-query-virtio-queue-element`` per
queue (the avail and used indices in guest memory), the server's ring state per queue
(``x-query-vhost-queues``), the guest consoles and the backends' logs.  Never
``x-query-virtio-queue-status`` on a vhost device: in QEMU 7.2 it sends GET_VRING_BASE, which
stops the ring it reports on.

Used by ``tests/e2e/test_migration.py`` (one run, fails on anything but ok) and by
``python -m benchmarks.migration_series`` (runs in a row, one line each and a table).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu_guest.guest import (
    REPO_ROOT,
    VIRTIO_F_RING_PACKED,
    Guest,
    accepts_connections,
    features_command,
    parse_features,
    parse_fio_json,
    parse_results,
)

log = logging.getLogger(__name__)

BACKENDS = ("builtin", "qsd", "server")

FIO = ("fio --filename=/dev/vda --ioengine=libaio --direct=1 --output-format=json "
       "--name=mig --rw=write --bs=64k --iodepth=8 --verify=crc32c --verify_fatal=1")

#: Verify passes the guest runs after the first (the scenario quits QEMU long before).
MAX_PASSES = 100

IMAGE_SIZE = 1 << 30

#: How long one phase may take before the run counts as a hang (TCG on a loaded machine).
PHASE_TIMEOUT = 300.0

#: What a dying guest kernel prints first: the line that names the crash.
OOPS = re.compile(r"(BUG: |Oops|general protection fault|Kernel panic|WARNING: CPU|"
                  r"list_(add|del) corruption|kernel BUG|RIP: |Call Trace|watchdog: BUG|"
                  r"rcu: INFO|INFO: task .* blocked)")

#: The guest kernel's panic line: with ``panic=0`` the panicked guest then spins, so its QEMU
#: still answers QMP and its virtio state can be read.
PANIC = r"Kernel panic - not syncing"

#: Guest crashes that QEMU's built-in virtio-blk (no vhost-user: QEMU 7.2's TCG alone) showed
#: in the migration series too, right after a completed migration (2026-12-07, /work/notes/
#: migration-series.md): a jump to a garbage RIP ("RIP: 0010:0x1"; qemu-storage-daemon showed
#: "RIP: 0010:0xff590c09c0427f58"), a corrupted hrtimer rbtree (rb_insert_color from
#: timerqueue_add; hrtimer_forward).  The one kind of failure the migration test may run again,
#: once, counted: a hang, a verify error, a list corruption, a crash in blk-mq or anything else
#: is never retried.
BUILTIN_ALSO_CRASHES = re.compile(r"RIP: 0010:(0x[0-9a-f]+$|rb_insert_color\+|hrtimer_forward\+)")

#: The kind of oops the built-in device showed most (twice in 30 runs): a NULL pointer
#: dereference in kernel code that has nothing to do with the disk (the scheduler, RCU, timers)
#: -- guest memory corrupted by the migration itself.  The same kind in the block layer, virtio
#: or list code (where a duplicated or lost completion from a backend would crash) is never
#: retried: :data:`DISK_PATH`.
BUILTIN_ALSO_OOPS = re.compile(r"BUG: kernel NULL pointer dereference")
DISK_PATH = re.compile(r"RIP: 0010:(blk_|__blk|bio_|virtblk|virtqueue|vring|virtio|"
                       r"__list|list_|scsi|dma_|sg_)")

#: Timer code: where the corruption after a migration landed with every backend -- the built-in
#: device (rb_insert_color from timerqueue_add, hrtimer_forward), qemu-storage-daemon (a
#: general protection fault in timerqueue_add) and this server (CI, 2026-12-07: "stack-protector:
#: Kernel stack is corrupted in: timekeeping_advance").  The timer bases are the kernel's most
#: often written pages, the ones a lost dirty-page write during QEMU's RAM migration hits first;
#: a backend only ever writes into the buffers and rings the guest gives it, never there.
TIMER_SITE = re.compile(r"^(0010:)?(timekeeping_|hrtimer_|timerqueue_|rb_insert_color|"
                        r"__run_timers|run_timer|tick_)")

#: A panic the kernel's stack protector raises names the function whose stack was overwritten.
STACK_PROTECTOR = re.compile(r"stack-protector: Kernel stack is corrupted in: (\S+)")

QEMU_DIED = re.compile(r"qemu exited")


def builtin_also_crashes(signature: str) -> bool:
    """``signature`` is a guest panic after a completed migration with a crash the built-in
    device shows too (:data:`BUILTIN_ALSO_CRASHES`, a NULL pointer dereference outside the
    disk path, or any crash in timer code: :data:`TIMER_SITE`): not evidence against the
    backend."""
    if not signature.startswith("guest panic") or " after migration " not in signature:
        return False
    rip = signature.rsplit(" / ", 1)[-1]  # the RIP line, or the first line if it was that
    if BUILTIN_ALSO_CRASHES.search(rip):
        return True
    protector = STACK_PROTECTOR.search(signature)
    site = protector.group(1) if protector else rip.removeprefix("RIP: ") if \
        " / RIP: " in signature or rip.startswith("RIP: ") else ""
    if TIMER_SITE.search(site):
        return True
    return bool(BUILTIN_ALSO_OOPS.search(signature)) and " / RIP: " in signature \
        and not DISK_PATH.search(rip)


class ScenarioFailure(Exception):
    """The scenario went wrong; ``signature`` is its one-line classification."""

    def __init__(self, signature: str, detail: str = "") -> None:
        super().__init__(signature if not detail else f"{signature}\n{detail}")
        self.signature = signature
        self.detail = detail


def workload(size_mb: int, jobs: int) -> str:
    """Report the negotiated features (result ``features``), write (rate-limited so that it
    lasts at least 20 s however fast the machine is: the first migration must fit inside it),
    verify, then verify again, pass after pass, until the scenario quits QEMU.

    The endless verify passes keep the second migration independent of how long a pass takes:
    fio's ``--rate`` does not hold for ``--verify_only`` passes (measured: 320 MiB verified
    twice within 24 s), so a single pass could end before the migration did, and the guest
    powered off under it.
    """
    rate = 16 // jobs
    job = (f"{FIO} --size={size_mb}M --numjobs={jobs} --offset_increment={size_mb}M "
           f"--rate={rate}m")
    return "\n".join([
        features_command(),
        "echo @@PHASE write",
        f"result write {job} --do_verify=0",
        "echo @@PHASE verify",
        f"result verify {job} --verify_only",
        "i=0",
        f"while [ $i -lt {MAX_PASSES} ]; do",
        "  i=$((i+1))",
        "  echo @@PHASE reverify$i",
        f"  result reverify$i {job} --verify_only",
        "done",
    ])


# --------------------------------------------------------------------------- QMP


class Qmp:
    """QMP on a unix socket (qemu.qmp's sync API), for QEMU and for this server.

    A connection that drops means the peer exited: the command raises.
    """

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        from qemu.qmp import ConnectError
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.path = path
        deadline = time.monotonic() + timeout
        while True:
            if not self.path.exists():  # qemu.qmp logs every refused connect as an ERROR
                if time.monotonic() > deadline:
                    raise ConnectError("no QMP socket", FileNotFoundError(str(path)))
                time.sleep(0.1)
                continue
            self.qmp = QEMUMonitorProtocol(str(self.path))
            try:
                self.qmp.connect()
                return
            except (OSError, ConnectError):  # the socket is not there yet
                self.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def cmd(self, name: str, **args: object) -> Any:
        return self.qmp.cmd(name, **args)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # EOFError once the peer has quit
            self.qmp.close()


def qmp_answer(qmp: Qmp, name: str, **args: object) -> str:
    """One command's answer (or its error) as compact JSON, for a diagnostics dump."""
    try:
        return json.dumps(qmp.cmd(name, **args), sort_keys=True)
    except Exception as exc:  # a diagnostic: say what failed, never raise
        return f"<{name} failed: {type(exc).__name__}: {exc}>"


def virtio_diagnostics(qmp: Qmp, queues: int) -> str:
    """Each virtio device's status and, per queue, its avail and used rings in guest memory.

    ``x-query-virtio-queue-element`` reads the rings from guest memory only; the
    ``x-query-virtio-queue-status`` command is never sent: on a vhost device in QEMU 7.2 it
    asks the backend for GET_VRING_BASE, which stops the ring.

    Not harmless either, and so read last, on a QEMU that is never used again: on a vhost
    device QEMU's own ``last_avail_idx`` is stale, the element it decodes by default is whatever
    the avail ring held there, and a descriptor that fails QEMU's checks ("Desc next is 65535")
    calls ``virtio_error``, which marks the device broken -- from then on QEMU drops the
    backend's interrupts (seen: the guest's I/O stopped for good after one such query).  The
    avail and used indices it reports are read before the descriptors and stay valid.
    """
    lines = []
    try:
        devices = qmp.cmd("x-query-virtio")
    except Exception as exc:
        return f"  x-query-virtio failed: {type(exc).__name__}: {exc}"
    for dev in devices:
        path = dev.get("path")
        lines.append(f"  device {dev.get('name')} at {path}")
        lines.append(f"    status: {qmp_answer(qmp, 'x-query-virtio-status', path=path)}")
        for q in range(queues):
            elem = qmp_answer(qmp, "x-query-virtio-queue-element", path=path, queue=q)
            lines.append(f"    queue {q} element: {elem}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- backends


def _wait_listening(path: Path, proc: subprocess.Popen[bytes], log_path: Path,
                    timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ScenarioFailure("backend failed to start",
                                  f"exit {proc.returncode}:\n{_tail(log_path, 30)}")
        if accepts_connections(path):
            return
        time.sleep(0.05)
    raise ScenarioFailure("backend failed to start", f"no socket {path} in {timeout} s")


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Daemon:
    """One vhost-user backend process (this server or a QSD) serving ``image`` on a socket."""

    kind = "daemon"

    def __init__(self, workdir: Path, image: Path, queues: int) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.image = image
        self.queues = queues
        self.sock = workdir / "vub.sock"
        self.qmp_path = workdir / "backend.qmp"
        self.log_path = workdir / f"{self.kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Daemon:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(self.command(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=out, start_new_session=True)
        _wait_listening(self.sock, self.proc, self.log_path)
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def errors(self) -> list[str]:
        return [ln for ln in self.log.splitlines()
                if " ERROR " in ln or "Traceback" in ln or "CRITICAL" in ln]

    def ring_state(self) -> str:
        """The backend's own view of its rings, where it can tell it."""
        return "  (not available from this backend)"

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 30 s; the exit status (None: had to be killed)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


class ServerDaemon(Daemon):
    """``python -m storage_daemon`` (this project), with a QMP socket for its ring state."""

    kind = "server"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "storage_daemon", "--socket", str(self.sock),
                "--image", str(self.image), "--locking", "off",
                "--num-queues", str(self.queues), "--qmp", str(self.qmp_path)]

    def ring_state(self) -> str:
        """``x-query-vhost-queues``: per queue what the server last popped and published, what
        it has in flight and the avail/used indices it reads in guest memory."""
        if not self.alive:
            return "  server not running"
        qmp = None
        try:
            qmp = Qmp(self.qmp_path, timeout=5)
            answer = qmp.cmd("x-query-vhost-queues")
        except Exception as exc:  # a diagnostic
            return f"  x-query-vhost-queues failed: {type(exc).__name__}: {exc}"
        finally:
            if qmp is not None:
                qmp.close()
        return "\n".join(f"  {json.dumps(q, sort_keys=True)}" for q in answer)

    def marked_pages(self) -> list[int]:
        return [int(n) for n in re.findall(r"dirty log closed: (\d+) pages marked", self.log)]


class QsdDaemon(Daemon):
    """qemu-storage-daemon exporting the image over vhost-user-blk."""

    kind = "qsd"

    def command(self) -> list[str]:
        return ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=f,filename={self.image},locking=off",
                "--export", (f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
                             f"addr.path={self.sock},writable=on,num-queues={self.queues}")]


class Backend:
    """What serves the disk of each QEMU of the scenario: ``disk(i)`` for QEMU ``i`` (1..3)."""

    def __init__(self, name: str, workdir: Path, image: Path, queues: int,
                 packed: bool = False) -> None:
        if name not in BACKENDS:
            raise ValueError(f"backend {name!r} is not one of {BACKENDS}")
        self.name = name
        self.image = image
        self.queues = queues
        self.packed = packed
        cls = {"server": ServerDaemon, "qsd": QsdDaemon}.get(name)
        #: Daemons a and b: QEMU 1 and 3 use a, QEMU 2 uses b.
        self.daemons: list[Daemon] = [] if cls is None else [
            cls(workdir / n, image, queues) for n in ("a", "b")]

    def start(self) -> None:
        for d in self.daemons:
            d.start()

    def disk(self, qemu: int) -> tuple[Path | None, list[str]]:
        """(vhost-user socket or None, extra QEMU arguments) for QEMU number ``qemu``."""
        if not self.daemons:
            drive = (f"file={self.image},if=none,id=d0,format=raw,cache=none,aio=native")
            device = f"virtio-blk-pci,drive=d0,num-queues={self.queues}"
            if self.packed:
                device += ",packed=on"
            return None, ["-drive", drive, "-device", device]
        return self.daemons[(qemu + 1) % 2].sock, []

    def errors(self) -> list[str]:
        return [f"{d.workdir.name}: {e}" for d in self.daemons for e in d.errors()]

    def dead(self) -> list[str]:
        return [d.workdir.name for d in self.daemons if not d.alive]

    def diagnostics(self) -> str:
        out = []
        for d in self.daemons:
            out.append(f"--- {d.kind} {d.workdir.name} ring state:\n{d.ring_state()}")
            out.append(f"--- {d.kind} {d.workdir.name} log tail:\n{_tail(d.log_path, 40)}")
        return "\n".join(out)

    def stop(self) -> list[str]:
        """Stop every daemon; what went wrong (a non-zero exit, a SIGTERM ignored)."""
        problems = []
        for d in self.daemons:
            rc = d.stop()
            if rc != 0:
                problems.append(f"{d.kind} {d.workdir.name} exited with {rc}")
        return problems


# --------------------------------------------------------------------------- the scenario


@dataclass
class Outcome:
    """One run: ``ok`` or the failure's signature, what it measured, what it saw."""

    backend: str
    queues: int
    ok: bool
    signature: str
    duration: float
    summary: str = ""
    diagnostics: str = ""
    phase: str = ""
    measurements: dict[str, Any] = field(default_factory=dict)
    packed: bool = False


def first_oops(console: str) -> str | None:
    """The first line of a guest kernel crash report on ``console``, if there is one, and the
    crash's first ``RIP:`` line (a garbage RIP tells a jump through corrupted memory from a
    fault in a known function)."""
    lines = console.splitlines()
    for i, line in enumerate(lines):
        if OOPS.search(line):
            rip = next((ln.strip() for ln in lines[i:] if "RIP: " in ln), None)
            first = re.sub(r"^\[\s*[\d.]+\]\s*", "", line.strip())
            if rip is not None and rip != line.strip():
                first += " / " + re.sub(r"^\[\s*[\d.]+\]\s*", "", rip)
            return first
    return None


def check_fio(name: str, *consoles: str) -> None:
    """fio job ``name`` succeeded without a verify error, as the guest reported it on its
    console: ``consoles``, those of the QEMUs it ran on in order (a result printed while the
    guest migrated begins on one and ends on the next)."""
    console = "\n".join(consoles)
    results = parse_results(console)
    if name not in results:
        raise ScenarioFailure(f"no fio result {name}", console[-3000:])
    rc, out = results[name]
    text = out.decode(errors="replace")
    if rc != 0:
        # fio's own messages, not its JSON report: "verify: bad header ..." is a verify error,
        # "fio: pid=128, got signal=11" then "free(): double free" a crashed fio (seen with the
        # built-in device after a migration: the guest's memory, not the disk's data).
        said = [ln.strip() for ln in text.splitlines()
                if ln.strip() and not ln.startswith((" ", "{", "}", '"', "\t"))]
        what = "verify error" if any("verify" in ln or "crc" in ln for ln in said) else \
            "fio failed"
        raise ScenarioFailure(f"{what} in {name} (rc={rc}): {'; '.join(said[:3])[:200]}",
                              text[:3000])
    fio = parse_fio_json(out)
    if fio.errors:
        raise ScenarioFailure(f"verify error in {name}: {fio.errors}", text[-3000:])
    if sum(j.write_io_bytes + j.read_io_bytes for j in fio.jobs) <= 0:
        raise ScenarioFailure(f"fio {name} did no I/O", text[-3000:])


_B64 = re.compile(r"^[A-Za-z0-9+/=]{20,}$")


def console_tail(console: str, lines: int) -> str:
    """The last ``lines`` of a console without the base64 lines of fio's results."""
    kept = [ln for ln in console.splitlines() if not _B64.match(ln.strip())]
    return "\n".join(kept[-lines:])


def reverify_passes(console: str) -> list[str]:
    """The names of the verify passes that ended on ``console``."""
    return re.findall(r"^@@RESULT-END (reverify\d+) ", console, re.M)


class Scenario:
    """One run of the scenario in ``workdir`` with ``backend`` and ``queues`` queues (packed
    rings with ``packed``)."""

    def __init__(self, backend: str, queues: int, workdir: Path,
                 phase_timeout: float = PHASE_TIMEOUT, packed: bool = False) -> None:
        self.queues = queues
        self.packed = packed
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.image = workdir / "disk.img"
        self.backend = Backend(backend, workdir, self.image, queues, packed)
        self.phase_timeout = phase_timeout
        self.phase = "setup"
        self.guests: dict[int, Guest] = {}
        self.qmps: dict[int, Qmp] = {}
        self.measured: dict[str, Any] = {}

    # -- helpers
    def _start_qemu(self, n: int, incoming: bool) -> tuple[Guest, Qmp]:
        qmp_path = self.workdir / f"q{n}.qmp"
        args = ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if incoming:
            args += ["-incoming", f"unix:{self.workdir / f'q{n}.mig'}"]
        sock, disk_args = self.backend.disk(n)
        size_mb = 320 // self.queues
        g = Guest(sock, workload(size_mb, self.queues), extra_qemu_args=[*disk_args, *args],
                  num_queues=self.queues, smp=self.queues, timeout=900, packed=self.packed,
                  # A panicked kernel spins instead of rebooting (-no-reboot would make QEMU
                  # exit): its QEMU still answers QMP and its virtio state can be read.
                  extra_kernel_args=["panic=0"],
                  console_log=self.workdir / f"q{n}.console")
        g.start()
        self.guests[n] = g
        q = Qmp(qmp_path)
        self.qmps[n] = q
        return g, q

    def _wait(self, n: int, pattern: str) -> str:
        """The first console line of QEMU ``n`` matching ``pattern``; a panic, QEMU exiting or
        the phase timeout is a :class:`ScenarioFailure`.  Never kills QEMU (the diagnostics
        need it alive)."""
        g = self.guests[n]
        rx = re.compile(pattern)
        panic = re.compile(PANIC)
        deadline = time.monotonic() + self.phase_timeout
        while True:
            lines = g.console.splitlines()
            for line in lines:
                if rx.search(line):
                    return line
            if any(panic.search(ln) for ln in lines):
                raise ScenarioFailure(self._panic_signature(n))
            if not g.running():
                oops = first_oops(g.console)
                if oops:
                    raise ScenarioFailure(self._panic_signature(n))
                raise ScenarioFailure(f"QEMU {n} exited in phase {self.phase}")
            if time.monotonic() > deadline:
                raise ScenarioFailure(f"hang in phase {self.phase} (QEMU {n}, guest at "
                                      f"{self._guest_phase(n)})")
            time.sleep(0.5)

    def _guest_phase(self, n: int) -> str:
        """The workload's last phase as of QEMU ``n`` (the guest's console is the consoles of
        the QEMUs it ran on, one after the other)."""
        console = "\n".join(self.guests[i].console for i in sorted(self.guests) if i <= n)
        phases = re.findall(r"^@@PHASE (\S+)", console, re.M)
        return phases[-1] if phases else "boot"

    def _panic_signature(self, n: int) -> str:
        what = "guest panic" if re.search(PANIC, self.guests[n].console) else "guest oops"
        return (f"{what} on QEMU {n} in phase {self.phase} (guest at "
                f"{self._guest_phase(n)}): {first_oops(self.guests[n].console)}")

    def _check_no_panic(self) -> None:
        for n, g in self.guests.items():
            if first_oops(g.console):
                raise ScenarioFailure(self._panic_signature(n))

    def _migrate(self, src: int, dst: int) -> dict[str, Any]:
        """Migrate QEMU ``src`` to ``dst``; query-migrate's final answer."""
        qmp = self.qmps[src]
        qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 2 << 30})  # a local socket
        qmp.cmd("migrate", uri=f"unix:{self.workdir / f'q{dst}.mig'}")
        deadline = time.monotonic() + self.phase_timeout
        while True:
            info = qmp.cmd("query-migrate")
            status = info.get("status")
            if status == "completed":
                return dict(info)
            if status in ("failed", "cancelled"):
                raise ScenarioFailure(f"migration {src}->{dst} {status}: "
                                      f"{info.get('error-desc', '')}", json.dumps(info))
            if time.monotonic() > deadline:
                raise ScenarioFailure(f"hang in phase {self.phase} (migration {src}->{dst} "
                                      f"{status})", json.dumps(info))
            time.sleep(0.2)

    def _wait_running(self, n: int, timeout: float = 60.0) -> None:
        """QEMU ``n``, the destination of a migration the source reports completed, runs.

        The source says "completed" once it has sent everything; the destination may still be
        loading the last of it ("inmigrate") for a moment -- seen once, under load.  Any other
        state, or "inmigrate" for ``timeout`` s, is a failed migration.
        """
        deadline = time.monotonic() + timeout
        while True:
            status = self.qmps[n].cmd("query-status")["status"]
            if status == "running":
                return
            if status != "inmigrate" or time.monotonic() > deadline:
                raise ScenarioFailure(f"migration to QEMU {n} failed: destination {status}")
            time.sleep(0.1)

    def _quit(self, n: int) -> None:
        with contextlib.suppress(Exception):
            self.qmps[n].cmd("quit")
        self.qmps.pop(n).close()
        self.guests[n].wait(60)

    # -- the run
    def run(self) -> Outcome:
        t0 = time.monotonic()
        out = Outcome(self.backend.name, self.queues, ok=False, signature="", duration=0.0,
                      packed=self.packed)
        try:
            summary = self._scenario()
            self._check_backend_after()
            self._check_ring_layout(self.guests[1].console)
            out.ok, out.signature, out.summary = True, "ok", summary
        except ScenarioFailure as exc:
            out.signature = exc.signature
            out.diagnostics = self.diagnostics(exc.detail)
        except Exception as exc:  # e.g. a QMP error: classified, not raised
            out.signature = self._classify(exc)
            out.diagnostics = self.diagnostics(f"{type(exc).__name__}: {exc}")
        finally:
            problems = self._teardown()
            if problems and out.ok:
                out.ok, out.signature = False, f"backend error: {'; '.join(problems)}"
                out.diagnostics = self.diagnostics("")
        out.phase = self.phase
        out.duration = time.monotonic() - t0
        out.measurements = self.measured
        return out

    def _classify(self, exc: BaseException) -> str:
        """A signature for an error the scenario did not raise itself (QMP, QEMU gone...)."""
        for n, g in self.guests.items():
            if first_oops(g.console):
                return self._panic_signature(n)
        errors = self.backend.errors()
        if errors:
            return f"backend error in phase {self.phase}: {errors[0][:200]}"
        dead = [n for n, g in self.guests.items() if not g.running()]
        if dead:
            return f"QEMU {dead[0]} exited in phase {self.phase} ({type(exc).__name__})"
        return f"error in phase {self.phase}: {type(exc).__name__}: {str(exc)[:200]}"

    def _scenario(self) -> str:
        self.phase = "start"
        self.image.parent.mkdir(parents=True, exist_ok=True)
        with self.image.open("wb") as f:
            f.truncate(IMAGE_SIZE)
        self.backend.start()
        self._start_qemu(1, incoming=False)
        self._start_qemu(2, incoming=True)

        # 1. Mid-write: a few seconds into fio's write pass.
        self.phase = "boot"
        self._wait(1, r"^@@PHASE write")
        time.sleep(1)
        self.phase = "migration 1"
        t0 = time.monotonic()
        info1 = self._migrate(1, 2)
        took1 = time.monotonic() - t0
        if "@@RESULT-END write" in self.guests[1].console:
            raise ScenarioFailure("scenario broken: fio finished before the migration")
        self._wait_running(2)
        self._quit(1)

        # 2. The destination finishes the write and verifies everything: zero errors.
        self.phase = "write+verify after migration 1"
        self._wait(2, r"^@@RESULT-END verify ")
        for name in ("write", "verify"):
            check_fio(name, self.guests[2].console)

        # 3. Back to the first backend, mid-verify (the backend writes read data into the guest).
        self.phase = "start QEMU 3"
        self._start_qemu(3, incoming=True)
        self.phase = "reverify before migration 2"
        self._wait(2, r"^@@PHASE reverify")
        time.sleep(1)
        self.phase = "migration 2"
        t0 = time.monotonic()
        info2 = self._migrate(2, 3)
        took2 = time.monotonic() - t0
        self._quit(2)
        for name in reverify_passes(self.guests[2].console):  # passes before the migration
            check_fio(name, self.guests[2].console)
        # The pass that was running when the guest moved ends on QEMU 3: zero errors.  Its
        # result may have begun on QEMU 2's console (printed while RAM was being copied): the
        # guest's console is QEMU 2's up to the switch-over, then QEMU 3's.
        self.phase = "reverify after migration 2"
        line = self._wait(3, r"^@@RESULT-END reverify\d+ ")
        check_fio(line.split()[1], self.guests[2].console, self.guests[3].console)
        self._check_no_panic()
        self.phase = "done"
        self._quit(3)
        self.measured = {"migration1_s": took1, "migration2_s": took2,
                         "downtime1_ms": info1.get("downtime"),
                         "downtime2_ms": info2.get("downtime")}
        return (f"migration 1 {took1:.2f} s (QEMU total-time {info1['total-time']} ms, downtime "
                f"{info1.get('downtime')} ms, {info1['ram']['transferred'] >> 20} MiB sent, "
                f"dirty syncs {info1['ram'].get('dirty-sync-count')}); migration 2 "
                f"{took2:.2f} s (total-time {info2['total-time']} ms, downtime "
                f"{info2.get('downtime')} ms)")

    def _check_ring_layout(self, console: str) -> None:
        """The guest drove the ring layout asked for, as it reported on ``console`` (QEMU 1's,
        where it booted; a migration never renegotiates features).  Checked once the rest has
        passed: QEMU with ``packed=on`` and a backend that does not offer packed rings runs
        the whole scenario on split rings, and only this tells."""
        result = parse_results(console).get("features")
        if result is None or result[0] != 0:
            raise ScenarioFailure("no features result from the guest",
                                  "" if result is None else result[1].decode(errors="replace"))
        try:
            bits = parse_features(result[1].decode(errors="replace"))
        except ValueError as exc:
            raise ScenarioFailure("no features result from the guest", str(exc)) from None
        if (VIRTIO_F_RING_PACKED in bits) != self.packed:
            shown = result[1].decode(errors="replace").strip()
            raise ScenarioFailure(
                f"packed ring {'not ' if self.packed else ''}negotiated with "
                f"packed={'on' if self.packed else 'off'} (features {shown})")

    def _check_backend_after(self) -> None:
        """What only the backend can get wrong, once the guests are gone."""
        errors = self.backend.errors()
        if errors:
            raise ScenarioFailure(f"backend error: {errors[0][:200]}", "\n".join(errors))
        if self.backend.name == "server":
            a, b = self.backend.daemons
            assert isinstance(a, ServerDaemon) and isinstance(b, ServerDaemon)
            pages_a, pages_b = a.marked_pages(), b.marked_pages()
            # Each source of a migration marked pages in QEMU's dirty log.
            if not (pages_a and pages_a[0] > 0 and pages_b and pages_b[0] > 0):
                raise ScenarioFailure(f"no dirty pages marked (a {pages_a}, b {pages_b})")
            self.measured.update(pages_marked_a=pages_a[0], pages_marked_b=pages_b[0])

    def diagnostics(self, detail: str) -> str:
        """Everything needed to find the cause, read before anything is killed."""
        out = [f"=== failure in phase {self.phase}"]
        if detail:
            out.append(detail)
        # The backend's view first: the QEMU queries below may mark QEMU's device broken.
        backend = self.backend.diagnostics()
        for n, g in sorted(self.guests.items()):
            qmp = self.qmps.get(n)
            state = "running" if g.running() else f"exited ({g.returncode})"
            out.append(f"=== QEMU {n} ({state}) virtio state:")
            if qmp is not None and g.running():
                out.append(virtio_diagnostics(qmp, self.queues))
            out.append(f"=== QEMU {n} console tail (fio's base64 results left out):\n"
                       f"{console_tail(g.console, 60)}")
            if g.stderr.strip():
                out.append(f"=== QEMU {n} stderr:\n{g.stderr}")
        out.append(backend)
        return "\n".join(out)

    def _teardown(self) -> list[str]:
        for q in self.qmps.values():
            q.close()
        for g in self.guests.values():
            g.kill()
        problems = self.backend.stop()
        return problems


def run_scenario(backend: str, queues: int, workdir: Path,
                 phase_timeout: float = PHASE_TIMEOUT, packed: bool = False) -> Outcome:
    """One run of the scenario (see the module docstring); never raises for what it tests."""
    return Scenario(backend, queues, workdir, phase_timeout, packed).run()

