"""qemu-storage-daemon's ``--blockdev`` / ``--export`` options, for the one export served.

``vhost-user-blk --blockdev driver=file,node-name=d,filename=IMG --export
type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=SOCK,writable=on`` serves what
``--socket SOCK --image IMG`` serves; the nodes are :mod:`blockdev.nodes`'s.  The export's keys
are QSD's: ``type`` (``vhost-user-blk``), ``id``, ``node-name``, ``addr.type`` (``unix`` with
``addr.path``, ``fd`` with ``addr.str``: an inherited listening socket's number), ``writable``
(default off, as in QSD), ``num-queues`` (default 1), ``logical-block-size`` (512 or 4096).
``--object throttle-group,id=G,limits.iops-total=N,...`` (or QSD's ``x-iops-total=N``) declares
a throttle group for ``driver=throttle`` nodes (:mod:`blockdev.throttle`).
One export per server so far.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from blockdev import keyval
from blockdev.nodes import NODE_NAME, BlockGraph, NodeError, opt_bool, opt_enum, opt_int, opt_str
from blockdev.storage import Storage
from blockdev.throttle import ThrottleError


class UsageError(ValueError):
    """A wrong option; the message is one line for the user (exit status 2)."""


@dataclass(frozen=True)
class ExportOptions:
    export_id: str
    node_name: str
    socket: str | None
    fd: int | None
    writable: bool
    num_queues: int
    logical_block_size: int


def parse_export(text: str, max_queues: int) -> ExportOptions:
    """The ``--export`` option's value (KEY=VALUE,... or JSON)."""
    try:
        opts: dict[str, Any] = _flat(keyval.parse_option(text, implied_key="type"))
        kind = opt_str(opts, "type", required=True)
        if kind != "vhost-user-blk":
            raise NodeError(f"Parameter 'type' does not accept value '{kind}' (this server "
                            "exports vhost-user-blk)")
        export_id = opt_str(opts, "id", required=True)
        node = opt_str(opts, "node-name", required=True)
        assert export_id is not None and node is not None
        for what, name in (("id", export_id), ("node-name", node)):
            if not NODE_NAME.fullmatch(name):
                raise NodeError(f"Invalid {what}: '{name}'")
        addr = opt_enum(opts, "addr.type", ("unix", "fd"), "")
        socket: str | None = None
        fd: int | None = None
        if addr == "unix":
            socket = opt_str(opts, "addr.path", required=True)
        elif addr == "fd":
            fd = opt_int(opts, "addr.str", 0, 1 << 30)
            if fd is None:
                raise NodeError("Parameter 'addr.str' is missing")
        else:
            raise NodeError("Parameter 'addr.type' is missing")
        writable = opt_bool(opts, "writable", False)
        queues = opt_int(opts, "num-queues", 1, max_queues) or 1
        lbs = opt_int(opts, "logical-block-size", 512, 4096) or 512
        if lbs not in (512, 4096):
            raise NodeError("Parameter 'logical-block-size' must be 512 or 4096 here")
        if opts:
            raise NodeError(f"Parameter '{sorted(opts)[0]}' is unexpected")
    except (keyval.KeyvalError, NodeError) as exc:
        raise UsageError(f"--export {text}: {exc}") from None
    return ExportOptions(export_id, node, socket, fd, writable, queues, lbs)


def _flat(opts: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in opts.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def declare_object(graph: BlockGraph, text: str) -> None:
    """One ``--object`` (QSD's syntax; ``throttle-group`` is the type served) into ``graph``."""
    try:
        opts: dict[str, Any] = _flat(keyval.parse_option(text, implied_key="qom-type"))
        kind = opt_str(opts, "qom-type", required=True)
        if kind != "throttle-group":
            raise NodeError(f"Parameter 'qom-type' does not accept value '{kind}'")
        object_id = opt_str(opts, "id", required=True)
        assert object_id is not None
        graph.groups.add(object_id, opts)
    except (keyval.KeyvalError, NodeError, ThrottleError) as exc:
        raise UsageError(f"--object {text}: {exc}") from None


def declare(blockdevs: Sequence[str], exports: Sequence[str],
            max_queues: int, objects: Sequence[str] = ()) -> tuple[BlockGraph, ExportOptions]:
    """Check every ``--object``, ``--blockdev`` and the ``--export`` (nothing is opened yet;
    objects first, as QSD creates them first: a throttle node names its group)."""
    if len(exports) > 1:
        raise UsageError("only one export per server so far")
    if not exports:
        raise UsageError("--blockdev needs an --export to serve")
    graph = BlockGraph()
    for text in objects:
        declare_object(graph, text)
    for text in blockdevs:
        try:
            graph.add(keyval.parse_option(text))
        except (keyval.KeyvalError, NodeError) as exc:
            raise UsageError(f"--blockdev {text}: {exc}") from None
    export = parse_export(exports[0], max_queues)
    if export.node_name not in graph.nodes:
        raise UsageError(f"--export {exports[0]}: Cannot find device='' nor "
                         f"node-name='{export.node_name}'")
    return graph, export


def open_export(graph: BlockGraph, export: ExportOptions, io_threads: int) -> Storage:
    """Open the exported node (StorageError, one line, where it cannot be)."""
    return graph.open(export.node_name, writable=export.writable,
                      logical_block_size=export.logical_block_size, io_threads=io_threads)
