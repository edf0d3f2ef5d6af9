"""The virtio-blk device: turns descriptor chains into disk operations and statuses.

Request path (one queue, on its worker thread): the chain's readable pieces start with the 16-byte
header, the status byte is the last byte of the last writable piece, the data lies between.  The
header is checked (:mod:`.request`), the data pieces become RequestBuffers (:mod:`.layout`), and
the IO goes to the engine either zero-copy -- ``lock()`` gives memoryviews straight into guest
memory -- or through a bounce buffer from the queue's budget when a piece boundary falls
mid-sector or O_DIRECT needs an alignment the guest's buffers lack.  When the op finishes, bounce
data is scattered back (reads), buffers are released, the status byte is written and the used
length (bytes written to guest memory, status included) goes back to the worker.

A request that needs bounce pages while the budget is spent waits in ``pending`` and is retried
as completions return pages -- the worker never blocks on the budget (it is the thread that must
reap those completions).
"""

from __future__ import annotations

import collections
import logging
import os
from array import array
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from operator import attrgetter
from time import monotonic_ns
from typing import TYPE_CHECKING, Any, cast

from blockdev.disk import BlockDisk, Disk
from blockdev.ops import OpKind
from blockdev.ratelimit import RateLimitedLog
from blockdev.stats import LATENCY_BOUNDS_NS, Totals, new_histograms, totals
from blockdev.storage import FileStorage, Storage
from blockdev.throttle import ThrottleGroup
from blockdev.throttle_filter import ThrottleStorage
from guestmem import AccessError, GuestMemory
from scsi_buffers import BounceBufferTracker
from vhost.device import Device, QueueHandler
from vhost.queue.base import NO_LIMIT, DescriptorChain, Queue
from virtio_blk.blk_request import BlkRequest
from virtio_blk.core import FastPathLike, make_fast_path
from virtio_blk.layout import DataLayout, plan, skip_start, trim_end
from virtio_blk.ops import (
    DEVICE_OPS,
    GET_ID,
    NATIVE_COUNT_SLOTS,
    NATIVE_KINDS,
    NATIVE_LATENCY_SLOTS,
    OPS,
    DeviceOp,
)
from virtio_blk.request import (
    HEADER,
    HEADER_SIZE,
    ID_BYTES,
    SECTOR_SHIFT,
    T_BARRIER,
    WRITEBACK_OFFSET,
    BlkFeature,
    Limits,
    RequestError,
    Status,
    check_range,
    config_space,
    device_id,
    parse_segments,
)

log = logging.getLogger(__name__)

#: Largest DISCARD/WRITE_ZEROES payload read (4096 segments; we accept 1): a bigger one is IOERR
#: without copying it, whatever flags its segments carry.
MAX_SEGMENT_PAYLOAD = 64 * 1024


#: Counters of the device itself, not of one kind of operation.
_DEVICE_COUNTERS = ("requests", "errors", "unsupported", "bounced_requests", "bounced_bytes",
                    "deferred")
#: Every integer counter of :class:`BlkStats`: the device's, then from the operation table
#: (:data:`virtio_blk.ops.OPS`) each kind's successes and the byte counters (discard and
#: write-zeroes share ``bytes_unmapped``).
_SCALARS = (
    _DEVICE_COUNTERS
    + tuple(row.counter for row in OPS)
    + tuple(dict.fromkeys(row.bytes_counter for row in OPS if row.bytes_counter is not None))
)
_get_scalars = attrgetter(*_SCALARS)


def _native_counters(kind: int) -> tuple[str, str]:
    """The scalar counters a native kind's ``native_counts`` block adds to (successes,
    bytes)."""
    row = OPS[kind]
    if row.bytes_counter is None:
        raise ValueError(f"the compiled core counts bytes of {row.name}, which has no counter")
    return row.counter, row.bytes_counter


#: Per native kind (:data:`virtio_blk.ops.NATIVE_KINDS`): the scalar counters its
#: ``native_counts`` block adds to, and its row in the per-kind lists.
_NATIVE_COUNTERS = tuple(_native_counters(kind) for kind in NATIVE_KINDS)
_NATIVE_ROWS = tuple(int(kind) for kind in NATIVE_KINDS)
_NATIVE_COUNTS_LEN = NATIVE_COUNT_SLOTS * len(NATIVE_KINDS)
_NATIVE_LATENCY_LEN = NATIVE_LATENCY_SLOTS * len(NATIVE_KINDS)


def _zeroed(n: int) -> array[int]:
    return array("q", bytes(8 * n))


