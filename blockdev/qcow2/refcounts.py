"""Refcounts of host clusters, and the cluster allocator built on them.

The refcount table (read at open, validated) points at refcount blocks; a block holds one
``2**refcount_order``-bit counter per host cluster.  Blocks are cached (bounded LRU) and the
cache is *write-through*: every change is ``pwrite``-n to the file before :meth:`set` returns,
so a kill -9 can never leave a cluster in use whose refcount is only in our memory.

Crash-safety ordering kept here: an allocated cluster's refcount is written (:meth:`allocate`,
in synced batches) before the caller writes anything that uses the cluster; a new refcount
block is written in full, and synced, before the refcount table entry that points at it.
Dropping a refcount (:meth:`free`) is the caller's last step, after it has cleared -- and
synced -- every pointer to the cluster.

Not thread-safe by itself: the image calls it under its metadata lock.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable

import numpy as np

from blockdev.qcow2.format import MAX_REFTABLE_BYTES, REFTABLE_RESERVED, Header, Qcow2OpenError

log = logging.getLogger(__name__)


# Clusters are taken (refcount set, file grown, synced) in batches of 4 MiB, doubling up to
# 16 MiB while refills come less than a second apart (and never more than 256 clusters): a
# kill -9 leaks at most one batch.
RESERVE_BYTES = 4 << 20
RESERVE_MAX_BYTES = 16 << 20
RESERVE_MAX_CLUSTERS = 256
# The most refcount-block work one allocation (one batch) may do looking for free clusters,
# below the end of the file and again past it: blocks visited, and bytes of them read.  The
# lock every queue shares is held meanwhile, so a hostile table (millions of entries, all
# "in use") must cost milliseconds, not hours; a scan that runs out resumes where it stopped
# at the next allocation.
SCAN_BLOCKS = 64
SCAN_BYTES = 4 << 20
_DTYPES: dict[int, np.dtype[np.unsignedinteger]] = {
    8: np.dtype(np.uint8), 16: np.dtype(">u2"), 32: np.dtype(">u4"), 64: np.dtype(">u8")}


class _Budget:
    """What is left of the scan work one batch may do."""

    __slots__ = ("blocks", "bytes")

    def __init__(self) -> None:
        self.blocks = SCAN_BLOCKS
        self.bytes = SCAN_BYTES

    def spend(self, nbytes: int) -> bool:
        """Account one block visit of ``nbytes``; False when nothing was left for it."""
        if self.blocks <= 0 or self.bytes <= 0:
            return False
        self.blocks -= 1
        self.bytes -= nbytes
        return True


class CorruptImage(OSError):
    """Metadata found bad at run time: fails the request with IOERR (never the server)."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.EIO, why)


