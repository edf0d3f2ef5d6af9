"""The queue interface: what a worker, a device and the protocol handler use of a virtqueue.

Two layouts implement it -- the split ring (:mod:`vhost.queue.split`, virtio 1.x 2.7) and the
packed ring (:mod:`vhost.queue.packed`, 2.8) -- the way rust-vmm's ``virtio-queue`` has
``QueueT``.  Nothing above ``vhost.queue`` reads a ring's memory: a device sees chains
(:class:`DescriptorChain` from the generic pop, :data:`SimpleChain` from the bounded pop the
fast path uses) and completes them by their head; the worker asks the queue whether the driver
wants a notification; the handler asks it for the value GET_VRING_BASE returns.

Chain rules are stated once per layout, in that layout's module, and both pops share them.
Every value read from a ring is hostile: a violation raises :class:`QueueError` from the pop,
the queue is marked ``broken`` and stays so until the driver resets it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Final, Protocol

from guestmem import GuestMemory, GuestRegion
from guestmem.dirty_log import DirtyMarker

#: Longest chain in bytes (virtio: a descriptor's length is 32 bits, a chain's total too).
MAX_CHAIN_BYTES = 1 << 32

_fence_lock = threading.Lock()


def full_fence() -> None:
    """A store->load barrier: a locked instruction (uncontended lock acquire/release).

    x86 keeps stores in order and loads in order; the one reordering the rings care about is a
    load passing an earlier store (publishing an index, then reading the driver's event field).
    """
    _fence_lock.acquire()
    _fence_lock.release()


class QueueError(Exception):
    """The driver broke a ring rule; the queue must stop."""


@dataclass(frozen=True)
class RingAddresses:
    """Guest physical addresses of a ring's three parts.

    Split ring: descriptor table, avail ring, used ring.  Packed ring: descriptor ring, driver
    event suppression area, device event suppression area (vhost-user's SET_VRING_ADDR carries
    them in the same three fields).
    """

    desc: int
    avail: int
    used: int


class DescriptorChain:
    """One request as the driver laid it out: readable pieces, then writable pieces.

    ``readable``/``writable`` are lists of ``(gpa, length)``; every piece has been checked to lie
    in guest memory when the chain was popped.  Zero-length descriptors are dropped.  ``head``
    is what completes the chain (:meth:`Queue.add_used_many`): the head index of a split ring,
    the buffer id of a packed one.
    """

    __slots__ = ("head", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        readable: list[tuple[int, int]],
        writable: list[tuple[int, int]],
        readable_len: int,
        writable_len: int,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len

    @property
    def pieces(self) -> list[tuple[int, int, bool]]:
        """Every piece as ``(gpa, length, writable)``, readable ones first."""
        return [(a, n, False) for a, n in self.readable] + [(a, n, True) for a, n in self.writable]

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable}, "
            f"writable={self.writable})"
        )


#: A chain in the shape Linux's block drivers send: a readable header, data runs that are all
#: readable or all writable, and one writable trailer (virtio-blk's status byte).
#:
#: Found by :meth:`Queue.peek_simple`, which checked every chain rule of its layout and that
#: each piece lies inside one guest memory region; nothing is claimed until :meth:`Queue.claim`
#: -- so a device that declines the request (its own checks failed) leaves the queue untouched
#: and the generic pop reports it.
#:
#: A plain tuple, not an object: one is made and read back for every request on the fast path,
#: and a tuple display plus one unpacking costs about a third of building an object with
#: slots and reading its fields.  Its fields, in this order (read them by unpacking the whole
#: tuple, or by the ``CHAIN_*`` indexes below):
#:
#: ``head``
#:     the chain's id (split: head descriptor index; packed: buffer id);
#: ``header``, ``header_len``
#:     guest address and length of the header piece;
#: ``data``, ``data_len``
#:     the data runs ``(gpa, length)``, none empty, and their total;
#: ``into_guest``
#:     the data runs are writable (the device writes them: a read);
#: ``trailer``, ``trailer_len``
#:     guest address and length of the last (writable) piece;
#: ``token``
#:     what :meth:`Queue.claim` needs besides ``head`` (the layout's own: the avail index it
#:     was found at, how many ring slots the chain takes);
#: ``region``
#:     the guest memory region every piece lies in, when one holds them all (the usual case;
#:     None: the device looks each piece up).  The queue found it while checking the pieces;
#:     handing it over spares the device a second lookup of each.
SimpleChain = tuple[int, int, int, list[tuple[int, int]], int, bool, int, int, int,
                    GuestRegion | None]

#: Indexes of :data:`SimpleChain`'s fields, for code that reads one or two of them.
CHAIN_HEAD: Final = 0
CHAIN_HEADER: Final = 1
CHAIN_HEADER_LEN: Final = 2
CHAIN_DATA: Final = 3
CHAIN_DATA_LEN: Final = 4
CHAIN_INTO_GUEST: Final = 5
CHAIN_TRAILER: Final = 6
CHAIN_TRAILER_LEN: Final = 7
CHAIN_TOKEN: Final = 8
CHAIN_REGION: Final = 9


class Queue(Protocol):
    """One started virtqueue, owned by one worker (thread or process): no method is
    thread-safe except where it says so."""

    #: The queue's index in its device, its size, the features that shape its behaviour.
    index: int
    size: int
    event_idx: bool
    indirect: bool
    #: "split" or "packed" (for logs and ring_state).
    layout: str
    #: A ring rule was broken: the queue pops nothing more; ``error`` says which rule.
    broken: bool
    error: QueueError | None
    #: Chains popped and not yet completed.
    in_flight_count: int
    #: Live migration: the dirty-log marker, set and cleared by the control thread with one
    #: store (None costs the hot path one check), and the guest address the ring's used side
    #: is logged at (VHOST_VRING_F_LOG's log_guest_addr).
    dirty: DirtyMarker | None
    used_log_addr: int
    addresses: RingAddresses
    memory: GuestMemory

    # -- the driver's side
    def has_avail(self) -> bool:
        """The driver made a chain available that has not been popped (a cheap look)."""

    @property
    def replay_pending(self) -> bool:
        """Chains from before a backend restart are still to be resubmitted (they come first,
        through :meth:`pop_batch`)."""

    def pop_batch(self, limit: int | None = None) -> list[DescriptorChain]:
        """Every chain available (up to ``limit``), in ring order.  A ring violation marks the
        queue broken and records :attr:`error`; the chains popped before it are returned (they
        are in flight and must be completed), nothing after."""

    def peek_simple(self, max_pieces: int) -> SimpleChain | None:
        """The next available chain if it has the simple shape (see :data:`SimpleChain`) and
        at most ``max_pieces`` pieces, else None -- also when the next chain breaks a rule, when
        chains wait to be resubmitted, or when the queue is broken: the generic pop then takes
        it and reports what is wrong.  Changes nothing."""

    def claim(self, chain: SimpleChain) -> None:
        """Take ``chain``, the one :meth:`peek_simple` just returned: it is in flight now (in the
        in-flight area too) and the next peek looks past it."""

    # -- the device's side
    def add_used_many(self, done: list[tuple[int, int]]) -> None:
        """Return each ``(head, bytes written)`` to the driver, in order; not yet visible.
        ValueError for a head not in flight (the entries before it are added)."""

    def publish_used(self) -> bool:
        """Make the entries added since the last call visible to the driver (one index store
        per batch; their dirty-log marks first); True if the driver wants a notification."""

    def disable_notifications(self) -> None:
        """Ask the driver not to kick while the worker drains the ring anyway."""

    def enable_notifications(self) -> bool:
        """Ask for a kick on the next chain; True if chains arrived meanwhile (drain again)."""

    # -- the handler's side
    def vring_base(self) -> int:
        """What GET_VRING_BASE returns for this queue once it is stopped (split: the next avail
        index; packed: next avail index and wrap counter in bits 0-15, used index and wrap
        counter in bits 16-31)."""

    def ring_state(self) -> dict[str, int]:
        """Where this queue is, for a diagnostics query (reads only).  Every layout gives at
        least ``used_idx`` (the used index published last: non-zero once the ring completed
        something, which the worker answers with a call when it starts), ``in_flight``,
        ``size`` and ``broken``."""

    def release(self) -> None:
        """Drop every view of guest memory so it can be unmapped."""


#: The most chains one worker pass takes from the ring before it ends -- its completions
#: published, the driver called if it asks to be -- and drains again, when requests finish in
#: the pass (reads and writes of cached pages).  Why: a pass that takes a whole batch (32 at a
#: driver's QD32) publishes nothing until all are done, so the driver sleeps through the pass
#: and the device through the driver's next one; ending a pass every few chains lets the driver
#: reap and refill while the device works on the rest.  (``python -m benchmarks.inprocess
#: --workloads randread --queues 1``: 0.44x qemu-storage-daemon io_uring's IOPS taking whole
#: batches, 1.16-1.38x ending a pass every 8, at 0.7-0.8x its CPU per request; 4 and 16 did
#: worse.)  After a pass that finished nothing in it a pass takes whole batches (NO_LIMIT):
#: with O_DIRECT completions come later, so nothing could be published early, and each extra
#: pass cost ~1 us CPU per request.  The worker decides (:class:`vhost.runner.thread.QueueWorker`)
#: and hands the limit to the device's fast path; its generic pop takes what is left of it.
PASS_LIMIT: Final = 8
#: A pass's limit when there is none: more than any ring holds.
NO_LIMIT: Final = 1 << 16

#: What the end of a worker pass found (:func:`pass_ender`): buffers arrived while kicks were
#: off (nothing published: drain again); published, no call wanted; published, call wanted.
PASS_AGAIN: Final = 0
PASS_QUIET: Final = 1
PASS_CALL: Final = 2


def pass_ender(queue: Queue) -> Callable[[list[tuple[int, int]]], int]:
    """The end of one worker pass on ``queue``, as one call ``ender(done)``: the pass's
    completions ``done`` added (:meth:`Queue.add_used_many`, which raises for a head not in
    flight), :meth:`Queue.enable_notifications`, then -- unless chains arrived meanwhile
    (:data:`PASS_AGAIN`) -- :meth:`Queue.publish_used` (:data:`PASS_CALL` if the driver wants
    a notification, else :data:`PASS_QUIET`).

    The worker asks for it once per queue.  A layout may do it in one go -- a method
    ``pass_ender()`` returning such a callable, with this contract (the split ring has one: its
    compiled core does both with their fences in C, the one call of a pass at batch 1 that is
    not the device's); this composes the two methods otherwise.
    """
    own = getattr(queue, "pass_ender", None)
    if own is not None:
        ender: Callable[[list[tuple[int, int]]], int] = own()
        return ender

    def end_pass(done: list[tuple[int, int]]) -> int:
        if done:
            queue.add_used_many(done)
        if queue.enable_notifications():
            return PASS_AGAIN
        return PASS_CALL if queue.publish_used() else PASS_QUIET
    return end_pass


def simple_chains(queue: Queue, max_pieces: int) -> Generator[SimpleChain, None, None]:
    """The simple chains available now, in ring order, for one pass of a fast path: what
    :meth:`Queue.peek_simple` returns, one after the other.  Asking for the next chain claims
    the one before (as :meth:`Queue.claim` does): the consumer keeps a chain by asking for the
    next, and declines one by stopping there (closing the iterator or dropping it) -- that
    chain is left where it is, for the generic pop, and so is everything after it.  The
    consumer does nothing else to the queue during the pass.

    A layout may do it in one go -- a method ``simple_chains(max_pieces)`` with this contract
    (the split ring has one: it counts the pending chains once and claims inline, sparing two
    calls per chain); this uses it when there, else peeks and claims chain by chain.
    """
    own = getattr(queue, "simple_chains", None)
    if own is not None:
        return own(max_pieces)
    return _peeked(queue, max_pieces)


def _peeked(queue: Queue, max_pieces: int) -> Generator[SimpleChain, None, None]:
    """:func:`simple_chains` built on :meth:`Queue.peek_simple` and :meth:`Queue.claim`."""
    while (chain := queue.peek_simple(max_pieces)) is not None:
        yield chain
        queue.claim(chain)
