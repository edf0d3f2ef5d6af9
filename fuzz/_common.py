"""What every harness shares: the libFuzzer command line, quiet logging and the fd zoo.

Each harness is ``python fuzz/NAME.py [libFuzzer options] [corpus dirs]``.  Without a corpus
directory on the command line the harness reads its seed corpus (``fuzz/corpus/NAME``) and
writes what it learns to a fresh directory under the system temp dir, so a run never grows the
corpus kept in the tree; crash artifacts go to the temp dir too unless ``-artifact_prefix`` says
otherwise.  Every harness is in-process and sans-IO where it can be: messages are handed to the
handler's entry point, guest memory is a memfd or an anonymous mapping made once per process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import atheris

T = TypeVar("T")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as ``python fuzz/NAME.py`` from anywhere
    sys.path.insert(0, str(ROOT))


def run(name: str, test_one_input: Callable[[bytes], None]) -> None:
    """Hand ``test_one_input`` to libFuzzer with the command line (see the module docstring)."""
    # The code under test logs every refused message and stopped queue: that is its job, and
    # formatting a million log lines would be most of the fuzzing time.
    logging.disable(logging.CRITICAL)
    argv = list(sys.argv)
    if not any(a.startswith("-artifact_prefix=") for a in argv[1:]):
        argv.insert(1, f"-artifact_prefix={tempfile.gettempdir()}/fuzz-{name}-")
    words = HERE / "dicts" / f"{name}.dict"
    if words.exists() and not any(a.startswith("-dict=") for a in argv[1:]):
        argv.insert(1, f"-dict={words}")
    if not [a for a in argv[1:] if not a.startswith("-")]:
        work = tempfile.mkdtemp(prefix=f"fuzz-{name}-corpus-")
        argv += [work, str(HERE / "corpus" / name)]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


# ---------------------------------------------------------------------------- fds of every kind

#: The kinds of fd a hostile frontend can attach to a message (each message gets fresh dups).
FD_KINDS = ("eventfd", "memfd", "pipe_r", "pipe_w", "file", "devnull", "socket", "memfd_small",
            "dir", "epoll")


class FdZoo:
    """One fd of each kind, made once per process; :meth:`dup` gives a fresh fd of a kind.

    The handler owns the fds it keeps and the caller closes the rest, so every message gets its
    own duplicates and the originals stay for the next input.
    """

    def __init__(self, memfd_size: int) -> None:
        self.tmp = tempfile.mkdtemp(prefix="fuzz-fds-")
        self.memfd = os.memfd_create("fuzz-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, memfd_size)
        small = os.memfd_create("fuzz-small", os.MFD_CLOEXEC)
        os.ftruncate(small, 4096)
        r, w = os.pipe2(os.O_CLOEXEC)
        path = os.path.join(self.tmp, "regular")
        with open(path, "wb") as f:
            f.write(bytes(8192))
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.peer = b  # kept open so the socket end stays connected
        import select

        self._epoll = select.epoll()
        self.fds = {
            "memfd": self.memfd,
            "eventfd": os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
            "pipe_r": r,
            "pipe_w": w,
            "file": os.open(path, os.O_RDWR | os.O_CLOEXEC),
            "devnull": os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC),
            "socket": a.detach(),
            "memfd_small": small,
            "dir": os.open(self.tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC),
            "epoll": self._epoll.fileno(),
        }

    def dup(self, kind: str) -> int:
        return os.dup(self.fds[kind])

    def pick(self, fdp: atheris.FuzzedDataProvider) -> int:
        """A fresh fd of a kind the input chooses."""
        return self.dup(FD_KINDS[fdp.ConsumeIntInRange(0, len(FD_KINDS) - 1)])


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


class Reader:
    """Reads an input front to back as little-endian numbers; zeros once it runs out.

    (atheris' FuzzedDataProvider would do, but a plain format lets ``make_seeds.py`` write
    seeds with ``struct.pack`` and keeps mutations local: a changed byte changes one field.)
    """

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def u8(self) -> int:
        pos = self.pos
        if pos < len(self.data):
            self.pos = pos + 1
            return self.data[pos]
        return 0

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def pick(self, options: Sequence[T]) -> T:
        return options[self.u8() % len(options)]


#: Values a hostile peer likes: boundaries of every integer width, page and ring sizes.
INTERESTING = (
    0, 1, 2, 3, 7, 8, 15, 16, 64, 255, 256, 511, 512, 4095, 4096, 4097, 0x7FFF, 0x8000, 0xFFFF,
    0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, (1 << 32) + 1, 1 << 48, 1 << 62,
    (1 << 63) - 1, 1 << 63, (1 << 63) + 1, (1 << 64) - 4096, (1 << 64) - 1,
)


def number(r: Reader, extra: tuple[int, ...] = ()) -> int:
    """A u64 the input chooses: a small number, an interesting one (``extra`` first) or raw.

    Selector byte ``s``: ``s < 0x80``: ``s`` itself; ``0x80 <= s < 0xF0``: an entry of
    ``extra + INTERESTING``; from ``0xF0``: the next eight bytes.
    """
    s = r.u8()
    if s < 0x80:
        return s
    if s < 0xF0:
        table = extra + INTERESTING
        return table[(s - 0x80) % len(table)]
    return r.u64()


def encode_number(value: int, extra: tuple[int, ...] = ()) -> bytes:
    """The shortest bytes :func:`number` reads back as ``value`` (for seed making)."""
    if value < 0x80:
        return bytes([value])
    table = extra + INTERESTING
    if value in table:
        return bytes([0x80 + table.index(value)])
    return bytes([0xF0]) + value.to_bytes(8, "little")
