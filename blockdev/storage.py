"""The block-backend seam: what the device needs from any kind of storage.

The device and the queue workers see only a :class:`Storage`: its geometry and access mode
(:class:`~.disk.DiskInfo`), which request types it can carry out (:class:`Capabilities` -- the
virtio features offered follow them), and one asynchronous :class:`~.engine.Engine` per queue
(submit, a completion fd the worker sleeps on, reap).  A raw file or block device
(:class:`FileStorage`, today's engines), a Ceph RBD image (:mod:`.rbd`) and an NBD export
(:mod:`.nbd`) all sit behind it; which one serves an ``--image`` is decided by the spec's syntax
alone (:mod:`.spec`), never by guessing from file contents.
"""

from __future__ import annotations

import abc

from blockdev.disk import BlockDisk, DiskError, DiskInfo, check_growth
from blockdev.engine import Engine, make_engine
from blockdev.ops import Capabilities


class StorageError(Exception):
    """The storage cannot be opened or used as asked; the message is one line for the user."""


class Storage(abc.ABC):
    """An opened image of some kind, shared by every queue of one device."""

    #: Geometry and access mode.
    info: DiskInfo
    #: What the storage can do; the device's feature bits follow.
    caps: Capabilities = Capabilities()
    #: What the user named (for log lines).
    name: str = ""

    @abc.abstractmethod
    def open_engine(self, queue_index: int) -> Engine:
        """A fresh engine serving queue ``queue_index`` (closed by its queue)."""

    def make_durable(self) -> None:
        """Make every completed write durable (at shutdown).  OSError on failure.

        Named for what it guarantees, not ``flush``: that word also meant ending an engine's
        batch (now ``Engine.submit_batch``) and publishing a virtqueue's used ring; and not
        ``sync``, which already names an op's write-through flag (``IoOp.sync``)."""

    def grow(self, size: int) -> None:
        """Make the storage ``size`` bytes (live resize); :attr:`info` follows.

        StorageError where it cannot (the default: this kind of storage is not resizable from
        here), for shrinking, and for a size that is not whole blocks.  The default checks the
        size by the shared rule first (:func:`~.disk.check_growth`): a bad size is named as such,
        and growing to the current size is the no-op it is everywhere.
        """
        try:
            if not check_growth(self.info, size):
                return
        except DiskError as exc:
            raise StorageError(f"{self.name}: {exc}") from None
        raise StorageError(f"{self.name}: this storage cannot be resized while it is served")

    def close(self) -> None:
        """Release the storage; every engine is closed by then."""


class FileStorage(Storage):
    """An image file or block device -- raw (:class:`~.disk.Disk`) or a format over a file
    (qcow2) -- served by the file engines."""

    def __init__(self, disk: BlockDisk, engine: str = "threads", io_threads: int = 16) -> None:
        self.disk = disk
        self.info = disk.info
        self.name = disk.path
        self.engine_kind = engine
        self.io_threads = io_threads

    def open_engine(self, queue_index: int) -> Engine:
        return make_engine(self.engine_kind, self.disk, queue_index, self.io_threads)

    def make_durable(self) -> None:
        if not self.info.read_only:
            self.disk.make_durable()

    def grow(self, size: int) -> None:
        try:
            self.disk.grow(size)
        except DiskError as exc:
            raise StorageError(str(exc)) from None
        self.info = self.disk.info

    def close(self) -> None:
        self.disk.close()


def remote_info(size: int, read_only: bool, logical_block_size: int = 512) -> DiskInfo:
    """The :class:`DiskInfo` of storage reached through a client library: no O_DIRECT, no
    buffer alignment (the library copies into its own messages or takes iovecs as they are)."""
    usable = size - size % logical_block_size
    if usable <= 0:
        raise StorageError(f"the image is smaller than one {logical_block_size}-byte block")
    return DiskInfo(usable, logical_block_size, read_only, False, 1, 1, False)
