"""vhost.fdkinds on its own: which fds pass as eventfds and as mappable files (issue 25).

The message-level table (every fd-carrying request x every wrong kind) is in
test_message_validation.py; here are the rules themselves, including the fallback used where
/proc/self/fd cannot be read.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from vhost import fdkinds


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("fdkinds", os.MFD_CLOEXEC)
    os.ftruncate(fd, 8192)
    yield fd
    os.close(fd)


@pytest.fixture
def eventfd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.fixture(params=["proc", "no-proc"])
def proc(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run with /proc/self/fd readable, and as if it were not (a sandbox without /proc)."""
    if request.param == "no-proc":
        def no_proc(path: str) -> str:
            raise FileNotFoundError(2, "No such file or directory", path)

        monkeypatch.setattr(fdkinds.os, "readlink", no_proc)
    return str(request.param)


def test_an_eventfd_is_an_eventfd(proc: str, eventfd: int) -> None:
    fdkinds.check_eventfd(eventfd, "kick")


def test_files_pipes_and_sockets_are_not_eventfds(proc: str, memfd: int) -> None:
    r, w = os.pipe()
    a, b = socket.socketpair()
    null = os.open("/dev/null", os.O_RDWR)
    try:
        for fd in (memfd, r, a.fileno(), null):
            with pytest.raises(fdkinds.FdKindError, match="not an eventfd"):
                fdkinds.check_eventfd(fd, "kick")
    finally:
        for fd in (r, w, null):
            os.close(fd)
        a.close()
        b.close()


def test_other_anonymous_inodes_are_told_apart_with_proc(eventfd: int) -> None:
    """An epoll fd shares the eventfd's anonymous inode; only its /proc name differs."""
    import select

    ep = select.epoll()
    try:
        with pytest.raises(fdkinds.FdKindError, match=r"anon_inode:\[eventpoll\]"):
            fdkinds.check_eventfd(ep.fileno(), "call")
    finally:
        ep.close()


def test_a_closed_fd_is_refused(proc: str) -> None:
    fd = os.eventfd(0)
    os.close(fd)
    with pytest.raises(fdkinds.FdKindError):
        fdkinds.check_eventfd(fd, "err")
    with pytest.raises(fdkinds.FdKindError):
        fdkinds.check_mappable(fd, 0, 4096, "region")


@pytest.mark.parametrize(("offset", "size", "ok"), [
    (0, 8192, True), (4096, 4096, True), (0, 0, True),
    (0, 8193, False), (8192, 1, False), (4096, (1 << 64) - 4096, False), (1 << 63, 1 << 63, False),
])
def test_mappable_range_inside_the_file(memfd: int, offset: int, size: int, ok: bool) -> None:
    if ok:
        assert fdkinds.check_mappable(memfd, offset, size, "region").st_size == 8192
    else:
        with pytest.raises(fdkinds.FdKindError, match=r"past the end|overflows"):
            fdkinds.check_mappable(memfd, offset, size, "region")


def test_mappable_needs_a_regular_file_open_read_write(memfd: int, eventfd: int) -> None:
    ro = os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY)
    zero = os.open("/dev/zero", os.O_RDWR)
    try:
        with pytest.raises(fdkinds.FdKindError, match="reading and writing"):
            fdkinds.check_mappable(ro, 0, 4096, "log")
        for fd in (eventfd, zero):
            with pytest.raises(fdkinds.FdKindError, match="not a file that can be mapped"):
                fdkinds.check_mappable(fd, 0, 0, "log")
    finally:
        os.close(ro)
        os.close(zero)
