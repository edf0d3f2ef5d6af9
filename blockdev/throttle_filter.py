"""``driver=throttle``: requests wait for their throttle group's budget (:mod:`.throttle`).

``--blockdev driver=throttle,node-name=N,throttle-group=G,file=CHILD`` -- QEMU's throttle filter.
Each queue's engine is the child's engine wrapped, like the delay filter's: a request the group
lets go goes straight down; one it does not is held in the engine's FIFO (later requests queue
behind it, so a queue's order is kept) and a timerfd, polled with the child's completion fd
through an epoll, says when to ask again.  The worker never sleeps and never blocks.

The timer is never armed for more than :data:`RECHECK` seconds: when the limits change
(``qom-set``), held requests ask again under the new ones within that time, whatever the old
limits had them wait for.  Flushes are not throttled (as in QEMU); reads count as reads;
writes, discards and write-zeroes as writes.

The time each request spent held is added up per node (``throttled_ns``, shown in
query-blockstats and the metrics) and per group, both in shared memory: a throttle node over a
raw file is served by queue processes too (:meth:`virtio_blk.device.BlkDevice.process_recipe`
passes the group's and the node's fds), and they all draw on the one budget.
"""

from __future__ import annotations

import mmap
import os
from collections import deque

from blockdev.engine import Engine, IoOp
from blockdev.filters import FilterStorage, HoldingEngine
from blockdev.ops import DISK_OPS
from blockdev.storage import Storage
from blockdev.throttle import Cells, ThrottleGroup

#: The longest a held request waits before asking its group again (seconds).
RECHECK = 0.2


class ThrottleStorage(FilterStorage):
    """A throttle node over ``child``, in ``group`` (which it does not own)."""

    def __init__(self, child: Storage, name: str, group: ThrottleGroup,
                 held_fd: int | None = None) -> None:
        """``held_fd``: in a queue process, the node's held-time counter the control process
        made (:attr:`held_fd`); taken."""
        super().__init__(child, name)
        self.group = group
        if held_fd is None:
            held_fd = os.memfd_create(f"throttle-held-{name}", os.MFD_CLOEXEC)
            os.ftruncate(held_fd, 8)
        #: The node's held time (ns, one float64) in shared memory: queue processes add to it
        #: under the group's lock, and the control process reads it for query-blockstats.
        self.held_fd = held_fd
        self._held_map = mmap.mmap(held_fd, 8, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
        self._held = memoryview(self._held_map).cast("d")
        group.users.add(name)

    def wrap(self, engine: Engine, queue_index: int) -> Engine:
        return ThrottleEngine(engine, self.group, self._held)

    @property
    def throttled_ns(self) -> int:
        """Nanoseconds requests of this node spent held, every queue of every process."""
        return int(self._held[0])

    def close(self) -> None:
        self.group.users.discard(self.name)
        try:
            super().close()
        finally:
            self._held.release()
            self._held_map.close()
            os.close(self.held_fd)


class ThrottleEngine(HoldingEngine):
    def __init__(self, child: Engine, group: ThrottleGroup, node_held: Cells) -> None:
        super().__init__(child)
        self.group = group
        self.name = f"{child.name}+throttle"
        self._node_held = node_held
        #: (op, when it was held (ns), is_write, size), in arrival order.
        self._held: deque[tuple[IoOp, int, bool, int]] = deque()
        self.held_ns = 0

    @staticmethod
    def _cost(op: IoOp) -> tuple[bool, int] | None:
        """(is_write, bytes) of ``op``, or None when it is not throttled (a flush: it neither
        moves data nor changes the disk), read off the operation table: whatever needs a
        writable disk counts as a write, as QEMU counts discards and write-zeroes."""
        row = DISK_OPS[op.kind]
        if not (row.moves_data or row.needs_writable):
            return None
        size = op.length if row.moves_data else sum(seg.length for seg in op.segments)
        return row.needs_writable, size

    def submit(self, op: IoOp) -> bool:
        cost = self._cost(op)
        if cost is None:
            return self.child.submit(op)
        is_write, size = cost
        if not self._held:
            wait = self.group.request(is_write, size)
            if not wait:
                return self.child.submit(op)
            self._arm(min(wait / 1e9, RECHECK))
        self._held.append((op, self.group.clock(), is_write, size))
        return False

    def reap(self) -> list[IoOp]:
        self._timer_seen()
        held = self._held
        ready: list[IoOp] = []
        while held:
            op, since, is_write, size = held[0]
            wait = self.group.request(is_write, size)
            if wait:
                self._arm(min(wait / 1e9, RECHECK))
                break
            held.popleft()
            took = self.group.clock() - since
            self.held_ns += took
            self.group.add_held(took, self._node_held)
            ready.append(op)
        return self._send_down(ready)

    def _drop_held(self) -> None:
        self._held.clear()
