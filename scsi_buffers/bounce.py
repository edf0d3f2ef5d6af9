"""Bounce buffers: page-aligned scratch memory for IO that cannot go straight to guest memory.

When a request's guest pieces cannot be handed to the disk as they are (a descriptor boundary in the
middle of a sector, an ``O_DIRECT`` alignment the guest did not meet), the data goes through a
:class:`BounceBuffer`: writes *gather* the guest pieces into it before the IO, reads *scatter* it
back to the guest after.

Bounce memory is bounded: :class:`BounceBufferTracker` gives every worker thread a budget of pages
(8 MiB by default) and makes an acquirer wait until its request fits.  Choices this module makes
where the reference crate leaves a trap:

* **Oversize requests fail at once.**  A request needing more pages than the whole budget could
  never be served (the reference waits forever); :meth:`BounceBufferTracker.acquire` raises
  ``ValueError`` immediately instead.  The device should split such an IO or raise the budget.
* **Waiters are served first come, first served.**  Each thread's waiters form a queue; freed pages
  go to the head of the queue, and a newcomer never overtakes a waiter even if it would fit.  The
  grant is made by the releasing thread while it holds the lock, so a wake-up cannot be missed.
* **Timeouts raise** ``TimeoutError`` (builtin) and leave the budget as it was.
* **Release returns pages to the budget they were taken from**, whichever thread releases;
  releasing twice is harmless; a buffer that is garbage-collected unreleased gives its pages back
  too (with a warning), at the latest on the tracker's next operation.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import mmap
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

from guestmem import PAGE_SHIFT, PAGE_SIZE, IoBuffer, buffer_address, iovec_array
from scsi_buffers.buffers import RequestBuffers, gather, scatter

__all__ = ["DEFAULT_MAX_PAGES", "BounceBuffer", "BounceBufferTracker", "TrackedBounceBuffer"]

log = logging.getLogger(__name__)

#: 8 MiB of 4 KiB pages per thread, as in the reference.
DEFAULT_MAX_PAGES = 2048


def pages_for(size: int) -> int:
    """Pages needed for ``size`` bytes (``ceil(size / 4096)``)."""
    return (size + PAGE_SIZE - 1) >> PAGE_SHIFT


class BounceBuffer:
    """``size`` bytes of zero-filled, page-aligned memory (a private anonymous mapping).

    An anonymous ``mmap`` is page-aligned, which satisfies ``O_DIRECT`` and io_uring whatever the
    sector size, and is returned to the system as soon as it is closed.  Size 0 is valid (no
    mapping; the views are empty).
    """

    __slots__ = ("_address", "_closed", "_mmap", "_size", "_view")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"negative bounce buffer size {size}")
        self._size = size
        self._closed = False
        if size:
            self._mmap: mmap.mmap | None = mmap.mmap(-1, pages_for(size) * PAGE_SIZE)
            whole = memoryview(self._mmap)
            self._view = whole[:size]
            whole.release()
            self._address = buffer_address(self._view)
        else:
            self._mmap = None
            self._view = memoryview(bytearray())
            self._address = 0

    def __len__(self) -> int:
        return self._size

    @property
    def size(self) -> int:
        return self._size

    @property
    def pages(self) -> int:
        return pages_for(self._size)

    @property
    def address(self) -> int:
        """Host address of the first byte (0 for size 0)."""
        return self._address

    def _live(self) -> memoryview:
        if self._closed:
            raise ValueError("bounce buffer is closed")
        return self._view

    def as_mut_bytes(self) -> memoryview:
        """A writable view of exactly ``size`` bytes.

        A fresh view each call, so releasing it does not affect the buffer; views still held when
        the buffer is closed keep the memory mapped until they go.
        """
        return self._live()[:]

    def io_buffers(self) -> list[IoBuffer]:
        """Exactly one :class:`IoBuffer` covering the whole buffer."""
        return [IoBuffer(self._live()[:], self._address)]

    def io_vecs(self) -> list[memoryview]:
        """Exactly one memoryview covering the whole buffer, for ``os.preadv``/``os.pwritev``."""
        return [self._live()[:]]

    def iovec_array(self) -> Any:
        """A one-element C ``struct iovec`` array (:class:`AtomicIoVec`)."""
        return iovec_array(self.io_buffers())

    def gather_from(self, buffers: Iterable[RequestBuffers]) -> int:
        """Copy the guest bytes of ``buffers``, in order, to the front of this buffer.

        For a write request: gather, then write this buffer to disk.  Returns the bytes copied.
        """
        return gather(buffers, self._live())

    def scatter_to(self, buffers: Iterable[RequestBuffers]) -> int:
        """Copy this buffer's front to the guest bytes of ``buffers`` in order (after a read)."""
        return scatter(self._live(), buffers)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unmap the memory (once every view handed out is gone).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._view.release()
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                log.debug("bounce buffer closed while viewed; unmapped when the last view goes")

    def __enter__(self) -> BounceBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BounceBuffer(size={self._size}{', closed' if self._closed else ''})"


