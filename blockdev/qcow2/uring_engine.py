"""io_uring for qcow2: requests inside one allocated cluster go to the ring at their host offset.

:class:`MappedUringEngine` queues every read and write as the raw engine does and translates
the whole batch when it is handed to the kernel (:meth:`Qcow2Disk.map_batch`: one lock round
trip for the batch, which also counts each translated IO in flight so its cluster is not freed
under it), then hands the ring the host offsets: the zero-copy, one-syscall-per-batch path of
raw images.  The two cases where the raw engine skips the ring because the ring is slower there
(:mod:`blockdev.engine`) skip it here too, at the host offset: a translated write is a plain
``pwritev`` (io_uring hands buffered writes to a kernel worker thread), and a batch of a single
translated read first tries ``preadv(RWF_NOWAIT)``, going to the ring only if the data is not
all in the page cache.  (qcow2 is never opened with O_DIRECT.)

Everything else -- allocating writes, copy-on-write, compressed or backing reads
(the reads and writes the batch could not translate, run at the end of the batch and handed
back by the next :meth:`reap`), discard, write-zeroes, and FLUSH (which also releases freed
clusters after its sync; these three run at once, when submitted) -- runs through the general
path inline on the queue's worker.

Before running anything inline the engine waits for its own ring to empty (``_quiesce``): the
general path may wait for in-flight IO to drain (discard) or for a discard to finish, and the
IO this queue has in the ring is only released when this worker reaps it.  Ops completed while
quiescing or inline are handed back by the next :meth:`reap`, which the worker calls at the end
of every batch.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Protocol

from blockdev.disk import BlockDisk, resume_io
from blockdev.engine import IoOp, UringEngine, execute, sync_if_write_through
from blockdev.ops import DATA_KINDS, OpKind

log = logging.getLogger(__name__)
_READ, _WRITE = OpKind.READ, OpKind.WRITE


class MappedDisk(BlockDisk, Protocol):
    """A disk whose guest offsets map to host offsets of its file, a batch of IOs at a time
    (the qcow2 image: :class:`~blockdev.qcow2.disk.Qcow2Disk`)."""

    def map_batch(self, ops: list[IoOp], guest: dict[int, int]) -> list[IoOp]:
        """Translate the ops it can in place (``op.offset`` becomes the host offset, the
        guest's is kept in ``guest[id(op)]``, each counted in flight until :meth:`unmap_io`);
        the others are moved out of ``ops`` and returned, for the general path."""

    def unmap_io(self, count: int = 1) -> None:
        """``count`` IOs that :meth:`map_batch` translated have completed."""


class MappedUringEngine(UringEngine):
    """An io_uring engine for a :class:`MappedDisk`."""

    def __init__(self, disk: MappedDisk, entries: int = 256) -> None:
        super().__init__(disk, entries)
        self.qcow2 = disk
        self._guest: dict[int, int] = {}  # id(op) -> guest offset, while op.offset is the host's
        self._early: list[IoOp] = []
        #: A lone translated read is tried with preadv(RWF_NOWAIT) first (see the module
        #: docstring); off once the file has shown it has no RWF_NOWAIT.
        self.nowait = True
        # The compiled fast path's IO at host offsets is counted in flight too: it leaves the
        # count when its completion is taken from the ring, whoever takes it.
        self.ring.external_reaped = disk.unmap_io

    def submit(self, op: IoOp) -> bool:
        if op.kind in DATA_KINDS:  # translated with the rest of the batch (submit_batch)
            self._queued.append(op)
            return False
        self._quiesce()  # the rest has no single host offset: the general path
        execute(self.disk, op)
        return True

    def submit_batch(self) -> None:
        """Translate the queued reads and writes; write those translated and try a lone read
        from the page cache at once, put the other translated ones in the ring, then run the
        rest through the general path (after the ring has emptied)."""
        queued = self._queued
        slow = self.qcow2.map_batch(queued, self._guest) if queued else None
        if queued:
            if len(queued) == 1:
                op = queued[0]
                if op.kind == _WRITE:
                    self._write(op)
                    finished = True
                else:  # from the page cache if it is all there; if not, the ring reads it
                    finished = self.nowait and self._read_nowait(op)
                if finished:
                    self._finished_now([op])
                    queued.clear()
            else:
                writes = [op for op in queued if op.kind == _WRITE]
                if writes:
                    for op in writes:
                        self._write(op)
                    self._finished_now(writes)
                    queued[:] = [op for op in queued if op.kind != _WRITE]
            if queued:
                self._prepare(queued)
        self.ring.submit()
        if slow:
            self._quiesce()
            for op in slow:
                execute(self.disk, op)
            self._early += slow

    def _write(self, op: IoOp) -> None:
        """A translated write as a plain pwritev at its host offset (what the raw engine does
        with a buffered write), made durable after it in write-through mode."""
        views = [b.view for b in op.buffers]
        try:
            done = os.pwritev(self.disk.fd, views, op.offset)
            op.result = done if done == op.length else resume_io(
                self.disk.fd, True, views, op.offset, done)
        except OSError as exc:
            op.result = exc
        if op.sync:
            sync_if_write_through(self.disk, op)

    def _read_nowait(self, op: IoOp) -> bool:
        """Try a translated read from the page cache without waiting (``preadv(RWF_NOWAIT)``
        at its host offset); True if it is finished (read in full, or failed with a disk
        error), False if the ring must read it (not all cached, short: again from the start)."""
        try:
            done = os.preadv(self.disk.fd, [b.view for b in op.buffers], op.offset,
                             os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # no RWF_NOWAIT on this file
                log.info("%s: preadv(RWF_NOWAIT) unsupported (%s); reads go to io_uring",
                         getattr(self.disk, "path", "disk"), exc.strerror)
                self.nowait = False
                return False
            op.result = exc  # a disk error, as the ring would have reported it
            return True
        if done != op.length:
            return False
        op.result = done
        return True

    def _finished_now(self, ops: list[IoOp]) -> None:
        """``ops``, translated and finished without the ring: their guest offsets back, out
        of the image's in-flight IO, handed back by the next :meth:`reap`."""
        pop = self._guest.pop
        for op in ops:
            op.offset = pop(id(op))
        self.qcow2.unmap_io(len(ops))
        self._early += ops

    def _quiesce(self) -> None:
        """Wait until none of this queue's IO is in the ring (see the module docstring) --
        the compiled fast path's included: its completions wait in the ring's external stash
        for it, already counted out of the image's in-flight IO."""
        if self._queued:
            self.submit_batch()  # the reads and writes queued for this batch go first
        while self._ops or self._external_in_kernel():
            self.ring.submit(wait=1)
            self._early.extend(self._reap_ring())

    def _reap_ring(self) -> list[IoOp]:
        if not self._ops and not self._external_in_kernel():  # nothing in the ring
            return []
        done = super().reap()
        mapped = 0
        pop = self._guest.pop
        for op in done:
            guest = pop(id(op), None)
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
