"""What a device plugs into the backend library: the :class:`Device` and its :class:`QueueHandler`.

The library speaks vhost-user and runs the rings; a device only says what it is (feature bits,
config space, number of queues) and serves descriptor chains.  ``virtio_blk`` is one such device;
the tests plug in an echo device.  This mirrors rust-vmm's ``VhostUserBackend`` trait.

A :class:`QueueHandler` lives on one queue's worker thread.  ``submit`` either finishes a request at
once (returning the number of bytes written to guest memory) or keeps it in flight (returning
None) and reports it later through ``reap``, after making ``completion_fd`` readable; so a device
can have many requests in flight per queue without the worker ever blocking on IO.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

from guestmem import GuestMemory
from guestmem.dirty_log import DirtyMarker
from vhost.messages import ProtocolFeature, VirtioFeature
from vhost.queue.base import NO_LIMIT, DescriptorChain, Queue

#: Most virtqueues a device may have: QEMU's VIRTIO_QUEUE_MAX, so a frontend can use them all.
MAX_QUEUES = 1024

#: Ring features the library implements for every device (both ring layouts: a frontend that
#: acks RING_PACKED gets packed rings, :func:`vhost.queue.factory.open_queue`).
RING_FEATURES = (
    VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC | VirtioFeature.RING_EVENT_IDX
    | VirtioFeature.RING_PACKED
)


class QueueHandler(abc.ABC):
    """Serves the requests of one virtqueue; every method runs on that queue's worker thread."""

    #: An fd that becomes readable when :meth:`reap` has completions (None: all synchronous).
    #: The worker watches it edge-triggered and never reads it, so :meth:`reap` must return
    #: everything finished so far (an eventfd written per completion, or an io_uring fd).
    completion_fd: int | None = None
    #: While the frontend logs dirty pages (live migration): where the handler records every
    #: range it writes into guest memory -- after the write, on this queue's thread; the queue
    #: commits the marks before it publishes the used index.  None (the class default) when
    #: logging is off; set and cleared by the library, for devices with ``logs_guest_writes``.
    dirty: DirtyMarker | None = None

    @abc.abstractmethod
    def submit(self, chain: DescriptorChain) -> int | None:
        """Start serving ``chain``; return the used length if done now, None if still in flight.

        Must not raise for a bad request (that is an error status in the request's own reply);
        an exception here is a device bug and stops the queue.
        """

    def submit_batch(self, chains: Sequence[DescriptorChain]) -> list[tuple[int, int]]:
        """Submit several chains; return ``(head, used_len)`` of those finished at once.

        The default calls :meth:`submit` for each; an engine that batches submissions (one
        io_uring_enter for a whole ring drain) overrides it.
        """
        done = []
        for chain in chains:
            used = self.submit(chain)
            if used is not None:
                done.append((chain.head, used))
        return done

    def submit_from_ring(self, vq: Queue, limit: int = NO_LIMIT) -> list[tuple[int, int]]:
        """Pop and start at most ``limit`` requests straight from ``vq`` (a device's fast path);
        ``(head, used_len)`` of those finished at once.

        Called before every :meth:`Queue.pop_batch`; it takes heads in ring order and stops
        at the first it does not handle, which the generic pop then gets.  Default: none.
        """
        return []

    def ring_submitter(self, vq: Queue) -> Callable[[int], list[tuple[int, int]]]:
        """:meth:`submit_from_ring` of ``vq`` as a callable of the pass's limit, which the worker
        gets once when it starts and calls in every pass.  A device may return its fast path's
        own method (one call less per pass: at one request per kick the calls around a request
        cost as much as the request); the default binds :meth:`submit_from_ring`."""
        return partial(self.submit_from_ring, vq)

    def reap(self) -> list[tuple[int, int]]:
        """``(head, used_len)`` of requests that finished since the last call."""
        return []

    def close(self) -> bool:
        """Release resources; called after the worker stopped, every submitted request reaped
        or abandoned (a drain that timed out).  True once nothing this handler started can
        still write guest memory; False if something still may (IO stuck in the kernel or a
        storage library): the caller must then leave guest memory (and the dirty log)
        mapped."""
        return True


class RemoteQueues(Protocol):
    """What a device asks of a runner serving its queues in other processes
    (:class:`vhost.runner.pool.ProcessRunner`)."""

    def refresh_counters(self) -> None:
        """Copy what each queue process last published into the device's counters."""

    def state_changed(self) -> None:
        """Send :meth:`Device.process_state` to every queue process."""


