"""The control plane of one server: the export, its QMP server and its metrics endpoint.

The CLI builds one after the daemon (both sockets are bound before anything is served, so a
bad ``--qmp`` path or a taken ``--metrics`` port is a one-line user error) and stops it after the
daemon stopped: clients get ``BLOCK_EXPORT_DELETED`` (QEMU's event for an export gone), then the
sockets close.  ``quit`` over QMP takes the path SIGTERM takes: ``daemon.shutdown()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from blockdev.nodes import BlockGraph
from storage_daemon import throttle_qmp, version_info
from storage_daemon.commands import Commands
from storage_daemon.export import BlockExport
from storage_daemon.metrics import BlkCollector, MetricsServer
from storage_daemon.qmp import QmpServer
from vhost.daemon import DaemonError, VhostUserDaemon
from virtio_blk.device import BlkDevice

log = logging.getLogger(__name__)


class ControlError(Exception):
    """A control socket or endpoint cannot be set up; the message is for the user."""


class ControlPlane:
    def __init__(self, device: BlkDevice, daemon: VhostUserDaemon, *, export_id: str,
                 node_name: str, qmp_path: str | None = None,
                 metrics_address: tuple[str, int] | None = None,
                 quit: Callable[[], None] | None = None,
                 graph: BlockGraph | None = None) -> None:
        self.export = BlockExport(export_id, node_name, device, daemon)
        self.commands = Commands(self.export, version_info(), quit or daemon.shutdown,
                                 queue_states=self.export.queue_states)
        if graph is not None:  # the QSD form: its throttle groups (storage_daemon.throttle_qmp)
            throttle_qmp.register(self.commands, graph, lambda: device.storage)
        self.qmp: QmpServer | None = None
        self.metrics: MetricsServer | None = None
        try:
            if qmp_path is not None:
                try:
                    self.qmp = QmpServer(qmp_path, self.commands, version_info())
                except DaemonError as exc:
                    raise ControlError(f"--qmp: {exc}") from exc
            if metrics_address is not None:
                host, port = metrics_address
                try:
                    self.metrics = MetricsServer(host, port, BlkCollector(device, daemon))
                    self.metrics.registry.register(
                        throttle_qmp.ThrottleCollector(lambda: device.storage))
                except OSError as exc:
                    raise ControlError(f"--metrics {host}:{port}: "
                                       f"{exc.strerror or exc}") from exc
        except ControlError:
            self.stop()
            raise

    def start(self) -> None:
        if self.qmp is not None:
            self.qmp.start()
            log.info("QMP on %s", self.qmp.path)
        if self.metrics is not None:
            log.info("metrics on port %d at /metrics", self.metrics.port)

    def stop(self) -> None:
        """The export is gone: tell QMP clients, close the QMP socket and the metrics server."""
        self.export.begin_shutdown()
        if self.qmp is not None:
            self.qmp.stop([("BLOCK_EXPORT_DELETED", {"id": self.export.export_id})])
            self.qmp = None
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
