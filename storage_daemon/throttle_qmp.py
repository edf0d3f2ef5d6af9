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

Throttle groups are one object type of the server's
:class:`~storage_daemon.objects.ObjectRegistry` (:func:`register_type`): ``--object`` and
``object-add``/``object-del``/``qom-get``/``qom-set`` reach them through it, and each group lives
in the :class:`~blockdev.nodes.BlockGraph` whose ``throttle`` nodes name it (its ``groups``: the
ExportSet's graph, so every export of the server may share one group's budget).
:func:`register` adds the throttled time to query-blockstats.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from blockdev.nodes import BlockGraph
from blockdev.storage import Storage
from blockdev.throttle import ThrottleError, ThrottleGroup
from blockdev.throttle_filter import ThrottleStorage
from storage_daemon.commands import Commands
from storage_daemon.exports import ExportSet
from storage_daemon.objects import ObjectRegistry
from storage_daemon.qmp_protocol import generic_error

log = logging.getLogger(__name__)

METRIC = "vhost_user_blk_throttled_seconds"


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


class ThrottleGroupObject:
    """One ``throttle-group`` object of the registry: the group in ``graph.groups``."""

    def __init__(self, graph: BlockGraph, group_id: str, props: dict[str, Any], *,
                 text: bool) -> None:
        """``props``: object-add's (JSON numbers) or, ``text``, --object's (ASCII digits)."""
        if not text:
            limits = props.get("limits")
            _numbers_only(limits if isinstance(limits, dict) else {}, "")
            _numbers_only({k: v for k, v in props.items() if k != "limits"}, "")
        self.graph = graph
        self.group_id = group_id
        try:
            group = graph.groups.add(group_id, props)
        except ThrottleError as exc:
            raise generic_error(str(exc)) from None
        log.info("throttle group %s added: %s", group_id,
                 {k: v for k, v in group.limits().items() if v > 1})

    def _group(self) -> ThrottleGroup:
        group = self.graph.groups.get(self.group_id)
        assert group is not None  # removed only by close(), after which the registry forgets us
        return group

    def get(self, prop: str) -> Any:
        if prop != "limits":
            raise generic_error(f"Property 'throttle-group.{prop}' not found")
        return self._group().limits()

    def set(self, prop: str, value: Any) -> None:
        self.get(prop)
        if not isinstance(value, dict):
            raise generic_error("Invalid parameter type for 'limits', expected: object")
        _numbers_only(value, "")
        group = self._group()
        try:
            group.set_limits(value)
        except ThrottleError as exc:
            raise generic_error(str(exc)) from None
        log.info("throttle group %s: limits now %s", self.group_id,
                 {k: v for k, v in group.limits().items() if v > 1})

    def close(self) -> None:
        """object-del: refused (QmpError, the registry keeps the object) while a node of the
        graph names the group or an open throttle filter uses it."""
        try:
            self.graph.groups.delete(self.group_id, self.graph.group_in_use(self.group_id))
        except ThrottleError as exc:
            raise generic_error(str(exc)) from None
        log.info("throttle group %s deleted", self.group_id)


class _ThrottleGroupType:
    """The ``throttle-group`` factory of one registry, bound to the graph of its nodes."""

    def __init__(self, graph: BlockGraph) -> None:
        self.graph = graph

    def __call__(self, object_id: str, props: dict[str, Any]) -> ThrottleGroupObject:
        return ThrottleGroupObject(self.graph, object_id, props, text=False)

    def from_text(self, object_id: str, props: dict[str, Any]) -> ThrottleGroupObject:
        return ThrottleGroupObject(self.graph, object_id, props, text=True)


def register_type(objects: ObjectRegistry, graph: BlockGraph) -> None:
    """Make ``throttle-group`` a type of ``objects``, its groups in ``graph``."""
    objects.register_type("throttle-group", _ThrottleGroupType(graph))


def export_storages(exports: ExportSet) -> list[Storage]:
    """The storage each export serves (the metrics' ThrottleCollector walks them)."""
    return [e.device.storage for e in exports.exports()]


def register(commands: Commands, exports: ExportSet) -> None:
    """Add each exported node's throttled time to query-blockstats."""
    blockstats = commands.handler("query-blockstats")

    def with_throttled_time(args: dict[str, Any]) -> Any:
        entries = blockstats(args)
        by_node = {e.node_name: e.device.storage for e in exports.exports()}
        for entry in entries:
            nodes = throttle_nodes(by_node.get(entry.get("node-name", "")))
            if nodes:
                entry["stats"]["x-throttled-time-ns"] = sum(n.throttled_ns for n in nodes)
        return entries

    commands.register("query-blockstats", with_throttled_time,
                      commands.params("query-blockstats"))


class ThrottleCollector(Collector):
    """``vhost_user_blk_throttled_seconds_total{node,group}``: time requests were held."""

    def __init__(self, storages: Callable[[], list[Storage]]) -> None:
        self.storages = storages

    def collect(self) -> Iterator[Metric]:
        held = CounterMetricFamily(METRIC, "Time requests spent held by a throttle filter",
                                   labels=["node", "group"])
        seen: set[int] = set()
        for storage in self.storages():
            for node in throttle_nodes(storage):
                if id(node) not in seen:
                    seen.add(id(node))
                    held.add_metric([node.name, node.group.name], node.throttled_ns / 1e9)
        yield held
