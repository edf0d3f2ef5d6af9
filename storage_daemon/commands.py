"""The QMP commands this server answers, as a function of (name, arguments) -> return value.

Argument checking follows QEMU's QAPI visitor, wording included, so scripts written against
qemu-storage-daemon see the same errors: an unknown command is ``CommandNotFound``, a missing,
unexpected or mistyped argument is ``GenericError``.  The commands act on the server's exports:
an :class:`~storage_daemon.exports.ExportSet` (nodes and exports added and removed at run time)
or a single :class:`Export` (the queries, resize and quit only); objects go to an
:class:`~storage_daemon.objects.ObjectRegistry`.  Nothing here touches a socket.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from storage_daemon.objects import ObjectRegistry
from storage_daemon.qmp_protocol import QmpError, generic_error

if TYPE_CHECKING:
    from storage_daemon.exports import ExportSet

log = logging.getLogger(__name__)


class Export(Protocol):
    """What the commands need of the exported disk (see :mod:`.export`)."""

    export_id: str
    node_name: str

    @property
    def shutting_down(self) -> bool: ...

    def resize(self, size: int) -> None: ...

    def blockstats(self) -> dict[str, Any]: ...


#: BlockExportRemoveMode.
_REMOVE_MODES = ("safe", "hard")


#: Argument types as QAPI names them in errors.
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "str": (str,), "bool": (bool,),
                                       "any": (object,)}
_TYPE_NAMES = {"int": "integer", "str": "string", "bool": "boolean", "any": "any"}
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    required: bool = True


def check_arguments(args: dict[str, Any], params: tuple[Param, ...]) -> None:
    """QAPI's checks: every required parameter present, none unknown, each of its type."""
    known = {p.name: p for p in params}
    for key in args:
        if key not in known:
            raise generic_error(f"Parameter '{key}' is unexpected")
    for p in params:
        if p.name not in args:
            if p.required:
                raise generic_error(f"Parameter '{p.name}' is missing")
            continue
        value = args[p.name]
        ok = isinstance(value, _TYPES[p.type])
        if p.type == "int":
            # JSON true is not an integer; QAPI's int is int64 (QEMU parses a larger number as
            # a float, which is then not an integer either).
            ok = ok and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX
        if not ok:
            raise generic_error(f"Invalid parameter type for '{p.name}', expected: "
                                f"{_TYPE_NAMES[p.type]}")


