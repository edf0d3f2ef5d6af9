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

from blockdev.stats import OP_NAMES
from blockdev.storage import StorageError
from storage_daemon.qmp_protocol import generic_error
from vhost.daemon import QueueStateError, VhostUserDaemon
from virtio_blk.device import BlkDevice

log = logging.getLogger(__name__)

_READ, _WRITE, _FLUSH, _DISCARD, _WZ = (OP_NAMES.index(n) for n in
                                        ("read", "write", "flush", "discard", "write_zeroes"))


class BlockExport:
    """The one vhost-user-blk export of this server (QSD's ``--export id=...,node-name=...``)."""

    def __init__(self, export_id: str, node_name: str, device: BlkDevice,
                 daemon: VhostUserDaemon) -> None:
        self.export_id = export_id
        self.node_name = node_name
        self.device = device
        self.daemon = daemon
        self._shutting_down = threading.Event()
        self._resize_lock = threading.Lock()

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down.is_set()

    def begin_shutdown(self) -> None:
        self._shutting_down.set()

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
        return {
            "rd_bytes": c["bytes_read"],
            "wr_bytes": c["bytes_written"],
            "unmap_bytes": c["bytes_unmapped"],
            "rd_operations": c["reads"],
            "wr_operations": c["writes"],
            "flush_operations": c["flushes"],
            "unmap_operations": c["discards"] + c["write_zeroes"],
            "rd_merged": 0,
            "wr_merged": 0,
            "unmap_merged": 0,
            "failed_rd_operations": t.failed[_READ],
            "failed_wr_operations": t.failed[_WRITE],
            "failed_flush_operations": t.failed[_FLUSH],
            "failed_unmap_operations": t.failed[_DISCARD] + t.failed[_WZ],
            "rd_total_time_ns": t.total_ns[_READ],
            "wr_total_time_ns": t.total_ns[_WRITE],
            "flush_total_time_ns": t.total_ns[_FLUSH],
            "unmap_total_time_ns": t.total_ns[_DISCARD] + t.total_ns[_WZ],
            "account_invalid": False,
            "account_failed": True,
            "timed_stats": [],
        }
