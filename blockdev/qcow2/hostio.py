"""Host-file IO for the qcow2 driver: vectored reads and writes that finish short transfers,
the caller's buffers handed out as slices, big-endian tables, and a raw backing file."""

from __future__ import annotations

import errno
import os
import sys
from array import array
from collections.abc import Sequence

ZEROS = bytes(2 << 20)
_SWAP = sys.byteorder == "little"  # tables are big-endian on disk


def be_table(raw: bytes) -> array:
    """A table of big-endian 64-bit entries as an array of native integers."""
    t = array("Q")
    t.frombytes(raw)
    if _SWAP:
        t.byteswap()
    return t


def to_be(t: array) -> bytes:
    c = array("Q", t)
    if _SWAP:
        c.byteswap()
    return c.tobytes()


class Views:
    """The caller's buffers as one byte sequence, handed out in order as slices."""

    __slots__ = ("i", "skip", "views")

    def __init__(self, views: Sequence[memoryview]) -> None:
        self.views = views
        self.i = 0
        self.skip = 0

    def take(self, n: int) -> list[memoryview]:
        out = []
        views = self.views
        while n:
            v = views[self.i]
            avail = v.nbytes - self.skip
            k = min(n, avail)
            out.append(v[self.skip:self.skip + k] if k != v.nbytes else v)
            n -= k
            if k == avail:
                self.i += 1
                self.skip = 0
            else:
                self.skip += k
        return out


def zero_fill(views: Sequence[memoryview]) -> None:
    for v in views:
        n = v.nbytes
        while n:
            k = min(n, len(ZEROS))
            v[v.nbytes - n:v.nbytes - n + k] = ZEROS[:k]
            n -= k


def preadv_full(fd: int, views: list[memoryview], offset: int) -> None:
    """Fill ``views`` from ``offset``; bytes beyond the end of the file read as zeroes."""
    total = sum(v.nbytes for v in views)
    done = os.preadv(fd, views, offset)
    while done < total:
        rest = Views(views)
        rest.take(done)
        tail = rest.take(total - done)
        n = os.preadv(fd, tail, offset + done)
        if n <= 0:
            zero_fill(tail)
            return
        done += n


def pwritev_full(fd: int, views: list[memoryview], offset: int) -> None:
    total = sum(v.nbytes for v in views)
    done = os.pwritev(fd, views, offset)
    while done < total:
        rest = Views(views)
        rest.take(done)
        n = os.pwritev(fd, rest.take(total - done), offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n


class RawBacking:
    """A raw backing file on the read-only ``fd`` the backing-file policy opened (and checked,
    :mod:`.backing_policy`); reads beyond its end are zeroes."""

    def __init__(self, fd: int, path: str) -> None:
        self.path = path
        self.fd = fd
        # A block device's fstat size is 0: its end is where lseek finds it.
        self.size = os.lseek(fd, 0, os.SEEK_END)

    def read_into(self, views: list[memoryview], offset: int) -> None:
        preadv_full(self.fd, views, offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
