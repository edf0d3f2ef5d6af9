"""A storage daemon started with qemu-storage-daemon's options, for the e2e tests that run the
same scenario against QSD (the reference) and this server."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from qemu_guest.hotplug import Monitor

REPO = Path(__file__).resolve().parents[2]


class Daemon:
    """A storage daemon started with QSD's options, with a QMP monitor on a --chardev."""

    def __init__(self, kind: str, work: Path) -> None:
        self.kind = kind
        self.work = work
        self.qmp_path = work / "daemon.qmp"
        self.log_path = work / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.mon: Monitor | None = None

    def start(self, *options: str) -> Monitor:
        monitor = ["--chardev", f"socket,id=mon0,path={self.qmp_path},server=on,wait=off",
                   "--monitor", "chardev=mon0"]
        if self.kind == "qsd":
            binary = shutil.which("qemu-storage-daemon")
            assert binary, "qemu-storage-daemon not installed (qemu-system-common)"
            cmd = [binary, *options, *monitor]
        else:
            cmd = [sys.executable, "-m", "storage_daemon", *options, *monitor]
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 20
        while not self.qmp_path.exists():
            assert self.proc.poll() is None, f"{self.kind} exited: {self.log}"
            assert time.monotonic() < deadline, f"{self.kind} has no QMP socket: {self.log}"
            time.sleep(0.05)
        self.mon = Monitor(self.qmp_path)
        return self.mon

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def quit(self) -> int:
        assert self.mon is not None and self.proc is not None
        self.mon.cmd("quit")
        self.mon.close()
        return self.proc.wait(20)

    def kill(self) -> None:
        if self.mon is not None:
            self.mon.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