class _Waiter:
    """One blocked acquire: how many pages it wants, whether it got them, how to wake it."""

    __slots__ = ("granted", "pages", "wake")

    def __init__(self, pages: int, wake: Callable[[], bool]) -> None:
        self.pages = pages
        self.granted = False
        self.wake = wake


def _set_event(event: threading.Event) -> Callable[[], bool]:
    def wake() -> bool:
        event.set()
        return True

    return wake


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class BounceBufferTracker:
    """A budget of bounce pages per worker thread, with fair (FIFO) waiting.

    ``threads`` budgets of ``max_pages`` pages each; a request takes ``ceil(size/4096)`` pages from
    the budget of the thread index it names.  :meth:`acquire` blocks the calling thread;
    :meth:`acquire_async` suspends an asyncio task instead.  Both kinds of waiter share the same
    queues, and pages may be released from any thread.
    """

    def __init__(self, max_pages: int = DEFAULT_MAX_PAGES, threads: int = 1) -> None:
        if max_pages < 0:
            raise ValueError(f"negative page budget {max_pages}")
        if threads < 1:
            raise ValueError(f"a tracker needs at least one thread, not {threads}")
        self._max_pages = max_pages
        self._lock = threading.Lock()
        self._free = [max_pages] * threads
        self._queues: list[collections.deque[_Waiter]] = [
            collections.deque() for _ in range(threads)
        ]
        # Pages of buffers garbage-collected unreleased; taken back under the lock (see _gc_return).
        self._pending: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()

    # ------------------------------------------------------------------ counters
    @property
    def max_pages(self) -> int:
        """Each thread's budget, in pages."""
        return self._max_pages

    @property
    def threads(self) -> int:
        return len(self._free)

    def free_pages(self, thread: int) -> int:
        """Pages currently free in ``thread``'s budget."""
        self._check_thread(thread)
        with self._lock:
            self._drain_pending()
            return self._free[thread]

    def free_pages_per_thread(self) -> list[int]:
        """Free pages of every thread's budget (one consistent snapshot)."""
        with self._lock:
            self._drain_pending()
            return list(self._free)

    def in_use_pages(self, thread: int) -> int:
        """Pages of ``thread``'s budget held by live buffers."""
        return self._max_pages - self.free_pages(thread)

    def waiting(self, thread: int) -> int:
        """How many acquires are queued on ``thread``'s budget."""
        self._check_thread(thread)
        with self._lock:
            return len(self._queues[thread])

    # ------------------------------------------------------------------ internals (lock held)
    def _check_thread(self, thread: int) -> None:
        if not 0 <= thread < len(self._free):
            raise ValueError(f"thread index {thread} out of range for {len(self._free)} threads")

    def _check(self, size: int, thread: int) -> int:
        self._check_thread(thread)
        if size < 0:
            raise ValueError(f"negative bounce buffer size {size}")
        pages = pages_for(size)
        if pages > self._max_pages:
            raise ValueError(
                f"bounce buffer of {size} bytes needs {pages} pages, more than the whole "
                f"per-thread budget of {self._max_pages}; it could never be served"
            )
        return pages

    def _serve(self, thread: int) -> None:
        """Grant pages to the head of ``thread``'s queue while they fit (FIFO, no overtaking)."""
        q = self._queues[thread]
        while q and q[0].pages <= self._free[thread]:
            waiter = q.popleft()
            waiter.granted = True
            self._free[thread] -= waiter.pages
            if not waiter.wake():  # its event loop is gone: nobody will take these pages
                waiter.granted = False
                self._free[thread] += waiter.pages

    def _give_back(self, thread: int, pages: int) -> None:
        self._free[thread] += pages
        self._serve(thread)

    def _drain_pending(self) -> None:
        while not self._pending.empty():
            try:
                thread, pages = self._pending.get_nowait()
            except queue.Empty:
                return
            self._give_back(thread, pages)

    def _take_or_queue(
        self, thread: int, pages: int, waiter_factory: Callable[[], _Waiter]
    ) -> _Waiter | None:
        with self._lock:
            self._drain_pending()
            q = self._queues[thread]
            if not q and self._free[thread] >= pages:
                self._free[thread] -= pages
                return None
            waiter = waiter_factory()
            q.append(waiter)
            return waiter

    def _withdraw(self, thread: int, waiter: _Waiter) -> bool:
        """Take a waiter that gave up out of the queue; True if it had been granted meanwhile."""
        with self._lock:
            if waiter.granted:
                return True
            self._queues[thread].remove(waiter)
            self._serve(thread)  # it may have been blocking smaller requests behind it
            return False

    def _wrap(self, size: int, thread: int, pages: int) -> TrackedBounceBuffer:
        try:
            buffer = BounceBuffer(size)
        except BaseException:
            self._release(thread, pages)
            raise
        return TrackedBounceBuffer(self, buffer, thread, pages)

    def _release(self, thread: int, pages: int) -> None:
        with self._lock:
            self._drain_pending()
            self._give_back(thread, pages)

    def _gc_return(self, thread: int, pages: int) -> None:
        """Return pages from a finalizer, which must never block on (or re-enter) the lock."""
        self._pending.put((thread, pages))
        if self._lock.acquire(blocking=False):
            try:
                self._drain_pending()
            finally:
                self._lock.release()

    # ------------------------------------------------------------------ acquiring
    def acquire(
        self, size: int, thread: int = 0, timeout: float | None = None
    ) -> TrackedBounceBuffer:
        """A bounce buffer of ``size`` bytes charged to ``thread``'s budget, waiting if need be.

        Blocks until the pages are free and every earlier waiter on that budget has been served.
        ``timeout`` (seconds; None waits forever) raises ``TimeoutError`` and takes nothing.
        ``ValueError`` at once for a bad thread index, a negative size, or a size above the whole
        budget.  Size 0 never waits.
        """
        pages = self._check(size, thread)
        if pages:
            event = threading.Event()
            waiter = self._take_or_queue(thread, pages, lambda: _Waiter(pages, _set_event(event)))
            if (
                waiter is not None
                and not event.wait(timeout)
                and not self._withdraw(thread, waiter)
            ):
                raise TimeoutError(
                    f"no {pages} bounce pages free on thread {thread} within {timeout} s"
                )
        return self._wrap(size, thread, pages)

    def try_acquire(self, size: int, thread: int = 0) -> TrackedBounceBuffer | None:
        """A bounce buffer if its pages are free now and nobody waits before us, else None."""
        pages = self._check(size, thread)
        if pages:
            with self._lock:
                self._drain_pending()
                if self._queues[thread] or self._free[thread] < pages:
                    return None
                self._free[thread] -= pages
        return self._wrap(size, thread, pages)

    async def acquire_async(self, size: int, thread: int = 0) -> TrackedBounceBuffer:
        """:meth:`acquire` for asyncio: suspends the task, never blocks the loop.

        Pages may be released from any thread; the grant reaches the loop through
        ``call_soon_threadsafe``.  Cancelling the task withdraws the request (or gives back pages
        granted in the meantime).  Use ``asyncio.timeout`` for a deadline.
        """
        pages = self._check(size, thread)
        if pages:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()

            def wake() -> bool:
                try:
                    loop.call_soon_threadsafe(_resolve, fut)
                except RuntimeError:  # loop closed
                    return False
                return True

            waiter = self._take_or_queue(thread, pages, lambda: _Waiter(pages, wake))
            if waiter is not None:
                try:
                    await fut
                except BaseException:
                    if self._withdraw(thread, waiter):
                        self._release(thread, pages)
                    raise
        return self._wrap(size, thread, pages)

    def __repr__(self) -> str:
        return (
            f"BounceBufferTracker(max_pages={self._max_pages}, free={self.free_pages_per_thread()})"
        )