class Refcounts:
    """Counts references to host clusters; allocates free ones."""

    #: Called after the refcount table moved (grew): the image's map state holds its range.
    table_moved: Callable[[], None] | None = None

    def __init__(self, fd: int, header: Header, file_size: int, path: str,
                 cache_blocks: int = 64) -> None:
        self.fd = fd
        self.path = path
        self.cluster_bits = header.cluster_bits
        self.cluster_size = cs = header.cluster_size
        self.order = header.refcount_order
        self.bits = 1 << self.order
        self.max_value = (1 << self.bits) - 1
        self.per_block = cs * 8 // self.bits
        self.table_offset = header.refcount_table_offset
        self.table_clusters = header.refcount_table_clusters
        raw = os.pread(fd, header.refcount_table_clusters * cs, self.table_offset)
        # Validated with numpy: a table may hold a million entries.
        entries = np.frombuffer(raw, dtype=">u8")[:len(raw) // 8].astype(np.uint64)
        bad = ((entries & np.uint64((cs - 1) | REFTABLE_RESERVED)) != 0) | (
            (entries != 0) & (entries > np.uint64(max(0, file_size - cs))))
        if bad.any():
            i = int(bad.argmax())
            raise Qcow2OpenError(f"{path}: refcount table entry {i} ({int(entries[i]):#x}) is "
                                 "misaligned or beyond the end of the file")
        self.table: list[int] = entries.tolist()
        self._check_blocks(entries, path)
        self.block_offsets = {e for e in self.table if e}
        # Per table entry: the block is known to have no free entry (set by a scan, cleared
        # when a count in it drops to zero), so scans skip it without reading it.
        self._full = np.zeros(len(self.table), dtype=bool)
        self._cache: OrderedDict[int, bytearray] = OrderedDict()
        self._cache_blocks = cache_blocks
        self.file_end = file_size  # highest byte we know to be in the file (grows on use)
        self._reserve: deque[int] = deque()  # refcount 1, synced, not used yet
        cb = self.cluster_bits
        self.reserve_clusters = min(RESERVE_MAX_CLUSTERS, max(8, RESERVE_BYTES >> cb))
        self.reserve_max = min(RESERVE_MAX_CLUSTERS, max(8, RESERVE_MAX_BYTES >> cb))
        self._batch = self.reserve_clusters
        self._last_refill = -1e9
        self._reserve_stale = False
        self._fresh: set[int] = set()  # reserved clusters that are holes past the old end
        self.free_hint = 0  # no free cluster below this index
        self._tail_hint = 0  # where the last scan past the end of the file stopped

    def _check_blocks(self, entries: np.ndarray, path: str) -> None:
        """Refuse a table whose blocks overlap each other or the table itself: a write to one
        count would change others (and a scan could be made to visit one block a million
        times).  Aligned and nonzero, a block is never in the header's cluster."""
        used = entries[entries != 0]
        if np.unique(used).size != used.size:
            raise Qcow2OpenError(f"{path}: refcount table entries share refcount blocks")
        start, end = self.table_range
        inside = (used >= np.uint64(start)) & (used < np.uint64(end))
        if inside.any():
            off = int(used[int(inside.argmax())])
            raise Qcow2OpenError(f"{path}: refcount block at {off:#x} overlaps the refcount "
                                 "table")

    # ------------------------------------------------------------------ blocks
    def _block(self, index: int) -> tuple[int, bytearray] | None:
        """(offset, contents) of refcount block ``index``, or None if it does not exist."""
        if index >= len(self.table):
            return None
        off = self.table[index]
        if off == 0:
            return None
        blk = self._cache.get(off)
        if blk is None:
            blk = bytearray(os.pread(self.fd, self.cluster_size, off))
            if len(blk) != self.cluster_size:
                raise CorruptImage(f"refcount block at {off:#x} is truncated")
            self._cache[off] = blk
            if len(self._cache) > self._cache_blocks:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(off)
        return off, blk

    def _get_in(self, blk: bytearray, i: int) -> int:
        bits = self.bits
        if bits >= 8:
            n = bits >> 3
            return int.from_bytes(blk[i * n:(i + 1) * n], "big")
        per_byte = 8 // bits
        return (blk[i // per_byte] >> ((i % per_byte) * bits)) & self.max_value

    def _set_in(self, blk: bytearray, i: int, value: int) -> tuple[int, int]:
        """Store ``value`` for entry ``i``; the (start, end) bytes of ``blk`` that changed."""
        bits = self.bits
        if bits >= 8:
            n = bits >> 3
            blk[i * n:(i + 1) * n] = value.to_bytes(n, "big")
            return i * n, (i + 1) * n
        per_byte = 8 // bits
        shift = (i % per_byte) * bits
        b = i // per_byte
        blk[b] = (blk[b] & ~(self.max_value << shift) & 0xFF) | (value << shift)
        return b, b + 1

    # ------------------------------------------------------------------ counts
    def get(self, cluster: int) -> int:
        found = self._block(cluster // self.per_block)
        if found is None:
            return 0
        return self._get_in(found[1], cluster % self.per_block)

    def set(self, cluster: int, value: int) -> None:
        """Set and write through the refcount of host cluster ``cluster``."""
        if not 0 <= value <= self.max_value:
            raise CorruptImage(f"refcount of cluster {cluster} would become {value}")
        found = self._block(cluster // self.per_block)
        if found is None:
            if value == 0:
                return
            raise CorruptImage(f"no refcount block for host cluster {cluster}")
        off, blk = found
        start, end = self._set_in(blk, cluster % self.per_block, value)
        _pwrite_all(self.fd, blk[start:end], off + start)
        if value == 0:
            self._full[cluster // self.per_block] = False

    def add(self, cluster: int, delta: int) -> int:
        value = self.get(cluster) + delta
        if value < 0:
            raise CorruptImage(f"refcount of host cluster {cluster} would drop below zero")
        self.set(cluster, value)
        return value

    def _new_block(self, index: int, place: int) -> None:
        """Make refcount block ``index`` in host cluster ``place`` (a free cluster of the range
        it covers), counting itself.  Written in full before the refcount table entry that
        points at it (ordering)."""
        if index >= len(self.table):
            self._grow_table(index, place)
            return
        cs = self.cluster_size
        blk = bytearray(cs)
        self._set_in(blk, place % self.per_block, 1)
        off = place * cs
        _pwrite_all(self.fd, blk, off)
        os.fdatasync(self.fd)  # the block is durable before the entry that points at it
        self.file_end = max(self.file_end, off + cs)
        self.table[index] = off
        self.block_offsets.add(off)
        _pwrite_all(self.fd, struct.pack(">Q", off), self.table_offset + index * 8)
        self._cache[off] = blk
        log.debug("%s: new refcount block %d at %#x", self.path, index, off)

    def _grow_table(self, index: int, place: int) -> None:
        """A larger refcount table, for block ``index`` placed in cluster ``place``.

        The new block goes in ``place`` and the new table right after it, in the same
        (so far uncovered, hence unused) range; the block counts both.  Order: block, table,
        then the header's two refcount-table fields in one pwrite, then the old table's
        clusters are freed, with an ``fdatasync`` between the steps (host crashes).  A crash
        before the header write leaves unreferenced clusters beyond every refcount, after it a
        leak of the old table at most.
        """
        cs = self.cluster_size
        per = self.per_block
        entries = max(index + 1, 2 * len(self.table))
        k = -(-entries * 8 // cs)
        if k * cs > MAX_REFTABLE_BYTES or place % per + 1 + k > per:
            raise OSError(errno.ENOSPC, f"{self.path}: refcount table cannot grow further")
        entries = k * cs // 8
        blk = bytearray(cs)
        for c in range(place, place + 1 + k):
            self._set_in(blk, c % per, 1)
        block_off = place * cs
        table_off = block_off + cs
        table = [*self.table, *([0] * (entries - len(self.table)))]
        table[index] = block_off
        _pwrite_all(self.fd, blk, block_off)
        _pwrite_all(self.fd, struct.pack(f">{entries}Q", *table), table_off)
        os.fdatasync(self.fd)  # block and table durable before the header points at them
        _pwrite_all(self.fd, struct.pack(">QI", table_off, k), 48)  # the header's fields
        os.fdatasync(self.fd)  # the header durable before the old table's refcount drops
        old_off, old_clusters = self.table_offset, self.table_clusters
        self.table, self.table_offset, self.table_clusters = table, table_off, k
        if self.table_moved is not None:
            self.table_moved()
        self._full = np.concatenate([self._full, np.zeros(entries - len(self._full), bool)])
        self.block_offsets.add(block_off)
        self._cache[block_off] = blk
        self.file_end = max(self.file_end, table_off + k * cs)
        self.free(old_off, old_clusters * cs)
        log.info("%s: refcount table grown to %d clusters at %#x", self.path, k, table_off)

    @property
    def table_range(self) -> tuple[int, int]:
        """The refcount table's bytes in the file, ``(start, end)``: one statement of it for
        the overlap check, :meth:`is_metadata` and the compiled core's copy of that rule."""
        return self.table_offset, self.table_offset + self.table_clusters * self.cluster_size

    def is_metadata(self, host: int) -> bool:
        """True if ``host`` is the start of a cluster of the refcount table or a block."""
        start, end = self.table_range
        return host in self.block_offsets or start <= host < end

    # ------------------------------------------------------------------ allocation
    def allocate(self) -> int:
        """A free host cluster whose refcount of 1 is in the file -- and synced -- before the
        caller uses it; its byte offset."""
        return self.allocate_fresh()[0]

    def allocate_fresh(self) -> tuple[int, bool]:
        """Like :meth:`allocate`; also whether the cluster is a hole the file grew by (it
        reads as zeroes without being zeroed)."""
        if self._reserve_stale:  # space was freed below the batch: prefer it (compact files)
            self.release_reserve()
        if not self._reserve:
            self._refill()
        c = self._reserve.popleft()
        fresh = c in self._fresh
        if fresh:
            self._fresh.discard(c)
        return c * self.cluster_size, fresh

    def allocate_run(self, count: int) -> int:
        """``count`` contiguous free clusters past every cluster in use, their refcounts 1 and
        synced before the caller uses them (a table that must be one piece: a new L1); the
        byte offset of the first.  The file is extended to cover them.  The search is bounded
        (:data:`SCAN_BLOCKS`): OSError(ENOSPC) if a hostile table hides every run."""
        cs = self.cluster_size
        per = self.per_block
        c = max(-(-self.file_end // cs), max(self._reserve, default=0) + 1, 1)
        budget = _Budget()
        x = c
        while x < c + count:
            found = self._block(x // per)
            if not budget.spend(cs):
                raise OSError(errno.ENOSPC, f"{self.path}: no run of {count} free clusters "
                              "found (refcount table full or damaged)")
            if found is None:
                self._new_block(x // per, x)  # the block takes x: look again after it
                c = x = x + 1
                continue
            i = x % per
            j = min(per, i + c + count - x)
            used = np.flatnonzero(self._in_use(found[1])[i:j])
            if used.size:
                c = x = x + int(used[-1]) + 1
            else:
                x += j - i
        for x in range(c, c + count):
            self.set(x, 1)
        end = (c + count) * cs
        if end > os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, end)
        self.file_end = max(self.file_end, end)
        os.fdatasync(self.fd)
        return c * cs

    def _refill(self) -> None:
        """Take the next free clusters as one batch: their refcounts are set to 1, then one
        ``fdatasync``.  That keeps refcount-before-use across a host crash too (a cluster is
        never mapped by an L2 entry the kernel may persist before its refcount) at one sync per
        batch; a crash leaks at most the batch's unused clusters."""
        now = time.monotonic()
        if now - self._last_refill < 1.0:  # allocating fast: fewer, larger batches
            self._batch = min(2 * self._batch, self.reserve_max)
        else:
            self._batch = self.reserve_clusters
        self._last_refill = now
        old_size = os.fstat(self.fd).st_size
        got: list[int] = []
        budget, tail_budget = _Budget(), _Budget()
        while len(got) < self._batch:
            found = self._find_free(self._batch - len(got), budget, tail_budget)
            if not found:
                break
            for c in found:
                self.set(c, 1)
            got += found
        if not got:
            raise CorruptImage(f"{self.path}: no free cluster found in {SCAN_BLOCKS} refcount "
                               "blocks below the end of the file nor past it (refcount table "
                               "damaged?); the next allocation looks further")
        # The file covers the batch before any of it can be referenced: an L2 entry persisted
        # ahead of its data (host crash) then points inside the file, never beyond its end.
        # Only ever grows: every cluster handed out earlier lies below the current size.
        end = (max(got) + 1) * self.cluster_size
        if end > os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, end)
        cs = self.cluster_size
        self._fresh = {c for c in got if c * cs >= old_size and c * cs not in self.block_offsets}
        self.file_end = max(self.file_end, end)
        os.fdatasync(self.fd)
        self._reserve.extend(got)

    def _in_use(self, blk: bytearray) -> np.ndarray[tuple[int], np.dtype[np.bool_]]:
        """Per entry of a refcount block: whether its count is nonzero (vectorised)."""
        bits = self.bits
        if bits >= 8:
            counts = np.frombuffer(blk, dtype=_DTYPES[bits])
            return np.not_equal(counts, 0)
        flags = np.unpackbits(np.frombuffer(blk, dtype=np.uint8), bitorder="little")
        # Entry i is bits i*bits .. (i+1)*bits-1, low bits first (as _get_in reads them).
        return np.any(flags.reshape(-1, bits), axis=1)

    def _find_free(self, want: int, budget: _Budget, tail_budget: _Budget) -> list[int]:
        """Up to ``want`` free host clusters (refcount 0) from one refcount block; none when
        the budgets ran out.

        First fit from :attr:`free_hint` (QEMU's order); if the budget runs out before one
        is found, the hint keeps the progress and the search goes on from the end of the file
        (a valid image has no counts there), on a budget of its own."""
        found, stop = self._scan(max(self.free_hint, 1), want, budget, True)
        self.free_hint = stop  # the caller sets the counts of what was found right away
        if found:
            return found
        tail = max(-(-self.file_end // self.cluster_size), self._tail_hint, stop)
        found, self._tail_hint = self._scan(tail, want, tail_budget, False)
        return found

    def _scan(self, c: int, want: int, budget: _Budget,
              from_hint: bool) -> tuple[list[int], int]:
        """(up to ``want`` free clusters at or after ``c``, all in the first block that has
        any; where the scan stopped: past the last one found).

        ``from_hint``: every cluster below ``c`` is in use, so a block scanned from inside
        finding nothing is full.  Blocks known to be full are skipped without being read (one
        vectorised search over the flags); a block is read and searched with numpy, so a
        visit costs microseconds and ``budget`` bounds the visits."""
        per = self.per_block
        while True:
            idx = c // per
            if idx < len(self._full) and self._full[idx]:
                rest = self._full[idx:]
                k = int(rest.argmin())
                idx = len(self._full) if rest[k] else idx + k
                c = idx * per
            if not budget.spend(self.cluster_size):
                return [], c
            found = self._block(idx)
            if found is None:
                self._new_block(idx, c)  # the block takes c; look again from c + 1
                c += 1
                continue
            i = c % per
            free = np.flatnonzero(~self._in_use(found[1])[i:])
            if free.size:
                picks = (free[:want] + c).tolist()
                return picks, picks[-1] + 1
            if from_hint or i == 0:
                self._full[idx] = True
            c = (idx + 1) * per

    def release_reserve(self) -> None:
        """Give back the clusters taken ahead and not used (at close: no leak when clean)."""
        self._reserve_stale = False
        self._fresh.clear()
        while self._reserve:
            c = self._reserve.pop()
            self.set(c, 0)
            self.free_hint = min(self.free_hint, c)

    def free(self, offset: int, length: int) -> None:
        """Drop one reference from every host cluster in [offset, offset+length)."""
        cb = self.cluster_bits
        for c in range(offset >> cb, ((offset + length - 1) >> cb) + 1):
            if self.add(c, -1) == 0:
                self.free_hint = min(self.free_hint, c)
                if self._reserve and c < self._reserve[0]:
                    self._reserve_stale = True


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short metadata write")
        view = view[n:]
        offset += n


pwrite_all = _pwrite_all
