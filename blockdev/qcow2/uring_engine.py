"""io_uring for qcow2: requests inside one allocated cluster go to the ring at their host offset.

:class:`MappedUringEngine` asks the image to translate each read or write
(:meth:`Qcow2Disk.map_io`, which also counts the IO in flight so its cluster is not freed under
it) and hands the ring the host offset: the zero-copy, one-syscall-per-batch path of raw images.
Everything else -- allocating writes, copy-on-write, compressed or backing reads, discard,
write-zeroes, and FLUSH (which also releases freed clusters after its sync) -- runs through the
general path inline on the queue's worker.

Before running anything inline the engine waits for its own ring to empty (``_quiesce``): the
general path may wait for in-flight IO to drain (discard) or for a discard to finish, and the
IO this queue has in the ring is only released when this worker reaps it.  Ops completed while
quiescing are handed back by the next :meth:`reap`, which the worker calls at the end of every
batch.
"""

from __future__ import annotations

from typing import Protocol

from blockdev.disk import BlockDisk
from blockdev.engine import IoOp, UringEngine, execute
from blockdev.ops import DATA_KINDS, OpKind


class MappedDisk(BlockDisk, Protocol):
    """A disk whose guest offsets map to host offsets of its file, one IO at a time (the
    qcow2 image: :class:`~blockdev.qcow2.disk.Qcow2Disk`)."""

    def map_io(self, offset: int, length: int, writing: bool) -> int:
        """The host offset of an IO (counted in flight until :meth:`unmap_io`), or -1."""

    def unmap_io(self, count: int = 1) -> None:
        """``count`` IOs that :meth:`map_io` translated have completed."""


class MappedUringEngine(UringEngine):
    """An io_uring engine for a :class:`MappedDisk`."""

    def __init__(self, disk: MappedDisk, entries: int = 256) -> None:
        super().__init__(disk, entries)
        self.qcow2 = disk
        self._guest: dict[int, int] = {}  # id(op) -> guest offset, while op.offset is the host's
        self._early: list[IoOp] = []

    def submit(self, op: IoOp) -> bool:
        kind = op.kind
        if kind in DATA_KINDS:  # the rest has no single host offset: the general path
            host = self.qcow2.map_io(op.offset, op.length, kind == OpKind.WRITE)
            if host >= 0:
                self._guest[id(op)] = op.offset
                op.offset = host
                return super().submit(op)
        self._quiesce()
        execute(self.disk, op)
        return True

    def _quiesce(self) -> None:
        """Wait until none of this queue's IO is in the ring (see the module docstring)."""
        if not self._ops and not self._queued:
            return
        self.submit_batch()  # the reads and writes queued for this batch go to the ring first
        while self._ops:
            self.ring.submit(wait=1)
            self._early.extend(self._reap_ring())

    def _reap_ring(self) -> list[IoOp]:
        done = super().reap()
        mapped = 0
        guests = self._guest
        for op in done:
            guest = guests.pop(id(op), None)
            if guest is not None:
                op.offset = guest
                mapped += 1
        if mapped:
            self.qcow2.unmap_io(mapped)  # one lock round trip per batch
        return done

    def reap(self) -> list[IoOp]:
        early, self._early = self._early, []
        return early + self._reap_ring() if early else self._reap_ring()

    def close(self, timeout: float | None = None) -> bool:
        """The ring engine's close (cancel, then wait for the completions, bounded); each op
        that ends there is counted out of the image's in-flight IO, as a reaped one is.  An
        op still in the kernel after that stays counted in flight: it is."""
        return super().close(timeout)

    def _dropped(self, op: IoOp) -> None:
        if self._guest.pop(id(op), None) is not None:
            self.qcow2.unmap_io(1)
