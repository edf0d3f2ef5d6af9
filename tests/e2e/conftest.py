"""Fixtures for the end-to-end tests: this project's server as a real subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from qemu_guest import ensure_guest

REPO = Path(__file__).resolve().parents[2]


class Server:
    """``python -m storage_daemon`` on a fresh image, started and stopped like a user would."""

    def __init__(self, workdir: Path, *args: str, size: str = "1G",
                 image: Path | None = None, spec: str | None = None,
                 launcher: Sequence[str] = ()) -> None:
        """``spec``: serve that ``--image`` (an rbd:/nbd:// spec) instead of a created file;
        ``launcher``: argv the server runs under (it must run it as its only child)."""
        self.workdir = workdir
        self.sock = workdir / "vub.sock"
        self.image = image or workdir / "disk.img"
        self.log_path = workdir / "server.log"
        self.args = list(args)
        self.size = size
        self.spec = spec
        self.launcher = list(launcher)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        image = ["--image", self.spec] if self.spec else \
            ["--image", str(self.image), "--create", self.size]
        cmd = [*self.launcher, sys.executable, "-m", "storage_daemon", "--socket", str(self.sock),
               *image, *self.args]
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log}")
            if self.sock.exists():
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(str(self.sock))
                    probe.close()
                    return self
                except OSError:
                    probe.close()
            time.sleep(0.05)
        raise AssertionError(f"server did not listen within 30 s:\n{self.log}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        """The server's own pid (under a launcher, the launcher's child)."""
        assert self.proc is not None
        if not self.launcher:
            return self.proc.pid
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return int(children.split()[0])

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM, as a service manager would; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            pid = self.pid
            os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"server ignored SIGTERM for 30 s:\n{self.log}") from None
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """Build (or reuse) the test guest once per session."""
    return ensure_guest()


@pytest.fixture
def server(tmp_path: Path, guest_image: Path) -> Iterator:
    """server(*args, size=...) starts our server; each is stopped (and must exit 0) after."""
    started: list[Server] = []

    def start(*args: str, size: str = "1G", launcher: Sequence[str] = ()) -> Server:
        srv = Server(tmp_path, *args, size=size, launcher=launcher).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        if srv.alive:
            rc = srv.stop()
            assert rc == 0, f"server exited with {rc}:\n{srv.log}"


def image_bytes(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        return os.pread(f.fileno(), length, offset)