class BlkStats:
    """Counters a user (and the tests) can read -- through :meth:`snapshot` or :meth:`values`
    (or the device's readers built on them: ``BlkDevice.stats``, ``totals()``,
    ``fresh_queue_stats()``, ``queue_counter_values()``), not the attributes alone.

    The integer counters (:data:`_SCALARS`) are generated from the operation table, so a kind
    added there is counted, published by queue processes and summed without an edit here.  Per
    operation kind (:data:`virtio_blk.ops.OPS` order): IO errors, and -- with latency accounting
    on -- total nanoseconds and a latency histogram.

    Two parts, each written only by the queue's worker thread, each only growing:

    * the attributes, counted by Python code (the generic path, the Python fast path, the
      compiled one's ``requests``);
    * ``native_counts`` and ``native_latency``: C arrays the compiled fast path adds to in C as
      each request completes (:data:`virtio_blk.ops.NATIVE_KINDS` says the layout).  Adding its
      counts into the attributes after every pass cost a tenth of a pass at one request per
      wake-up; leaving them in C and having a reader pull them through a flush would have a
      reader thread write the attributes while the worker's Python code updates them (a lost
      update: ``finish`` reads a counter, calls, writes it back).  So nothing is ever moved
      between the parts: a reader adds them.  A request completed before a reader starts is in
      one part or the other, both read after that start; none is in both.
    """

    __slots__ = (*_SCALARS, "failed", "latency", "total_ns", "native_counts", "native_latency")

    failed: list[int]
    total_ns: list[int]
    latency: list[list[int]]
    native_counts: array[int]
    native_latency: array[int]

    if TYPE_CHECKING:  # the generated counters, each an int
        def __getattr__(self, name: str) -> int: ...
        def __setattr__(self, name: str, value: Any) -> None: ...

    def __init__(self) -> None:
        for name in _SCALARS:
            setattr(self, name, 0)
        self.failed = [0] * len(OPS)
        self.total_ns = [0] * len(OPS)
        self.latency = new_histograms(len(OPS))
        # (never resized: the compiled core holds a view of each, and writes through it)
        self.native_counts = _zeroed(_NATIVE_COUNTS_LEN)
        self.native_latency = _zeroed(_NATIVE_LATENCY_LEN)

    def __repr__(self) -> str:
        snap = self.snapshot()
        counters = ", ".join(f"{name}={getattr(snap, name)}" for name in _SCALARS)
        return f"BlkStats({counters}, failed={snap.failed})"

    def values(self, full: bool = True) -> list[int]:
        """Every counter, flat, in a fixed order: the attributes, then the native arrays as
        they are (the reader -- :meth:`set_values` -- adds them up).  ``full=False`` (what a
        queue process publishes once per batch, where every microsecond counts): without the
        latency part while no latency was ever recorded (latency accounting off) -- a prefix
        that leaves the published zeros as they are."""
        out = list(_get_scalars(self))
        out += self.failed
        out += self.native_counts
        # (each native latency block starts with its total ns: all zero while no latency
        # was counted in C)
        if (full or any(self.total_ns)
                or any(self.native_latency[::NATIVE_LATENCY_SLOTS])):
            out += self.total_ns
            for histogram in self.latency:
                out += histogram
            out += self.native_latency
        return out

    def set_values(self, values: Sequence[int]) -> None:
        """The inverse of :meth:`values`, native parts added into the attributes and the
        native arrays zeroed (a list of the wrong length is refused).  For the counters of a
        queue no compiled fast path of this process serves now (a queue process's, as
        published), and for :meth:`snapshot`."""
        kinds = len(self.failed)
        buckets = len(self.latency[0])
        n = len(_SCALARS)
        if len(values) != n + kinds * (2 + buckets) + _NATIVE_COUNTS_LEN + _NATIVE_LATENCY_LEN:
            raise ValueError(f"{len(values)} counter values for a {type(self).__name__}")
        scalars = dict(zip(_SCALARS, values[:n], strict=True))
        at = n
        failed = list(values[at : at + kinds])
        at += kinds
        native = values[at : at + _NATIVE_COUNTS_LEN]
        at += _NATIVE_COUNTS_LEN
        for k, (count, nbytes) in enumerate(_NATIVE_COUNTERS):
            scalars[count] += native[NATIVE_COUNT_SLOTS * k]
            scalars[nbytes] += native[NATIVE_COUNT_SLOTS * k + 1]
        total_ns = list(values[at : at + kinds])
        at += kinds
        latency = [list(values[at + k * buckets : at + (k + 1) * buckets])
                   for k in range(kinds)]
        at += kinds * buckets
        native = values[at:]
        for k, row in enumerate(_NATIVE_ROWS):
            block = native[NATIVE_LATENCY_SLOTS * k : NATIVE_LATENCY_SLOTS * (k + 1)]
            total_ns[row] += block[0]
            histogram = latency[row]
            for b, requests in enumerate(block[1:]):
                histogram[b] += requests
        for name, value in scalars.items():
            setattr(self, name, value)
        self.failed = failed
        self.total_ns = total_ns
        self.latency = latency
        for part in (self.native_counts, self.native_latency):
            for i in range(len(part)):
                part[i] = 0

    def snapshot(self) -> BlkStats:
        """A copy of every counter, the native parts added in (read here, in any thread: see
        the class docstring for why that sees every request completed before the call)."""
        out = BlkStats()
        out.set_values(self.values())
        return out

    def add_latency(self, kind: int, start_ns: int) -> None:
        """Count a disk operation of ``kind`` started at ``start_ns`` (monotonic) and done now."""
        ns = monotonic_ns() - start_ns
        self.total_ns[kind] += ns
        self.latency[kind][bisect_left(LATENCY_BOUNDS_NS, ns)] += 1


