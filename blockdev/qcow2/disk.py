"""The qcow2 image behind the interface of :class:`blockdev.disk.Disk`."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from blockdev.disk import DiskError, DiskInfo, check_growth, resume_io
from blockdev.engine import IoOp
from blockdev.qcow2.image import Qcow2Image
from blockdev.qcow2.uring_engine import MappedUringEngine
from blockdev.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)


class Qcow2Disk:
    """A qcow2 image with the interface of :class:`blockdev.disk.Disk`.

    Every failure -- including metadata found bad while serving -- leaves as an ``OSError``,
    which the engines turn into an IOERR status for that request.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False,
                 logical_block_size: int = 512, backing_dirs: Iterable[str] = ()) -> None:
        """``backing_dirs``: directories besides the image's own that backing files may come
        from (``--backing-dir``; :mod:`.backing_policy`)."""
        self.image = Qcow2Image(path, read_only=read_only, backing_dirs=tuple(backing_dirs))
        self.path = self.image.path
        self.read_only = read_only
        self.fd = self.image.fd
        size = self.image.size - self.image.size % logical_block_size
        if size == 0:
            self.image.close()
            raise DiskError(f"{self.path}: virtual size is smaller than one block")
        self.info = DiskInfo(size, logical_block_size, read_only, False, 1, 1, False)
        #: Bad metadata fails every request that meets it: the first lines, then a count.
        self._errlog = RateLimitedLog(log)
        # The io_uring engine's two calls per batch, straight to the image (no frame of ours):
        #: Translate the reads and writes inside one allocated cluster each to host offsets
        #: (counted in flight until :attr:`unmap_io`; their guest offsets kept in ``guest``);
        #: the rest are taken out of ``ops`` and returned: they must go through readv/writev,
        #: which report bad metadata as an IOERR for that request (never the queue's worker).
        self.map_batch: Callable[[list[IoOp], dict[int, int]], list[IoOp]] = \
            self.image.map_batch
        #: ``count`` IOs that :attr:`map_batch` translated have completed.
        self.unmap_io: Callable[[int], None] = self.image.leave

    @property
    def uring_engine(self) -> type:
        """The io_uring engine for this disk (guest offsets are translated per batch)."""
        return MappedUringEngine

    def resume(self, write: bool, buffers: Sequence[memoryview], offset: int, done: int) -> int:
        """Continue a short transfer at a *host* offset (the io_uring engine's fallback for IO
        that :attr:`map_batch` translated)."""
        return resume_io(self.fd, write, buffers, offset, done)

    def readv(self, buffers: Sequence[memoryview], offset: int) -> int:
        views = [v for v in buffers if v.nbytes]
        try:
            self.image.read_into(views, offset)
        except OSError as exc:
            self._errlog.log(logging.ERROR, "%s: read at %d failed: %s", self.path, offset, exc)
            raise
        except Exception as exc:  # a bug or bad metadata we did not foresee: this request only
            self._errlog.log(logging.ERROR, "%s: read at %d failed", self.path, offset,
                             exc_info=True)
            raise OSError(errno.EIO, str(exc)) from exc
        return sum(v.nbytes for v in views)

    def writev(self, buffers: Sequence[memoryview], offset: int) -> int:
        views = [v for v in buffers if v.nbytes]
        try:
            self.image.write_from(views, offset)
        except OSError as exc:
            self._errlog.log(logging.ERROR, "%s: write at %d failed: %s", self.path, offset, exc)
            raise
        except Exception as exc:
            self._errlog.log(logging.ERROR, "%s: write at %d failed", self.path, offset,
                             exc_info=True)
            raise OSError(errno.EIO, str(exc)) from exc
        return sum(v.nbytes for v in views)

    def make_durable(self) -> None:
        self._guard(self.image.make_durable)

    def discard(self, offset: int, length: int) -> None:
        self._guard(self.image.discard, offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._guard(self.image.discard, offset, length, True, unmap)

    def _guard(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except OSError as exc:
            self._errlog.log(logging.ERROR, "%s: %s%r failed: %s", self.path, fn.__name__, args,
                             exc)
            raise
        except Exception as exc:
            self._errlog.log(logging.ERROR, "%s: %s%r failed", self.path, fn.__name__, args,
                             exc_info=True)
            raise OSError(errno.EIO, str(exc)) from exc

    def grow(self, size: int) -> None:
        """Live resize (:meth:`Qcow2Image.grow` says what can grow and how)."""
        if not check_growth(self.info, size):
            return
        self.image.grow(size)
        self.info = replace(self.info, size=size)

    def close(self) -> None:
        self.image.close()
        self.fd = -1
