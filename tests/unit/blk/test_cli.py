"""The ``vhost-user-blk`` command (``python -m storage_daemon``), run as a subprocess.

Every user error is one line on stderr and exit status 2 (no traceback); SIGTERM exits 0 with
the writes made before it in the image.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest

from blockdev.disk import Disk, DiskError
from tests.unit.cli_harness import (
    REPO,
    TIMEOUT,
    Server,
    assert_one_line_error,
    command,
    connect,
    run,
)
from virtio_blk.request import Status


# ---------------------------------------------------------------- user errors
def test_missing_image(tmp_path: Path) -> None:
    missing = tmp_path / "nope.img"
    proc = run("--socket", tmp_path / "s.sock", "--image", missing)
    assert_one_line_error(proc, str(missing), "--create")
    assert not (tmp_path / "s.sock").exists()


def test_image_is_a_directory(tmp_path: Path) -> None:
    proc = run("--socket", tmp_path / "s.sock", "--image", tmp_path)
    assert_one_line_error(proc, "directory")


def test_empty_image(tmp_path: Path) -> None:
    empty = tmp_path / "empty.img"
    empty.touch()
    assert_one_line_error(run("--socket", tmp_path / "s.sock", "--image", empty), "smaller")


def _as_unprivileged_child(path: Path) -> dict[str, object]:
    """In a forked child that gave up root (when root): can ``path`` be opened read-only, and
    what does the CLI say without --read-only?  Runs ``main()`` in-process: the child cannot
    exec our Python (it lives under /root, mode 0700)."""
    from storage_daemon.cli import main

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            err = open(w, "w", buffering=1)  # noqa: SIM115 - lives until _exit
            sys.stderr = err
            try:
                Disk(path, read_only=True).close()
                err.write("@@read-only-open-ok\n")
            except DiskError as exc:
                err.write(f"@@read-only-open-failed {exc}\n")
            try:
                code = main(["--socket", str(path.parent / "x.sock"), "--image", str(path)])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 98
            err.flush()
        except BaseException:
            with contextlib.suppress(BaseException):
                os.write(w, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + TIMEOUT
    with os.fdopen(r, "rb") as f:
        while True:
            chunk = f.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("child did not finish")
        time.sleep(0.01)
    return {"rc": os.waitstatus_to_exitcode(status), "stderr": b"".join(chunks).decode()}


def test_image_not_writable_without_read_only() -> None:
    # A root-owned 0644 image opened by an unprivileged user (root itself may write anything).
    # The directory is world-searchable, so the only thing refused is the write access.
    top = Path(tempfile.mkdtemp(prefix="vub-ro-"))
    try:
        os.chmod(top, 0o755)
        img = top / "disk.img"
        with open(img, "wb") as f:
            os.truncate(f.fileno(), 1 << 20)
        os.chmod(img, 0o644 if os.geteuid() == 0 else 0o444)
        out = _as_unprivileged_child(img)
        lines = str(out["stderr"]).splitlines()
        assert lines[0] == "@@read-only-open-ok"  # it is readable: only the write is refused
        assert out["rc"] == 2, out
        assert len(lines) == 2, out
        assert lines[1].startswith("vhost-user-blk: error: ")
        assert "permission denied" in lines[1] and "--read-only" in lines[1]
        assert "Traceback" not in str(out["stderr"])
    finally:
        shutil.rmtree(top)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--num-queues", "0"], "must be positive"),
        (["--num-queues", "two"], "not a number"),
        (["--logical-block-size", "1000"], "invalid choice"),
        (["--aio", "magic"], "invalid choice"),
        (["--create", "12Q"], "bad size"),
        (["--create", "0"], "must be positive"),
        (["--queue-size", "1000"], "power of two"),
        (["--queue-size", "65536"], "power of two"),
        (["--serial", "s" * 21], "longer than 20"),
        (["--serial", "sérial"], "not ASCII"),
        (["--num-queues", "1025"], "at most 1024 queues"),
        (["--num-queues", "10000"], "at most 1024 queues"),
        (["--create", "100000000T"], "larger than a file can be"),
    ],
)
def test_bad_option(tmp_path: Path, image: Path, args: list[str], fragment: str) -> None:
    proc = run("--socket", tmp_path / "s.sock", "--image", image, *args)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "s.sock").exists()


@pytest.mark.parametrize(
    "args",
    [[], ["--socket", "{sock}"], ["--image", "{img}"], ["--socket", "{sock}", "--fd", "3",
                                                         "--image", "{img}"]],
    ids=["nothing", "no-image", "no-socket", "socket-and-fd"],
)
def test_missing_or_conflicting_options(tmp_path: Path, image: Path, args: list[str]) -> None:
    filled = [a.format(sock=tmp_path / "s.sock", img=image) for a in args]
    assert_one_line_error(run(*filled))


def test_fd_that_is_not_a_listening_socket(tmp_path: Path, image: Path) -> None:
    r, w = os.pipe()
    try:
        proc = subprocess.run(command("--fd", str(r), "--image", image), cwd=REPO,
                              capture_output=True, text=True, timeout=TIMEOUT, pass_fds=[r],
                              check=False)
    finally:
        os.close(r)
        os.close(w)
    assert_one_line_error(proc, f"fd {r}")


def test_socket_path_in_use(tmp_path: Path, image: Path, servers: list[Server]) -> None:
    sock = tmp_path / "s.sock"
    first = Server("--socket", sock, "--image", image, "--aio", "threads")
    servers.append(first)
    first.started()
    proc = run("--socket", sock, "--image", image, "--locking", "off")  # (else: image locked)
    assert_one_line_error(proc, "in use")
    # The first server is unharmed: still listening and serving.
    fe, mem, drv = connect(sock)
    try:
        assert drv.read(0, 512).status == Status.OK
    finally:
        fe.close()
        mem.close()
    assert first.terminate()[0] == 0


def test_socket_path_that_is_not_a_socket(tmp_path: Path, image: Path) -> None:
    assert_one_line_error(run("--socket", image, "--image", image), "not a socket")
    assert image.stat().st_size == 1 << 20


def test_stale_socket_file_is_replaced(tmp_path: Path, image: Path,
                                       servers: list[Server]) -> None:
    sock = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens
    server = Server("--socket", sock, "--image", image, "--aio", "threads")
    servers.append(server)
    server.started()
    assert server.terminate()[0] == 0


# ---------------------------------------------------------------- running
def test_create_makes_a_sparse_image(tmp_path: Path, servers: list[Server]) -> None:
    img = tmp_path / "new.img"
    sock = tmp_path / "s.sock"
    server = Server("--socket", sock, "--image", img, "--create", "64M", "--aio", "threads")
    servers.append(server)
    line = server.started()
    assert f"({64 << 20} bytes" in line
    st = img.stat()
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < 1 << 20  # sparse
    assert any("created" in ln and str(img) in ln for ln in server.lines)
    assert server.terminate()[0] == 0


def test_create_leaves_an_existing_image_alone(tmp_path: Path, image: Path,
                                               servers: list[Server]) -> None:
    with open(image, "r+b") as f:
        f.write(b"keep me")
    server = Server("--socket", tmp_path / "s.sock", "--image", image, "--create", "4G",
                    "--aio", "threads")
    servers.append(server)
    server.started()
    assert image.stat().st_size == 1 << 20
    assert image.read_bytes()[:7] == b"keep me"
    assert not any("created" in ln for ln in server.lines)
    assert server.terminate()[0] == 0


@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_startup_line(tmp_path: Path, image: Path, servers: list[Server],
                      read_only: bool) -> None:
    sock = tmp_path / "s.sock"
    server = Server("--socket", sock, "--image", image, *(["--read-only"] if read_only else []))
    servers.append(server)
    line = server.started()
    assert str(image) in line
    assert str(sock) in line
    assert f"{1 << 20} bytes" in line
    features = re.search(r"features (\S+)$", line)
    assert features is not None, line
    names = set(features.group(1).split("|"))
    assert {"SIZE_MAX", "SEG_MAX", "BLK_SIZE", "FLUSH", "CONFIG_WCE", "MQ"} <= names
    if read_only:
        assert "RO" in names and "read-only" in line
        assert not names & {"DISCARD", "WRITE_ZEROES"}
    else:
        assert {"DISCARD", "WRITE_ZEROES"} <= names and "RO" not in names
    assert oct(sock.stat().st_mode & 0o777) == oct(0o600)
    assert server.terminate()[0] == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_while_idle(tmp_path: Path, image: Path, servers: list[Server], sig: int) -> None:
    sock = tmp_path / "s.sock"
    server = Server("--socket", sock, "--image", image, "--aio", "threads")
    servers.append(server)
    server.started()
    rc, took = server.terminate(sig)
    assert rc == 0
    assert took < 5
    assert not sock.exists()
    assert "Traceback" not in "\n".join(server.lines)
    assert any(ln.endswith("0 requests (0 reads, 0 writes, 0 flushes), 0 errors, 0 bounced")
               for ln in server.lines)


@pytest.mark.parametrize("aio", ["threads", "inline"])
def test_sigterm_with_a_frontend_connected(tmp_path: Path, image: Path, servers: list[Server],
                                           aio: str) -> None:
    sock = tmp_path / "s.sock"
    server = Server("--socket", sock, "--image", image, "--aio", aio)
    servers.append(server)
    server.started()
    fe, mem, drv = connect(sock)
    try:
        data = os.urandom(8192)
        assert drv.write(16, data).status == Status.OK  # write-back: not flushed by the guest
        assert drv.write(100, data[:512], pieces=drv.pieces([100, 412])).status == Status.OK
        rc, took = server.terminate()
    finally:
        fe.close()
        mem.close()
    assert rc == 0
    assert took < 5
    with open(image, "rb") as f:
        assert os.pread(f.fileno(), 8192, 16 * 512) == data
        assert os.pread(f.fileno(), 512, 100 * 512) == data[:512]
    assert any("2 requests (0 reads, 2 writes" in ln for ln in server.lines)
    assert not sock.exists()


def test_inherited_listening_fd(tmp_path: Path, image: Path, servers: list[Server]) -> None:
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(4)
        fd = listener.fileno()
        server = Server("--fd", str(fd), "--image", image, "--aio", "threads", pass_fds=[fd])
        servers.append(server)
    finally:
        listener.close()  # the server has its own copy
    line = server.started()
    assert f"on fd {fd}" in line
    fe, mem, drv = connect(path)
    try:
        data = os.urandom(4096)
        assert drv.write(8, data).status == Status.OK
        res = drv.read(8, 4096)
        assert (res.status, res.data) == (Status.OK, data)
        rc, _ = server.terminate()
    finally:
        fe.close()
        mem.close()
    assert rc == 0
    assert path.exists()  # the server did not make the socket file, so it leaves it


def test_create_in_a_missing_directory(tmp_path: Path) -> None:
    img = tmp_path / "no" / "such" / "dir" / "disk.img"
    proc = run("--socket", tmp_path / "s.sock", "--image", img, "--create", "1M")
    assert_one_line_error(proc, "cannot create", str(img))


@pytest.mark.parametrize(("size", "fragment"), [
    ("100000000T", "larger than a file can be"),  # past what a file offset can hold
    ("100T", "File too large"),  # past what the file system allows (ext4: 16 TiB)
])
def test_create_too_large_leaves_nothing_behind(tmp_path: Path, size: str, fragment: str) -> None:
    img = tmp_path / "big.img"
    proc = run("--socket", tmp_path / "s.sock", "--image", img, "--create", size)
    assert_one_line_error(proc, fragment)
    assert not img.exists()
    assert not (tmp_path / "s.sock").exists()


def test_negative_fd(image: Path) -> None:
    assert_one_line_error(run("--fd", "-1", "--image", image), "--fd -1")


@pytest.mark.parametrize("read_only", [True, False], ids=["read-only", "read-write"])
def test_fifo_image_is_refused_without_blocking(tmp_path: Path, read_only: bool) -> None:
    fifo = tmp_path / "disk.fifo"
    os.mkfifo(fifo)
    # Opening a FIFO for reading blocks until a writer comes: run() times out if it hangs.
    proc = run("--socket", tmp_path / "s.sock", "--image", fifo,
               *(["--read-only"] if read_only else []))
    assert_one_line_error(proc, "neither a regular file nor a block device")


def test_character_device_image_is_refused(tmp_path: Path) -> None:
    proc = run("--socket", tmp_path / "s.sock", "--image", "/dev/zero", "--read-only")
    assert_one_line_error(proc, "neither a regular file nor a block device")
