"""Client floods and fd exhaustion against the real command, in a process of its own.

The server runs with a low ``RLIMIT_NOFILE`` (set in the child before exec).  While clients
pile up or fds run out, its CPU time (``/proc/PID/stat``) over two seconds must stay low and its
log short -- an accept loop that retries at once spins a core and writes a line per turn -- and
once the flood leaves, QMP answers again.
"""

from __future__ import annotations

import os
import queue
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.unit.cli_harness import REPO, TIMEOUT, command, qmp

#: The fd limit the server runs with: what the issue's report used.
FD_LIMIT = 40
#: How long CPU time and log lines are measured while the flood sits there.
MEASURE = 2.0
#: CPU seconds allowed in MEASURE (a busy accept loop takes ~MEASURE).
MAX_CPU = 0.1
#: Log lines allowed in MEASURE.
MAX_LINES = 20

HOG = """
import os, sys, threading, time
from pathlib import Path
from storage_daemon.cli import main

def hog() -> None:
    # Once both sockets exist, take every fd left; give them back when stdin closes.
    deadline = time.monotonic() + 20
    while not all(Path(p).exists() for p in sys.argv[1:3]) and time.monotonic() < deadline:
        time.sleep(0.01)
    fds = []
    try:
        while True:
            fds.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    print(f"HOG took {len(fds)} fds", file=sys.stderr, flush=True)
    sys.stdin.read()
    for fd in fds:
        os.close(fd)
    print("HOG released", file=sys.stderr, flush=True)

threading.Thread(target=hog, daemon=True).start()
sys.exit(main(sys.argv[3:]))
"""


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


class Proc:
    """The server process; stderr lines collected on a thread."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=_limit_fds)
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            self._new.put(line)

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if text in self._new.get(timeout=0.1):
                    return
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        raise AssertionError(f"no {text!r} in {self.lines[-20:]}")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def measure(self) -> tuple[float, int]:
        """(CPU seconds, log lines) over MEASURE seconds from now."""
        cpu, lines = self.cpu_seconds(), len(self.lines)
        time.sleep(MEASURE)
        return self.cpu_seconds() - cpu, len(self.lines) - lines

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()



def open_clients(path: Path, n: int) -> list[socket.socket]:
    """``n`` connections that never send anything (some may be refused: they stay open here)."""
    out: list[socket.socket] = []
    deadline = time.monotonic() + TIMEOUT
    while len(out) < n:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:  # the backlog is full: the server has not accepted yet
            s.close()
            if time.monotonic() > deadline:
                break  # a server that stopped accepting: what the test then measures
            time.sleep(0.001)
            continue
        out.append(s)
    return out


def test_300_idle_qmp_clients_under_a_40_fd_limit(tmp_path: Path, image: Path,
                                                  procs: list[Proc]) -> None:
    qmp_path = tmp_path / "qmp.sock"
    p = Proc(command("--socket", tmp_path / "vhost.sock", "--image", image, "--qmp", qmp_path))
    procs.append(p)
    p.wait_for(" serving ")
    clients = open_clients(qmp_path, 300)
    try:
        cpu, lines = p.measure()
        print(f"server CPU {cpu:.3f} s and {lines} log lines in {MEASURE} s")
        assert cpu < MAX_CPU and lines < MAX_LINES, (cpu, lines, p.lines[-5:])
        assert p.proc.poll() is None
    finally:
        for s in clients:
            s.close()
    assert "qemu" in qmp(qmp_path, '{"execute": "query-version"}')[0]["return"]


def test_no_fds_left_backs_off_and_serves_when_they_come_back(tmp_path: Path, image: Path,
                                                               procs: list[Proc]) -> None:
    qmp_path, vhost = tmp_path / "qmp.sock", tmp_path / "vhost.sock"
    p = Proc([sys.executable, "-c", HOG, str(qmp_path), str(vhost),
              *command("--socket", vhost, "--image", image, "--qmp", qmp_path)[3:]])
    procs.append(p)
    p.wait_for("HOG took")
    # Connections queue on both listeners; neither can be accepted (no fd for it).
    clients = open_clients(qmp_path, 3) + open_clients(vhost, 3)
    try:
        cpu, lines = p.measure()
        print(f"server CPU {cpu:.3f} s and {lines} log lines in {MEASURE} s")
        assert cpu < MAX_CPU and lines < MAX_LINES, (cpu, lines, p.lines[-5:])
        assert any("accept failed" in line for line in p.lines)
    finally:
        for s in clients:
            s.close()
    assert p.proc.stdin is not None
    p.proc.stdin.close()  # the fds come back
    p.wait_for("HOG released")
    assert "qemu" in qmp(qmp_path, '{"execute": "query-version"}')[0]["return"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as fe:
        fe.connect(str(vhost))
        p.wait_for("frontend connected")
