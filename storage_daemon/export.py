"""The exported disk as the control plane sees it: its names, resize, statistics.

Glue between the QMP commands / the metrics exporter and the device and daemon: growing the disk
is the device's job (:meth:`virtio_blk.device.BlkDevice.resize`), telling the guest is the
vhost-user connection's (:meth:`vhost.daemon.VhostUserDaemon.notify_config_change`); this
module only orders the two and turns their failures into QMP errors.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from blockdev.storage import Storage, StorageError
from storage_daemon.qmp_protocol import generic_error
from vhost.daemon import QueueStateError, VhostUserDaemon
from virtio_blk.device import BlkDevice
from virtio_blk.ops import OPS

log = logging.getLogger(__name__)

#: QEMU's BlockDeviceStats families (rd, wr, flush, unmap), in table order, with their rows.
_FAMILIES = {family: [row for row in OPS if row.qmp == family]
             for family in dict.fromkeys(row.qmp for row in OPS if row.qmp is not None)}
#: The families that move bytes (QEMU has no flush_bytes or flush_merged), with their
#: byte counters (discard and write-zeroes share ``bytes_unmapped``).
_BYTES = {family: list(dict.fromkeys(row.bytes_counter for row in rows
                                     if row.bytes_counter is not None))
          for family, rows in _FAMILIES.items()
          if any(row.bytes_counter is not None for row in rows)}


def zero_blockstats() -> dict[str, Any]:
    """BlockDeviceStats of a node nothing has read or written (a node not exported)."""
    stats: dict[str, Any] = {}
    for family in _BYTES:
        stats[f"{family}_bytes"] = 0
    for family in _FAMILIES:
        stats[f"{family}_operations"] = 0
    for family in _BYTES:
        stats[f"{family}_merged"] = 0
    for family in _FAMILIES:
        stats[f"failed_{family}_operations"] = 0
    for family in _FAMILIES:
        stats[f"{family}_total_time_ns"] = 0
    stats.update(account_invalid=False, account_failed=True, timed_stats=[])
    return stats


class BlockExport:
    """One vhost-user-blk export of this server (QSD's ``--export id=...,node-name=...``):
    its device, its daemon (socket and frontend) and, once it is served by an
    :class:`~storage_daemon.exports.ExportSet`, the storage it owns and closes."""

    def __init__(self, export_id: str, node_name: str, device: BlkDevice,
                 daemon: VhostUserDaemon, storage: Storage | None = None) -> None:
        self.export_id = export_id
        self.node_name = node_name
        self.device = device
        self.daemon = daemon
        self.storage = storage
        self._shutting_down = threading.Event()
        self._resize_lock = threading.Lock()

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down.is_set()

    def begin_shutdown(self) -> None:
        self._shutting_down.set()

    def close(self, report: bool = True) -> bool:
        """Stop serving: drop the frontend (its queues drained), close the socket, make the
        disk durable and close the storage.  False if making it durable failed (logged)."""
        ok = True
        try:
            self.daemon.close()
        except Exception:
            log.exception("export %s: closing its socket failed", self.export_id)
        try:
            self.device.make_durable()
        except OSError as exc:
            log.error("export %s: making the disk durable failed: %s", self.export_id, exc)
            ok = False
        finally:
            if self.storage is not None:
                try:
                    self.storage.close()
                except Exception:
                    log.exception("export %s: closing its storage failed", self.export_id)
                    ok = False
            self.device.errlog.close()
        if not report:  # never served (start-up failed): nothing to report
            return ok
        s = self.device.stats
        log.info("export %s stopped: %d requests (%d reads, %d writes, %d flushes), "
                 "%d errors, %d bounced", self.export_id, s.requests, s.reads, s.writes,
                 s.flushes, s.errors, s.bounced_requests)
        return ok

    def resize(self, size: int) -> None:
        """Grow the disk to ``size`` bytes and tell the guest (GenericError where it cannot)."""
        with self._resize_lock:
            old = self.device.storage.info.size
            try:
                self.device.resize(size)
            except (StorageError, OSError) as exc:
                raise generic_error(str(exc)) from exc
            if size == old:
                return
            log.info("%s resized from %d to %d bytes", self.node_name, old, size)
            if not self.daemon.connected:
                log.info("no frontend connected: the new size is read when one connects")
            elif self.daemon.notify_config_change():
                log.info("frontend told of the new size")

    def queue_states(self) -> list[dict[str, Any]]:
        """``x-query-vhost-queues``: every queue's ring state; GenericError rather than a hang
        if a queue process does not answer within 1 s."""
        try:
            return self.daemon.queue_states(timeout=1.0)
        except QueueStateError as exc:
            raise generic_error(f"queue state unavailable: {exc}") from exc

    def blockstats(self) -> dict[str, Any]:
        """``BlockDeviceStats`` as QEMU's query-blockstats reports it.

        Discard and write-zeroes are both "unmap" operations (QEMU accounts write-zeroes with
        unmap as BLOCK_ACCT_UNMAP too).  Failed operations are IO errors; requests refused for
        being malformed are not accounted per kind (``account_invalid`` is false).
        """
        t = self.device.totals()
        c = t.counters
        stats: dict[str, Any] = {}
        for family, counters in _BYTES.items():
            stats[f"{family}_bytes"] = sum(c[name] for name in counters)
        for family, rows in _FAMILIES.items():
            stats[f"{family}_operations"] = sum(c[row.counter] for row in rows)
        for family in _BYTES:
            stats[f"{family}_merged"] = 0
        for family, rows in _FAMILIES.items():
            stats[f"failed_{family}_operations"] = sum(t.failed[row.index] for row in rows)
        for family, rows in _FAMILIES.items():
            stats[f"{family}_total_time_ns"] = sum(t.total_ns[row.index] for row in rows)
        stats.update(account_invalid=False, account_failed=True, timed_stats=[])
        return stats
