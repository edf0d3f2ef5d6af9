"""qemu-storage-daemon's ``--blockdev`` / ``--export`` options, for the one export served.

``vhost-user-blk --blockdev driver=file,node-name=d,filename=IMG --export
type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=SOCK,writable=on`` serves what
``--socket SOCK --image IMG`` serves; the nodes are :mod:`blockdev.nodes`'s.  The export's keys
are QSD's: ``type`` (``vhost-user-blk``), ``id``, ``node-name``, ``addr.type`` (``unix`` with
``addr.path``, ``fd`` with ``addr.str``: an inherited listening socket's number), ``writable``
(default off, as in QSD), ``num-queues`` (default 1), ``logical-block-size`` (512 or 4096).
Any number of exports per server (each its own socket); ``block-export-add`` over QMP takes the
same keys as a JSON object (:func:`export_from_dict`).  ``--chardev socket,...`` and
``--monitor chardev=ID`` (:func:`parse_monitors`) name the QMP sockets as QSD's do.
``--object`` (throttle groups) goes to :class:`storage_daemon.objects.ObjectRegistry`, before
:func:`declare`, into the graph it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from blockdev import keyval
from blockdev.nodes import NODE_NAME, BlockGraph, NodeError, opt_bool, opt_enum, opt_int, opt_str
from blockdev.storage import Storage


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
    """The ``--export`` option's value (KEY=VALUE,... or JSON); UsageError if wrong."""
    try:
        return export_from_dict(keyval.parse_option(text, implied_key="type"), max_queues)
    except (keyval.KeyvalError, NodeError) as exc:
        raise UsageError(f"--export {text}: {exc}") from None


def export_from_dict(options: Any, max_queues: int) -> ExportOptions:
    """An export's options as a dict (parsed ``--export``, or block-export-add's arguments);
    NodeError (one line, QEMU's wording where it has one) for anything wrong."""
    if not isinstance(options, dict):
        raise NodeError("export options must be an object")
    opts: dict[str, Any] = _flat(options)
    kind = opt_str(opts, "type", required=True)
    if kind != "vhost-user-blk":
        raise NodeError(f"Parameter 'type' does not accept value '{kind}'")
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
    return ExportOptions(export_id, node, socket, fd, writable, queues, lbs)


def _flat(opts: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in opts.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def declare(blockdevs: Sequence[str], exports: Sequence[str],
            max_queues: int, graph: BlockGraph | None = None
            ) -> tuple[BlockGraph, list[ExportOptions]]:
    """Check every ``--blockdev`` and ``--export`` (nothing is opened yet) into ``graph``
    (new if None): the caller's, when ``--object`` has put throttle groups in it already --
    QSD creates objects first, and a throttle node names its group."""
    graph = BlockGraph() if graph is None else graph
    for text in blockdevs:
        try:
            graph.add(keyval.parse_option(text))
        except (keyval.KeyvalError, NodeError) as exc:
            raise UsageError(f"--blockdev {text}: {exc}") from None
    out: list[ExportOptions] = []
    for text in exports:
        export = parse_export(text, max_queues)
        if export.node_name not in graph.nodes:
            raise UsageError(f"--export {text}: Cannot find device='' nor "
                             f"node-name='{export.node_name}'")
        if any(e.export_id == export.export_id for e in out):
            raise UsageError(f"--export {text}: Block export id '{export.export_id}' is "
                             "already in use")
        for e in out:
            where = export.socket or export.fd
            if where is not None and where == (e.socket or e.fd):
                raise UsageError(f"--export {text}: exports '{e.export_id}' and "
                                 f"'{export.export_id}' listen on the same address")
        out.append(export)
    return graph, out


@dataclass(frozen=True)
class Monitor:
    """A QMP monitor: ``--chardev socket,id=ID,path=P,server=on,wait=off`` + ``--monitor
    chardev=ID``."""

    chardev: str
    path: str


def parse_monitors(chardevs: Sequence[str], monitors: Sequence[str]) -> list[Monitor]:
    """The QMP sockets QSD's way; UsageError (one line, QEMU's wording) for anything wrong.

    Only what a monitor needs is accepted: a Unix socket chardev that listens
    (``server=on``) without waiting for a client (``wait=off``, QSD's default under
    --daemonize; ``wait=on`` would block start-up until a client connects, which this server
    does not do, so it is refused rather than ignored).
    """
    paths: dict[str, str] = {}
    for text in chardevs:
        try:
            opts = _flat(keyval.parse_option(text, implied_key="backend"))
            backend = opt_str(opts, "backend", required=True)
            if backend != "socket":
                raise NodeError(f"chardev backend '{backend}' is not supported here (only "
                                "'socket', for QMP)")
            cid = opt_str(opts, "id", required=True)
            assert cid is not None
            if not NODE_NAME.fullmatch(cid):
                raise NodeError(f"Invalid id: '{cid}'")
            if cid in paths:
                raise NodeError(f"attempt to add duplicate property '{cid}' to object "
                                "(type 'container')")
            path = opt_str(opts, "path")
            if path is None:
                raise NodeError("chardev: socket: only unix sockets (path=) are supported")
            if not opt_bool(opts, "server", False):
                raise NodeError("chardev: socket: only server=on is supported")
            if opt_bool(opts, "wait", True):
                raise NodeError("chardev: socket: wait=on is not supported; give wait=off")
            if opts:
                raise NodeError(f"Parameter '{sorted(opts)[0]}' is unexpected")
        except (keyval.KeyvalError, NodeError) as exc:
            raise UsageError(f"--chardev {text}: {exc}") from None
        paths[cid] = path
    out: list[Monitor] = []
    for text in monitors:
        try:
            opts = _flat(keyval.parse_option(text, implied_key="chardev"))
            cid = opt_str(opts, "chardev", required=True)
            assert cid is not None
            if opt_enum(opts, "mode", ("control", "readline"), "control") != "control":
                raise NodeError("Only QMP is supported")  # QSD's own refusal of readline
            opt_bool(opts, "pretty", False)
            opt_str(opts, "id")
            if opts:
                raise NodeError(f"Parameter '{sorted(opts)[0]}' is unexpected")
            if cid not in paths:
                raise NodeError(f"chardev \"{cid}\" not found")
            if any(m.chardev == cid for m in out):
                raise NodeError(f"chardev \"{cid}\" is already used by another monitor")
        except (keyval.KeyvalError, NodeError) as exc:
            raise UsageError(f"--monitor {text}: {exc}") from None
        out.append(Monitor(cid, paths[cid]))
    return out


def open_export(graph: BlockGraph, export: ExportOptions, io_threads: int) -> Storage:
    """Open the exported node (StorageError, one line, where it cannot be)."""
    return graph.open(export.node_name, writable=export.writable,
                      logical_block_size=export.logical_block_size, io_threads=io_threads)