class StatsTotals:
    """Live totals of per-queue :class:`BlkStats` (read any counter by name)."""

    def __init__(self, parts: list[BlkStats], device: Device | None = None) -> None:
        self._parts = parts
        self._device = device

    def _snapshots(self) -> list[BlkStats]:
        """Each queue's counters whole; queues served in processes report theirs first
        (vhost.runner.pool)."""
        if self._device is not None:
            self._device.refresh_counters()
        return [part.snapshot() for part in self._parts]

    def __getattr__(self, name: str) -> int:
        if name.startswith("_") or name not in _STAT_NAMES:
            raise AttributeError(name)
        return sum(getattr(p, name) for p in self._snapshots())

    def as_dict(self) -> dict[str, int]:
        parts = self._snapshots()
        return {name: sum(getattr(p, name) for p in parts) for name in _STAT_NAMES}

    def __repr__(self) -> str:
        return f"StatsTotals({self.as_dict()})"


_STAT_NAMES = frozenset(_SCALARS)


class _Deferred(Exception):
    """No bounce pages right now: retry the chain when some come back."""


class BlkDevice(Device):
    """A virtio-blk device backed by a :class:`~.storage.Storage` (a bare :class:`Disk` is served
    through :class:`~.storage.FileStorage` with ``engine``)."""

    logs_guest_writes = True  # data of reads, status bytes, GET_ID strings

    def __init__(
        self,
        disk: BlockDisk | Storage,
        *,
        num_queues: int = 1,
        max_queue_size: int = 1024,
        serial: str = "",
        engine: str = "threads",
        io_threads: int = 16,
        bounce_pages: int = 2048,
        writeback: bool = True,
        fast_path: bool = True,
        queue_processes: bool | None = None,
        latency_accounting: bool = True,
    ) -> None:
        self.storage = disk if isinstance(disk, Storage) else FileStorage(disk, engine, io_threads)
        if self._raw_disk() is None:
            # A format (qcow2) keeps metadata and allocates clusters in its own process, and a
            # remote storage's connection lives in it: two processes writing one image would
            # each allocate without the other.
            if queue_processes:
                raise ValueError("queue processes serve raw image files only")
            queue_processes = False
        #: One process per queue (None: when there is more than one queue); see vhost.runner.pool.
        self.queue_processes = queue_processes
        self._options = {
            "num_queues": num_queues, "max_queue_size": max_queue_size, "serial": serial,
            "engine": engine, "io_threads": io_threads, "bounce_pages": bounce_pages,
            "writeback": writeback, "fast_path": fast_path,
            "latency_accounting": latency_accounting,
        }
        #: Start reads and writes in Linux's shapes through :mod:`.fastpath` (off: every request
        #: takes the generic path, the reference the fast path is tested against).
        self.fast_path = fast_path
        info = self.storage.info
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.serial = serial
        self.engine_kind = engine
        self.io_threads = io_threads
        seg_max, size_max = 126, 1 << 20
        self.limits = Limits(
            capacity=info.size >> SECTOR_SHIFT,
            logical_block_size=info.logical_block_size,
            read_only=info.read_only,
            seg_max=seg_max,
            size_max=size_max,
            # What the advertised seg_max x size_max lets a driver send (Linux does when its
            # max_sectors_kb is raised).  Not tied to the bounce budget: only a request that
            # must be bounced needs to fit it (IOERR in _attach_buffers otherwise).
            max_transfer=seg_max * size_max,
        )
        self.tracker = BounceBufferTracker(bounce_pages, threads=num_queues)
        self._handlers: set[BlkQueueHandler] = set()  # running queues (see set_capacity)
        self.default_writeback = writeback
        self._writeback = writeback
        self.writeback_chosen = False  # the driver wrote the writeback config byte
        self.acked = 0
        # One counter set per queue: each is only written by its queue's worker thread.
        self.queue_stats = [BlkStats() for _ in range(num_queues)]
        self.stats = StatsTotals(self.queue_stats, self)
        #: Per-request failures (a failing disk fails every request): the first lines of each
        #: minute, then a count.
        self.errlog = RateLimitedLog(log)
        #: Time every disk operation (two clock reads per request) for latencies and totals.
        self.latency_accounting = latency_accounting

    @property
    def writeback(self) -> bool:
        """The write cache mode: True, write-back (a write completes before it is stable);
        False, write-through."""
        return self._writeback

    @writeback.setter
    def writeback(self, on: bool) -> None:
        # The one place the mode changes (the config byte, SET_FEATURES, a reset, a queue
        # process's copy of the state): every queue's fast path is told, so the compiled one
        # need not read it in every pass, and the next request it checks obeys the new mode.
        self._writeback = on
        for handler in list(self._handlers):
            handler.settings_changed()

    # ------------------------------------------------------------------ operating
    def resize(self, size: int) -> None:
        """Grow the disk to ``size`` bytes and the capacity requests are checked against.

        DiskError where the storage cannot grow (read-only, a block device that is smaller,
        shrinking, a size that is not whole blocks).  Telling the driver is the caller's part
        (a config-change message to the frontend): this only changes what the device is.
        """
        self.storage.grow(size)
        self.set_capacity(self.storage.info.size >> SECTOR_SHIFT)

    def set_capacity(self, sectors: int) -> None:
        """The one place capacity changes: the config space and every queue's checks.

        Limits is immutable, so each queue sees the old or the new one whole; a request
        checked just before the change is inside the old (smaller) disk, which still exists.
        """
        self.limits = replace(self.limits, capacity=sectors)
        for handler in list(self._handlers):
            handler.limits = self.limits
        self.process_state_changed()  # queue processes check against it too

    def fresh_queue_stats(self) -> list[BlkStats]:
        """Each queue's counters (a :meth:`BlkStats.snapshot`, the compiled fast path's counts
        in), brought up to date first where queues run in processes."""
        self.refresh_counters()
        return [stats.snapshot() for stats in self.queue_stats]

    def totals(self) -> Totals:
        """All queues' counters summed, with failures, times and latency histograms."""
        return totals(self.fresh_queue_stats(), sorted(_STAT_NAMES), len(OPS))

    # ------------------------------------------------------------------ Device interface
    def features(self) -> int:
        caps = self.storage.caps
        read_only = self.limits.read_only
        f = (
            BlkFeature.SIZE_MAX | BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE
            | BlkFeature.TOPOLOGY | BlkFeature.MQ
        )
        if read_only:
            f |= BlkFeature.RO
        for op in DEVICE_OPS:  # each request type's bits, where the storage can do it
            if op.row.supported(caps, read_only):
                f |= op.features
        return int(f)

    def feature_names(self) -> list[str]:
        return [flag.name or "" for flag in BlkFeature if self.features() & flag]

    def config(self) -> bytes:
        return config_space(self.limits, self.num_queues, self.writeback)

    def write_config(self, offset: int, data: bytes, flags: int) -> None:
        if offset == WRITEBACK_OFFSET and len(data) == 1:
            if data[0] not in (0, 1):
                raise ValueError(f"writeback value {data[0]}")
            self.writeback = bool(data[0])
            self.writeback_chosen = True
            log.info("guest set the cache mode to %s",
                     "write-back" if self.writeback else "write-through")
            return
        raise ValueError(f"config bytes {offset}..{offset + len(data)} are read-only")

    def set_features(self, features: int) -> None:
        """The cache mode follows the driver that negotiated last.

        Firmware (SeaBIOS, OVMF) drives the disk first without FLUSH, then the OS driver
        renegotiates with it; each SET_FEATURES therefore decides afresh -- except that a
        mode the driver chose itself through the writeback config byte is kept.
        """
        self.acked = features
        if not features & BlkFeature.FLUSH:
            # A driver that cannot flush gets every write made stable before completion (and
            # with CONFIG_WCE but not FLUSH, writeback MUST start at 0: virtio 1.2 5.2.5.1).
            self.writeback = False
        elif not self.writeback_chosen:
            self.writeback = self.default_writeback

    def create_handler(self, queue_index: int, memory: GuestMemory) -> QueueHandler:
        handler = BlkQueueHandler(self, queue_index, memory)
        self._handlers.add(handler)
        handler.limits = self.limits  # a resize between its creation and now
        return handler

    def reset(self) -> None:
        self.writeback = self.default_writeback
        self.writeback_chosen = False
        self.acked = 0

    def make_durable(self) -> None:
        if not self.limits.read_only:
            self.storage.make_durable()

    # ------------------------------------------------------------------ queue processes
    def _raw_disk(self) -> Disk | None:
        """The raw image file behind this device, the only storage queue processes serve."""
        storage = self.storage
        if isinstance(storage, ThrottleStorage):
            # A throttle filter's budget and held time are in shared memory: its queue
            # processes wrap the file's engines in it again and share the one limit.
            storage = storage.child
        if isinstance(storage, FileStorage) and isinstance(storage.disk, Disk):
            return storage.disk
        return None

    def process_recipe(self) -> tuple[str, dict[str, object], list[int]]:
        raw = self._raw_disk()
        if raw is None:
            raise NotImplementedError("queue processes serve raw image files only")
        info = raw.info
        disk = {"path": raw.path, "read_only": info.read_only, "direct": info.direct,
                "logical_block_size": info.logical_block_size}
        recipe: dict[str, object] = {"disk": disk, "options": self._options}
        fds = [raw.fd]
        if isinstance(self.storage, ThrottleStorage):
            recipe["throttle"] = {"node": self.storage.name, "group": self.storage.group.name}
            fds += [self.storage.group.fd, self.storage.held_fd]
        return ("virtio_blk.device:BlkDevice.in_queue_process", recipe, fds)

    @classmethod
    def in_queue_process(cls, recipe: dict[str, Any], fds: list[int]) -> BlkDevice:
        """The device rebuilt in a queue process, on the image fd the server passed.

        The image is reopened through ``/proc/self/fd`` (the same file, whatever its path now
        names), so the flags -- O_DIRECT, read-only -- are this process's own.
        """
        fd, *extra = fds
        spec = recipe["disk"]
        throttle = recipe.get("throttle")
        try:
            disk = Disk(f"/proc/self/fd/{fd}", read_only=spec["read_only"],
                        direct=spec["direct"], logical_block_size=spec["logical_block_size"])
        except BaseException:
            for other in extra:
                os.close(other)
            raise
        finally:
            os.close(fd)
        disk.path = spec["path"]
        options = recipe["options"]
        if throttle is None:
            return cls(disk, queue_processes=False, **options)
        group_fd, held_fd = extra
        storage = FileStorage(disk, options["engine"], options["io_threads"])
        node = ThrottleStorage(storage, throttle["node"],
                               ThrottleGroup.attach(throttle["group"], group_fd), held_fd)
        return cls(node, queue_processes=False, **options)

    def process_state(self) -> dict[str, object]:
        return {"writeback": self.writeback, "acked": self.acked,
                "capacity": self.limits.capacity}

    def apply_process_state(self, state: dict[str, Any]) -> None:
        self.writeback = bool(state.get("writeback", self.writeback))
        self.acked = int(state.get("acked", self.acked))
        capacity = int(state.get("capacity", self.limits.capacity))
        if capacity != self.limits.capacity:  # a resize (the image file grew already)
            self.set_capacity(capacity)

    def queue_counter_values(self, index: int) -> list[int]:
        return self.queue_stats[index].values(full=False)

    def counter_slots(self) -> int:
        return len(BlkStats().values())

    def set_queue_counter_values(self, index: int, values: Sequence[int]) -> None:
        self.queue_stats[index].set_values(values)


