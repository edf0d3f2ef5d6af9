"""What kind of file a frontend's fd is, checked when the message that carries it arrives.

Every fd a vhost-user message carries is the frontend's choice, and the frontend is hostile.
The protocol says what each one must be (``docs/interop/vhost-user.rst``):

* kick, call and err fds (SET_VRING_KICK/CALL/ERR) and the log's call fd (SET_LOG_FD) are
  eventfds.  A worker watches the kick fd with epoll and writes 8-byte counts to the others: a
  regular file (a memfd, say) cannot be watched -- epoll refuses it with EPERM, which used to
  surface in the worker thread long after the message was acknowledged -- and a write to one
  would land in the file.
* memory regions (SET_MEM_TABLE, ADD_MEM_REG), the dirty log (SET_LOG_BASE) and the in-flight
  area (SET_INFLIGHT_FD) are files we map shared, read-write: memfds, tmpfs or hugetlbfs
  files -- all regular files.  Anything else is refused before mmap sees it: an eventfd or a
  socket cannot be mapped at all, and a character device (``/dev/zero``) maps memory the guest
  never sees.  The range to map must lie inside the file (a mapping past the end is SIGBUS on
  first touch, which kills the server) and its end must fit 64 bits (mmap raises
  OverflowError for sizes beyond a C long).

An eventfd the backend writes must not block it: a write blocks while the count is at its
maximum (0xffff_ffff_ffff_fffe), which the frontend can set by writing to its own fd, and a
worker stuck in that write would hold the queue -- and the control thread waiting for it -- for
good.  :func:`take_eventfd` therefore also makes the fd non-blocking.  The flag belongs to the
open file, which the frontend shares: QEMU makes its event notifiers non-blocking itself, and a
write that finds the count full has nothing to add (the reader will wake anyway).

Checking here, once per message, turns each of these into a refusal of that message with one
log line, instead of an exception in whatever uses the fd later.
"""

from __future__ import annotations

import fcntl
import os
import stat

#: The target /proc/self/fd/N shows for an eventfd (fs/eventfd.c names its anon inode so).
EVENTFD_LINK = "anon_inode:[eventfd]"
U64_LIMIT = 1 << 64


class FdKindError(Exception):
    """The fd is not of the kind its message requires (or its range does not fit it)."""


def _link(fd: int) -> str | None:
    """``fd``'s /proc link ("anon_inode:[eventfd]", "/memfd:x (deleted)"), None without /proc."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def describe(fd: int) -> str:
    """What ``fd`` is, for a log line."""
    link = _link(fd)
    if link is not None:
        return link
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        return f"unusable ({exc.strerror})"
    return f"a file of type {stat.S_IFMT(mode):#o}"


def check_eventfd(fd: int, what: str) -> None:
    """FdKindError unless ``fd`` is an eventfd.

    The kernel gives every eventfd the same anonymous inode, named in /proc; nothing in fstat
    tells an eventfd from another anon inode (a timerfd, an epoll fd), so the name is the check.
    Where /proc/self/fd cannot be read (a sandbox without /proc) the check falls back to what
    fstat can tell: an anonymous inode (no file type bits), not a file, pipe, socket or device.
    """
    link = _link(fd)
    if link is not None:
        if link != EVENTFD_LINK:
            raise FdKindError(f"{what} fd is {link}, not an eventfd")
        return
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise FdKindError(f"{what} fd: {exc.strerror}") from None
    if stat.S_IFMT(mode):
        raise FdKindError(f"{what} fd is {describe(fd)}, not an eventfd")


def take_eventfd(fd: int, what: str) -> None:
    """Check that ``fd`` is an eventfd (:func:`check_eventfd`) and make it non-blocking, so a
    count the frontend left at its maximum cannot block the backend's writes (module doc)."""
    check_eventfd(fd, what)
    try:
        os.set_blocking(fd, False)
    except OSError as exc:
        raise FdKindError(f"{what} fd: {exc.strerror}") from None


def check_mappable(fd: int, offset: int, size: int, what: str) -> os.stat_result:
    """FdKindError unless ``size`` bytes at ``offset`` of ``fd`` can be mapped shared, read-write.

    ``fd`` must be a regular file (memfd, tmpfs, hugetlbfs) opened read-write, and the range
    must be non-negative, fit 64 bits and lie inside the file.  Returns the fd's stat.
    """
    if offset < 0 or size < 0:
        raise FdKindError(f"{what}: negative offset {offset} or size {size}")
    if offset + size >= U64_LIMIT:
        raise FdKindError(f"{what}: offset {offset:#x} + size {size:#x} overflows 64 bits")
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        raise FdKindError(f"{what} fd: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FdKindError(f"{what} fd is {describe(fd)}, not a file that can be mapped")
    if flags & os.O_ACCMODE != os.O_RDWR:
        raise FdKindError(f"{what} fd is not open for reading and writing")
    if offset + size > st.st_size:
        raise FdKindError(f"{what}: offset {offset:#x} + size {size:#x} is past the end of its "
                          f"{st.st_size:#x}-byte file")
    return st