class Commands:
    """The command table: ``commands(name, args)`` runs one (QmpSession's ``execute``)."""

    def __init__(self, exports: Export | ExportSet, version: dict[str, Any],
                 quit: Callable[[], None],
                 queue_states: Callable[[], list[dict[str, Any]]] | None = None,
                 objects: ObjectRegistry | None = None) -> None:
        from storage_daemon.exports import ExportSet

        self.server: ExportSet | None = exports if isinstance(exports, ExportSet) else None
        self._single: Export | None = None if self.server is not None else exports  # type: ignore[assignment]
        self.objects = objects if objects is not None else ObjectRegistry()
        self.version = version
        self._quit = quit
        Table = dict[str, tuple[Callable[[dict[str, Any]], Any], tuple[Param, ...] | None]]
        self._table: Table = {
            "query-version": (self._query_version, ()),
            "query-commands": (self._query_commands, ()),
            "query-block-exports": (self._query_block_exports, ()),
            "query-blockstats": (self._query_blockstats, (Param("query-nodes", "bool", False),)),
            "block_resize": (self._block_resize, (
                Param("device", "str", False), Param("node-name", "str", False),
                Param("size", "int"),
            )),
            "quit": (self._quit_cmd, ()),
        }
        if self.server is not None:
            # None: the arguments are a union QAPI checks by its own members (the node's or
            # export's options), judged by the layer that owns them.
            self._table.update({
                "blockdev-add": (self._blockdev_add, None),
                "blockdev-del": (self._blockdev_del, (Param("node-name", "str"),)),
                "block-export-add": (self._block_export_add, None),
                "block-export-del": (self._block_export_del, (
                    Param("id", "str"), Param("mode", "str", False))),
                "query-named-block-nodes": (self._query_named_block_nodes, (
                    Param("flat", "bool", False),)),
            })
        self._table.update({
            "object-add": (self._object_add, None),
            "object-del": (self._object_del, (Param("id", "str"),)),
            "qom-get": (self._qom_get, (Param("path", "str"), Param("property", "str"))),
            "qom-set": (self._qom_set, None),
        })
        if queue_states is not None:
            # Read-only diagnostics (see _x_query_vhost_queues); "x-": not a stable interface.
            self._table["x-query-vhost-queues"] = (lambda _args: queue_states(), ())

    def register(self, name: str, func: Callable[[dict[str, Any]], Any],
                 params: tuple[Param, ...] | None) -> None:
        """Add (or replace) command ``name``; ``params`` None: ``func`` checks its arguments
        itself (object-add, whose arguments depend on ``qom-type``)."""
        self._table[name] = (func, params)

    def handler(self, name: str) -> Callable[[dict[str, Any]], Any]:
        return self._table[name][0]

    def params(self, name: str) -> tuple[Param, ...] | None:
        return self._table[name][1]

    @property
    def names(self) -> list[str]:
        return ["qmp_capabilities", *self._table]

    def __call__(self, name: str, args: dict[str, Any]) -> Any:
        entry = self._table.get(name)
        if entry is None:
            raise QmpError("CommandNotFound", f"The command {name} has not been found")
        func, params = entry
        if params is not None:
            check_arguments(args, params)
        return func(args)

    def _exports(self) -> list[Export]:
        if self.server is not None:
            return list(self.server.exports())
        assert self._single is not None
        return [self._single]

    # ------------------------------------------------------------------ the commands
    def _query_version(self, args: dict[str, Any]) -> Any:
        return self.version

    def _query_commands(self, args: dict[str, Any]) -> Any:
        return [{"name": name} for name in self.names]

    def _query_block_exports(self, args: dict[str, Any]) -> Any:
        return [{"type": "vhost-user-blk", "id": e.export_id, "node-name": e.node_name,
                 "shutting-down": e.shutting_down} for e in self._exports()]

    def _query_blockstats(self, args: dict[str, Any]) -> Any:
        """Per exported node (``device`` is empty: exports' backends have no name, as in
        QSD); with ``query-nodes`` every named node, those not exported with zero counts."""
        exported = {e.node_name: e for e in self._exports()}
        if not args.get("query-nodes") or self.server is None:
            return [{"device": "", "node-name": e.node_name, "stats": e.blockstats()}
                    for e in exported.values()]
        from storage_daemon.export import zero_blockstats

        out = []
        for node in self.server.nodes():
            e = exported.get(node.name)
            out.append({"node-name": node.name,
                        "stats": e.blockstats() if e is not None else zero_blockstats()})
        return out

    def _block_resize(self, args: dict[str, Any]) -> Any:
        device, node = args.get("device"), args.get("node-name")
        target = None
        if device is None and node is not None:
            target = next((e for e in self._exports() if e.node_name == node), None)
        if target is None:
            if (device is None and node is not None and self.server is not None
                    and node in self.server.graph.nodes):
                raise generic_error(f"node '{node}' is not exported: this server opens a "
                                    "node only for its export, so only exported nodes resize")
            # The export's BlockBackend has no name (as in QSD): nodes are found by node-name.
            raise generic_error(f"Cannot find device='{device or ''}' nor "
                                f"node-name='{node or ''}'")
        size = args["size"]
        if size < 0:
            raise generic_error("Parameter 'size' expects a >0 size")
        target.resize(size)
        return {}

    # x-query-vhost-queues: each queue's ring state as this server sees it (enabled, the last
    # avail index it took, the used index it published, requests in flight, and the avail/used
    # indices in guest memory) -- what a failed migration test prints next to QEMU's own
    # x-query-virtio-queue-element.  Reads only; a queue process that does not answer within
    # 1 s makes it a GenericError, never a hang (BlockExport.queue_states).

    def _quit_cmd(self, args: dict[str, Any]) -> Any:
        log.info("quit requested over QMP")
        self._quit()
        return {}

    # ------------------------------------------------------------------ nodes and exports
    def _blockdev_add(self, args: dict[str, Any]) -> Any:
        assert self.server is not None
        if "node-name" not in args:  # QSD: a node added over QMP must be named
            raise generic_error("'node-name' must be specified for the root node")
        self.server.blockdev_add(args)
        return {}

    def _blockdev_del(self, args: dict[str, Any]) -> Any:
        assert self.server is not None
        self.server.blockdev_del(args["node-name"])
        return {}

    def _block_export_add(self, args: dict[str, Any]) -> Any:
        from storage_daemon.exports import add_from_qmp

        assert self.server is not None
        add_from_qmp(self.server, args)
        return {}

    def _block_export_del(self, args: dict[str, Any]) -> Any:
        assert self.server is not None
        mode = args.get("mode", "safe")
        if mode not in _REMOVE_MODES:
            raise generic_error(f"Parameter 'mode' does not accept value '{mode}'")
        self.server.delete(args["id"], mode)
        return {}

    def _query_named_block_nodes(self, args: dict[str, Any]) -> Any:
        """QSD's BlockDeviceInfo, the members this server knows (I/O limits are throttle
        nodes' business here, so the legacy bps/iops fields are 0 as on a node without)."""
        assert self.server is not None
        out = []
        for node in self.server.nodes():
            export = self.server.export_of(node.name)
            size = (export.device.storage.info.size if export is not None
                    else self.server.declared_size(node))
            leaf = node
            while "file" in leaf.children and "filename" not in leaf.options:
                leaf = leaf.children["file"]
            filename = str(leaf.options.get("filename", ""))
            direct = str(leaf.options.get("cache.direct", "off")) in ("on", "true", "True")
            info: dict[str, Any] = {
                "node-name": node.name, "drv": node.driver, "ro": node.read_only,
                "file": filename, "encrypted": False, "detect_zeroes": "off",
                "backing_file_depth": 0, "write_threshold": 0,
                "cache": {"writeback": True, "direct": direct, "no-flush": False},
                "image": {"filename": filename, "format": node.driver, "virtual-size": size,
                          "dirty-flag": False},
            }
            for key in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"):
                info[key] = 0
            out.append(info)
        return out

    # ------------------------------------------------------------------ QOM objects
    def _object_add(self, args: dict[str, Any]) -> Any:
        props = dict(args)
        qom_type, object_id = props.pop("qom-type", None), props.pop("id", None)
        if not isinstance(qom_type, str):
            raise generic_error("Parameter 'qom-type' is missing" if qom_type is None else
                                "Invalid parameter type for 'qom-type', expected: string")
        if not isinstance(object_id, str):
            raise generic_error("Parameter 'id' is missing" if object_id is None else
                                "Invalid parameter type for 'id', expected: string")
        self.objects.add(qom_type, object_id, props)
        return {}

    def _object_del(self, args: dict[str, Any]) -> Any:
        self.objects.delete(args["id"])
        return {}

    def _qom_get(self, args: dict[str, Any]) -> Any:
        return self.objects.get(args["path"], args["property"])

    def _qom_set(self, args: dict[str, Any]) -> Any:
        check_arguments({k: v for k, v in args.items() if k != "value"},
                        (Param("path", "str"), Param("property", "str")))
        if "value" not in args:
            raise generic_error("Parameter 'value' is missing")
        self.objects.set(args["path"], args["property"], args["value"])
        return {}