#: A handler method that checks and starts one type of request (see :data:`DEVICE_OPS`).
_Starter = Callable[[DescriptorChain, int, int, DeviceOp], "int | None"]


class BlkQueueHandler(QueueHandler):
    """Serves one queue of a :class:`BlkDevice`."""

    def __init__(self, device: BlkDevice, index: int, memory: GuestMemory) -> None:
        self.device = device
        self.index = index
        self.memory = memory
        self.limits = device.limits
        self.stats = device.queue_stats[index]
        self.errlog = device.errlog
        self.caps = device.storage.caps
        self.direct = device.storage.info.direct
        self.mem_align = device.storage.info.mem_align
        self.engine = device.storage.open_engine(index)
        self.completion_fd = self.engine.completion_fd
        self.timing = device.latency_accounting
        self.pending: collections.deque[DescriptorChain] = collections.deque()
        self._fast: FastPathLike | None = None
        #: Request type -> the method that checks and starts it, and its table row.
        self._starters: dict[int, tuple[_Starter, DeviceOp]] = {
            op.req_type: (getattr(self, op.start), op) for op in DEVICE_OPS}

    @property
    def writeback(self) -> bool:
        """The device caches writes (a write needs no flush of its own before it completes)."""
        return self.device._writeback  # (not the property: one Python call per write less)

    def settings_changed(self) -> None:
        """The device's write cache mode changed (:attr:`BlkDevice.writeback`): the fast path,
        if there is one, reads it again before its next request."""
        fast = self._fast
        if fast is not None:
            fast.settings_changed()

    def submit_from_ring(self, vq: Queue, limit: int = NO_LIMIT) -> list[tuple[int, int]]:
        """The fast path (:mod:`.fastpath`) when the device has it on."""
        fast = self._fast_path_of(vq)
        return [] if fast is None else fast.drain(limit)

    def ring_submitter(self, vq: Queue) -> Callable[[int], list[tuple[int, int]]]:
        """:meth:`submit_from_ring` of ``vq`` for the worker: the fast path's own ``drain`` (the
        compiled one's is a C method: no Python frame in between), or, with the fast path off,
        :meth:`submit_from_ring` bound (it finds nothing)."""
        fast = self._fast_path_of(vq)
        return partial(self.submit_from_ring, vq) if fast is None else fast.drain

    def _fast_path_of(self, vq: Queue) -> FastPathLike | None:
        """The fast path serving ``vq`` (made for it on first use), None when it is off."""
        fast = self._fast
        if fast is None or fast.vq is not vq:
            if not self.device.fast_path:
                return None
            fast = self._fast = make_fast_path(self, vq)
        return fast

    # ------------------------------------------------------------------ QueueHandler
    def submit(self, chain: DescriptorChain) -> int | None:
        if self.pending:  # keep arrival order behind requests waiting for bounce pages
            self.stats.requests += 1  # _start(retry=True) will not count it
            self.stats.deferred += 1
            self.pending.append(chain)
            return None
        return self._start(chain)

    def submit_batch(self, chains: Sequence[DescriptorChain]) -> list[tuple[int, int]]:
        """Start every chain, then hand the whole batch to the engine at once."""
        done = []
        for chain in chains:
            used = self.submit(chain)
            if used is not None:
                done.append((chain.head, used))
        if self.engine.batched:
            self.engine.submit_batch()
            done += self.complete_reaped()
        return done

    def complete_reaped(self) -> list[tuple[int, int]]:
        """Finish every op the engine has finished: ``(head, used length)`` of each.

        With a fast path, its ``complete_reaped`` does it (its requests by its fused
        completion, the rest by :meth:`finish`).
        """
        fast = self._fast
        if fast is None:
            finish = self.finish
            return [(req.head, finish(req)) for req in self.reaped()]
        return fast.complete_reaped()

    def reap(self) -> list[tuple[int, int]]:
        done = self.complete_reaped()
        if not self.pending:
            return done
        while self.pending:
            chain = self.pending.popleft()
            used = self._start(chain, retry=True)
            if used is None and self.pending and self.pending[0] is chain:
                break  # still no pages: wait for the next completion
            if used is not None:
                done.append((chain.head, used))
        if self.engine.batched:
            self.engine.submit_batch()
            # What submitting finished already (page-cached IO, a read served without the
            # ring) gives no completion event to wait for: finish it now.
            done += self.complete_reaped()
        return done

    def reaped(self) -> list[BlkRequest]:
        """The engine's finished ops: every op this queue submits is a :class:`BlkRequest`."""
        return cast("list[BlkRequest]", self.engine.reap())

    def close(self) -> bool:
        for chain in self.pending:  # only when the queue is torn down with requests waiting
            log.warning("queue %d: dropping request %d waiting for bounce pages", self.index,
                        chain.head)
        self.pending.clear()
        quiet = self.engine.close()
        self.device._handlers.discard(self)
        return quiet

    # ------------------------------------------------------------------ request start
    def _start(self, chain: DescriptorChain, retry: bool = False) -> int | None:
        if not retry:
            self.stats.requests += 1
        writable = chain.writable
        if not writable:
            self.stats.errors += 1
            self.errlog.log(logging.WARNING, "queue %d: request %d has no writable status byte; "
                            "completed without a status", self.index, chain.head)
            return 0
        gpa, n = writable[-1]
        status_gpa = gpa + n - 1
        try:
            req_type, sector = self._header(chain)
            starter = self._starters.get(req_type)
            if starter is None:
                raise RequestError(Status.UNSUPP, f"request type {req_type}")
            start, op = starter
            return start(chain, status_gpa, sector, op)
        except _Deferred:
            if retry:
                self.pending.appendleft(chain)
            else:
                self.stats.deferred += 1
                self.pending.append(chain)
            return None
        except RequestError as exc:
            return self._reject(chain, status_gpa, exc.status, str(exc))
        except AccessError as exc:
            return self._reject(chain, status_gpa, Status.IOERR, f"guest memory: {exc}")

    def _reject(self, chain: DescriptorChain, status_gpa: int, status: Status, why: str) -> int:
        if status == Status.UNSUPP:
            self.stats.unsupported += 1
        else:
            self.stats.errors += 1
        log.debug("queue %d: request %d -> %s: %s", self.index, chain.head, status.name, why)
        return self.put_status(status_gpa, status, 1)

    def put_status(self, status_gpa: int, status: int, used: int) -> int:
        """Write ``status`` to the status byte at ``status_gpa``: ``used`` (the used length to
        return), or 0 when guest memory there is gone (nothing can be reported)."""
        where = self.memory.locate(status_gpa, 1)
        if where is not None:
            try:
                where[0][where[1]] = status
                if self.dirty is not None:
                    self.dirty.record(status_gpa, 1)
                return used
            except (ValueError, TypeError):  # region removed meanwhile, or read-only
                pass
        try:
            self.memory.write(status_gpa, bytes((status,)))
        except AccessError as exc:  # memory went away under the request: nothing to report to
            self.errlog.log(logging.WARNING, "queue %d: cannot write status at %#x: %s",
                            self.index, status_gpa, exc)
            return 0
        if self.dirty is not None:
            self.dirty.record(status_gpa, 1)
        return used

    def record_read(self, req: BlkRequest) -> None:
        """Record the guest pages a READ's data went to (zero-copy or scattered)."""
        dirty = self.dirty
        if dirty is not None and req.layout is not None:
            for buffers in req.layout.buffers:
                dirty.record_ranges(buffers.runs())

    def _header(self, chain: DescriptorChain) -> tuple[int, int]:
        if chain.readable_len < HEADER_SIZE:
            raise RequestError(Status.IOERR, f"header of {chain.readable_len} bytes")
        gpa, n = chain.readable[0]
        where = self.memory.locate(gpa, HEADER_SIZE) if n >= HEADER_SIZE else None
        try:
            if where is not None:
                req_type, _, sector = HEADER.unpack_from(where[0], where[1])
                return req_type & ~T_BARRIER, sector
        except ValueError:  # region removed meanwhile: take the checked path below
            pass
        # A header split over descriptors (or a racing memory change): gather it.
        # Only the header's bytes: the pieces after it may hold gigabytes of data.
        head = trim_end(chain.readable, chain.readable_len - HEADER_SIZE)
        raw = b"".join(self.memory.read(a, n) for a, n in head)
        req_type, _, sector = HEADER.unpack(raw)
        return req_type & ~T_BARRIER, sector

    # ------------------------------------------------------------------ IN / OUT
    def _read(self, chain: DescriptorChain, status_gpa: int, sector: int,
              op: DeviceOp) -> int | None:
        if chain.readable_len != HEADER_SIZE:
            raise RequestError(Status.IOERR, "IN with data in readable descriptors")
        length = chain.writable_len - 1
        check_range(sector, length, self.limits)
        if length == 0:
            return self.put_status(status_gpa, Status.OK, 1)
        layout = plan(self.memory, trim_end(chain.writable, 1), guest_writable=True)
        req = BlkRequest(OpKind.READ, chain.head, status_gpa, sector, length)
        self._attach_buffers(req, layout, into_guest=True)
        return self._submit(req)

    def _write(self, chain: DescriptorChain, status_gpa: int, sector: int,
               op: DeviceOp) -> int | None:
        if self.limits.read_only:
            raise RequestError(Status.IOERR, "write to a read-only disk")
        if chain.writable_len != 1:
            raise RequestError(Status.IOERR, "OUT with data in writable descriptors")
        length = chain.readable_len - HEADER_SIZE
        check_range(sector, length, self.limits)
        if length == 0:
            return self.put_status(status_gpa, Status.OK, 1)
        layout = plan(self.memory, skip_start(chain.readable, HEADER_SIZE), guest_writable=False)
        req = BlkRequest(OpKind.WRITE, chain.head, status_gpa, sector, length)
        req.sync = not self.device._writeback
        self._attach_buffers(req, layout, into_guest=False)
        return self._submit(req)

    def _attach_buffers(self, req: BlkRequest, layout: DataLayout, into_guest: bool) -> None:
        """Zero-copy when the pieces allow it, else a bounce buffer (gathered now for writes).

        ``into_guest``: the data flows into guest memory (an IN request, a disk read).
        """
        req.layout = layout
        if not layout.bounce:
            locks = [b.lock(for_write=into_guest) for b in layout.buffers]
            req.locks = locks
            if len(locks) == 1:
                pieces = locks[0].io_buffers
            else:
                pieces = [p for lock in locks for p in lock.io_buffers]
            if not self.direct or all(lock.is_aligned(self.mem_align) for lock in locks):
                req.buffers = pieces
                return
            req.release()
        try:
            bounce = self.device.tracker.try_acquire(req.length, self.index)
        except ValueError as exc:
            raise RequestError(Status.IOERR, f"cannot bounce: {exc}") from exc
        if bounce is None:
            raise _Deferred
        req.bounce = bounce
        self.stats.bounced_requests += 1
        self.stats.bounced_bytes += req.length
        if not into_guest:
            try:
                bounce.buffer.gather_from(layout.buffers)
            except BaseException:
                req.release()
                raise
        req.buffers = bounce.buffer.io_buffers()

    # ------------------------------------------------------------------ the other types
    def _flush(self, chain: DescriptorChain, status_gpa: int, sector: int,
               op: DeviceOp) -> int | None:
        if sector != 0 or chain.readable_len != HEADER_SIZE or chain.writable_len != 1:
            # The spec makes these driver errors; IOERR is its status for driver errors.
            raise RequestError(Status.IOERR, "FLUSH with a sector or with data")
        if not op.row.supported(self.caps, self.limits.read_only):
            raise RequestError(Status.UNSUPP, "FLUSH: the storage has no cache to flush")
        return self._submit(BlkRequest(OpKind.FLUSH, chain.head, status_gpa, 0, 0))

    def _get_id(self, chain: DescriptorChain, status_gpa: int, sector: int,
                op: DeviceOp) -> int:
        if chain.readable_len != HEADER_SIZE:
            raise RequestError(Status.IOERR, "GET_ID with data in readable descriptors")
        start_ns = monotonic_ns() if self.timing else 0
        try:
            used = self._put_id(chain, status_gpa)
        finally:
            if self.timing:  # timed like a disk operation: it is one to the user
                self.stats.add_latency(GET_ID, start_ns)
        self.stats.get_ids += 1
        return used

    def _put_id(self, chain: DescriptorChain, status_gpa: int) -> int:
        """Write the device's id string (as much as fits) and the OK status."""
        ident = device_id(self.device.serial)
        room = min(ID_BYTES, chain.writable_len - 1)
        pos = 0
        for gpa, n in trim_end(chain.writable, 1):
            take = min(n, room - pos)
            if take <= 0:
                break
            self.memory.write(gpa, ident[pos : pos + take])
            if self.dirty is not None:
                self.dirty.record(gpa, take)
            pos += take
        return self.put_status(status_gpa, Status.OK, pos + 1)

    def _discard_or_zeroes(self, chain: DescriptorChain, status_gpa: int, sector: int,
                           op: DeviceOp) -> int | None:
        req_type = op.req_type
        if self.limits.read_only:
            raise RequestError(Status.IOERR, f"{req_type.name} on a read-only disk")
        if chain.writable_len != 1:
            raise RequestError(Status.IOERR, f"{req_type.name} with writable data")
        if not op.row.supported(self.caps, read_only=False):
            raise RequestError(Status.UNSUPP, f"{req_type.name}: not offered by the storage")
        if chain.readable_len - HEADER_SIZE > MAX_SEGMENT_PAYLOAD:  # never copy gigabytes
            raise RequestError(Status.IOERR, f"{req_type.name} payload of "
                               f"{chain.readable_len - HEADER_SIZE} bytes")
        pieces = skip_start(chain.readable, HEADER_SIZE)
        data = b"".join(self.memory.read(a, n) for a, n in pieces)
        segments = parse_segments(req_type, data, self.limits)
        req = BlkRequest(OpKind(op.row.index), chain.head, status_gpa,
                         segments[0].offset >> SECTOR_SHIFT, 0)
        req.offset = 0
        req.segments = segments
        req.sync = not self.device._writeback
        return self._submit(req)

    # ------------------------------------------------------------------ completion
    def _submit(self, req: BlkRequest) -> int | None:
        if self.timing:
            req.start_ns = monotonic_ns()
        if self.engine.submit(req):
            return self.finish(req)
        return None

    def finish(self, req: BlkRequest) -> int:
        """Complete a request the engine finished (any kind, any result): release, account,
        write the status; the used length.  The reference the fast path's fused completion
        defers to for anything but full success."""
        result = req.result
        kind = req.kind
        row = OPS[kind]
        stats = self.stats
        ok = not isinstance(result, BaseException) and (
            not row.moves_data or result == req.length
        )
        used = 1
        try:
            if ok and kind == OpKind.READ:
                if req.bounce is not None and req.layout is not None:
                    req.bounce.buffer.scatter_to(req.layout.buffers)
                used = req.length + 1
        except AccessError as exc:
            self.errlog.log(logging.WARNING, "queue %d: read of sector %d could not be returned: "
                            "%s", self.index, req.sector, exc)
            ok = False
            used = 1
        finally:
            req.release()
        if self.timing:
            stats.add_latency(kind, req.start_ns)
        if self.dirty is not None and kind == OpKind.READ:
            self.record_read(req)  # even a failed read may have written part of the buffers
        if ok:
            setattr(stats, row.counter, getattr(stats, row.counter) + 1)
            nbytes = row.bytes_counter
            if nbytes is not None:
                n = req.length if row.moves_data else sum(seg.length for seg in req.segments)
                setattr(stats, nbytes, getattr(stats, nbytes) + n)
            return self.put_status(req.status_gpa, Status.OK, used)
        stats.errors += 1
        stats.failed[kind] += 1
        why = result if isinstance(result, BaseException) else f"{result} of {req.length} bytes"
        self.errlog.log(logging.ERROR, "queue %d: %s at sector %d failed: %s", self.index,
                        kind.name, req.sector, why)
        return self.put_status(req.status_gpa, Status.IOERR, 1)
