"""Throttle groups over QMP and in the metrics: QSD's ``object-add``/``object-del`` of a
``throttle-group``, ``qom-get``/``qom-set`` of its ``limits``, and the time requests were held.

* ``object-add {"qom-type": "throttle-group", "id": G, "limits": {...}}`` (or QSD's flat
  ``x-iops-total``-style properties); ``object-del {"id": G}`` is refused while a node names G
  ("object 'G' is in use, can not be deleted", QEMU's words).
* ``qom-get {"path": G or "/objects/G", "property": "limits"}``: every ThrottleLimits member;
  ``qom-set`` of ``limits`` changes the members given (the others stay), effective within
  :data:`blockdev.throttle_filter.RECHECK` for requests already held, at once for the rest.
* ``query-blockstats``: a throttled node's entry gets ``x-throttled-time-ns`` in its stats
  (QEMU has no such member; ``x-``: this server's extension), the nanoseconds its requests
  were held; the metrics get ``vhost_user_blk_throttled_seconds_total`` per node and group.

The commands act on the server's :class:`~blockdev.nodes.BlockGraph` (its ``groups``) and
are added to the command table by :func:`register`, so the table itself knows nothing of
throttling.  (A registry of QOM objects shared with other object types would take these
handlers as they are; none is on the main branch yet, so this module keeps its own.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from blockdev.nodes import BlockGraph
from blockdev.storage import Storage
from blockdev.throttle import ThrottleError
from blockdev.throttle_filter import ThrottleStorage
from storage_daemon.commands import Commands, Param
from storage_daemon.qmp_protocol import QmpError, generic_error

log = logging.getLogger(__name__)

METRIC = "vhost_user_blk_throttled_seconds"
OBJECTS = "/objects/"


def throttle_nodes(storage: Storage | None) -> list[ThrottleStorage]:
    """The throttle filters in ``storage``'s chain (the exported node and its children)."""
    found: list[ThrottleStorage] = []
    seen: set[int] = set()
    while storage is not None and id(storage) not in seen:
        seen.add(id(storage))
        if isinstance(storage, ThrottleStorage):
            found.append(storage)
        storage = getattr(storage, "child", None)
    return found


def _numbers_only(limits: dict[str, Any], prefix: str) -> None:
    """QMP's visitor: a limit is a JSON integer (text is the command line's form only)."""
    for key, value in limits.items():
        if isinstance(value, str):
            raise generic_error(f"Invalid parameter type for '{prefix}{key}', expected: "
                                "integer")


class ThrottleCommands:
    """The handlers; ``storage()`` gives the exported storage (for its throttled time)."""

    def __init__(self, graph: BlockGraph, storage: Callable[[], Storage | None]) -> None:
        self.graph = graph
        self.storage = storage

    def object_add(self, args: dict[str, Any]) -> Any:
        opts = dict(args)
        kind = opts.pop("qom-type", None)
        if kind is None:
            raise generic_error("Parameter 'qom-type' is missing")
        group_id = opts.pop("id", None)
        if group_id is None:
            raise generic_error("Parameter 'id' is missing")
        if not isinstance(kind, str) or not isinstance(group_id, str):
            raise generic_error("Invalid parameter type for 'qom-type', expected: string"
                                if not isinstance(kind, str) else
                                "Invalid parameter type for 'id', expected: string")
        if kind != "throttle-group":
            raise generic_error(f"Parameter 'qom-type' does not accept value '{kind}'")
        limits = opts.get("limits")
        _numbers_only(limits if isinstance(limits, dict) else {}, "")
        _numbers_only({k: v for k, v in opts.items() if k != "limits"}, "")
        try:
            self.graph.groups.add(group_id, opts)
        except ThrottleError as exc:
            raise generic_error(str(exc)) from None
        log.info("throttle group %s added: %s", group_id,
                 {k: v for k, v in self.graph.groups.groups[group_id].limits().items() if v > 1})
        return {}

    def object_del(self, args: dict[str, Any]) -> Any:
        group_id = args["id"]
        try:
            self.graph.groups.delete(group_id, self.graph.group_in_use(group_id))
        except ThrottleError as exc:
            raise generic_error(str(exc)) from None
        log.info("throttle group %s deleted", group_id)
        return {}

    def _group_property(self, args: dict[str, Any]) -> Any:
        path, prop = args["path"], args["property"]
        name = path.removeprefix(OBJECTS)
        group = self.graph.groups.get(name)
        if group is None:
            raise QmpError("DeviceNotFound", f"Device '{path}' not found")
        if prop != "limits":
            raise generic_error(f"Property 'throttle-group.{prop}' not found")
        return group

    def qom_get(self, args: dict[str, Any]) -> Any:
        return self._group_property(args).limits()

    def qom_set(self, args: dict[str, Any]) -> Any:
        group = self._group_property(args)
        value = args["value"]
        if not isinstance(value, dict):
            raise generic_error("Invalid parameter type for 'limits', expected: object")
        _numbers_only(value, "")
        try:
            group.set_limits(value)
        except ThrottleError as exc:
            raise generic_error(str(exc)) from None
        log.info("throttle group %s: limits now %s", group.name,
                 {k: v for k, v in group.limits().items() if v > 1})
        return {}

    def add_throttled_time(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        nodes = throttle_nodes(self.storage())
        if nodes:
            held = sum(node.throttled_ns for node in nodes)
            for entry in entries:
                entry["stats"]["x-throttled-time-ns"] = held
        return entries


def register(commands: Commands, graph: BlockGraph,
             storage: Callable[[], Storage | None]) -> ThrottleCommands:
    """Add the throttle-group commands to ``commands`` (and throttled time to
    query-blockstats)."""
    handlers = ThrottleCommands(graph, storage)
    commands.register("object-add", handlers.object_add, None)
    commands.register("object-del", handlers.object_del, (Param("id", "str"),))
    commands.register("qom-get", handlers.qom_get,
                      (Param("path", "str"), Param("property", "str")))
    commands.register("qom-set", handlers.qom_set,
                      (Param("path", "str"), Param("property", "str"), Param("value", "any")))
    blockstats = commands.handler("query-blockstats")
    commands.register("query-blockstats",
                      lambda args: handlers.add_throttled_time(blockstats(args)),
                      commands.params("query-blockstats"))
    return handlers


class ThrottleCollector(Collector):
    """``vhost_user_blk_throttled_seconds_total{node,group}``: time requests were held."""

    def __init__(self, storage: Callable[[], Storage | None]) -> None:
        self.storage = storage

    def collect(self) -> Iterator[Metric]:
        held = CounterMetricFamily(METRIC, "Time requests spent held by a throttle filter",
                                   labels=["node", "group"])
        for node in throttle_nodes(self.storage()):
            held.add_metric([node.name, node.group.name], node.throttled_ns / 1e9)
        yield held
