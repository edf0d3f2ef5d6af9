"""The QMP commands this server answers, as a function of (name, arguments) -> return value.

Argument checking follows QEMU's QAPI visitor, wording included, so scripts written against
qemu-storage-daemon see the same errors: an unknown command is ``CommandNotFound``, a missing,
unexpected or mistyped argument is ``GenericError``.  The commands act on an :class:`Export`
(the one disk this server exports); nothing here touches a socket.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from storage_daemon.qmp_protocol import QmpError, generic_error

log = logging.getLogger(__name__)


class Export(Protocol):
    """What the commands need of the exported disk (see :mod:`.export`)."""

    export_id: str
    node_name: str

    @property
    def shutting_down(self) -> bool: ...

    def resize(self, size: int) -> None: ...

    def blockstats(self) -> dict[str, Any]: ...


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

    def __init__(self, export: Export, version: dict[str, Any],
                 quit: Callable[[], None],
                 queue_states: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.export = export
        self.version = version
        self._quit = quit
        self._table: dict[str, tuple[Callable[[dict[str, Any]], Any],
                                     tuple[Param, ...] | None]] = {
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

    # ------------------------------------------------------------------ the commands
    def _query_version(self, args: dict[str, Any]) -> Any:
        return self.version

    def _query_commands(self, args: dict[str, Any]) -> Any:
        return [{"name": name} for name in self.names]

    def _query_block_exports(self, args: dict[str, Any]) -> Any:
        e = self.export
        return [{"type": "vhost-user-blk", "id": e.export_id, "node-name": e.node_name,
                 "shutting-down": e.shutting_down}]

    def _query_blockstats(self, args: dict[str, Any]) -> Any:
        e = self.export
        return [{"device": "", "node-name": e.node_name, "stats": e.blockstats()}]

    def _block_resize(self, args: dict[str, Any]) -> Any:
        device, node = args.get("device"), args.get("node-name")
        if device is not None or node != self.export.node_name:
            # The export's BlockBackend has no name (as in QSD): nodes are found by node-name.
            raise generic_error(f"Cannot find device='{device or ''}' nor "
                                f"node-name='{node or ''}'")
        size = args["size"]
        if size < 0:
            raise generic_error("Parameter 'size' expects a >0 size")
        self.export.resize(size)
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
