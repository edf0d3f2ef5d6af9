"""Boot a throw-away Linux guest in QEMU attached to a vhost-user-blk socket.

The guest (a Debian kernel plus a busybox/fio initramfs) is built by
``qemu-configs/build-guest.sh`` and cached (see :func:`guest_dir`).  Each run gets its own
initrd: the cached ``initramfs.cpio.gz`` followed by a small uncompressed newc archive that
holds ``/workload.sh`` -- Linux unpacks concatenated initramfs archives in order, so the
script never has to go through the (size-limited) kernel command line.

The guest's ``/init`` (``qemu-configs/guest-init.sh``) loads the virtio/ext4 modules, waits
for ``/dev/vda``, sources the workload and powers off.  The workload reports back on the
serial console with the ``result`` shell helper::

    result NAME CMD ARGS...     # -> @@RESULT-BEGIN NAME / base64 lines / @@RESULT-END NAME rc=N

Example::

    from qemu_guest import Guest

    with Guest(sock, "result size blockdev --getsize64 /dev/vda", timeout=120) as g:
        res = g.wait()
    assert res.rc("size") == 0 and int(res.text("size")) == 1 << 30
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
"""Root of the project checkout."""

BUILD_SCRIPT = REPO_ROOT / "qemu-configs" / "build-guest.sh"
"""Script that builds (or validates the cache of) the guest kernel and initramfs."""

QEMU_BINARY = os.environ.get("VUB_QEMU", "qemu-system-x86_64")
"""QEMU system emulator to run (override with $VUB_QEMU)."""

DEFAULT_KERNEL_ARGS: tuple[str, ...] = (
    "console=ttyS0",
    "quiet",
    "loglevel=1",
    "panic=-1",
    "oops=panic",
    "mitigations=off",
)
"""Kernel command line used for every run (extra arguments are appended)."""

MARKER = "@@"
"""Prefix of every protocol line printed by the guest."""

FEATURES_PATH = "/sys/block/vda/device/features"
"""The guest's view of the virtio features the driver negotiated with the device: one ``0``/``1``
character per feature bit, bit 0 first (Linux's ``virtio_bus`` ``features`` attribute)."""

VIRTIO_F_RING_PACKED = 34
"""Feature bit of the packed virtqueue layout (virtio 1.1+, 2.8): character 34 of
:data:`FEATURES_PATH` is ``1`` when the guest drives packed rings."""

_B64_LINE = re.compile(r"^[A-Za-z0-9+/=]+$")
_RESULT_END = re.compile(r"^@@RESULT-END (\S+) rc=(-?\d+)\s*$")
_RC = re.compile(r"rc=(-?\d+)")


class GuestError(RuntimeError):
    """The guest run failed (QEMU could not start, the guest did not finish, ...)."""


class GuestTimeout(GuestError):
    """The guest did not finish within its timeout; QEMU has been killed."""


# --------------------------------------------------------------------------- guest image


def guest_dir() -> Path:
    """Directory holding the built guest (``vmlinuz``, ``initramfs.cpio.gz``, ``stamp``).

    ``$VUB_GUEST_DIR`` if set, else ``${XDG_CACHE_HOME:-~/.cache}/vhost-user-blk/guest``;
    the same default as ``build-guest.sh``.
    """
    env = os.environ.get("VUB_GUEST_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "vhost-user-blk" / "guest"


_ensured: dict[Path, Path] = {}
_ensure_lock = threading.Lock()


def ensure_guest(force: bool = False, outdir: Path | None = None) -> Path:
    """Build the guest if needed and return its directory.

    Runs ``build-guest.sh`` (which exits at once when its stamp matches) the first time it
    is called in a process, or every time with ``force=True`` (which forces a rebuild).

    Raises:
        GuestError: the build failed; the message has the tail of its output.
    """
    out = Path(outdir) if outdir is not None else guest_dir()
    with _ensure_lock:
        if not force and out in _ensured:
            return _ensured[out]
        cmd = ["bash", str(BUILD_SCRIPT), *(["--force"] if force else []), str(out)]
        log.info("ensuring guest image: %s", " ".join(cmd))
        t0 = time.monotonic()
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        for line in proc.stderr.splitlines():
            log.debug("build-guest: %s", line)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise GuestError(f"{BUILD_SCRIPT} failed (rc={proc.returncode}):\n{tail}")
        for name in ("vmlinuz", "initramfs.cpio.gz"):
            if not (out / name).is_file():
                raise GuestError(f"{BUILD_SCRIPT} succeeded but {out / name} is missing")
        log.info("guest image ready in %.1fs: %s", time.monotonic() - t0, out)
        _ensured[out] = out
        return out


def newc_archive(files: Mapping[str, bytes | tuple[bytes, int]]) -> bytes:
    """Return an uncompressed ``newc`` cpio archive holding regular files.

    Args:
        files: archive path (no leading ``/``) -> content, or (content, mode bits).
            Parent directories are added automatically (mode 0755).
    """
    entries: list[tuple[str, int, bytes]] = []
    dirs: set[str] = set()
    for name, value in files.items():
        name = name.lstrip("/")
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                entries.append((d, 0o040755, b""))
        data, mode = value if isinstance(value, tuple) else (value, 0o644)
        entries.append((name, 0o100000 | (mode & 0o7777), data))
    entries.append(("TRAILER!!!", 0, b""))

    out = bytearray()
    for ino, (name, mode, data) in enumerate(entries, start=1):
        bname = name.encode() + b"\0"
        nlink = 2 if mode & 0o040000 else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(bname), 0)
        out += b"070701" + b"".join(b"%08X" % v for v in fields) + bname
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    out += b"\0" * (-len(out) % 512)
    return bytes(out)


def make_initrd(workload_script: str, dest: Path, guest: Path | None = None) -> Path:
    """Write ``dest``: the cached initramfs followed by an archive holding ``/workload.sh``.

    Linux unpacks concatenated initramfs archives one after the other into the same rootfs.
    """
    guest = guest or ensure_guest()
    script = workload_script if workload_script.endswith("\n") else workload_script + "\n"
    extra = newc_archive({"workload.sh": (script.encode(), 0o755)})
    with open(guest / "initramfs.cpio.gz", "rb") as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
        # The kernel only recognises an uncompressed archive that follows a compressed one
        # at a 4-byte aligned offset (it skips zero padding); a gzip file has any length.
        out.write(b"\0" * (-out.tell() % 512))
        out.write(extra)
    return dest


# --------------------------------------------------------------------------- fio results


@dataclass(frozen=True)
class FioJob:
    """Per-job figures from fio's ``--output-format=json``."""

    name: str
    error: int
    read_iops: float
    write_iops: float
    read_bw: int
    """Read bandwidth, bytes/s."""
    write_bw: int
    """Write bandwidth, bytes/s."""
    read_io_bytes: int
    write_io_bytes: int
    read_lat_mean_ns: float
    write_lat_mean_ns: float
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def iops(self) -> float:
        """Read plus write IOPS."""
        return self.read_iops + self.write_iops

    @property
    def bw(self) -> int:
        """Read plus write bandwidth, bytes/s."""
        return self.read_bw + self.write_bw


@dataclass(frozen=True)
class FioResult:
    """A parsed fio JSON report."""

    jobs: list[FioJob]
    raw: dict[str, Any] = field(repr=False)

    @property
    def iops(self) -> float:
        """Total IOPS over all jobs."""
        return sum(j.iops for j in self.jobs)

    @property
    def bw(self) -> int:
        """Total bandwidth over all jobs, bytes/s."""
        return sum(j.bw for j in self.jobs)

    @property
    def errors(self) -> dict[str, int]:
        """Job name -> fio error code, for the jobs that failed."""
        return {j.name: j.error for j in self.jobs if j.error}


def _extract_json(text: str) -> dict[str, Any]:
    """Find the JSON object in fio output that may also hold warnings or stderr lines."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"^\{", text, re.MULTILINE):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "jobs" in obj:
            return obj
    raise ValueError(f"no fio JSON report in output: {text[:500]!r}")


def parse_fio_json(output: bytes | str) -> FioResult:
    """Parse fio ``--output-format=json`` output (stderr lines mixed in are tolerated).

    Raises:
        ValueError: no fio JSON report found.
    """
    text = output.decode("utf-8", "replace") if isinstance(output, bytes) else output
    data = _extract_json(text)
    jobs = []
    for job in data["jobs"]:
        rd, wr = job.get("read", {}), job.get("write", {})
        jobs.append(
            FioJob(
                name=str(job.get("jobname", "")),
                error=int(job.get("error", 0)),
                read_iops=float(rd.get("iops", 0.0)),
                write_iops=float(wr.get("iops", 0.0)),
                read_bw=int(rd.get("bw_bytes", rd.get("bw", 0) * 1024)),
                write_bw=int(wr.get("bw_bytes", wr.get("bw", 0) * 1024)),
                read_io_bytes=int(rd.get("io_bytes", 0)),
                write_io_bytes=int(wr.get("io_bytes", 0)),
                read_lat_mean_ns=float(rd.get("lat_ns", {}).get("mean", 0.0)),
                write_lat_mean_ns=float(wr.get("lat_ns", {}).get("mean", 0.0)),
                raw=job,
            )
        )
    return FioResult(jobs=jobs, raw=data)


# --------------------------------------------------------------------------- negotiated features


def features_command(name: str = "features") -> str:
    """A workload line that reports the disk's negotiated feature bits as result ``name``
    (read them back with :meth:`GuestResult.features`)."""
    return f"result {name} cat {FEATURES_PATH}"


def parse_features(text: str) -> frozenset[int]:
    """The set bits of a ``features`` string (``0``/``1`` per bit, bit 0 first).

    The string is the guest's, so anything else in it is an error rather than a guess: a
    missing file or a truncated read must not pass for "bit 34 clear" or "bit 34 set".

    Raises:
        ValueError: ``text`` is not one non-empty line of ``0`` and ``1``.
    """
    bits = text.strip()
    if not bits or set(bits) - {"0", "1"}:
        raise ValueError(f"not a virtio features string: {text[:200]!r}")
    return frozenset(i for i, c in enumerate(bits) if c == "1")


# --------------------------------------------------------------------------- console parsing


def parse_results(console: str) -> dict[str, tuple[int, bytes]]:
    """Extract ``NAME -> (rc, output)`` from ``@@RESULT-BEGIN/END`` blocks in console text.

    Lines inside a block that are not base64 (e.g. a stray kernel message) are ignored.
    A later result with the same name replaces an earlier one.
    """
    results: dict[str, tuple[int, bytes]] = {}
    current: str | None = None
    chunks: list[str] = []
    for raw_line in console.splitlines():
        line = raw_line.strip().strip("\r")
        if line.startswith("@@RESULT-BEGIN "):
            current = line.split(" ", 1)[1].strip()
            chunks = []
            continue
        if current is None:
            continue
        m = _RESULT_END.match(line)
        if m:
            if m.group(1) == current:
                data = "".join(chunks)
                try:
                    payload = base64.b64decode(data + "=" * (-len(data) % 4))
                except binascii.Error:
                    payload = b""
                    log.warning("result %s: undecodable base64 payload", current)
                results[current] = (int(m.group(2)), payload)
            current = None
            continue
        if _B64_LINE.match(line):
            chunks.append(line)
    return results


@dataclass
class GuestResult:
    """Outcome of one guest run."""

    returncode: int | None
    """QEMU's exit code (None if it had to be killed)."""
    console: str
    """Everything the guest printed on its serial console."""
    results: dict[str, tuple[int, bytes]]
    """``result`` NAME -> (exit code, captured stdout+stderr)."""
    done: bool
    """The guest printed ``@@GUEST-DONE``."""
    workload_rc: int | None
    """Exit status of /workload.sh (None if it never ended)."""
    elapsed: float
    """Seconds from QEMU start to its exit."""
    boot_time: float | None
    """Seconds from QEMU start to ``@@WORKLOAD-START`` (includes waiting for the disk)."""
    init_time: float | None = None
    """Seconds from QEMU start to ``@@INIT-START`` (kernel boot and initramfs unpacking)."""
    qemu_stderr: str = ""
    killed: bool = False
    """QEMU was killed (by :meth:`Guest.kill` or after GUEST-DONE without exiting)."""

    @property
    def markers(self) -> list[str]:
        """All ``@@`` protocol lines except result payload markers."""
        return [
            ln.strip()
            for ln in self.console.splitlines()
            if ln.strip().startswith(MARKER) and not ln.strip().startswith("@@RESULT-")
        ]

    @property
    def workload_started(self) -> bool:
        """The guest found /workload.sh and started it."""
        return any(m.startswith("@@WORKLOAD-START") for m in self.markers)

    @property
    def disk(self) -> dict[str, str] | None:
        """Fields of the ``@@DISK`` line (name, size, queues), None if no disk appeared."""
        for m in self.markers:
            if m.startswith("@@DISK "):
                return dict(kv.split("=", 1) for kv in m.split()[1:] if "=" in kv)
        return None

    def rc(self, name: str) -> int:
        """Exit code of result ``name`` (KeyError with the console tail if absent)."""
        return self._get(name)[0]

    def output(self, name: str) -> bytes:
        """Captured output of result ``name``."""
        return self._get(name)[1]

    def text(self, name: str) -> str:
        """Captured output of result ``name`` as stripped text."""
        return self._get(name)[1].decode("utf-8", "replace").strip()

    def check(self, name: str) -> bytes:
        """Output of result ``name``; raise GuestError if its exit code is not 0."""
        rc, out = self._get(name)
        if rc != 0:
            text = out.decode("utf-8", "replace")
            raise GuestError(f"guest command {name!r} failed rc={rc}:\n{text[-4000:]}")
        return out

    def fio(self, name: str) -> FioResult:
        """Parse result ``name`` as fio JSON output."""
        return parse_fio_json(self.output(name))

    def features(self, name: str = "features") -> frozenset[int]:
        """The negotiated virtio feature bits the guest reported with
        :func:`features_command` as result ``name``.

        Raises:
            GuestError: the guest could not read the features file (its output says why).
            ValueError: it printed something that is not a features string.
        """
        return parse_features(self.check(name).decode("ascii", "replace"))

    def tail(self, lines: int = 40) -> str:
        """Last lines of the console."""
        return "\n".join(self.console.splitlines()[-lines:])

    def _get(self, name: str) -> tuple[int, bytes]:
        try:
            return self.results[name]
        except KeyError:
            raise KeyError(
                f"no result {name!r} (have {sorted(self.results)}); console tail:\n{self.tail()}"
            ) from None


# --------------------------------------------------------------------------- the runner


class Guest:
    """One QEMU guest run attached to a vhost-user-blk socket.

    Construct, then :meth:`start` (or use as a context manager, which starts it and kills
    QEMU on exit if it is still running), then :meth:`wait`.

    Args:
        socket_path: vhost-user socket of the backend (the backend listens, QEMU connects);
            None for a guest without a disk.
        workload_script: busybox sh script run by the guest's /init (see the module doc).
        num_queues: virtio-blk queues (the guest uses min(num_queues, smp) of them).
        smp: guest vCPUs.
        mem: guest RAM, e.g. ``"1G"`` (memfd-backed, shared, as vhost-user requires).
        reconnect: add ``reconnect=1`` to the socket chardev (QEMU re-connects to a
            restarted backend).
        packed: add ``packed=on`` to the device: QEMU offers the guest the packed virtqueue
            (VIRTIO_F_RING_PACKED) if the backend does; if it does not, QEMU masks the bit and
            the guest silently uses split rings -- check :meth:`GuestResult.features`.
        extra_qemu_args: appended to the QEMU command line.
        extra_kernel_args: appended to the kernel command line.
        timeout: default for :meth:`wait`, seconds.
        devwait: seconds the guest waits for /dev/vda before running the workload anyway.
        console_log: also write the console there (else a file in the run's temp dir).
        guest: prebuilt guest directory (default: :func:`ensure_guest`).
        machine: QEMU machine type.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None,
        workload_script: str,
        *,
        num_queues: int = 1,
        smp: int = 1,
        mem: str = "1G",
        reconnect: bool = False,
        packed: bool = False,
        extra_qemu_args: Sequence[str] = (),
        extra_kernel_args: Sequence[str] = (),
        timeout: float = 300.0,
        devwait: int = 30,
        console_log: str | os.PathLike[str] | None = None,
        guest: Path | None = None,
        machine: str = "q35",
    ) -> None:
        self.socket_path = None if socket_path is None else Path(socket_path)
        self.workload_script = workload_script
        self.num_queues = num_queues
        self.smp = smp
        self.mem = mem
        self.reconnect = reconnect
        self.packed = packed
        self.extra_qemu_args = list(extra_qemu_args)
        self.extra_kernel_args = list(extra_kernel_args)
        self.timeout = timeout
        self.devwait = devwait
        self.machine = machine
        self._guest = guest
        self._console_log_path = Path(console_log) if console_log else None
        self._workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines: list[str] = []
        self._partial = ""
        self._stderr: collections.deque[str] = collections.deque(maxlen=200)
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._t_start = 0.0
        self._t_workload: float | None = None
        self._t_init: float | None = None
        self._t_done: float | None = None
        self._killed = False
        self._killed_on_purpose = False
        self._result: GuestResult | None = None

    # -- command line

    def kernel_cmdline(self) -> str:
        """The kernel command line of this run."""
        args = [*DEFAULT_KERNEL_ARGS, f"vub.devwait={self.devwait}", *self.extra_kernel_args]
        return " ".join(args)

    def command(self, initrd: Path | None = None, guest: Path | None = None) -> list[str]:
        """The QEMU command line (paths of the run's initrd and the guest image)."""
        g = guest or self._guest or guest_dir()
        initrd = initrd or (g / "initramfs.cpio.gz")
        cmd = [
            QEMU_BINARY,
            "-machine", self.machine,
            "-accel", "tcg,thread=multi",
            "-cpu", "max",
            "-smp", str(self.smp),
            "-m", self.mem,
            "-object", f"memory-backend-memfd,id=mem,size={self.mem},share=on",
            "-numa", "node,memdev=mem",
            "-kernel", str(g / "vmlinuz"),
            "-initrd", str(initrd),
            "-append", self.kernel_cmdline(),
            "-display", "none",
            "-nodefaults",
            "-no-reboot",
            "-chardev", "stdio,id=ser0,signal=off",
            "-serial", "chardev:ser0",
        ]  # fmt: skip
        if self.socket_path is not None:
            chardev = f"socket,id=vub0,path={self.socket_path}"
            if self.reconnect:
                chardev += ",reconnect=1"
            device = f"vhost-user-blk-pci,chardev=vub0,num-queues={self.num_queues}"
            if self.packed:
                device += ",packed=on"
            cmd += ["-chardev", chardev, "-device", device]
        cmd += self.extra_qemu_args
        return cmd

    # -- lifecycle

    def start(self) -> Guest:
        """Build the per-run initrd and start QEMU (returns self)."""
        if self._proc is not None:
            raise GuestError("guest already started")
        guest = self._guest or ensure_guest()
        self._guest = guest
        self._workdir = Path(tempfile.mkdtemp(prefix="vub-guest-run-"))
        initrd = make_initrd(self.workload_script, self._workdir / "initrd", guest)
        if self._console_log_path is None:
            self._console_log_path = self._workdir / "console.log"
        cmd = self.command(initrd, guest)
        log.info("starting guest: %s", " ".join(cmd))
        self._t_start = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            self._cleanup()
            raise GuestError(f"cannot start {QEMU_BINARY}: {exc}") from exc
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read_console, args=(self._proc.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(self._proc.stderr,), daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    @property
    def pid(self) -> int:
        """PID of the QEMU process."""
        if self._proc is None:
            raise GuestError("guest not started")
        return self._proc.pid

    @property
    def console(self) -> str:
        """Console text received so far."""
        with self._cond:
            return "\n".join([*self._lines, self._partial])

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status (None while it runs or before it started)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def stderr(self) -> str:
        """QEMU's stderr so far (its last 200 lines)."""
        with self._cond:
            return "\n".join(self._stderr)

    def running(self) -> bool:
        """QEMU is still running."""
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL QEMU at once (e.g. to crash the guest mid-I/O). Idempotent."""
        self._killed_on_purpose = True
        self._kill()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            log.info("killing qemu pid %d", self._proc.pid)
            self._killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def wait_for(self, pattern: str, timeout: float | None = None) -> str:
        """Wait until a console line matches regex ``pattern``; return that line.

        Raises:
            GuestTimeout: not seen within ``timeout`` (QEMU is killed).
            GuestError: QEMU exited first.
        """
        rx = re.compile(pattern)
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    if rx.search(line):
                        return line
                seen = len(self._lines)
                if self._proc is None or (self._proc.poll() is not None and self._eof()):
                    raise GuestError(
                        f"qemu exited before {pattern!r} appeared; console tail:\n"
                        f"{self._tail()}{self._stderr_text()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
        self._kill()
        raise GuestTimeout(
            f"{pattern!r} not seen on the guest console within {timeout}s; console tail:\n"
            f"{self._tail()}{self._stderr_text()}"
        )

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait for QEMU to exit and return the run's result.

        A guest that printed ``@@GUEST-DONE`` but whose QEMU does not exit within 15 s is
        killed and its result returned.  A guest that was killed with :meth:`kill` returns
        its (partial) result.

        Raises:
            GuestTimeout: QEMU still running after ``timeout`` seconds (it is killed; the
                message has the console tail).
        """
        if self._proc is None:
            raise GuestError("guest not started")
        if self._result is not None:
            return self._result
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            while self._proc.poll() is None:
                now = time.monotonic()
                if now >= deadline:
                    self._kill()
                    self._join()
                    raise GuestTimeout(
                        f"guest did not finish within {timeout}s (qemu killed); full console "
                        f"in {self._console_log_path}; tail:\n{self._tail()}{self._stderr_text()}"
                    )
                if self._t_done is not None and now - self._t_done > 15:
                    log.warning("guest printed @@GUEST-DONE but qemu did not exit: killing it")
                    self._kill()
                    break
                with self._cond:
                    self._cond.wait(0.2)
            self._join()
            self._result = self._make_result()
            res = self._result
            log.info(
                "guest finished: qemu rc=%s done=%s workload rc=%s in %.1fs (boot %.1fs)",
                res.returncode,
                res.done,
                res.workload_rc,
                res.elapsed,
                res.boot_time or -1,
            )
            return res
        finally:
            self._cleanup()

    def __enter__(self) -> Guest:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._kill()
        self._join()
        self._cleanup()

    # -- internals

    def _eof(self) -> bool:
        return not self._threads[0].is_alive() if self._threads else True

    def _join(self) -> None:
        for t in self._threads:
            t.join(timeout=5)

    def _cleanup(self) -> None:
        """Drop the per-run initrd; drop the run directory too unless the run failed."""
        if self._workdir is None or not self._workdir.exists() or self.running():
            return
        (self._workdir / "initrd").unlink(missing_ok=True)
        # Keep the console log of runs that went wrong on their own (timeout, no
        # GUEST-DONE); runs killed on purpose with kill() are not failures.
        ok = self._killed_on_purpose or (self._result is not None and self._result.done)
        ok = ok and not os.environ.get("VUB_KEEP_RUNS")
        log_inside = self._console_log_path is not None and self._console_log_path.is_relative_to(
            self._workdir
        )
        if ok or not log_inside:
            shutil.rmtree(self._workdir, ignore_errors=True)
        else:
            log.info("guest run kept for inspection: %s", self._workdir)

    def report(self, lines: int = 40) -> str:
        """The console's last ``lines``, QEMU's stderr and whether it still runs (for a test
        that failed while this guest ran)."""
        state = "running" if self.running() else "exited"
        return f"qemu {state}; console tail:\n{self._tail(lines)}{self._stderr_text()}"

    def _tail(self, lines: int = 40) -> str:
        return "\n".join(self.console.splitlines()[-lines:])

    def _stderr_text(self) -> str:
        err = "\n".join(self._stderr)
        return f"\nqemu stderr:\n{err}" if err.strip() else ""

    def _read_console(self, stream: Any) -> None:
        path = self._console_log_path
        logf = path.open("w", encoding="utf-8") if path else None
        try:
            fd = stream.fileno()
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                text = chunk.decode("utf-8", "replace")
                if logf:
                    logf.write(text)
                    logf.flush()
                with self._cond:
                    data = (self._partial + text).replace("\r", "")
                    *complete, self._partial = data.split("\n")
                    for line in complete:
                        self._on_line(line)
                    self._lines.extend(complete)
                    self._cond.notify_all()
        finally:
            with self._cond:
                if self._partial:
                    self._on_line(self._partial)
                    self._lines.append(self._partial)
                    self._partial = ""
                self._cond.notify_all()
            if logf:
                logf.close()

    def _on_line(self, line: str) -> None:
        if not line.startswith(MARKER):
            return
        if line.startswith("@@RESULT-"):
            log.debug("guest: %s", line)
            return
        log.info("guest: %s", line)
        now = time.monotonic()
        if line.startswith("@@INIT-START"):
            self._t_init = now
        elif line.startswith("@@WORKLOAD-START"):
            self._t_workload = now
        elif line.startswith("@@GUEST-DONE"):
            self._t_done = now

    def _read_stderr(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                log.warning("qemu: %s", line)
                self._stderr.append(line)

    def _make_result(self) -> GuestResult:
        assert self._proc is not None
        console = self.console
        workload_rc = None
        done = False
        for line in console.splitlines():
            if line.startswith("@@WORKLOAD-END"):
                m = _RC.search(line)
                workload_rc = int(m.group(1)) if m else None
            elif line.startswith("@@GUEST-DONE"):
                done = True
        end = time.monotonic()
        return GuestResult(
            returncode=None if self._killed else self._proc.returncode,
            console=console,
            results=parse_results(console),
            done=done,
            workload_rc=workload_rc,
            elapsed=end - self._t_start,
            boot_time=None if self._t_workload is None else self._t_workload - self._t_start,
            init_time=None if self._t_init is None else self._t_init - self._t_start,
            qemu_stderr="\n".join(self._stderr),
            killed=self._killed,
        )


def run_guest(
    socket_path: str | os.PathLike[str] | None,
    workload_script: str,
    *,
    timeout: float = 300.0,
    check: bool = True,
    **kwargs: Any,
) -> GuestResult:
    """Start a :class:`Guest`, wait for it and return its result.

    Args:
        check: raise GuestError unless the guest started the workload and printed
            ``@@GUEST-DONE`` (a non-zero workload exit status is not an error).
        kwargs: passed to :class:`Guest`.
    """
    with Guest(socket_path, workload_script, timeout=timeout, **kwargs) as g:
        res = g.wait()
    if check and not (res.done and res.workload_started):
        raise GuestError(
            f"guest did not finish its workload (qemu rc={res.returncode}); console tail:\n"
            f"{res.tail()}\nqemu stderr:\n{res.qemu_stderr}"
        )
    return res


def shell_quote(args: Iterable[str]) -> str:
    """Quote arguments for the guest's busybox sh (POSIX single-quote quoting)."""
    return " ".join("'" + a.replace("'", "'\"'\"'") + "'" for a in args)


def accepts_connections(path: Path) -> bool:
    """Something listens on the Unix socket ``path`` (a connect succeeds; closed at once)."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
