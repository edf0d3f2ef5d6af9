"""Which IO engine the command runs, named honestly.

``--aio io_uring`` asked for where io_uring cannot start is a user error (one line, exit 2),
not a quiet switch to threads; with no ``--aio`` the server takes io_uring where it works and
otherwise the thread pool, with a WARNING saying why; and the serving line names the engine
that runs.

io_uring is made unavailable the way a kernel or a seccomp policy would: every io_uring_setup
fails (ENOSYS here).  That is done in the server process by a launcher that replaces
``Uring.__init__`` before running the command's ``main`` -- nothing in the product reads a
test switch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from blockdev.uring import available
from tests.unit.cli_harness import REPO, TIMEOUT, Server, assert_one_line_error, command, connect
from virtio_blk.request import Status

#: Put before ``command(...)``: runs the command's main with io_uring_setup failing.  (argv of
#: ``python -c CODE python -m storage_daemon ARGS`` is
#: ``['-c', python, '-m', 'storage_daemon', ARGS]``.)
NO_URING = [sys.executable, "-c", (
    "import errno, sys\n"
    "from blockdev import uring\n"
    "def refuse(*args, **kwargs):\n"
    "    raise uring.UringError(errno.ENOSYS, 'io_uring_setup: Function not implemented')\n"
    "uring.Uring.__init__ = refuse\n"
    "from storage_daemon.cli import main\n"
    "sys.exit(main(sys.argv[4:]))\n")]


def test_io_uring_asked_for_and_unavailable_is_an_error(tmp_path: Path, image: Path) -> None:
    sock = tmp_path / "s.sock"
    proc = subprocess.run([*NO_URING, *command("--socket", sock, "--image", image,
                                               "--aio", "io_uring")],
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert_one_line_error(proc, "--aio io_uring", "io_uring is unavailable",
                          "Function not implemented")
    assert not sock.exists()


def serve_and_write(server: Server, sock: Path) -> str:
    """The serving line, after one write and read through the engine it names."""
    line = server.started()
    fe, mem, drv = connect(sock)
    try:
        data = os.urandom(4096)
        assert drv.write(8, data).status == Status.OK
        assert drv.read(8, 4096).data == data
    finally:
        fe.close()
        mem.close()
    rc, _ = server.terminate()
    assert rc == 0, server.lines
    return line


def test_default_falls_back_to_threads_with_a_warning(tmp_path: Path, image: Path,
                                                      servers: list[Server]) -> None:
    sock = tmp_path / "s.sock"
    server = Server("--socket", sock, "--image", image, launcher=NO_URING)
    servers.append(server)
    warning = server.wait_for(r"io_uring")
    assert " WARNING " in warning and "Function not implemented" in warning, warning
    assert "using the thread pool" in warning
    assert "aio=threads" in serve_and_write(server, sock)


def test_default_is_io_uring_where_it_works(tmp_path: Path, image: Path,
                                            servers: list[Server]) -> None:
    assert available(), "io_uring is unavailable on this machine: nothing here tests it"
    sock = tmp_path / "s.sock"
    server = Server("--socket", sock, "--image", image)
    servers.append(server)
    assert "aio=io_uring" in serve_and_write(server, sock)
    assert not any("thread pool" in line or "unavailable" in line for line in server.lines)
