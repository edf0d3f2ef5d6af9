"""Several exports in one server: the block nodes, the exports, and the one loop serving them.

:class:`ExportSet` owns the server's :class:`~blockdev.nodes.BlockGraph` (``--blockdev`` and
``blockdev-add`` nodes) and its exports, each a :class:`~storage_daemon.export.BlockExport` with
its own vhost-user socket, device and queue runner.  One control thread
(:meth:`ExportSet.serve_forever`) waits in ``select`` on every export's listener and frontend
connection and hands each daemon the fds that are its own; the queues run on each export's
runner, so a busy or broken export does not hold up another's rings.

Isolation: a frontend that crashes or breaks the protocol is dropped by its own daemon (its
queues drained and stopped); a bad ring stops that queue; a failing image fails that export's
requests; and anything unforeseen while serving one export's fds drops that export's frontend
with a log line -- the loop and the other exports go on.

Exports come and go while the loop runs: ``block-export-add`` (the QMP thread) opens the node
and binds the socket there, so its errors are the command's, then wakes the loop, which starts
watching the new socket.  ``block-export-del`` marks the export shutting down and wakes the
loop, which drops its frontend (queues drained), closes it and only then reports
``BLOCK_EXPORT_DELETED`` (:attr:`ExportSet.on_deleted`), as QSD does once the export is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from blockdev.nodes import BlockGraph, NodeError, NodeSpec
from blockdev.python.storage import load_class
from blockdev.ratelimit import RateLimitedLog
from blockdev.storage import Storage, StorageError
from storage_daemon.export import BlockExport
from storage_daemon.qmp_protocol import QmpError, generic_error
from storage_daemon.qsd_options import ExportOptions, export_from_dict
from vhost.daemon import DaemonError, VhostUserDaemon
from vhost.device import MAX_QUEUES
from virtio_blk.device import BlkDevice

log = logging.getLogger(__name__)

#: How long an export whose serving raised is left unwatched.
PAUSE_AFTER_ERROR = 0.5

#: Makes an export's device from its opened storage and options (the command line's settings:
#: engine, IO threads, queue processes...), so QMP-added exports get the same as --export ones.
DeviceFactory = Callable[[Storage, ExportOptions], BlkDevice]


class ExportError(Exception):
    """An export cannot be added; the message is one line (QEMU's wording where it has one)."""


def _fd_set(fds: list[int]) -> set[int]:
    return set(fds)


class ExportSet:
    """The exports of one server and the loop that serves their sockets."""

    def __init__(self, make_device: DeviceFactory, graph: BlockGraph | None = None, *,
                 io_threads: int = 16) -> None:
        self.graph = graph if graph is not None else BlockGraph()
        self.make_device = make_device
        self.io_threads = io_threads
        #: Called with an export's id once it is gone (its frontend dropped, storage closed).
        self.on_deleted: Callable[[str], None] = lambda _id: None
        self._exports: dict[str, BlockExport] = {}
        self._lock = threading.Lock()  # the dict and the graph: QMP thread vs. the loop
        self._pending: dict[str, str] = {}  # export id -> node name, being opened
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.failed_close = False
        self._paused: dict[str, float] = {}  # export id -> when to watch it again
        self._errors = RateLimitedLog(log, burst=5, interval=60.0)
        self._running = False

    # ------------------------------------------------------------------ exports
    def exports(self) -> list[BlockExport]:
        """The exports, oldest first (a snapshot)."""
        with self._lock:
            return list(self._exports.values())

    def find(self, export_id: str) -> BlockExport | None:
        with self._lock:
            return self._exports.get(export_id)

    def add(self, opts: ExportOptions) -> BlockExport:
        """Open the node, make the device, bind the socket and serve it (ExportError, and
        nothing left open, where any of it fails)."""
        with self._lock:
            if opts.export_id in self._exports or opts.export_id in self._pending:
                raise ExportError(f"Block export id '{opts.export_id}' is already in use")
            if opts.node_name not in self.graph.nodes:
                raise ExportError(f"Cannot find device='' nor node-name='{opts.node_name}'")
            for e in self._exports.values():
                if e.node_name == opts.node_name:
                    # Each export opens its node for itself: two would be two opens of one
                    # image (QSD shares the node; this server does not, and says so).
                    raise ExportError(f"Node '{opts.node_name}' is already exported by "
                                      f"'{e.export_id}'")
            # Opening may take a while (an NBD server, a Ceph cluster): not under the lock
            # the serving loop takes, the id is held meanwhile.
            self._pending[opts.export_id] = opts.node_name
        try:
            try:
                storage = self.graph.open(opts.node_name, writable=opts.writable,
                                          logical_block_size=opts.logical_block_size,
                                          io_threads=self.io_threads)
            except StorageError as exc:
                raise ExportError(str(exc)) from None
            try:
                device = self.make_device(storage, opts)
                daemon = VhostUserDaemon(device, opts.socket, listen_fd=opts.fd)
            except (DaemonError, ValueError) as exc:
                storage.close()
                raise ExportError(str(exc)) from None
            except BaseException:
                storage.close()
                raise
        finally:
            with self._lock:
                self._pending.pop(opts.export_id, None)
        export = BlockExport(opts.export_id, opts.node_name, device, daemon, storage)
        return self.insert(export)

    def insert(self, export: BlockExport) -> BlockExport:
        """Serve an export made elsewhere (the short form's): ExportError if its id is taken."""
        with self._lock:
            if export.export_id in self._exports:
                raise ExportError(f"Block export id '{export.export_id}' is already in use")
            self._exports[export.export_id] = export
        # Before the loop runs (start-up) the command line says what it serves, in its words.
        log.log(logging.INFO if self._running else logging.DEBUG,
                "export %s: node %s on %s, %d queue(s)", export.export_id, export.node_name,
                export.daemon.address, export.device.num_queues)
        self._wake()
        return export

    def delete(self, export_id: str, mode: str = "safe") -> None:
        """``block-export-del``: QSD's checks and wording; the export goes in the loop, which
        then calls :attr:`on_deleted`."""
        with self._lock:
            export = self._exports.get(export_id)
            if export is None:
                raise generic_error(f"Export '{export_id}' is not found")
            if export.shutting_down:
                raise generic_error(f"Export '{export_id}' is already shutting down")
            if mode == "safe" and export.daemon.in_use():
                raise generic_error(f"export '{export_id}' still in use")
            export.begin_shutdown()
        log.info("export %s: deleting (mode %s)", export_id, mode)
        self._wake()

    # ------------------------------------------------------------------ nodes
    def blockdev_add(self, options: Mapping[str, Any]) -> None:
        """Declare a node; as QSD, a file that cannot be opened is the command's error (the
        node itself opens when an export asks, so only the file's existence is checked)."""
        with self._lock:
            try:
                spec = self.graph.add(options)
            except NodeError as exc:
                raise generic_error(str(exc)) from None
            try:
                _check_files(spec)
            except QmpError:
                self._forget(spec)
                raise

    def blockdev_del(self, node_name: str) -> None:
        """QSD's refusals, in its order: unknown, exported, a child of another node."""
        with self._lock:
            spec = self.graph.nodes.get(node_name)
            if spec is None or node_name.startswith("#"):
                raise generic_error(f"Failed to find node with node-name='{node_name}'")
            if node_name in self._pending.values() or any(
                    e.node_name == node_name for e in self._exports.values()):
                raise generic_error(f"Node {node_name} is in use")
            for other in self.graph.nodes.values():
                if spec in other.children.values():
                    raise generic_error(f"Block device {node_name} is in use")
            self._forget(spec)

    def _forget(self, spec: NodeSpec) -> None:
        """Remove a node and the automatically named children only it had (nested options)."""
        self.graph.nodes.pop(spec.name, None)
        for child in spec.children.values():
            if child.name.startswith("#") and not any(
                    child in n.children.values() for n in self.graph.nodes.values()):
                self._forget(child)

    def nodes(self) -> list[NodeSpec]:
        """The nodes the user named (QSD's query-named-block-nodes), in declaration order."""
        with self._lock:
            return [n for n in self.graph.nodes.values() if not n.name.startswith("#")]

    def export_of(self, node_name: str) -> BlockExport | None:
        """The export serving ``node_name`` (None if the node is not exported)."""
        with self._lock:
            for e in self._exports.values():
                if e.node_name == node_name:
                    return e
        return None

    def declared_size(self, node: NodeSpec) -> int:
        """The virtual size of a node no export has opened, as QSD reports it after
        blockdev-add: an exported node that serves it through filters has it; a file its
        length; a qcow2 image the size its header says (8 bytes read); otherwise 0."""
        for e in self.exports():
            top = self.graph.nodes.get(e.node_name)
            while top is not None and top.driver in _SIZE_PRESERVING:
                top = top.children.get("file")
                if top is node:
                    return int(e.device.storage.info.size)
        child = node.children.get("file")
        try:
            if node.driver == "file":
                return os.stat(str(node.options.get("filename", ""))).st_size
            if node.driver == "raw" and child is not None:
                return self.declared_size(child)
            if node.driver == "qcow2" and child is not None:
                with open(str(child.options.get("filename", "")), "rb") as f:
                    header = f.read(32)
                if len(header) == 32 and header[:4] == b"QFI\xfb":
                    return int.from_bytes(header[24:32], "big")
        except OSError:
            pass
        return 0

    # ------------------------------------------------------------------ the loop
    def shutdown(self) -> None:
        """Make serve_forever return; safe from a signal handler or another thread."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._stop_w, b"x")

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def serve_forever(self) -> None:
        """Serve every export's socket until :meth:`shutdown`, then close them all."""
        self._running = True
        try:
            while True:
                self._reap()
                now = time.monotonic()
                self._paused = {k: t for k, t in self._paused.items() if t > now}
                serving = [e for e in self.exports()
                           if not e.shutting_down and e.export_id not in self._paused]
                owned = {e.export_id: _fd_set(e.daemon.watched()) for e in serving}
                watch = [self._stop_r, self._wake_r]
                for fds in owned.values():
                    watch.extend(fds)
                timeouts = [t for e in serving if (t := e.daemon.timeout()) is not None]
                timeouts += [t - now for t in self._paused.values()]
                try:
                    ready, _, _ = select.select(watch, [], [],
                                                min(timeouts) if timeouts else None)
                except InterruptedError:
                    continue
                if self._stop_r in ready:
                    break
                if self._wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                got = set(ready)
                for e in serving:
                    mine = got & owned[e.export_id]
                    if mine:
                        self._serve(e, mine)
        finally:
            self.close_all()

    def _serve(self, export: BlockExport, ready: set[int]) -> None:
        """One export's ready fds; whatever goes wrong drops that export's frontend only, and
        the export is left unwatched for :data:`PAUSE_AFTER_ERROR` seconds: an error that
        recurs (its listener stays readable) costs a line per pause, not a spinning loop."""
        try:
            export.daemon.handle_ready(ready)
        except Exception:
            self._errors.log(logging.ERROR, "export %s: internal error; dropping its frontend",
                             export.export_id, exc_info=True)
            with contextlib.suppress(Exception):
                export.daemon.disconnect("internal error")
            self._paused[export.export_id] = time.monotonic() + PAUSE_AFTER_ERROR

    def _reap(self) -> None:
        """Close the exports block-export-del asked to remove, then report them gone."""
        with self._lock:
            going = [e for e in self._exports.values() if e.shutting_down]
        for export in going:
            if not export.close(report=self._running):
                self.failed_close = True
            with self._lock:
                self._exports.pop(export.export_id, None)
            log.log(logging.INFO if self._running else logging.DEBUG, "export %s deleted",
                    export.export_id)
            try:
                self.on_deleted(export.export_id)
            except Exception:
                log.exception("export %s: reporting its deletion failed", export.export_id)

    def close_all(self) -> None:
        """Close every export (server exit); idempotent."""
        for export in self.exports():
            export.begin_shutdown()
        self._reap()

    def close(self) -> None:
        """Close the loop's pipes (after serve_forever returned, or instead of it)."""
        self.close_all()
        for fd in (self._stop_r, self._stop_w, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _check_files(spec: NodeSpec) -> None:
    """Every ``file`` node's file can be opened for reading, in QEMU's words if not, and every
    ``python`` node's class can be imported (the node opens when an export asks; these are the
    errors a user expects from blockdev-add itself, as QSD gives them)."""
    if spec.driver == "python":
        try:
            load_class(str(spec.options["module"]), str(spec.options["class"]))
        except StorageError as exc:
            raise generic_error(str(exc)) from None
    if spec.driver == "file":
        filename = str(spec.options.get("filename", ""))
        try:
            fd = os.open(filename, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise generic_error(f"Could not open '{filename}': {exc.strerror}") from None
        os.close(fd)
    for child in spec.children.values():
        _check_files(child)


#: Drivers whose node has its child's virtual size (filters and raw over a file).
_SIZE_PRESERVING = frozenset({"throttle", "delay", "error", "log", "raw"})


#: block-export-add's members as QAPI types them.
_QMP_TYPES: tuple[tuple[str, type, str], ...] = (
    ("type", str, "string"), ("id", str, "string"), ("node-name", str, "string"),
    ("writable", bool, "boolean"), ("num-queues", int, "integer"),
    ("logical-block-size", int, "integer"), ("addr.type", str, "string"),
    ("addr.path", str, "string"), ("addr.str", str, "string"),
)


def add_from_qmp(exports: ExportSet, args: dict[str, Any]) -> None:
    """``block-export-add``: BlockExportOptions -> an export, errors as QSD words them.

    QMP's arguments are typed JSON: ``"writable": "on"`` is a type error there, where the
    command line's keyval takes it (QAPI's wording)."""
    for key, kind, name in _QMP_TYPES:
        value = args.get(key)
        if key.startswith("addr."):
            addr = args.get("addr")
            value = addr.get(key[5:]) if isinstance(addr, dict) else None
        if value is not None and (not isinstance(value, kind) or
                                  (kind is int and isinstance(value, bool))):
            raise generic_error(f"Invalid parameter type for '{key}', expected: {name}")
    if "addr" in args and not isinstance(args["addr"], dict):
        raise generic_error("Invalid parameter type for 'addr', expected: object")
    try:
        opts = export_from_dict(dict(args), MAX_QUEUES)
    except NodeError as exc:
        raise generic_error(str(exc)) from None
    try:
        exports.add(opts)
    except ExportError as exc:
        raise QmpError("GenericError", str(exc)) from None
