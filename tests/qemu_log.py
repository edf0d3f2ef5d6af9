"""QEMU's side of a dirty-page log, for tests: the memfd QEMU hands over with SET_LOG_BASE
(sealed against shrinking and growing, as ``vhost_log_alloc`` makes it), mapped here to read
and clear it the way QEMU's sync does."""

from __future__ import annotations

import fcntl
import os

from guestmem.dirty_log import DirtyLog

PAGE = 4096
F_SEAL_SHRINK, F_SEAL_GROW, F_ADD_SEALS = 0x2, 0x4, 1033


def log_memfd(size: int) -> int:
    """A log memfd of ``size`` bytes sealed like QEMU's."""
    fd = os.memfd_create("vhost-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
    return fd


def pages(gpa: int, length: int) -> set[int]:
    """The guest pages ``[gpa, gpa+length)`` touches."""
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))


def pieces_pages(pieces: list[tuple[int, int]]) -> set[int]:
    """The guest pages a list of ``(gpa, length)`` pieces touches."""
    out: set[int] = set()
    for gpa, length in pieces:
        out |= pages(gpa, length)
    return out


class QemuLog:
    """A log covering ``memory`` bytes of guest memory (one bit per page)."""

    def __init__(self, memory: int) -> None:
        self.size = memory // PAGE // 8
        self.fd = log_memfd(self.size)
        self.log = DirtyLog(self.fd, self.size)

    def take(self) -> set[int]:
        """Exchange every marked word with 0; the pages taken (QEMU's sync)."""
        return set(self.log.take())

    def close(self) -> None:
        self.log.close()
        os.close(self.fd)