class Device(abc.ABC):
    """A virtio device served over vhost-user."""

    #: Number of virtqueues the device has (GET_QUEUE_NUM).
    num_queues: int = 1
    #: Largest queue size the device accepts (SET_VRING_NUM above it is refused).
    max_queue_size: int = 1024
    #: The handlers record their guest-memory writes in ``QueueHandler.dirty``: the library
    #: then offers VHOST_F_LOG_ALL and LOG_SHMFD (QEMU refuses to migrate a device without).
    logs_guest_writes: bool = False

    @abc.abstractmethod
    def features(self) -> int:
        """Device feature bits to offer, besides :data:`RING_FEATURES` (which the library adds)."""

    def protocol_features(self) -> ProtocolFeature:
        """Protocol features the device needs offered on top of the library's own."""
        return ProtocolFeature.CONFIG

    @abc.abstractmethod
    def config(self) -> bytes:
        """The device's virtio config space as the driver reads it."""

    def write_config(self, offset: int, data: bytes, flags: int) -> None:
        """A driver write to config space; raise ValueError to refuse it."""
        raise ValueError("config space is read-only")

    def set_features(self, features: int) -> None:
        """The features the frontend acknowledged (a subset of what was offered)."""

    @abc.abstractmethod
    def create_handler(self, queue_index: int, memory: GuestMemory) -> QueueHandler:
        """A handler for queue ``queue_index``, called when that queue starts."""

    def reset(self) -> None:
        """Back to the state after construction (RESET_DEVICE, disconnect)."""

    def make_durable(self) -> None:
        """Make completed writes durable (called on shutdown and at the end of a migration).

        Not ``flush``: that word also names publishing a virtqueue's used ring and ending an
        IO engine's batch; this is the one that reaches stable storage."""

    # ------------------------------------------------------------------ queue processes
    # A device that can serve each queue in a process of its own (vhost.runner.pool) says how to
    # rebuild itself there, and which of its state and counters cross the process boundary.
    #: Serve queues in processes (None: when there is more than one queue).
    queue_processes: bool | None = False
    #: The daemon's pool of queue worker processes (vhost.runner.workerpool.PoolRunner),
    #: shared by its devices; when set, it serves this device's queues.
    queue_pool: Any = None
    #: The runners whose queue processes serve this device now (see :meth:`attach_runner`);
    #: a tuple, replaced whole, so a scrape on another thread reads it without a lock.
    _remote_runners: tuple[RemoteQueues, ...] = ()

    def attach_runner(self, runner: RemoteQueues) -> None:
        """``runner`` serves queues of this device in other processes from now on: its
        counters are gathered and its processes told of state changes.  Several may be
        attached (a daemon serving one device to several connections)."""
        self._remote_runners = (*self._remote_runners, runner)

    def detach_runner(self, runner: RemoteQueues) -> None:
        self._remote_runners = tuple(r for r in self._remote_runners if r is not runner)

    def refresh_counters(self) -> None:
        """Bring the counters of queues served in processes (:meth:`set_queue_counter_values`)
        up to date; call before reading them.  Nothing to do without queue processes."""
        for runner in self._remote_runners:
            runner.refresh_counters()

    def process_state_changed(self) -> None:
        """The device calls this when :meth:`process_state` changed outside a vhost-user
        message (a resize, say): every queue process follows before it returns."""
        for runner in self._remote_runners:
            runner.state_changed()

    def process_recipe(self) -> tuple[str, dict[str, object], list[int]]:
        """``("module:callable", kwargs, fds)``: ``callable(kwargs, fds)`` in a queue process
        rebuilds this device there (the fds travel by SCM_RIGHTS; the callable owns them)."""
        raise NotImplementedError(f"{type(self).__name__} cannot run queues in processes")

    def process_state(self) -> dict[str, object]:
        """State a queue process must follow while it runs (sent again when it changes)."""
        return {}

    def apply_process_state(self, state: dict[str, object]) -> None:
        """In a queue process: take :meth:`process_state` from the control process."""

    def queue_counter_values(self, index: int) -> Sequence[int]:
        """In a queue process: queue ``index``'s statistics as unsigned integers in a fixed
        layout, to be summed by the control process.  Flat, because a queue process writes
        them to shared memory once per batch of completions
        (:class:`vhost.runner.ipc.CounterBlock`): keep it cheap.  May return a prefix of the
        layout when the rest has not changed since the last call (the rest then keeps its
        last values); the control side's count is the layout's full length."""
        return ()

    def counter_slots(self) -> int:
        """How many values :meth:`queue_counter_values`'s full layout has."""
        return 0

    def set_queue_counter_values(self, index: int, values: Sequence[int]) -> None:
        """In the control process: queue ``index``'s statistics as its process published
        them (:meth:`queue_counter_values`'s layout)."""
