"""The device's operation table: the block layer's rows (:mod:`blockdev.ops`) plus its own.

GET_ID is answered by the device from its serial and never reaches the disk, so it has no
:class:`~blockdev.ops.OpKind` and no engine handles it; it still is a kind of operation the user
counts and times.  :data:`OPS` is the block table extended with it: its index is the position of
each kind in the per-queue stats lists (``BlkStats`` counters, failures, times, latency
histograms), and the metrics, ``query-blockstats`` and the completion accounting read it.

:data:`DEVICE_OPS` ties each row to the virtio side: the request type on the wire, the feature
bits offered when the storage supports the operation (:meth:`~blockdev.ops.OpRow.supported`),
and the :class:`~virtio_blk.device.BlkQueueHandler` method that checks and starts such a request.
Adding a request type: a row here (and in :mod:`blockdev.ops` if the disk does it), the method
that starts it, and -- for a disk operation -- each engine's handler for the kind (a dispatch
built with :func:`blockdev.ops.by_kind` refuses to be built without one).
"""

from __future__ import annotations

from dataclasses import dataclass

from blockdev.ops import DISK_OPS, OpKind, OpRow, check_table
from blockdev.stats import LATENCY_BOUNDS_NS
from virtio_blk.request import BlkFeature, ReqType

#: Index of GET_ID in :data:`OPS` (after the disk operations).
GET_ID = len(DISK_OPS)

#: Every operation the device counts, indexed by ``OpRow.index``.
OPS: tuple[OpRow, ...] = check_table((*DISK_OPS, OpRow(GET_ID, "get_id", "get_ids")))


#: The kinds the compiled fast path (``virtio_blk/_fastpath_core.pyx``) counts in C, straight
#: into each queue's ``BlkStats.native_counts`` / ``native_latency`` arrays, one block per kind
#: in this order: in ``native_counts`` :data:`NATIVE_COUNT_SLOTS` (successes, bytes), in
#: ``native_latency`` :data:`NATIVE_LATENCY_SLOTS` (total ns, then the histogram's buckets).
#: Stated once here: the device reads the arrays by it, the compiled core writes them by it.
NATIVE_KINDS: tuple[OpKind, ...] = (OpKind.READ, OpKind.WRITE)
NATIVE_COUNT_SLOTS = 2
NATIVE_LATENCY_SLOTS = 1 + len(LATENCY_BOUNDS_NS) + 1


@dataclass(frozen=True)
class DeviceOp:
    """One virtio-blk request type: its operation, its wire type, what it makes the device
    offer, and the handler method (``(chain, status_gpa, sector, op) -> used | None``) that
    starts it."""

    row: OpRow
    req_type: ReqType
    features: BlkFeature
    start: str


_NONE = BlkFeature(0)

#: The request types the device serves (any other is answered UNSUPP).
DEVICE_OPS: tuple[DeviceOp, ...] = (
    DeviceOp(OPS[OpKind.READ], ReqType.IN, _NONE, "_read"),
    DeviceOp(OPS[OpKind.WRITE], ReqType.OUT, _NONE, "_write"),
    # A cache to flush is also what makes the cache mode (writeback config byte) meaningful.
    DeviceOp(OPS[OpKind.FLUSH], ReqType.FLUSH, BlkFeature.FLUSH | BlkFeature.CONFIG_WCE,
             "_flush"),
    DeviceOp(OPS[GET_ID], ReqType.GET_ID, _NONE, "_get_id"),
    DeviceOp(OPS[OpKind.DISCARD], ReqType.DISCARD, BlkFeature.DISCARD, "_discard_or_zeroes"),
    DeviceOp(OPS[OpKind.WRITE_ZEROES], ReqType.WRITE_ZEROES, BlkFeature.WRITE_ZEROES,
             "_discard_or_zeroes"),
)
