"""The control plane of one server: its QMP monitors and its metrics endpoint, for every export.

The CLI builds one after the exports (every socket is bound before anything is served, so a bad
monitor path or a taken ``--metrics`` port is a one-line user error) and stops it after the
exports stopped: clients get ``BLOCK_EXPORT_DELETED`` for each export as it goes (QEMU's event
for an export gone, from :attr:`ExportSet.on_deleted`), then the sockets close.  ``quit`` over
QMP takes the path SIGTERM takes: ``exports.shutdown()``.  Several monitors (``--qmp`` and any
number of ``--chardev``/``--monitor`` pairs) share one command table; events go to all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from blockdev.storage import Storage
from storage_daemon import throttle_qmp, version_info
from storage_daemon.commands import Commands
from storage_daemon.export import BlockExport
from storage_daemon.exports import ExportSet
from storage_daemon.metrics import ExportsCollector, MetricsServer
from storage_daemon.objects import ObjectRegistry
from storage_daemon.qmp import QmpServer
from storage_daemon.qmp_protocol import generic_error
from storage_daemon.qsd_options import ExportOptions
from vhost.daemon import DaemonError, VhostUserDaemon
from virtio_blk.device import BlkDevice

log = logging.getLogger(__name__)


class ControlError(Exception):
    """A control socket or endpoint cannot be set up; the message is for the user."""


class ControlPlane:
    def __init__(self, exports: ExportSet, *, qmp_paths: Sequence[tuple[str, str]] = (),
                 metrics_address: tuple[str, int] | None = None,
                 quit: Callable[[], None] | None = None,
                 objects: ObjectRegistry | None = None) -> None:
        """``qmp_paths``: (what the user wrote, for errors; socket path) per monitor."""
        self.exports = exports
        self.objects = objects if objects is not None else ObjectRegistry()
        if "throttle-group" not in self.objects.types:  # the command line registers it first
            throttle_qmp.register_type(self.objects, exports.graph)
        self.commands = Commands(exports, version_info(), quit or exports.shutdown,
                                 queue_states=self._queue_states, objects=self.objects)
        throttle_qmp.register(self.commands, exports)
        self.monitors: list[QmpServer] = []
        self._reported: set[str] = set()
        self.metrics: MetricsServer | None = None
        exports.on_deleted = self._deleted
        try:
            for what, path in qmp_paths:
                try:
                    self.monitors.append(QmpServer(path, self.commands, version_info()))
                except DaemonError as exc:
                    raise ControlError(f"{what}: {exc}") from exc
            if metrics_address is not None:
                host, port = metrics_address
                try:
                    self.metrics = MetricsServer(host, port, ExportsCollector(exports.exports))
                    self.metrics.registry.register(throttle_qmp.ThrottleCollector(
                        lambda: throttle_qmp.export_storages(exports)))
                except OSError as exc:
                    raise ControlError(f"--metrics {host}:{port}: "
                                       f"{exc.strerror or exc}") from exc
        except ControlError:
            self.stop()
            raise

    @classmethod
    def for_one(cls, device: BlkDevice, daemon: VhostUserDaemon, *, export_id: str,
                node_name: str, qmp_path: str | None = None,
                metrics_address: tuple[str, int] | None = None,
                quit: Callable[[], None] | None = None) -> ControlPlane:
        """The control plane of a device served by a daemon someone else runs (tests, the
        fuzzer): one export in a set whose loop is not used; ``quit`` stops that daemon."""

        def no_device(_storage: Storage, _opts: ExportOptions) -> BlkDevice:
            raise ValueError("this control plane serves one given export")

        exports = ExportSet(no_device)
        exports.insert(BlockExport(export_id, node_name, device, daemon))
        return cls(exports, qmp_paths=[("--qmp", qmp_path)] if qmp_path else [],
                   metrics_address=metrics_address, quit=quit or daemon.shutdown)

    @property
    def export(self) -> BlockExport:
        """The first export (the short form's only one)."""
        return self.exports.exports()[0]

    @property
    def qmp(self) -> QmpServer | None:
        """The first monitor (the short form's ``--qmp``)."""
        return self.monitors[0] if self.monitors else None

    def _queue_states(self) -> list[dict[str, Any]]:
        """x-query-vhost-queues of the server's only export (the short form's diagnostics)."""
        exports = self.exports.exports()
        if len(exports) != 1:
            raise generic_error("x-query-vhost-queues needs a server of exactly one export")
        return exports[0].queue_states()

    def _deleted(self, export_id: str) -> None:
        self._reported.add(export_id)
        for monitor in self.monitors:
            monitor.emit("BLOCK_EXPORT_DELETED", {"id": export_id})

    def start(self) -> None:
        for monitor in self.monitors:
            monitor.start()
            log.info("QMP on %s", monitor.path)
        if self.metrics is not None:
            log.info("metrics on port %d at /metrics", self.metrics.port)

    def stop(self) -> None:
        """Close the monitors (after flushing their events) and the metrics server.

        Exports still there (their loop did not run, or stops after us) are reported gone
        here: a client always learns that the exports it saw are gone."""
        final = [("BLOCK_EXPORT_DELETED", {"id": e.export_id})
                 for e in self.exports.exports() if e.export_id not in self._reported]
        for e in self.exports.exports():
            e.begin_shutdown()
        for monitor in self.monitors:
            monitor.stop(final)
        self.monitors = []
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
