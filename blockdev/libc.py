"""The C library calls Python's ``os`` module lacks, declared once: fallocate, statx, fstatfs,
syscall.

Both the disk (``fallocate`` for discard and write-zeroes, ``statx`` for O_DIRECT alignment) and
the io_uring ring (``syscall`` for io_uring_setup/enter) need them; one handle and one set of
prototypes keeps the argument types from drifting apart.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Callable

LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

LIBC.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
LIBC.fallocate.restype = ctypes.c_int
syscall = LIBC.syscall
syscall.restype = ctypes.c_long

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

STATX_DIOALIGN = 0x2000
AT_EMPTY_PATH = 0x1000

_statx: Callable[..., int] | None
try:
    _statx = LIBC.statx
    _statx.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p)
    _statx.restype = ctypes.c_int
except AttributeError:  # pragma: no cover - glibc < 2.28
    _statx = None


def errno_error(what: str = "") -> OSError:
    """The OSError for the errno the last libc call left."""
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}" if what else os.strerror(err))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError on failure (EOPNOTSUPP where the file system lacks the mode)."""
    if LIBC.fallocate(fd, mode, offset, length) != 0:
        raise errno_error()


def dio_alignment(fd: int) -> tuple[int, int] | None:
    """(memory alignment, offset alignment) for O_DIRECT from statx, or None if not reported."""
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(256)
    if _statx(fd, b"", AT_EMPTY_PATH, STATX_DIOALIGN, buf) != 0:
        return None
    mask = struct.unpack_from("<I", buf, 0)[0]
    if not mask & STATX_DIOALIGN:
        return None
    mem_align, offset_align = struct.unpack_from("<II", buf, 152)
    if not mem_align or not offset_align:
        return None  # O_DIRECT not supported on this file
    return mem_align, offset_align


LIBC.fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)
LIBC.fstatfs.restype = ctypes.c_int


def fstatfs_type(fd: int) -> int:
    """The file system type (``f_type``, a ``*_MAGIC`` of statfs(2)) of the open file ``fd``;
    ``os.statvfs`` does not report it.  ``f_type`` is the first field of struct statfs, a
    native ``long`` on every Linux ABI we run on; only its low 32 bits carry the magic."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if LIBC.fstatfs(fd, buf) != 0:
        raise errno_error("fstatfs")
    return int(ctypes.c_long.from_buffer(buf).value) & 0xFFFFFFFF


# timerfd (os has it only from Python 3.13): a timer an epoll can wait on.
CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("interval_sec", ctypes.c_long), ("interval_nsec", ctypes.c_long),
                ("value_sec", ctypes.c_long), ("value_nsec", ctypes.c_long)]


LIBC.timerfd_create.argtypes = (ctypes.c_int, ctypes.c_int)
LIBC.timerfd_create.restype = ctypes.c_int
LIBC.timerfd_settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
LIBC.timerfd_settime.restype = ctypes.c_int


def timerfd_create() -> int:
    """A non-blocking CLOCK_MONOTONIC timerfd."""
    fd = LIBC.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
    if fd < 0:
        raise errno_error("timerfd_create")
    return int(fd)


def timerfd_arm(fd: int, seconds: float | None) -> None:
    """Fire once after ``seconds`` (at once if <= 0); None disarms."""
    spec = _ITimerSpec()
    if seconds is not None:
        ns = max(1, int(seconds * 1e9))  # all zero would disarm
        spec.value_sec, spec.value_nsec = divmod(ns, 1_000_000_000)
    if LIBC.timerfd_settime(fd, 0, ctypes.byref(spec), None) != 0:
        raise errno_error("timerfd_settime")
