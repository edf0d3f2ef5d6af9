"""Fuzz qcow2 images: open hostile files, then read, write, discard, zero, flush and grow.

Input: a 32-byte script (read-only or not, then up to six operations of kind, offset and
length), then the image file itself.  The image is written to a file in a directory of its own
next to two legitimate backing files (``base.raw``, ``base.qcow2``), and opened with
:class:`Qcow2Image` -- the L1 table, every L2 table the operations reach and, writable, the
refcount table and blocks they allocate through are the input's.

Asserts (the rules of ``blockdev.qcow2``): opening either succeeds or raises ``DiskError``
(``Qcow2OpenError``: the CLI prints it); every operation either succeeds or raises ``OSError``
(``CorruptImage`` is one: that request fails with an IO error), ``grow`` may also refuse with
``DiskError``; closing raises nothing but ``OSError``; and no file outside the image's directory
(and its subdirectories) is ever opened (every ``os.open`` is recorded), whatever the backing
file name says.  Anything else -- an ``IndexError`` from a hostile table, a ``struct.error``, a
stray ``ValueError`` -- is a crash: ``Qcow2Disk`` would turn it into EIO with a logged
traceback, but it is bad metadata nobody validated.  Slow inputs (a refcount search over a
hostile table) are found by libFuzzer's ``-timeout``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile

import atheris

with atheris.instrument_imports(include=["blockdev"]):
    from _common import Reader, run

    from blockdev.disk import DiskError
    from blockdev.qcow2.image import Qcow2Image

SCRIPT = 32
KINDS = ("read", "write", "discard", "zero", "flush", "grow", "read", "write")
OFFSETS = (0, 512, 4096, 65536, 1 << 20, (1 << 20) - 512, 3, 1 << 30)
LENGTHS = (512, 1, 4096, 8192, 65536, 3, 1024, 0)

_real_open = os.open


class Jail:
    """The image's directory, and every file opened while the image was."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        # The image's directory sits inside a scratch root that also holds a file, so a
        # backing name such as ``../a.raw`` (a seed) reaches a file that exists: a policy
        # that let it through would open it, and the check below would see that.
        root = os.path.realpath(tempfile.mkdtemp(prefix="fuzz-qcow2-", dir=base))
        with open(os.path.join(root, "a.raw"), "wb") as f:
            f.write(b"\xee" * 65536)
        self.dir = os.path.join(root, "images")
        os.mkdir(self.dir)
        self.image = os.path.join(self.dir, "image.qcow2")
        with open(os.path.join(self.dir, "base.raw"), "wb") as f:
            f.write(bytes(range(256)) * 256)
        if shutil.which("qemu-img"):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512",
                            os.path.join(self.dir, "base.qcow2"), "64k"], check=True)
        self.opened: list[str] = []
        os.open = self._open
        self.fd = _real_open(self.image, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _open(self, path: object, flags: int, mode: int = 0o777, *, dir_fd: object = None
              ) -> int:
        # An O_PATH descriptor reads nothing (the backing-file policy judges a name through
        # one before it opens anything); every other open is resolved now, while a
        # /proc/self/fd/N name (the policy's reopen of the inode it judged) still resolves.
        if not flags & os.O_PATH:
            self.opened.append(os.path.realpath(os.fsdecode(path)))  # type: ignore[arg-type]
        return _real_open(path, flags, mode)  # type: ignore[arg-type]

    def write(self, data: bytes) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def check(self) -> None:
        for real in self.opened:
            if os.path.commonpath([real, self.dir]) != self.dir:
                raise AssertionError(f"backing opened outside the image directory: {real!r}")
        self.opened.clear()


def buffers(n: int) -> list[memoryview]:
    """``n`` bytes in two pieces (the request's data is rarely one buffer)."""
    first = n // 3
    return [memoryview(bytearray(b"\xa5" * first)), memoryview(bytearray(b"\x5a" * (n - first)))]


def operate(img: Qcow2Image, kind: str, offset: int, length: int) -> None:
    # The device checks every request against the virtual size and the block size before the
    # image sees it; do the same, so the image is asked what a guest can make it do.
    size = img.size - img.size % 512
    offset = offset % max(size, 1) & ~511
    length = min(length, size - offset)
    if kind == "read" and length > 0:
        img.read_into(buffers(length), offset)
    elif kind == "write" and length > 0 and not img.read_only:
        img.write_from(buffers(length), offset)
    elif kind in ("discard", "zero") and not img.read_only:
        img.discard(offset, length & ~511, zero=kind == "zero")
    elif kind == "flush":
        img.make_durable()
    elif kind == "grow" and not img.read_only:
        img.grow(img.size + (length & ~511))


JAIL: Jail | None = None


def test_one_input(data: bytes) -> None:
    global JAIL
    if JAIL is None:
        JAIL = Jail()
    r = Reader(data[:SCRIPT])
    JAIL.write(data[SCRIPT:])
    read_only = bool(r.u8() & 1)
    try:
        try:
            img = Qcow2Image(JAIL.image, read_only=read_only, l2_cache_bytes=4096)
        except DiskError:
            return
        try:
            for _ in range(6):
                op = r.u8()
                offset = OFFSETS[r.u8() % len(OFFSETS)] + 512 * r.u8()
                length = LENGTHS[r.u8() % len(LENGTHS)] + 512 * (r.u8() % 16)
                try:
                    operate(img, KINDS[op % len(KINDS)], offset, length)
                except OSError:
                    pass
                except DiskError:
                    if KINDS[op % len(KINDS)] != "grow":
                        raise
        finally:
            with contextlib.suppress(OSError):
                img.close()
    finally:
        JAIL.check()


if __name__ == "__main__":
    run("qcow2_image", test_one_input)