class TrackedBounceBuffer:
    """A :class:`BounceBuffer` charged to one thread's budget until released.

    :meth:`release` (or ``close``, or leaving a ``with`` block) unmaps the buffer and returns its
    pages to the budget it was taken from, waking waiters.  Releasing again does nothing.
    """

    __slots__ = ("_released", "_tracker", "buffer", "pages", "thread")

    def __init__(
        self, tracker: BounceBufferTracker, buffer: BounceBuffer, thread: int, pages: int
    ) -> None:
        self._tracker = tracker
        self.buffer = buffer
        self.thread = thread
        self.pages = pages
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Return the pages to the budget of :attr:`thread` and wake whoever can now proceed."""
        tracker = self._tracker
        with tracker._lock:
            if self._released:
                return
            self._released = True
            tracker._drain_pending()
            tracker._give_back(self.thread, self.pages)
        self.buffer.close()

    close = release

    def __enter__(self) -> TrackedBounceBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if getattr(self, "_released", True):
            return
        self._released = True
        log.warning(
            "bounce buffer of %d pages (thread %d) was never released; reclaiming",
            self.pages,
            self.thread,
        )
        if self.pages:
            self._tracker._gc_return(self.thread, self.pages)

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"TrackedBounceBuffer({self.buffer.size} bytes, thread {self.thread}, {state})"
