"""A disk kept as a directory of chunk files, sparse: a chunk never written is not stored and
reads as zeros; trimming a whole chunk deletes its file.  The shape of many object stores
(one object per chunk), here on a local directory.

``--blockdev driver=python,node-name=d,module=chunkdir,class=ChunkDir,path=DIR,size=1G``
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

API_VERSION = 1


class ChunkDir:
    """``size`` bytes in ``path``/``<index>`` files of ``chunk`` bytes (default 1 MiB)."""

    thread_model = "serialized"  # read-modify-write of a chunk must not interleave

    def __init__(self, path: str, size: str, chunk: str = "1048576") -> None:
        self.path = path
        self._size = int(size)
        self.chunk = int(chunk)
        if self.chunk <= 0 or self._size <= 0:
            raise ValueError("size and chunk must be positive")
        os.makedirs(path, exist_ok=True)
        self._dirty: set[int] = set()  # chunks written since the last flush

    def size(self) -> int:
        return self._size

    def _file(self, index: int) -> str:
        return os.path.join(self.path, str(index))

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(chunk index, offset in chunk, bytes, offset in the request) over the range."""
        done = 0
        while done < length:
            index, start = divmod(offset + done, self.chunk)
            n = min(self.chunk - start, length - done)
            yield index, start, n, done
            done += n

    def pread(self, buf: memoryview, offset: int) -> None:
        for index, start, n, at in self._pieces(offset, len(buf)):
            try:
                with open(self._file(index), "rb") as f:
                    f.seek(start)
                    got = f.readinto(buf[at:at + n])
            except FileNotFoundError:
                got = 0
            buf[at + got:at + n] = bytes(n - got)  # past a chunk file's end: zeros

    def pwrite(self, buf: memoryview, offset: int) -> None:
        for index, start, n, at in self._pieces(offset, len(buf)):
            fd = os.open(self._file(index), os.O_WRONLY | os.O_CREAT, 0o600)
            self._dirty.add(index)
            try:
                os.pwrite(fd, buf[at:at + n], start)
            finally:
                os.close(fd)

    def trim(self, offset: int, length: int) -> None:
        for index, start, n, _at in self._pieces(offset, length):
            if start == 0 and n == self.chunk:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._file(index))
            else:
                self._zero_part(index, start, n)

    zero = trim

    def _zero_part(self, index: int, start: int, n: int) -> None:
        if not os.path.exists(self._file(index)):
            return  # already zeros
        fd = os.open(self._file(index), os.O_WRONLY)
        self._dirty.add(index)
        try:
            os.pwrite(fd, bytes(n), start)
        finally:
            os.close(fd)

    def flush(self) -> None:
        """Chunk files are written with plain pwrite: make them and the directory durable."""
        for index in sorted(self._dirty):
            try:
                fd = os.open(self._file(index), os.O_RDONLY)
            except FileNotFoundError:
                continue  # trimmed since
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._dirty.clear()
        dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
