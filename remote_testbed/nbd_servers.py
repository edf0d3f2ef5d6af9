"""Real NBD servers for tests: ``qemu-nbd`` on a raw file and ``nbdkit``'s memory plugin, on a
Unix socket or on TCP 127.0.0.1 (loopback only), that a test can kill and restart."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

EXPORT = "disk"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NbdServer:
    """One server process; :attr:`uri` is the ``--image`` spec that reaches it."""

    def __init__(self, kind: str, transport: str, workdir: Path, size: int = 64 << 20,
                 image: Path | None = None, read_only: bool = False,
                 extra: tuple[str, ...] = (), params: tuple[str, ...] = ()) -> None:
        """``extra``: options before the image/plugin (nbdkit filters); ``params``: nbdkit
        KEY=VALUE parameters (after the plugin)."""
        if kind not in ("qemu-nbd", "nbdkit") or transport not in ("unix", "tcp"):
            raise ValueError(f"{kind}/{transport}")
        self.kind = kind
        self.transport = transport
        self.size = size
        self.read_only = read_only
        self.extra = extra
        self.params = params
        self.sock = workdir / f"{kind}.sock"
        self.port = free_port() if transport == "tcp" else 0
        self.image = image if image is not None else workdir / "nbd.img"
        if kind == "qemu-nbd" and not self.image.exists():
            with open(self.image, "wb") as f:
                f.truncate(size)
        self.log = workdir / f"{kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        if self.transport == "unix":
            return f"nbd+unix:///{EXPORT}?socket={self.sock}"
        return f"nbd://127.0.0.1:{self.port}/{EXPORT}"

    def argv(self) -> list[str]:
        if self.kind == "qemu-nbd":
            where = (["-k", str(self.sock)] if self.transport == "unix"
                     else ["-b", "127.0.0.1", "-p", str(self.port)])
            ro = ["-r"] if self.read_only else ["--discard=unmap"]
            return ["qemu-nbd", "-t", "--shared=16", "-f", "raw", "-x", EXPORT, *ro, *where,
                    *self.extra, str(self.image)]
        where = (["-U", str(self.sock)] if self.transport == "unix"
                 else ["-i", "127.0.0.1", "-p", str(self.port)])
        ro = ["-r"] if self.read_only else []
        return ["nbdkit", "-f", "--exit-with-parent", *where, *ro, *self.extra, "memory",
                str(self.size), *self.params]

    def start(self, timeout: float = 30) -> None:
        if self.transport == "unix":
            self.sock.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited: {self.log.read_text()[-500:]}")
            if self._listening():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} did not start listening")

    def _listening(self) -> bool:
        if self.transport == "unix":
            if not self.sock.exists():
                return False
            s = socket.socket(socket.AF_UNIX)
            addr: object = str(self.sock)
        else:
            s = socket.socket()
            addr = ("127.0.0.1", self.port)
        with s:
            try:
                s.connect(addr)  # type: ignore[arg-type]
                return True
            except OSError:
                return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:  # nbdkit waits for its clients on SIGTERM
                self.proc.kill()
                self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def read(self, offset: int, length: int) -> bytes:
        """The export's bytes as the file holds them (qemu-nbd only)."""
        fd = os.open(self.image, os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)


def missing(kind: str) -> bool:
    return shutil.which(kind) is None
