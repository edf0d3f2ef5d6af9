"""The dirty-page log of a live migration: one bit per 4 KiB guest page, shared with QEMU.

While QEMU migrates a VM it copies guest RAM in passes and re-sends the pages that changed since
the last pass.  It sees the guest's own writes, but not the ones a vhost-user backend makes: data
read from disk into guest buffers, status bytes, used-ring entries.  So the backend marks those
pages in a bitmap QEMU hands it (``SET_LOG_BASE``: a memfd, its size and offset), and QEMU folds
the bitmap into its own on every pass.

Layout (QEMU's ``vhost_log_chunk_t`` array, ``hw/virtio/vhost.c``): page ``gpa >> 12`` is bit
``page % 64`` of little-endian u64 word ``page // 64`` -- on a little-endian host that is bit
``page % 8`` of byte ``page // 8``.

Who writes the bitmap at the same time:

* every queue of this backend (a worker thread each, processes later);
* other vhost backends of the same VM: QEMU shares one log between all its vhost devices;
* QEMU itself, which *clears* it: ``vhost_dev_sync_region`` exchanges each non-zero word with 0
  and sends the pages whose bits it took.

A mark may be spurious (an extra page sent costs little) but never lost (a lost one is a page
the destination never receives: silent guest corruption).  A read-modify-write of a word in
Python could lose another writer's bit, so every bit is set with an atomic OR (``lock or`` on
x86) through libatomic's ``__atomic_fetch_or_8``.  QEMU's exchange and our OR are then both atomic
on the same word: each bit is either taken by a sync (and the page sent after our write, since
the OR comes after it) or still set for the next one.  A ``lock``-prefixed instruction is also
a full fence, so the data written before a mark is visible before the mark is.  (Reads of
a word may tear into halves; the argument holds per bit, so that is harmless.)

:class:`DirtyMarker` batches the marks of one queue between two used-ring publications: the
device records ranges as it writes them, the queue commits them all -- at most one atomic OR
per 64-page word touched -- just before it stores the used index that exposes the writes.  A
word whose bits are all set already is skipped after one full fence: a set bit observed after
our writes are visible can only be cleared by a later sync, which then sends the page with
them.  Between two QEMU syncs most marks hit such words (the used ring's page, the status
bytes' pages), so a commit usually costs a fence and a few plain reads.

When marks are published, and when a log may be unmapped, is the owner's business
(:mod:`vhost.dirty_logging`): the bitmap itself only promises atomic marks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

LOG_PAGE_SHIFT = 12
LOG_PAGE_SIZE = 1 << LOG_PAGE_SHIFT
WORD_BYTES = 8
#: Largest log accepted: 4 GiB of bitmap covers 128 TiB of guest physical address space.
MAX_LOG_SIZE = 1 << 32

_SEQ_CST = 5  # __ATOMIC_SEQ_CST
_F_GET_SEALS = 1034
_F_SEAL_SHRINK = 0x0002


class DirtyLogError(Exception):
    """The log the frontend handed over cannot be used (size, offset, fd)."""


def _load_atomics() -> tuple[Callable[[int, int], int], Callable[[int, int], int], bool]:
    """(fetch_or(addr, mask), exchange(addr, value), atomic) on u64 words.

    libatomic's functions are called through ``PyDLL`` (the GIL stays held for the ~50 ns the
    instruction takes; releasing and re-taking it would cost more than the call).  Without
    libatomic a process-wide lock serialises our own markers; against other processes sharing
    the log that read-modify-write is not atomic, and a warning says so.
    """
    name = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        lib = ctypes.PyDLL(name)
        fetch_or = lib.__atomic_fetch_or_8
        exchange = lib.__atomic_exchange_8
    except (OSError, AttributeError):
        lock = threading.Lock()

        def locked_or(addr: int, mask: int) -> int:
            with lock:
                word = ctypes.c_uint64.from_address(addr)
                old = word.value
                word.value = old | mask
                return old

        def locked_exchange(addr: int, value: int) -> int:
            with lock:
                word = ctypes.c_uint64.from_address(addr)
                old = word.value
                word.value = value
                return old

        return locked_or, locked_exchange, False
    for fn in (fetch_or, exchange):
        fn.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int)
        fn.restype = ctypes.c_uint64

    def atomic_or(addr: int, mask: int) -> int:
        return int(fetch_or(addr, mask, _SEQ_CST))

    def atomic_exchange(addr: int, value: int) -> int:
        return int(exchange(addr, value, _SEQ_CST))

    return atomic_or, atomic_exchange, True


_fetch_or, _exchange, ATOMIC = _load_atomics()
#: Acquiring an uncontended lock is a locked instruction on x86: a full (store->load) fence.
_fence = threading.Lock()
if not ATOMIC:  # pragma: no cover - libatomic1 is installed by .ci/run
    log.warning("libatomic not found: dirty-log marks are atomic between this process's "
                "threads only")


def add_range(pending: dict[int, int], gpa: int, length: int) -> None:
    """Add the pages of guest bytes ``[gpa, gpa+length)`` to ``pending`` (word -> bit mask).

    First to last page touched: 1 byte at the end of a page marks that page only; 2 bytes
    across a boundary mark both.  A zero or negative length marks nothing.
    """
    if length <= 0 or gpa < 0:
        return
    first = gpa >> LOG_PAGE_SHIFT
    last = (gpa + length - 1) >> LOG_PAGE_SHIFT
    word = first >> 6
    last_word = last >> 6
    if word == last_word:  # the usual case: one word
        mask = ((1 << (last - first + 1)) - 1) << (first & 63)
        pending[word] = pending.get(word, 0) | mask
        return
    pending[word] = pending.get(word, 0) | (((1 << 64) - 1) << (first & 63) & ((1 << 64) - 1))
    for w in range(word + 1, last_word):
        pending[w] = (1 << 64) - 1
    pending[last_word] = pending.get(last_word, 0) | ((1 << ((last & 63) + 1)) - 1)


class DirtyLog:
    """The mapped bitmap: atomic marks by word, and QEMU's clearing side for tests and tools.

    Thread-safe: any number of threads (and processes mapping the same fd) mark at once.
    :meth:`close` must only be called when no thread can still mark (the owner makes sure:
    the handler waits for every queue worker to pass a quiescent point first).
    """

    def __init__(self, fd: int, size: int, offset: int = 0) -> None:
        if size <= 0 or size % WORD_BYTES or size > MAX_LOG_SIZE:
            raise DirtyLogError(f"log size {size}: want a positive multiple of {WORD_BYTES} "
                                f"up to {MAX_LOG_SIZE}")
        if offset < 0 or offset % WORD_BYTES:
            raise DirtyLogError(f"log offset {offset}: want a multiple of {WORD_BYTES}")
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise DirtyLogError(f"log fd: {exc.strerror}") from None
        # Touching a mapping past the end of its file is SIGBUS, which would kill the server.
        if offset + size > st.st_size:
            raise DirtyLogError(f"log of {size} bytes at offset {offset} does not fit the "
                                f"{st.st_size}-byte file")
        try:
            seals = fcntl.fcntl(fd, _F_GET_SEALS)
        except OSError:
            seals = 0
        if not seals & _F_SEAL_SHRINK:  # QEMU seals its memfd log; a shrink would be SIGBUS
            log.debug("dirty log fd is not sealed against shrinking")
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        delta = offset - start
        try:
            self._mmap = mmap.mmap(fd, size + delta, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (OSError, ValueError) as exc:
            raise DirtyLogError(f"cannot map the log: {exc}") from None
        anchor = ctypes.c_char.from_buffer(self._mmap)
        self.base = ctypes.addressof(anchor) + delta
        del anchor  # from_buffer exports the mmap; the address stays valid while it is mapped
        self.size = size
        self.words = size // WORD_BYTES
        self._words = memoryview(self._mmap)[delta : delta + size].cast("Q")  # plain reads
        #: Pages the bitmap can describe: a mark beyond it is counted as outside and dropped.
        self.pages = size * 8
        self._delta = delta
        self.closed = False

    # ------------------------------------------------------------------ marking
    def set_words(self, pending: dict[int, int]) -> tuple[int, int]:
        """OR every ``word -> mask`` into the bitmap; (pages marked, pages outside the log).

        A word whose bits are all set already is left alone: after a full fence (so every
        write made before this call is visible to QEMU), a set bit can only be cleared by a
        later QEMU sync, which then sends the page -- with those writes.  Between two syncs
        the same pages (the used ring's, the status bytes') are marked over and over, so this
        saves most atomic calls (about a microsecond each through ctypes).
        """
        base = self.base
        words = self.words
        view = self._words
        marked = outside = 0
        fetch_or = _fetch_or
        _fence.acquire()  # a locked instruction: the full fence the check below relies on
        _fence.release()
        for word, mask in pending.items():
            if 0 <= word < words:
                if view[word] & mask != mask:
                    fetch_or(base + word * WORD_BYTES, mask)
                marked += mask.bit_count()
            else:
                outside += mask.bit_count()
        return marked, outside

    def mark(self, gpa: int, length: int) -> int:
        """Mark the pages of ``[gpa, gpa+length)`` now; the number of pages marked."""
        pending: dict[int, int] = {}
        add_range(pending, gpa, length)
        return self.set_words(pending)[0]

    # ------------------------------------------------------------------ QEMU's side
    def take(self) -> list[int]:
        """Atomically exchange every non-zero word with 0; the pages whose bits were taken.

        What QEMU's ``vhost_dev_sync_region`` does on every pass (used by tests and tools).
        """
        view = self._words
        pages = []
        for word in range(self.words):
            if view[word]:
                bits = _exchange(self.base + word * WORD_BYTES, 0)
                while bits:
                    low = bits & -bits
                    pages.append(word * 64 + low.bit_length() - 1)
                    bits ^= low
        return pages

    def dirty_pages(self) -> list[int]:
        """Pages whose bit is set (a snapshot; does not clear)."""
        view = self._words
        out = []
        for word in range(self.words):
            bits = view[word]
            while bits:
                low = bits & -bits
                out.append(word * 64 + low.bit_length() - 1)
                bits ^= low
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._words.release()
            self._mmap.close()

    def __repr__(self) -> str:
        return f"DirtyLog({self.size} bytes, {self.pages} pages{', closed' if self.closed else ''})"


class DirtyMarker:
    """One queue's marks, batched between used-ring publications; used by one thread only.

    The device and the ring :meth:`record` what they wrote; the ring :meth:`commit` s them
    before it publishes the used index.  ``log`` may be swapped by the control thread for a new
    bitmap (a resize): pending marks then go to the new one, which QEMU reads from then on.
    """

    __slots__ = ("_pending", "log", "notify", "outside", "pages")

    def __init__(self, dirty_log: DirtyLog, notify: Callable[[], None] | None = None) -> None:
        self.log = dirty_log
        self.notify = notify
        self._pending: dict[int, int] = {}
        #: Pages marked (counted once per commit in which they were recorded).
        self.pages = 0
        #: Pages recorded outside the bitmap (a frontend whose log is too small for its memory).
        self.outside = 0

    def record(self, gpa: int, length: int) -> None:
        """Note that ``[gpa, gpa+length)`` was written; marked at the next :meth:`commit`."""
        if length <= 0:
            return
        page = gpa >> LOG_PAGE_SHIFT
        if page == (gpa + length - 1) >> LOG_PAGE_SHIFT:  # one page: the usual case, inline
            word = page >> 6
            pending = self._pending
            pending[word] = pending.get(word, 0) | (1 << (page & 63))
        else:
            add_range(self._pending, gpa, length)

    def record_ranges(self, ranges: Iterable[tuple[int, int]]) -> None:
        pending = self._pending
        for gpa, length in ranges:
            add_range(pending, gpa, length)

    def commit(self) -> None:
        """Set every recorded page's bit (after the writes, before they are published).

        See :meth:`DirtyLog.set_words` for the fence and why a word already all set is left
        alone.
        """
        pending = self._pending
        if not pending:
            return
        log_ = self.log
        marked, outside = log_.set_words(pending)
        pending.clear()
        self.pages += marked
        if outside:
            if not self.outside:
                log.warning("dirty log of %d pages is too small: %d marks beyond it dropped "
                            "(further ones are counted silently)", log_.pages, outside)
            self.outside += outside
        if self.notify is not None and marked:
            self.notify()

    def mark(self, gpa: int, length: int) -> None:
        """Record and commit at once (the used index: marked right after its store)."""
        page = gpa >> LOG_PAGE_SHIFT
        if self._pending or length <= 0 or page != (gpa + length - 1) >> LOG_PAGE_SHIFT:
            self.record(gpa, length)
            self.commit()
            return
        # One page and nothing else pending (the used index, every publication): no dict.
        log_ = self.log
        word = page >> 6
        bit = 1 << (page & 63)
        if not 0 <= word < log_.words:
            self.record(gpa, length)
            self.commit()  # counts and reports it as outside
            return
        _fence.acquire()
        _fence.release()
        if not log_._words[word] & bit:
            _fetch_or(log_.base + word * WORD_BYTES, bit)
        self.pages += 1
        if self.notify is not None:
            self.notify()
