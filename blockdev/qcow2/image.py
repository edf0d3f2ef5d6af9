"""A qcow2 image: guest offsets mapped to host clusters, read-write, with a backing chain.

:class:`Qcow2Disk` (:mod:`.disk`) presents the interface of :class:`blockdev.disk.Disk`
(``readv``, ``writev``, ``make_durable``, ``discard``, ``write_zeroes``, ``info``, ``close``),
so the device and the ``inline``/``threads`` engines use it unchanged; the io_uring engine
(:mod:`.uring_engine`) asks :meth:`Qcow2Image.fast_target` for the host offset of IO inside one
allocated cluster.  Data of allocated clusters moves with ``preadv``/``pwritev`` (or the ring) at
the translated host offset, on the caller's buffers (guest memory): zero copy.

Metadata changes happen in one place (the multi-queue design)
------------------------------------------------------------
All metadata -- the L1 table, the L2 and refcount caches, the allocator -- is guarded by one
lock, ``self._lock``, which every queue (and every IO thread) shares; data IO runs outside it.
Three rules make that safe with many requests in flight:

* a write that must allocate a guest cluster marks the cluster *busy* until its L2 entry is
  written; any other write, discard or zeroing of that cluster waits (clusters are taken in
  ascending order, so two requests cannot wait on each other);
* every data IO counts itself *in flight* while it touches host clusters;
* a host cluster whose refcount drops to zero is not released while any data IO is in flight
  (frees are queued and applied by a FLUSH that finds no IO in flight, by discard, which
  drains in-flight IO first, or at close): a cluster is never reused under an IO still aimed
  at it.

Crash safety (kill -9 leaves the file as a prefix of our pwrite calls)
----------------------------------------------------------------------
All metadata caches are write-through: an entry is ``pwrite``-n before the operation that
changed it completes, so a completed guest write is mapped in the file (durability under kill
-9; FLUSH then only needs ``fdatasync``).  The order of those pwrites is:

1. refcount of a new cluster set to 1          (:meth:`Refcounts.allocate`)
2. new L2 table written in full                (:meth:`_writable_l2`)
3. L1 entry pointing at it                     (:meth:`_writable_l2`)
4. data cluster written in full (COW filled)   (:meth:`_allocating_write`)
5. L2 entry pointing at the data               (:meth:`_commit`)
6. old cluster's refcount dropped              (:meth:`_release` after 5)

so a crash between any two leaves at worst a leaked cluster (refcount 1, no reference), never
a reference to unwritten data or a cluster referenced with a too-small refcount.

A host crash (power loss) may persist the pwrites since the last sync in any order, so the
metadata dependencies are also separated by ``fdatasync`` (as QEMU does): refcounts are set in
synced batches before their clusters are handed out (1), a new L2 table is synced before its
L1 entry (2-3), new refcount blocks and a grown refcount table before what points at them, and
a refcount drops (6) only after a sync made the cleared entry durable.  Only 4-5 are not
separated: after a host crash a guest write it had not flushed may read back as whatever the
new cluster held before (QEMU's writeback mode behaves alike); the image stays consistent.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, MutableSequence, Sequence
from typing import Any, Generic, Protocol, TypeVar, overload

import numpy as np

from blockdev.disk import FALLOC_FL_ZERO_RANGE, DiskError, fallocate
from blockdev.ops import OpKind
from blockdev.qcow2.backing_policy import BackingPolicy
from blockdev.qcow2.format import (
    COMPAT_LAZY_REFCOUNTS,
    L1_RESERVED,
    L2_RESERVED,
    MAX_L1_BYTES,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Header,
    Qcow2OpenError,
    l1_entries_needed,
    read_header,
)
from blockdev.qcow2.hostio import (
    ZEROS,
    RawBacking,
    Views,
    be_table,
    preadv_full,
    pwritev_full,
    to_be,
    zero_fill,
)
from blockdev.qcow2.refcounts import CorruptImage, Refcounts, pwrite_all

log = logging.getLogger(__name__)

MAX_CHAIN_DEPTH = 32
# Entry bits (with COPIED inverted) that send an IO to the general path.
_FAST_REJECT_READ = OFLAG_COMPRESSED | OFLAG_ZERO | L2_RESERVED
_FAST_REJECT_WRITE = _FAST_REJECT_READ | OFLAG_COPIED  # not COPIED: copy-on-write
UNALLOCATED, ZERO, NORMAL, COMPRESSED = range(4)
_READ, _WRITE = OpKind.READ, OpKind.WRITE


class MappableIo(Protocol):
    """A read or write as :meth:`Qcow2Image.map_batch` sees it (an engine's ``IoOp``)."""

    offset: int

    @property
    def kind(self) -> int: ...

    @property
    def length(self) -> int: ...


_Io = TypeVar("_Io", bound=MappableIo)


class _OneIo:
    """One IO for :meth:`Qcow2Image.fast_target` (the general path's own fast case)."""

    __slots__ = ("kind", "length", "offset")

    def __init__(self, kind: int, offset: int, length: int) -> None:
        self.kind = kind
        self.offset = offset
        self.length = length


_T = TypeVar("_T")


class _MapStateField(Generic[_T]):
    """A field of :class:`Qcow2Image` that :meth:`Qcow2Image.map_state` returns: assigning it
    drops the state cached there.

    The compiled fast path asks for the map state once per pass; building the 13 fields again
    each time was a third of what a qcow2 pass costs over a raw one.  So the state is built once
    and kept until one of its scalar fields is assigned -- here, for every assignment, so no
    code that replaces the L1 table or moves the end of the file can forget to (the sets and
    the L2 cache it holds are the image's own objects, changed in place).  Like every change of
    the image's metadata, an assignment is made with the image's lock held -- the lock
    map_state is read under -- so a state being built never outlives the drop that follows.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self._key = f"_field_{name}"

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _MapStateField[_T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> _T: ...

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        try:
            return obj.__dict__[self._key]
        except KeyError:
            raise AttributeError(self._key.removeprefix("_field_")) from None

    def __set__(self, obj: object, value: _T) -> None:
        fields = obj.__dict__
        fields[self._key] = value
        fields["_map_cache"] = None


class Qcow2Image:
    """An open qcow2 image (and, recursively, its backing chain)."""

    # What map_state returns besides the image's own sets and caches (see _MapStateField).
    l1 = _MapStateField[array]()
    file_end = _MapStateField[int]()
    size = _MapStateField[int]()
    _l1_clusters = _MapStateField[range]()
    _autoclear_pending = _MapStateField[bool]()
    #: map_state's tuple while none of its fields changed (None: build it again).
    _map_cache: tuple[array, OrderedDict[int, array], set[int], bool, int, int,
                      Callable[[int], array], int, int, set[int], set[int], int, int] | None = None

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False,
                 l2_cache_bytes: int = 32 << 20, backing_dirs: Sequence[str] = (),
                 _policy: BackingPolicy | None = None, _fd: int | None = None,
                 _depth: int = 0, _seen: frozenset[tuple[int, int]] = frozenset()) -> None:
        """Open ``path`` (the top of a chain) or, for a backing level, take ``_fd``, which the
        backing-file policy opened and checked.  ``backing_dirs``: the ``--backing-dir``
        directories backing files may also come from (:mod:`.backing_policy`)."""
        self.path = os.fspath(path)
        self.read_only = read_only
        if _fd is None:
            # O_NONBLOCK: a FIFO named as the image must not hang the open (it is refused
            # below); regular files ignore the flag.
            flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
            try:
                self.fd = os.open(self.path, flags)
            except FileNotFoundError:
                raise DiskError(f"{self.path}: no such file (use --create SIZE to make "
                                "one)") from None
            except OSError as exc:
                raise DiskError(f"{self.path}: {exc.strerror}") from None
        else:
            self.fd = _fd
        self.backing: Qcow2Image | RawBacking | None = None
        try:
            policy = _policy or BackingPolicy.for_image(self.path, backing_dirs)
            self._open(l2_cache_bytes, policy, _depth, _seen)
        except BaseException:
            self.close()
            raise

    def _open(self, l2_cache_bytes: int, policy: BackingPolicy, depth: int,
              seen: frozenset[tuple[int, int]]) -> None:
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            raise Qcow2OpenError(f"{self.path}: qcow2 images must be regular files")
        h: Header = read_header(self.fd, self.path)
        self.header = h
        self.cluster_bits = cb = h.cluster_bits
        self.cluster_size = cs = h.cluster_size
        self.l2_bits = cb - 3
        self._l2_mask = (1 << self.l2_bits) - 1
        self.size = h.size
        self.file_end = st.st_size
        self.v3 = h.version >= 3
        # Compressed-entry geometry.
        self._csize_shift = 62 - (cb - 8)
        self._csize_mask = (1 << (cb - 8)) - 1
        self._coffset_mask = (1 << self._csize_shift) - 1
        raw = os.pread(self.fd, h.l1_size * 8, h.l1_table_offset) if h.l1_size else b""
        if len(raw) != h.l1_size * 8:
            raise Qcow2OpenError(f"{self.path}: L1 table is truncated")
        self.l1 = be_table(raw)
        # Validated with numpy: an L1 table may hold four million entries.
        l1 = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        offs = l1 & np.uint64(OFFSET_MASK)
        bad = ((l1 & np.uint64(L1_RESERVED)) != 0) | ((offs & np.uint64(cs - 1)) != 0) | (
            (offs != 0) & (offs > np.uint64(max(0, st.st_size - cs))))
        if bad.any():
            i = int(bad.argmax())
            raise Qcow2OpenError(f"{self.path}: L1 entry {i} ({self.l1[i]:#x}) is misaligned or "
                                 "points beyond the end of the file")
        # Every L2 table the active L1 points at: never a data write target.
        self._l2_offsets: set[int] = set(np.unique(offs[offs != 0]).tolist())
        self._l2_cache: OrderedDict[int, array] = OrderedDict()
        self._l2_cache_tables = max(16, l2_cache_bytes // cs)
        self._l1_clusters = range(h.l1_table_offset >> cb,
                                  (h.l1_table_offset + h.l1_size * 8 + cs - 1) >> cb)
        self._compressed_cache: OrderedDict[int, bytes] = OrderedDict()
        self.ref: Refcounts | None = None
        if not self.read_only:
            self.ref = Refcounts(self.fd, h, st.st_size, self.path)
            self.ref.table_moved = self._drop_map_state  # its byte range is in the map state
            shared = self.ref.block_offsets & (self._l2_offsets | {c << cb for c in
                                                                   self._l1_clusters})
            if shared:
                raise Qcow2OpenError(f"{self.path}: refcount block at {min(shared):#x} is also "
                                     "an L1 or L2 table")
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._busy: set[int] = set()
        self._inflight = 0
        self._draining = False
        self._pending_free: list[tuple[int, int]] = []
        self._zero_range_ok = True
        # Autoclear bits name extensions (e.g. bitmaps) that our writes do not maintain: the
        # spec has software that does not know them clear them before it writes.  Not here:
        # opening writes nothing (the caller locks the image after opening it, and a server
        # refused by the lock must leave an image in use untouched), so the bits are cleared
        # by the first change (:meth:`_before_write`); until then no write takes the fast path.
        self._autoclear_pending = not self.read_only and bool(h.autoclear) and self.v3
        self._open_backing(policy, depth, seen | {(st.st_dev, st.st_ino)})
        if h.compatible & COMPAT_LAZY_REFCOUNTS:
            log.debug("%s: lazy refcounts allowed; we keep them exact", self.path)

    def _open_backing(self, policy: BackingPolicy, depth: int,
                      seen: frozenset[tuple[int, int]]) -> None:
        """Open the backing file through the policy (:mod:`.backing_policy`), which every
        level of the chain goes through; ``seen``: the (device, inode) of every image above."""
        h = self.header
        if h.backing_file is None:
            return
        name = h.backing_file
        if depth + 1 > MAX_CHAIN_DEPTH:
            raise Qcow2OpenError(f"{self.path}: backing chain deeper than {MAX_CHAIN_DEPTH}")
        fmt = h.backing_format
        if fmt is None:
            raise Qcow2OpenError(f"{self.path}: the backing file format is not recorded (we do "
                                 "not probe); set it with: qemu-img rebase -u -b "
                                 f"{name} -F raw|qcow2 {self.path}")
        if fmt not in ("raw", "qcow2"):
            raise Qcow2OpenError(f"{self.path}: backing format {fmt!r} is not supported "
                                 "(raw or qcow2)")
        f = policy.open(name, self.path)
        try:
            st = os.fstat(f.fd)
            if (st.st_dev, st.st_ino) in seen:
                raise Qcow2OpenError(f"{self.path}: backing chain loops at {f.path}")
            if fmt == "raw":
                self.backing = RawBacking(f.fd, f.path)
        except BaseException:
            os.close(f.fd)
            raise
        if fmt == "qcow2":  # takes the fd (and closes it if it fails)
            self.backing = Qcow2Image(f.path, read_only=True, _policy=policy, _fd=f.fd,
                                      _depth=depth + 1, _seen=seen)

    def _before_write(self) -> None:
        """Called (lock held) before anything is written to the image: the first call clears
        the autoclear bits, synced before the write that follows it may break what they
        vouch for (QEMU's bitmaps)."""
        if not self._autoclear_pending:
            return
        h = self.header
        pwrite_all(self.fd, bytes(8), 88)
        os.fdatasync(self.fd)
        log.info("%s: cleared autoclear feature bits %#x", self.path, h.autoclear)
        h.autoclear = 0
        self._autoclear_pending = False

    # ------------------------------------------------------------------ metadata lookup
    def _l2_table(self, offset: int) -> array:
        t = self._l2_cache.get(offset)
        if t is not None:
            self._l2_cache.move_to_end(offset)
            return t
        raw = os.pread(self.fd, self.cluster_size, offset)
        if len(raw) != self.cluster_size:
            raise CorruptImage(f"{self.path}: L2 table at {offset:#x} is truncated")
        t = be_table(raw)
        self._l2_cache[offset] = t
        if len(self._l2_cache) > self._l2_cache_tables:
            self._l2_cache.popitem(last=False)
        return t

    def _entry(self, g: int) -> int:
        """The raw L2 entry of guest cluster ``g`` (0 when its L2 table is absent)."""
        l1e = self.l1[g >> self.l2_bits]
        off = l1e & OFFSET_MASK
        if not off:
            return 0
        return self._l2_table(off)[g & ((1 << self.l2_bits) - 1)]

    def _classify(self, e: int) -> tuple[int, int]:
        """(kind, host offset) of an L2 entry, validated against the file."""
        if e & OFLAG_COMPRESSED:
            host = e & self._coffset_mask
            if host == 0 or host >= self.file_end:
                raise CorruptImage(f"{self.path}: compressed cluster at {host:#x} is outside "
                                   "the file")
            return COMPRESSED, host
        host = e & OFFSET_MASK
        if e & L2_RESERVED or (e & OFLAG_ZERO and not self.v3):
            raise CorruptImage(f"{self.path}: L2 entry {e:#x} has reserved bits set")
        if host & (self.cluster_size - 1) or host >= self.file_end:
            raise CorruptImage(f"{self.path}: L2 entry {e:#x} points outside the file or "
                               "between clusters")
        if e & OFLAG_ZERO:
            return ZERO, host
        return (NORMAL, host) if host else (UNALLOCATED, 0)

    def _compressed_size(self, e: int, host: int) -> int:
        nsect = ((e >> self._csize_shift) & self._csize_mask) + 1
        return nsect * 512 - (host & 511)

    def _inflate(self, e: int) -> bytes:
        """The data of a compressed cluster (cached: templates read the same ones often)."""
        host = e & self._coffset_mask
        with self._lock:
            data = self._compressed_cache.get(e)
        if data is not None:
            return data
        size = min(self._compressed_size(e, host), self.file_end - host)
        raw = os.pread(self.fd, size, host)
        try:
            data = zlib.decompressobj(-15).decompress(raw, self.cluster_size)
        except zlib.error as exc:
            raise CorruptImage(f"{self.path}: compressed cluster at {host:#x}: {exc}") from None
        if len(data) != self.cluster_size:
            raise CorruptImage(f"{self.path}: compressed cluster at {host:#x} inflates to "
                               f"{len(data)} bytes")
        with self._lock:
            self._compressed_cache[e] = data
            if len(self._compressed_cache) > 8:
                self._compressed_cache.popitem(last=False)
        return data

    def _refs(self) -> Refcounts:
        if self.ref is None:
            raise OSError(errno.EROFS, f"{self.path} is open read-only")
        return self.ref

    def _protected(self, host: int) -> bool:
        """True if ``host`` is a metadata cluster we know of (never a data write target).  (The
        compiled fast path states this again over :meth:`map_state`.)"""
        c = host >> self.cluster_bits
        return (c == 0 or c in self._l1_clusters
                or (self.ref is not None and self.ref.is_metadata(host))
                or host in self._l2_offsets)

    # ------------------------------------------------------------------ in-flight accounting
    def _enter(self) -> None:
        """Count a data IO in flight (lock held)."""
        while self._draining:
            self._cond.wait()
        self._inflight += 1

    def leave(self, count: int = 1) -> None:
        """``count`` data IOs are no longer in flight."""
        # (the lock taken by hand: a with block's __enter__/__exit__ were a third of this
        # call, which the compiled fast path makes once per pass)
        lock = self._lock
        lock.acquire()
        try:
            self._inflight -= count
            if self._inflight == 0 and self._draining:  # only a discard waits for zero
                self._cond.notify_all()
        finally:
            lock.release()

    def _apply_pending_frees(self, count: int | None = None) -> None:
        """Drop the refcounts queued by :meth:`_release` (the first ``count`` of them), once
        the entries that referenced them are synced and no IO is in flight (lock held)."""
        n = len(self._pending_free) if count is None else count
        pending, self._pending_free = self._pending_free[:n], self._pending_free[n:]
        for off, length in pending:
            try:
                self._refs().free(off, length)
            except OSError as exc:
                log.error("%s: freeing %#x+%#x failed (leaked): %s", self.path, off, length, exc)

    def _release(self, e: int, kind: int, host: int) -> None:
        """Queue the drop of the reference an old L2 entry held (lock held; the L2 entry that
        replaced it is in the file).  Ordering 6: the drop is written only after a sync has
        made that entry durable, and when no IO is in flight (flush, discard, close)."""
        if kind == COMPRESSED:
            self._pending_free.append((host, self._compressed_size(e, host)))
        elif host:
            self._pending_free.append((host, self.cluster_size))

    # ------------------------------------------------------------------ reads
    def fast_target(self, offset: int, total: int, writing: bool) -> int:
        """The host offset for an IO inside one allocated cluster (writes: one we may write in
        place), counted in flight; -1 (nothing counted) when the general path must run.
        Guest IO is mostly this case: one lock round trip, one table lookup
        (:meth:`map_batch`, the one place its rules are)."""
        io = _OneIo(_WRITE if writing else _READ, offset, total)
        ops = [io]
        self.map_batch(ops, {})
        return io.offset if ops else -1

    def map_state(self) -> tuple[array, OrderedDict[int, array], set[int], bool, int, int,
                                 Callable[[int], array], int, int, set[int], set[int], int,
                                 int] | None:
        """What :meth:`map_batch` reads, for the compiled fast path's statement of the same rule
        (:mod:`virtio_blk._fastpath_core`, held to this one by a differential test); call it with
        :attr:`lock` held, and count what it translates with :meth:`count_in` before letting
        go.  None while a discard drains in-flight IO (nothing may be counted in then).

        The L1 table, the L2 cache, the clusters being allocated, whether writes must wait for
        the autoclear bits, the end of the file, the virtual size, the L2 table loader; then
        what :meth:`_protected` reads: the L1 table's clusters (as a byte range), the L2 tables'
        offsets, the refcount blocks' offsets and the refcount table's byte range (empty when
        read-only).
        """
        if self._draining:
            return None
        state = self._map_cache
        if state is None:  # (dropped by every assignment of a field in it: _MapStateField)
            ref = self.ref
            blocks: set[int] = set() if ref is None else ref.block_offsets
            start, end = (0, 0) if ref is None else ref.table_range
            cb = self.cluster_bits
            state = self._map_cache = (
                self.l1, self._l2_cache, self._busy, self._autoclear_pending, self.file_end,
                self.size, self._l2_table, self._l1_clusters.start << cb,
                self._l1_clusters.stop << cb, self._l2_offsets, blocks, start, end)
        return state

    def _drop_map_state(self) -> None:
        """The refcount table moved: :meth:`map_state` builds its state again."""
        self._map_cache = None

    @property
    def lock(self) -> threading.Lock:
        """The lock :meth:`map_state` is read under."""
        return self._lock

    def count_in(self, count: int) -> None:
        """``count`` IOs the compiled fast path translated are in flight (lock held), until
        :meth:`leave`."""
        self._inflight += count

    def map_batch(self, ops: MutableSequence[_Io], guest: dict[int, int]) -> list[_Io]:
        """The host offsets of a batch of reads and writes, in one lock round trip.  Each op
        inside one allocated cluster (a write: one it may write in place) gets its host offset
        in ``op.offset`` (the guest offset saved in ``guest[id(op)]``), is counted in flight
        and stays in ``ops``; the others are moved, untouched and in order, to the list
        returned: the general path's.

        Guest IO is mostly the first case.  The io_uring engine translates every read and write
        of a pass here: one lock round trip for the pass and, per IO, one cached L2 lookup done
        inline -- not a method call, a lock round trip and a list per IO, which were most of
        the qcow2 path's extra cost over raw.  The compiled fast path states this rule again,
        in C, over :meth:`map_state`.
        """
        cs = self.cluster_size
        mask = cs - 1
        cb = self.cluster_bits
        l2_bits = self.l2_bits
        l2_mask = self._l2_mask
        size = self.size
        cached = self._l2_cache.get
        slow: list[_Io] = []
        with self._lock:
            if self._draining:  # a discard waits for in-flight IO to drain: count in no more
                slow.extend(ops)
                del ops[:]
                return slow
            l1 = self.l1
            file_end = self.file_end
            busy = self._busy
            no_writes = self._autoclear_pending
            keep = 0
            for op in ops:
                offset = op.offset
                within = offset & mask
                host = -1
                try:
                    if within + op.length <= cs and offset + op.length <= size:
                        g = offset >> cb
                        writing = op.kind == _WRITE
                        l2_off = l1[g >> l2_bits] & OFFSET_MASK
                        if l2_off and not (writing and (no_writes or g in busy)):
                            table = cached(l2_off)  # a hit skips the LRU update: near-LRU
                            if table is None:
                                table = self._l2_table(l2_off)
                            e = table[g & l2_mask] ^ OFLAG_COPIED
                            host = e & OFFSET_MASK
                            if (e & (_FAST_REJECT_WRITE if writing else _FAST_REJECT_READ)
                                    or not host or host & mask or host + cs > file_end
                                    or (writing and self._protected(host))):
                                host = -1  # the general path handles it (or says why it is bad)
                except Exception:  # bad metadata or a bug: the general path reports it (as an
                    host = -1  # IOERR for this request), never the queue's worker
                if host < 0:
                    slow.append(op)
                    continue
                guest[id(op)] = offset
                op.offset = host + within
                ops[keep] = op
                keep += 1
            del ops[keep:]
            self._inflight += keep
        return slow

    def read_into(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` with guest bytes from ``offset``; zeroes beyond the virtual size."""
        total = sum(v.nbytes for v in views)
        host = self.fast_target(offset, total, False)
        if host >= 0:
            try:
                if os.preadv(self.fd, views, host) != total:
                    preadv_full(self.fd, views, host)
            finally:
                self.leave()
            return
        if offset + total > self.size:
            cut = Views(views)
            inside = cut.take(max(0, self.size - offset))
            zero_fill(cut.take(total - max(0, self.size - offset)))
            views, total = inside, max(0, self.size - offset)
            if not total:
                return
        cs = self.cluster_size
        cb = self.cluster_bits
        with self._lock:
            self._enter()
        try:
            cur = Views(views)
            pos, end = offset, offset + total
            run_host = run_len = 0
            run_views: list[memoryview] = []
            while pos < end:
                n = min(cs - (pos & (cs - 1)), end - pos)
                with self._lock:
                    e = self._entry(pos >> cb)
                    kind, host = self._classify(e)
                part = cur.take(n)
                if kind == NORMAL:
                    h = host + (pos & (cs - 1))
                    if run_len and run_host + run_len == h and len(run_views) < 512:
                        run_views += part
                        run_len += n
                    else:
                        if run_len:
                            preadv_full(self.fd, run_views, run_host)
                        run_host, run_len, run_views = h, n, part
                else:
                    self._read_other(kind, e, part, pos)
                pos += n
            if run_len:
                preadv_full(self.fd, run_views, run_host)
        finally:
            self.leave()

    def _read_other(self, kind: int, e: int, part: list[memoryview], pos: int) -> None:
        if kind == COMPRESSED:
            data = self._inflate(e)
            start = pos & (self.cluster_size - 1)
            for v in part:
                v[:] = data[start:start + v.nbytes]
                start += v.nbytes
        elif kind == UNALLOCATED and self.backing is not None:
            self.backing.read_into(part, pos)
        else:
            zero_fill(part)

    # ------------------------------------------------------------------ writes
    def write_from(self, views: Sequence[memoryview], offset: int) -> None:
        """Write the guest bytes in ``views`` at ``offset`` (inside the virtual size)."""
        total = sum(v.nbytes for v in views)
        if offset < 0 or offset + total > self.size:
            raise OSError(errno.EINVAL, "write beyond the virtual size")
        host = self.fast_target(offset, total, True)
        if host >= 0:
            try:
                pwritev_full(self.fd, list(views), host)
            finally:
                self.leave()
            return
        cs = self.cluster_size
        cb = self.cluster_bits
        cur = Views(views)
        in_place: list[tuple[int, list[memoryview]]] = []
        allocs: list[tuple[int, int, list[memoryview]]] = []  # (guest pos, length, data)
        busy: list[int] = []
        with self._lock:
            self._enter()
        try:
            pos, end = offset, offset + total
            with self._lock:
                self._before_write()
                while pos < end:
                    n = min(cs - (pos & (cs - 1)), end - pos)
                    g = pos >> cb
                    while g in self._busy:
                        self._cond.wait()
                    e = self._entry(g)
                    kind, host = self._classify(e)
                    part = cur.take(n)
                    if kind == NORMAL and e & OFLAG_COPIED:
                        h = host + (pos & (cs - 1))
                        if self._protected(host):
                            raise CorruptImage(f"{self.path}: L2 entry of guest cluster {g} "
                                               f"points at metadata ({host:#x})")
                        if in_place and in_place[-1][0] + sum(
                                v.nbytes for v in in_place[-1][1]) == h:
                            in_place[-1][1].extend(part)
                        else:
                            in_place.append((h, part))
                    else:
                        self._busy.add(g)
                        busy.append(g)
                        allocs.append((pos, n, part))
                    pos += n
            for h, part in in_place:
                pwritev_full(self.fd, part, h)
            for pos, n, part in allocs:
                self._allocating_write(pos, n, part)
        finally:
            with self._lock:
                for g in busy:
                    self._busy.discard(g)
                if busy:
                    self._cond.notify_all()
            self.leave()

    def _allocating_write(self, pos: int, n: int, part: list[memoryview]) -> None:
        """Write ``part`` into a new host cluster for guest cluster ``pos >> cluster_bits``,
        filling the rest of the cluster from its old contents, then map it (the cluster is
        ours: marked busy)."""
        cs = self.cluster_size
        g = pos >> self.cluster_bits
        start = pos & (cs - 1)
        with self._lock:
            e = self._entry(g)
            kind, old_host = self._classify(e)
            self._writable_l2(g)  # orderings 1-3 for the L2 table
            new, fresh = self._refs().allocate_fresh()  # ordering 1 for the data cluster
            if self._protected(new):
                raise CorruptImage(f"{self.path}: allocator returned metadata cluster {new:#x}")
        try:
            zero_fill = kind == ZERO or (kind == UNALLOCATED and self.backing is None)
            if zero_fill and n < cs and (fresh or self._zero_range(new)):
                # The rest of the cluster must read as zeroes: it is a hole the file grew by, or
                # the file system zeroes it (as QEMU has it do) -- not cluster_size - n bytes of
                # zeroes written by us.
                pwritev_full(self.fd, part, new + start)  # ordering 4
            else:
                iov: list[memoryview] = []
                if start:
                    head = memoryview(bytearray(start))
                    self._fill(kind, e, old_host, [head], g * cs)
                    iov.append(head)
                iov += part
                if start + n < cs:
                    tail = memoryview(bytearray(cs - start - n))
                    self._fill(kind, e, old_host, [tail], pos + n)
                    iov.append(tail)
                pwritev_full(self.fd, iov, new)  # ordering 4: data before the L2 entry
        except BaseException:
            with self._lock:
                self._pending_free.append((new, cs))  # never mapped: give it back
            raise
        with self._lock:
            self.file_end = max(self.file_end, new + cs)
            self._commit(g, new | OFLAG_COPIED)  # ordering 5
            self._release(e, kind, old_host)  # ordering 6 (applied when no IO is in flight)

    def _zero_range(self, host: int) -> bool:
        """Zero (and allocate) one host cluster with FALLOC_FL_ZERO_RANGE; False where the
        file system cannot."""
        if not self._zero_range_ok:
            return False
        try:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE, host, self.cluster_size)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.info("%s: no FALLOC_FL_ZERO_RANGE; writing zeroes into new clusters", self.path)
            self._zero_range_ok = False
            return False

    def _fill(self, kind: int, e: int, host: int, views: list[memoryview], pos: int) -> None:
        """Read the old guest bytes at ``pos`` of a cluster about to be replaced."""
        if kind == NORMAL:
            preadv_full(self.fd, views, host + (pos & (self.cluster_size - 1)))
        else:
            self._read_other(kind, e, views, pos)

    def _writable_l2(self, g: int) -> array:
        """The L2 table of guest cluster ``g``, made ours (COPIED) if absent or shared with a
        snapshot: a new table is written in full before the L1 entry points at it, and the old
        table's refcount drops only after that (lock held)."""
        i = g >> self.l2_bits
        l1e = self.l1[i]
        old = l1e & OFFSET_MASK
        if old and l1e & OFLAG_COPIED:
            return self._l2_table(old)
        table = array("Q", self._l2_table(old)) if old else array("Q", bytes(self.cluster_size))
        new = self._refs().allocate()
        if self._protected(new):
            raise CorruptImage(f"{self.path}: allocator returned metadata cluster {new:#x}")
        pwrite_all(self.fd, to_be(table), new)  # ordering 2
        os.fdatasync(self.fd)  # ... durable before the L1 entry (once per new L2 table)
        self.file_end = max(self.file_end, new + self.cluster_size)
        entry = new | OFLAG_COPIED
        pwrite_all(self.fd, struct.pack(">Q", entry), self.header.l1_table_offset + i * 8)  # 3
        self.l1[i] = entry
        self._l2_cache[new] = table
        self._l2_offsets.add(new)
        if old:
            self._l2_cache.pop(old, None)
            self._l2_offsets.discard(old)
            self._pending_free.append((old, self.cluster_size))  # after a sync (ordering 6)
        return table

    def _commit(self, g: int, entry: int) -> None:
        """Write guest cluster ``g``'s L2 entry (its table is ours already; lock held)."""
        table = self._writable_l2(g)
        i = g & ((1 << self.l2_bits) - 1)
        l2_off = self.l1[g >> self.l2_bits] & OFFSET_MASK
        pwrite_all(self.fd, struct.pack(">Q", entry), l2_off + i * 8)
        table[i] = entry

    # ------------------------------------------------------------------ discard / zeroes
    def discard(self, offset: int, length: int, zero: bool = False, unmap: bool = True) -> None:
        """Free (or, with ``zero``, mark zero) the whole clusters in the range; partial clusters
        are left alone by discard and written with zeroes by write-zeroes."""
        cs = self.cluster_size
        end = min(offset + length, self.size)
        first = -(-offset // cs)
        last = end // cs if end < self.size else -(-end // cs)  # the tail cluster may be short
        if zero:
            if offset < min(first * cs, end):
                self._write_zeroes(offset, min(first * cs, end) - offset)
            if last >= first and last * cs < end:
                self._write_zeroes(last * cs, end - last * cs)
        if last <= first:
            return
        write_back: list[int] = []
        with self._lock:
            while self._draining:
                self._cond.wait()
            self._draining = True
            try:
                while self._inflight or any(first <= g < last for g in self._busy):
                    self._cond.wait()
                self._before_write()
                for g in range(first, last):
                    if not self._discard_cluster(g, zero, unmap):
                        write_back.append(g)
                if self._pending_free:  # nothing is in flight; the cleared entries go first
                    os.fdatasync(self.fd)
                    self._apply_pending_frees()
            finally:
                self._draining = False
                self._cond.notify_all()
        for g in write_back:  # v2 with a backing file cannot say "zero": write them
            self._write_zeroes(g * cs, min(cs, self.size - g * cs))

    def _discard_cluster(self, g: int, zero: bool, unmap: bool) -> bool:
        """Drop or zero one guest cluster (lock held, nothing in flight); False if it must be
        written with zeroes instead."""
        e = self._entry(g)
        kind, host = self._classify(e)
        backing = self.backing is not None
        if not self.v3:
            if backing:
                return not zero  # discard: advisory, leave it; zeroes: write them
            new = 0
        elif zero and not unmap and kind == NORMAL and e & OFLAG_COPIED:
            new = host | OFLAG_ZERO | OFLAG_COPIED  # keep the allocation, read as zeroes
        elif kind == ZERO and e & OFLAG_COPIED and not unmap and zero:
            return True
        else:
            new = OFLAG_ZERO if backing else 0
        if new == e:
            return True
        self._commit(g, new)  # the entry goes first (ordering: free after unreference)
        if not new & OFFSET_MASK:
            self._release(e, kind, host)
        return True

    def _write_zeroes(self, offset: int, length: int) -> None:
        while length:
            n = min(length, len(ZEROS))
            self.write_from([memoryview(ZEROS)[:n]], offset)
            offset += n
            length -= n

    # ------------------------------------------------------------------ lifecycle
    def grow(self, size: int) -> None:
        """Grow the virtual size to ``size`` bytes while the image is served.

        Done when the old size ends on a cluster boundary (no tail of a cluster that would
        have to be zeroed first) and no backing file would show through the new area.  Where
        the L1 table's clusters have room for the entries the new size needs (one 64 KiB L1
        cluster maps 4 TiB), the header's size and L1 size change in one write, then are
        synced; otherwise the table moves to new, larger clusters (:meth:`_move_l1`).
        Anything else is a DiskError naming the offline way.
        """
        with self._lock:
            h = self.header
            cs = self.cluster_size
            if self.read_only:
                raise DiskError(f"{self.path} is open read-only")
            if size <= self.size:
                return
            offline = "stop the server and use qemu-img resize"
            if self.size % cs:
                raise DiskError(f"{self.path}: its size is not a whole number of clusters; "
                                f"{offline}")
            if self.backing is not None and self.backing.size > self.size:
                raise DiskError(f"{self.path}: the backing file would show through the new "
                                f"area; {offline}")
            self._before_write()
            need = l1_entries_needed(size, self.cluster_bits)
            room = -(-(h.l1_size * 8) // cs) * cs // 8  # entries the L1 clusters hold
            if need > room:
                self._move_l1(need, size)
            else:
                l1_size = max(need, h.l1_size)
                if l1_size > h.l1_size:  # the slack of the L1 cluster must be unused
                    slack = os.pread(self.fd, (l1_size - h.l1_size) * 8,
                                     h.l1_table_offset + h.l1_size * 8)
                    if slack.strip(b"\0"):
                        raise DiskError(f"{self.path}: the L1 table's unused entries are not "
                                        f"zero; {offline}")
                # size (offset 24), crypt_method (32) and l1_size (36): one write, then synced.
                pwrite_all(self.fd, struct.pack(">QII", size, h.crypt_method, l1_size), 24)
                os.fdatasync(self.fd)
                self.l1.extend([0] * (l1_size - len(self.l1)))
                h.l1_size = l1_size
            h.size = self.size = size

    def _move_l1(self, entries: int, size: int) -> None:
        """Move the active L1 table to new clusters holding ``entries`` entries (lock held).

        Ordered as QEMU grows an L1 table: the new clusters are counted (synced), the new
        table is written and synced, then the header points at it -- size, L1 size and L1
        offset, bytes 24-47, in one write, synced -- and only then are the old table's clusters
        freed.  A crash before the header write leaks the new clusters; after it, the old ones
        at most.  Every L1 update takes the lock and reads the offset from the header, so no
        write can land in the old table once it is freed.
        """
        h = self.header
        cs = self.cluster_size
        if entries * 8 > MAX_L1_BYTES:
            raise DiskError(f"{self.path}: {size} bytes need an L1 table larger than "
                            f"{MAX_L1_BYTES} bytes")
        ref = self._refs()
        clusters = -(-entries * 8 // cs)
        new_off = ref.allocate_run(clusters)
        table = array("Q", self.l1)
        table.extend([0] * (entries - len(table)))
        pwrite_all(self.fd, struct.pack(f">{entries}Q", *table), new_off)
        os.fdatasync(self.fd)  # the table is durable before the header points at it
        pwrite_all(self.fd, struct.pack(">QIIQ", size, h.crypt_method, entries, new_off), 24)
        os.fdatasync(self.fd)  # the header is durable before the old table's refcount drops
        old_off, old_bytes = h.l1_table_offset, h.l1_size * 8
        self.l1 = table
        h.l1_table_offset, h.l1_size = new_off, entries
        cb = self.cluster_bits
        self._l1_clusters = range(new_off >> cb, (new_off + entries * 8 + cs - 1) >> cb)
        self.file_end = max(self.file_end, new_off + clusters * cs)
        if old_bytes:
            ref.free(old_off, old_bytes)
        log.info("%s: L1 table moved to %#x (%d entries) for %d bytes", self.path, new_off,
                 entries, size)

    def make_durable(self) -> None:
        """Every metadata change is already in the file (write-through): sync it.  Then drop
        the refcounts of clusters whose last reference was cleared before the sync -- if no IO
        is in flight that may still aim at them (else a later flush or discard does)."""
        with self._lock:
            ready = len(self._pending_free)
        os.fdatasync(self.fd)
        if ready:
            with self._lock:
                if not self._inflight:
                    self._apply_pending_frees(ready)

    def close(self) -> None:
        if getattr(self, "_pending_free", None) is not None and self.fd >= 0 \
                and self.ref is not None:
            with self._lock:
                try:
                    os.fdatasync(self.fd)
                    self._apply_pending_frees()
                    self.ref.release_reserve()
                except OSError as exc:
                    log.error("%s: closing: %s (clusters leaked)", self.path, exc)
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
