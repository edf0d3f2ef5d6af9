"""Image locking the way QEMU does it, so QEMU, qemu-img, qemu-storage-daemon and this server
refuse each other's images exactly as two QEMUs would.

QEMU (``block/file-posix.c``) describes what an open image is used for with open-file-description
locks (``F_OFD_SETLK``) on single bytes: for each block permission *held*, a shared lock on byte
``100 + bit``; for each permission *not shared* with other users, a shared lock on byte
``200 + bit``.  An opener then checks, with ``F_OFD_GETLK`` and a write-lock probe, that nobody
refuses to share what it wants (byte ``200 + bit`` of each permission it takes) and nobody holds
what it refuses to share (byte ``100 + bit``).

This server takes the permissions of a QEMU guest disk: ``consistent read``, plus ``write`` for a
writable export; and like a guest disk it does not share ``write`` or ``resize``.  So:

* a second server, a QEMU ``-drive``/``-blockdev`` or a qemu-storage-daemon export of the same
  image is refused while we hold it, and we are refused while they do (``Failed to get "write"
  lock``, as QEMU says);
* two read-only exports coexist; ``qemu-img info`` needs ``-U`` (``--force-share``) while the
  image is served, as it does while a VM runs;
* ``--locking off`` (QEMU's ``file.locking=off``) takes and checks nothing: the migration source
  and destination then serve one image on shared storage, and the user is responsible for only
  one of them writing at a time (the migration protocol guarantees that: the source stops its
  guest before the destination starts its own).

The locks belong to the open file description, so they live exactly as long as the disk's fd.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

F_OFD_GETLK = 36
F_OFD_SETLK = 37
PERM_BASE = 100
SHARED_BASE = 200

#: QEMU's block permissions (include/block/block-common.h) and the names its messages use.
PERM_CONSISTENT_READ = 0x1
PERM_WRITE = 0x2
PERM_WRITE_UNCHANGED = 0x4
PERM_RESIZE = 0x8
PERM_NAMES = {
    PERM_CONSISTENT_READ: "consistent read",
    PERM_WRITE: "write",
    PERM_WRITE_UNCHANGED: "write unchanged",
    PERM_RESIZE: "resize",
}
PERM_ALL = 0xF

# struct flock on x86-64 / aarch64 Linux: short type, short whence, off_t start, off_t len,
# pid_t pid (0 for OFD locks), padding to 32 bytes.
_FLOCK = struct.Struct("hhqqi4x")


class ImageLockError(Exception):
    """The image is in use (or cannot be locked); the message is for the user.

    ``unsupported``: the file system has no OFD locks (``--locking auto`` then goes on).
    """

    def __init__(self, message: str, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


def _flock(fd: int, cmd: int, lock_type: int, byte: int) -> int:
    """One fcntl OFD lock call on ``byte``; the lock type it reports (GETLK) or set."""
    arg = _FLOCK.pack(lock_type, os.SEEK_SET, byte, 1, 0)
    result = fcntl.fcntl(fd, cmd, arg)
    return _FLOCK.unpack(result)[0]


def _held_by_other(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on ``byte`` (a write probe)."""
    return _flock(fd, F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def permissions(writable: bool) -> tuple[int, int]:
    """(permissions taken, permissions shared) of an export: those of a QEMU guest disk."""
    perm = PERM_CONSISTENT_READ | (PERM_WRITE if writable else 0)
    shared = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED
    return perm, shared


def lock_image(fd: int, path: str, writable: bool) -> None:
    """Take QEMU's lock bytes on ``fd`` and check nobody conflicts; ImageLockError otherwise.

    On failure the caller closes ``fd``, which drops whatever was taken.
    """
    perm, shared = permissions(writable)
    unshared = PERM_ALL & ~shared
    hint = f"is another process using the image {path}? (--locking off shares it)"
    try:
        for bit, name in PERM_NAMES.items():
            if perm & bit:
                try:
                    _flock(fd, F_OFD_SETLK, fcntl.F_RDLCK, PERM_BASE + bit.bit_length() - 1)
                except BlockingIOError:
                    raise ImageLockError(f'failed to lock byte {PERM_BASE + bit.bit_length() - 1}'
                                         f' ("{name}"): {hint}') from None
            if unshared & bit:
                try:
                    _flock(fd, F_OFD_SETLK, fcntl.F_RDLCK, SHARED_BASE + bit.bit_length() - 1)
                except BlockingIOError:
                    raise ImageLockError(f'failed to lock byte '
                                         f'{SHARED_BASE + bit.bit_length() - 1} ("{name}"): '
                                         f'{hint}') from None
        for bit, name in PERM_NAMES.items():
            if perm & bit and _held_by_other(fd, SHARED_BASE + bit.bit_length() - 1):
                raise ImageLockError(f'failed to get "{name}" lock: {hint}')
            if unshared & bit and _held_by_other(fd, PERM_BASE + bit.bit_length() - 1):
                raise ImageLockError(f'failed to get shared "{name}" lock: {hint}')
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            raise ImageLockError(f"{path}: the file system does not support OFD locks "
                                 "(--locking off to serve it unlocked)", True) from None
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLockError(f"{path}: locked by another process: {hint}") from None
        raise ImageLockError(f"{path}: cannot lock: {exc.strerror}") from None
