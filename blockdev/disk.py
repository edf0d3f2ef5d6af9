"""The disk behind the device: a raw image file or a block device, and the operations on it.

Reads and writes take lists of buffers (memoryviews straight into guest memory, or a bounce
buffer) and loop until the whole length is done: ``preadv``/``pwritev`` may return short, and a
write is only complete -- and only then reported OK to the guest -- when every byte was taken.
Flush is ``fdatasync``.  Discard punches a hole (``BLKDISCARD`` on a block device); write-zeroes
uses ``FALLOC_FL_ZERO_RANGE`` (``BLKZEROOUT``), or punches a hole when the driver allows unmap,
and falls back to writing zeroes where the file system has neither.

With ``direct=True`` the image is opened ``O_DIRECT`` (QEMU's ``cache.direct=on``); the memory and
offset alignment it needs come from ``statx(STATX_DIOALIGN)``, or the logical block size where the
kernel does not say, and callers bounce any buffer that does not meet them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from blockdev.libc import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    dio_alignment,
    fallocate,
)

log = logging.getLogger(__name__)

#: The unit of disk addresses and sizes in the block layer (and in virtio-blk, which takes it
#: from here).
SECTOR_SIZE = 512

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F


#: Largest size a file can have: off_t is signed 64-bit.
MAX_IMAGE_SIZE = (1 << 63) - 1


class DiskError(Exception):
    """The image cannot be opened or used as asked; the message is for the user."""


def resume_io(fd: int, write: bool, buffers: Sequence[memoryview], offset: int,
              done: int) -> int:
    """Continue a vectored IO on ``fd`` at ``offset`` that stopped after ``done`` bytes, until
    it completes or stops moving; the total bytes done.

    Every engine's short reads and writes end here (a write is complete only when every byte
    was taken; a read comes up short only at the end of the file).
    """
    call = os.pwritev if write else os.preadv
    total = sum(b.nbytes for b in buffers)
    while done < total:
        skip = done
        rest: list[memoryview] = []
        for b in buffers:
            if skip >= b.nbytes:
                skip -= b.nbytes
                continue
            rest.append(b[skip:] if skip else b)
            skip = 0
        n = call(fd, rest, offset + done)
        if n <= 0:
            break
        done += n
    return done


@dataclass(frozen=True)
class DiskInfo:
    """What the device needs to know about the disk."""

    size: int  # bytes usable (a multiple of the logical block size)
    logical_block_size: int
    read_only: bool
    direct: bool
    mem_align: int  # buffer address/length alignment IO needs (1 when buffered)
    offset_align: int  # file offset alignment IO needs
    block_device: bool


def check_growth(info: DiskInfo, size: object) -> bool:
    """Whether growing to ``size`` changes anything; DiskError for a size no storage takes
    (not an int, not above 0, above :data:`MAX_IMAGE_SIZE`, a partial block, shrinking, a
    read-only export).

    The one rule every kind of storage's resize path applies before it touches the storage:
    ``size`` comes from a QMP client, and beyond the bound lies silent damage -- ctypes'
    ``c_uint64`` turns 2**64 into 0 on its way into ``rbd_resize`` (an emptied volume),
    ``ftruncate`` raises OverflowError, the virtio capacity field (u64 sectors) overflows at
    2**73.  :data:`MAX_IMAGE_SIZE` is what every kind holds: off_t for files, NBD's and QEMU's
    int64 sizes, RBD's uint64; the capacity then needs at most 2**54 sectors.  What is smaller
    for one kind (a block device's size, a qcow2 L1 table's reach) its own grow refuses.
    """
    if type(size) is not int:  # bool is an int subclass; a float is not whole bytes
        raise DiskError(f"size {size!r} is not an integer")
    if size <= 0:
        raise DiskError(f"size {size} must be above 0")
    if size > MAX_IMAGE_SIZE:
        raise DiskError(f"size {size} is larger than any image can be ({MAX_IMAGE_SIZE} bytes)")
    lbs = info.logical_block_size
    if size % lbs:
        raise DiskError(f"size {size} is not a multiple of the {lbs}-byte block size")
    if size < info.size:
        raise DiskError(f"shrinking from {info.size} to {size} bytes is not supported")
    if size == info.size:
        return False
    if info.read_only:
        raise DiskError("the export is read-only and cannot grow")
    return True


class BlockDisk(Protocol):
    """What the engines and the device use of a disk: a raw :class:`Disk` or a format (qcow2)
    that translates guest offsets itself.  ``fd`` and :meth:`resume` work in host offsets."""

    path: str
    fd: int
    info: DiskInfo
    read_only: bool

    def readv(self, buffers: Sequence[memoryview], offset: int) -> int: ...
    def writev(self, buffers: Sequence[memoryview], offset: int) -> int: ...
    def resume(self, write: bool, buffers: Sequence[memoryview], offset: int,
               done: int) -> int: ...
    def make_durable(self) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None: ...
    def grow(self, size: int) -> None: ...
    def close(self) -> None: ...


class Disk:
    """An open raw image or block device."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        direct: bool = False,
        logical_block_size: int = SECTOR_SIZE,
    ) -> None:
        if logical_block_size not in (512, 4096):
            raise DiskError(f"logical block size {logical_block_size}: want 512 or 4096")
        self.path = os.fspath(path)
        # O_NONBLOCK: opening a FIFO (or a character device) for reading would block until a
        # writer came; with it the open returns and _probe refuses anything that is neither a
        # regular file nor a block device.  Cleared again before any IO.
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise DiskError(f"{self.path}: no such file (use --create SIZE to make one)") from None
        except IsADirectoryError:
            raise DiskError(f"{self.path} is a directory") from None
        except PermissionError:
            hint = "" if read_only else " (use --read-only for a read-only export)"
            raise DiskError(f"{self.path}: permission denied{hint}") from None
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                raise DiskError(f"{self.path}: the file system does not support O_DIRECT") from None
            raise DiskError(f"{self.path}: {exc.strerror}") from None
        try:
            self.info = self._probe(read_only, direct, logical_block_size)
            os.set_blocking(self.fd, True)
        except BaseException:
            os.close(self.fd)
            raise
        self.read_only = read_only
        self._discard_ok = True
        self._zero_range_ok = True

    def _probe(self, read_only: bool, direct: bool, lbs: int) -> DiskInfo:
        st = os.fstat(self.fd)
        block_device = stat.S_ISBLK(st.st_mode)
        if block_device:
            buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
            size = struct.unpack("<Q", buf)[0]
            dev_lbs = struct.unpack("<i", fcntl.ioctl(self.fd, BLKSSZGET, b"\0" * 4))[0]
            if lbs < dev_lbs:
                raise DiskError(f"{self.path} has {dev_lbs}-byte sectors; use "
                                f"--logical-block-size {dev_lbs}")
        elif stat.S_ISREG(st.st_mode):
            size = st.st_size
        else:
            raise DiskError(f"{self.path} is neither a regular file nor a block device")
        usable = size - size % lbs
        if usable == 0:
            raise DiskError(f"{self.path} is smaller than one {lbs}-byte block")
        if usable != size:
            log.warning("%s: %d trailing bytes beyond the last whole block are not exported",
                        self.path, size - usable)
        mem_align = offset_align = 1
        if direct:
            probed = dio_alignment(self.fd)
            mem_align, offset_align = probed if probed else (lbs, lbs)
            if offset_align > lbs:
                raise DiskError(f"{self.path}: O_DIRECT needs {offset_align}-byte aligned "
                                f"offsets, above the logical block size {lbs}")
        return DiskInfo(usable, lbs, read_only, direct, mem_align, offset_align, block_device)

    # ------------------------------------------------------------------ size
    def grow(self, size: int) -> None:
        """Make the disk ``size`` bytes (DiskError where it cannot be; shrinking is refused).

        A raw file is extended (sparse, like ``qemu-img resize``); a block device cannot be
        grown from here, so it must already be that large (an LV or LUN grown by its owner).
        """
        info = self.info
        if not check_growth(info, size):
            return
        if info.block_device:
            buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
            have = struct.unpack("<Q", buf)[0]
            if have < size:
                raise DiskError(f"{self.path} is a {have}-byte block device; grow the device "
                                f"itself first")
        else:
            try:
                os.ftruncate(self.fd, max(size, os.fstat(self.fd).st_size))
            except OSError as exc:
                raise DiskError(f"{self.path}: cannot grow to {size} bytes: "
                                f"{exc.strerror}") from None
        self.info = replace(info, size=size)  # one store: readers see old or new, whole

    # ------------------------------------------------------------------ data
    def readv(self, buffers: Sequence[memoryview], offset: int) -> int:
        """Fill ``buffers`` from ``offset``; the bytes read (short only at the end of the file)."""
        total = sum(b.nbytes for b in buffers)
        done = os.preadv(self.fd, buffers, offset)
        if done == total or done == 0:
            return done
        return self.resume(False, buffers, offset, done)

    def try_readv_nowait(self, buffers: Sequence[memoryview], offset: int, length: int) -> bool:
        """Fill ``buffers`` (``length`` bytes) from ``offset`` if the page cache has all of it.

        ``preadv(RWF_NOWAIT)``: True when every byte was read without waiting; False when the
        read would block or came back short (nothing is owed: the caller reads it the usual way,
        again from the start).  A real error (EIO) is raised as from :meth:`readv`.  Meaningless
        with O_DIRECT, where it is never tried.
        """
        try:
            done = os.preadv(self.fd, buffers, offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        return done == length

    def writev(self, buffers: Sequence[memoryview], offset: int) -> int:
        """Write all of ``buffers`` at ``offset``; the bytes written."""
        total = sum(b.nbytes for b in buffers)
        done = os.pwritev(self.fd, buffers, offset)
        if done == total:
            return done
        return self.resume(True, buffers, offset, done)

    def resume(self, write: bool, buffers: Sequence[memoryview], offset: int, done: int) -> int:
        """Continue a vectored IO at ``offset`` that stopped after ``done`` bytes (see
        :func:`resume_io`)."""
        return resume_io(self.fd, write, buffers, offset, done)

    def make_durable(self) -> None:
        """Every completed write on stable storage (a FLUSH request, write-through)."""
        os.fdatasync(self.fd)

    # ------------------------------------------------------------------ discard / zeroes
    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range (reads after it may return anything; we return zeroes)."""
        if self.info.block_device:
            fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("<QQ", offset, length))
            return
        if not self._discard_ok:
            return  # discard is advisory: doing nothing is correct
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.info("%s: file system cannot punch holes; discard is a no-op", self.path)
            self._discard_ok = False

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make a range read back as zeroes, deallocating it if ``unmap`` and possible."""
        if self.info.block_device:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("<QQ", offset, length))
            return
        if unmap and self._discard_ok:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._discard_ok = False
        if self._zero_range_ok:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log.info("%s: no FALLOC_FL_ZERO_RANGE; writing zeroes instead", self.path)
                self._zero_range_ok = False
        self._write_zero_bytes(offset, length)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        chunk = 1 << 20
        zeros = mmap.mmap(-1, min(chunk, length))  # page-aligned, so O_DIRECT takes it too
        try:
            view = memoryview(zeros)
            while length:
                n = min(length, view.nbytes)
                written = self.writev([view[:n]], offset)
                if written != n:
                    raise OSError(errno.EIO, "short write while zeroing")
                offset += n
                length -= n
            view.release()
        finally:
            zeros.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def create_image(path: str | os.PathLike[str], size: int) -> bool:
    """Create a sparse raw image of ``size`` bytes if ``path`` does not exist; True if created.

    A file that cannot be given that size (over the file system's limit) is removed again, so a
    failed ``--create`` leaves nothing behind to confuse the next run.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        raise DiskError(f"cannot create {os.fspath(path)}: {exc.strerror}") from None
    try:
        os.ftruncate(fd, size)
    except (OSError, OverflowError) as exc:
        os.close(fd)
        os.unlink(path)
        why = exc.strerror if isinstance(exc, OSError) else "too large"
        raise DiskError(f"cannot create {os.fspath(path)} of {size} bytes: {why}") from None
    os.close(fd)
    return True


def parse_size(text: str) -> int:
    """'1G', '512M', '4096', '10GiB' -> bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(num) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(f"bad size {text!r} (examples: 1G, 512M, 1048576)") from None
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    if value > MAX_IMAGE_SIZE:
        raise ValueError(f"size {text!r} is larger than a file can be ({MAX_IMAGE_SIZE} bytes)")
    return value
