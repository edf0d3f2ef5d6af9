"""Running the ``python -m storage_daemon`` command in tests: to completion, or as a server whose
stderr is read on a thread, and a frontend connected to it (shared by the CLI tests)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vhost_frontend import Frontend, FrontendMemory
from vhost_frontend.blk import BlkDriver

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 20.0


def command(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "storage_daemon", *(os.fspath(arg) for arg in args)]


def run(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """Run the command to completion (it must exit on its own)."""
    return subprocess.run(command(*args), cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


def qmp(path: Path, *commands: str) -> list[dict[str, Any]]:
    """Replies to ``commands`` (JSON texts) on a fresh QMP connection, after the greeting and
    ``qmp_capabilities``.  Events that arrive meanwhile (BLOCK_EXPORT_DELETED of an export
    still closing, say) are skipped: each reply is the next line that is not an event."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        f = sock.makefile("rb")
        assert "QMP" in json.loads(f.readline())
        sock.sendall(b'{"execute": "qmp_capabilities"}')
        assert json.loads(f.readline()) == {"return": {}}
        replies = []
        for cmd in commands:
            sock.sendall(cmd.encode())
            while "event" in (reply := json.loads(f.readline())):
                pass
            replies.append(reply)
        return replies


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vhost-user-blk: error: ")
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert proc.stdout == ""


class Server:
    """A running ``python -m storage_daemon``; its stderr lines are collected on a thread."""

    def __init__(self, *args: str | os.PathLike[str], pass_fds: Sequence[int] = (),
                 launcher: Sequence[str] = ()) -> None:
        """``launcher``: argv put before the command (a shell that sets up fds, say)."""
        self.proc = subprocess.Popen([*launcher, *command(*args)], cwd=REPO,
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, pass_fds=pass_fds)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> str:
        """The first stderr line (from now on) matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r}; got {self.lines}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"exited ({self.proc.wait(5)}) before {pattern!r}: "
                                     f"{self.lines}")
            self.lines.append(line)
            if re.search(pattern, line):
                return line

    def started(self) -> str:
        return self.wait_for(r" serving ")

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> tuple[int, float]:
        """Send ``sig``; (exit status, seconds it took)."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        took = time.monotonic() - t0
        self._reader.join(5)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return rc, took

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def connect(path: Path | str) -> tuple[Frontend, FrontendMemory, BlkDriver]:
    fe = Frontend(path)
    mem = FrontendMemory([(0, 8 << 20, 0)])
    fe.negotiate()
    fe.set_mem_table(mem)
    q = fe.setup_queue(0, size=64)
    return fe, mem, BlkDriver(fe, q, mem)
