"""Block nodes from ``--blockdev`` options (QEMU's BlockdevOptions, the part this server serves).

A node is declared by its options dict (:mod:`.keyval` or JSON) and checked at once -- driver,
``node-name`` (required, unique, QEMU's spelling rule), every key known to its driver, children
named before use -- so a wrong command line fails before anything is opened.  Opening happens
when an export asks for the node (:meth:`BlockGraph.open`), because only the export knows the
logical block size and whether it writes.

Drivers:

* ``file``: ``filename``, ``cache.direct``, ``aio`` (``threads`` -- QEMU's default -- or
  ``io_uring``; ``native`` means Linux AIO in QEMU, which this server does not have: it maps to
  ``io_uring``, the kernel's native asynchronous interface, and needs ``cache.direct=on`` as in
  QEMU), ``locking`` (``auto``/``on``/``off``: QEMU's lock bytes), ``discard``.
* ``raw``: ``file`` (a raw format over any node is that node).
* ``qcow2``: ``file`` (a ``file`` node), backing files as the image names them
  (``backing=`` another node is not supported).
* ``rbd``: ``pool``, ``image``, ``snapshot``, ``conf``, ``user``.
* ``nbd``: ``server.type`` (``unix`` with ``server.path``, ``inet`` with ``server.host`` and
  ``server.port``), ``export``, ``reconnect-delay``.
* ``python`` (``module``, ``class``, anything else goes to the class) and the short names
  installed plugins register (:mod:`.python.storage`).
* the filters ``delay``, ``error``, ``log`` (:mod:`.filters`), over ``file``; their own
  options are checked when they open (``error-start`` is judged against the child's size).
* ``throttle`` (:mod:`.throttle_filter`): ``throttle-group`` (a group declared before, by
  ``--object throttle-group`` or ``object-add``), ``file``.

Every node also takes ``read-only`` and ``discard`` (``unmap``/``on``: discards go down,
the default here -- as with ``--image`` -- where QEMU's default is ``ignore``; ``ignore``/``off``:
DISCARD is not offered).  A child is a node name defined earlier or nested options (which get
an automatic name, ``#blockN``).  Error messages are QEMU's where QEMU has one.
"""

from __future__ import annotations

import itertools
import logging
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from blockdev.disk import DiskError
from blockdev.engine import EngineUnavailable, choose_engine
from blockdev.filters import FILTERS, FilterError, open_filter
from blockdev.image_lock import ImageLockError, lock_image
from blockdev.images import open_image
from blockdev.python.storage import load_class, load_registered, open_plugin
from blockdev.spec import RbdSpec, SpecError, parse_nbd
from blockdev.storage import FileStorage, Storage, StorageError
from blockdev.throttle import ThrottleError, ThrottleGroups
from blockdev.throttle_filter import ThrottleStorage

log = logging.getLogger(__name__)

NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,30}")
#: Options every node takes.
COMMON = {"driver", "node-name", "read-only", "discard", "auto-read-only", "detect-zeroes",
          "force-share"}
#: The options of each built-in driver (dotted; children are ``file`` / ``backing``).
DRIVER_KEYS: dict[str, set[str]] = {
    "file": {"filename", "cache.direct", "cache.no-flush", "aio", "locking"},
    "raw": {"file"},
    "qcow2": {"file", "backing"},
    "rbd": {"pool", "image", "snapshot", "conf", "user"},
    "nbd": {"server.type", "server.path", "server.host", "server.port", "export",
            "reconnect-delay"},
    "python": {"module", "class"},
}
for _name in FILTERS:
    DRIVER_KEYS[_name] = {"file"}
DRIVER_KEYS["throttle"] = {"file", "throttle-group"}
CHILD_KEYS = ("file", "backing")
#: Longest reconnect-delay accepted (as the short form's --reconnect-delay).
MAX_RECONNECT_DELAY = 24 * 3600


class NodeError(ValueError):
    """The node options are wrong; the message is one line for the user."""


@dataclass
class NodeSpec:
    """A declared node: its checked options and its children, not yet opened."""

    name: str
    driver: str
    options: dict[str, Any]
    children: dict[str, NodeSpec] = field(default_factory=dict)
    read_only: bool = False
    discard: bool = True
    #: A registered plugin class for ``driver`` (entry point), or None.
    plugin_class: type | None = None


# ---------------------------------------------------------------------- option values
def _flatten(opts: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in opts.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and not (not prefix and k in CHILD_KEYS):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def opt_str(opts: dict[str, Any], key: str, required: bool = False) -> str | None:
    value = opts.pop(key, None)
    if value is None:
        if required:
            raise NodeError(f"Parameter '{key}' is missing")
        return None
    if not isinstance(value, str):
        raise NodeError(f"Invalid parameter type for '{key}', expected: string")
    return value


_BOOLS = {"on": True, "yes": True, "true": True, "y": True,
          "off": False, "no": False, "false": False, "n": False}


def opt_bool(opts: dict[str, Any], key: str, default: bool) -> bool:
    value = opts.pop(key, None)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in _BOOLS:
        return _BOOLS[value]
    raise NodeError(f"Parameter '{key}' expects 'on' or 'off'")


def opt_enum(opts: dict[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = opts.pop(key, None)
    if value is None:
        return default
    if value not in choices:
        raise NodeError(f"Parameter '{key}' does not accept value '{value}'")
    return str(value)


def opt_int(opts: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = opts.pop(key, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise NodeError(f"Invalid parameter type for '{key}', expected: integer")
    try:
        number = int(value, 10) if isinstance(value, str) else value
    except ValueError:
        raise NodeError(f"Parameter '{key}' expects an integer") from None
    if not low <= number <= high:
        raise NodeError(f"Parameter '{key}' expects a value from {low} to {high}")
    return number


# ---------------------------------------------------------------------- the graph
class BlockGraph:
    """The nodes of one server, by node name."""

    def __init__(self, groups: ThrottleGroups | None = None) -> None:
        self.nodes: dict[str, NodeSpec] = {}
        self._auto = itertools.count(1)
        #: The throttle-group objects the ``throttle`` nodes name (``--object``).
        self.groups = ThrottleGroups() if groups is None else groups

    def group_in_use(self, group_id: str) -> bool:
        """Whether a declared node names throttle group ``group_id`` (object-del refuses)."""
        return any(spec.driver == "throttle" and spec.options.get("throttle-group") == group_id
                   for spec in self.nodes.values())

    def add(self, options: Mapping[str, Any]) -> NodeSpec:
        """Declare a node (``--blockdev``); NodeError (one line) for anything wrong, and then
        nothing is declared (not even the nested children checked before the error)."""
        before = dict(self.nodes)
        try:
            return self._declare(options, top=True)
        except NodeError:
            self.nodes = before
            raise

    def _declare(self, options: Mapping[str, Any], top: bool) -> NodeSpec:
        if not isinstance(options, Mapping):
            raise NodeError("Invalid parameter type for 'file', expected: object or string")
        opts = _flatten(options)
        driver = opt_str(opts, "driver", required=True)
        assert driver is not None
        name = opt_str(opts, "node-name", required=top)
        if name is None:
            name = f"#block{next(self._auto)}"
        elif not NODE_NAME.fullmatch(name):
            raise NodeError(f"Invalid node-name: '{name}'")
        if name in self.nodes:
            raise NodeError(f"Duplicate nodes with node-name='{name}'")
        plugin_class = None
        if driver not in DRIVER_KEYS:
            plugin_class = _registered(driver)
        spec = NodeSpec(name, driver, {}, plugin_class=plugin_class)
        spec.read_only = opt_bool(opts, "read-only", False)
        spec.discard = opt_enum(opts, "discard", ("ignore", "off", "unmap", "on"),
                                "unmap") in ("unmap", "on")
        opt_bool(opts, "auto-read-only", False)  # accepted; a read-only export opens read-only
        opt_bool(opts, "force-share", False)
        if opt_enum(opts, "detect-zeroes", ("off", "on", "unmap"), "off") != "off":
            raise NodeError("detect-zeroes is not supported (only 'off')")
        if "file" in opts and "file" in DRIVER_KEYS.get(driver, set()):
            spec.children["file"] = self._child(opts.pop("file"))
        if plugin_class is not None or driver == "python":
            self._plugin_options(spec, opts)
        elif driver in FILTERS:
            # The filter's own options are checked when it opens (some, like error-start,
            # are judged against the child's size).
            spec.options["args"] = opts.copy()
            opts.clear()
            self._check(spec)
        else:
            known = DRIVER_KEYS[driver]
            for key in known:
                if key in opts:
                    spec.options[key] = opts.pop(key)
            if opts:
                raise NodeError(f"Parameter '{sorted(opts)[0]}' is unexpected")
            self._check(spec)
        self.nodes[name] = spec
        return spec

    def _child(self, ref: Any) -> NodeSpec:
        if isinstance(ref, str):
            child = self.nodes.get(ref)
            if child is None:
                raise NodeError(f"Cannot find device='' nor node-name='{ref}'")
            return child
        return self._declare(ref, top=False)

    def _plugin_options(self, spec: NodeSpec, opts: dict[str, Any]) -> None:
        if spec.driver == "python":
            module = opt_str(opts, "module", required=True)
            cls = opt_str(opts, "class", required=True)
            assert module is not None and cls is not None
            spec.options["module"], spec.options["class"] = module, cls
        spec.options["args"] = opts.copy()  # checked by the class itself, as strings
        opts.clear()

    def _check(self, spec: NodeSpec) -> None:
        """Driver rules that need no IO: required keys, enums, combinations."""
        o = spec.options
        d = spec.driver
        if d == "file":
            opt_str(dict(o), "filename", required=True)
            direct = opt_bool(dict(o), "cache.direct", False)
            if opt_bool(dict(o), "cache.no-flush", False):
                raise NodeError("cache.no-flush=on is not supported")
            aio = opt_enum(dict(o), "aio", ("threads", "native", "io_uring"), "threads")
            if aio == "native" and not direct:
                raise NodeError("aio=native was specified, but it requires cache.direct=on, "
                                "which was not specified.")
            opt_enum(dict(o), "locking", ("auto", "on", "off"), "auto")
        elif d == "throttle":
            if "file" not in spec.children:
                raise NodeError("Parameter 'file' is missing")
            group = o.get("throttle-group")
            if not group:
                raise NodeError("Parameter 'throttle-group' is missing")
            if not isinstance(group, str):
                raise NodeError("Invalid parameter type for 'throttle-group', expected: string")
            if self.groups.get(group) is None:
                raise NodeError(f"Throttle group '{group}' does not exist")
        elif d in ("raw", "qcow2") or d in FILTERS:
            if "file" not in spec.children:
                raise NodeError("Parameter 'file' is missing")
            if d == "qcow2":
                if spec.children["file"].driver != "file":
                    raise NodeError("qcow2: its 'file' must be a driver=file node")
                if "backing" in o:
                    raise NodeError("qcow2: 'backing' is not supported; the backing file the "
                                    "image names is used")
        elif d == "rbd":
            for key in ("pool", "image"):
                opt_str(dict(o), key, required=True)
            for key in ("snapshot", "conf", "user"):
                opt_str(dict(o), key)
        elif d == "nbd":
            self._nbd_uri(spec)
            opt_int(dict(o), "reconnect-delay", 0, MAX_RECONNECT_DELAY)

    @staticmethod
    def _nbd_uri(spec: NodeSpec) -> str:
        o = dict(spec.options)
        kind = opt_enum(o, "server.type", ("unix", "inet"), "")
        if not kind:
            raise NodeError("Parameter 'server.type' is missing")
        export = urllib.parse.quote(opt_str(o, "export") or "", safe="")
        if kind == "unix":
            path = opt_str(o, "server.path", required=True)
            assert path is not None
            if "server.host" in o or "server.port" in o:
                raise NodeError("Parameter 'server.host' is unexpected")
            uri = f"nbd+unix:///{export}?socket={urllib.parse.quote(path, safe='/')}"
        else:
            host = opt_str(o, "server.host", required=True)
            assert host is not None
            port = opt_int(o, "server.port", 1, 65535)
            if "server.path" in o:
                raise NodeError("Parameter 'server.path' is unexpected")
            netloc = f"[{host}]" if ":" in host else host
            uri = f"nbd://{netloc}:{port or 10809}/{export}"
        try:
            parse_nbd(uri)
        except SpecError as exc:
            raise NodeError(str(exc)) from None
        return uri

    # ------------------------------------------------------------------ opening
    def open(self, name: str, *, writable: bool, logical_block_size: int = 512,
             io_threads: int = 16) -> Storage:
        """Open node ``name`` and its children for an export; StorageError (one line) if it
        cannot be served."""
        spec = self.nodes.get(name)
        if spec is None:
            raise StorageError(f"Cannot find device='' nor node-name='{name}'")
        if writable and spec.read_only:
            raise StorageError(f"Cannot export read-only node '{name}' as writable")
        return self._open(spec, read_only=not writable, lbs=logical_block_size,
                          io_threads=io_threads)

    def _open(self, spec: NodeSpec, *, read_only: bool, lbs: int, io_threads: int) -> Storage:
        read_only = read_only or spec.read_only
        o = dict(spec.options)
        d = spec.driver
        try:
            if d == "file":
                st: Storage = self._open_file(spec, read_only, lbs, io_threads)
            elif d == "raw":
                st = self._open(spec.children["file"], read_only=read_only, lbs=lbs,
                                io_threads=io_threads)
            elif d == "qcow2":
                st = self._open_qcow2(spec, read_only, lbs, io_threads)
            elif d == "rbd":
                from blockdev.rbd.storage import RbdStorage

                rbd = RbdSpec(str(o["pool"]), str(o["image"]), o.get("snapshot"), o.get("conf"),
                              o.get("user"))
                st = RbdStorage(rbd, read_only=read_only, logical_block_size=lbs)
            elif d == "nbd":
                from blockdev.nbd.storage import NbdStorage

                delay = opt_int(dict(o), "reconnect-delay", 0, MAX_RECONNECT_DELAY)
                st = NbdStorage(self._nbd_uri(spec), read_only=read_only,
                                logical_block_size=lbs,
                                reconnect_delay=30.0 if delay is None else float(delay))
            elif d == "throttle":
                group = self.groups.get(str(o["throttle-group"]))
                if group is None:
                    raise StorageError(f"Throttle group '{o['throttle-group']}' does not exist")
                st = ThrottleStorage(self._open(spec.children["file"], read_only=read_only,
                                                lbs=lbs, io_threads=io_threads),
                                     spec.name, group)
            elif d in FILTERS:
                child = self._open(spec.children["file"], read_only=read_only, lbs=lbs,
                                   io_threads=io_threads)
                try:
                    st = open_filter(d, child, spec.name, o["args"])
                except BaseException:
                    child.close()
                    raise
            else:
                cls = spec.plugin_class or load_class(o["module"], o["class"])
                st = open_plugin(cls, o["args"], spec.name, read_only=read_only,
                                 logical_block_size=lbs)
        except (DiskError, FilterError, ThrottleError, EngineUnavailable) as exc:
            raise StorageError(f"{spec.name}: {exc}") from None
        if not spec.discard and st.caps.discard:
            st.caps = replace(st.caps, discard=False)
        return st

    def _open_file(self, spec: NodeSpec, read_only: bool, lbs: int,
                   io_threads: int) -> FileStorage:
        o = dict(spec.options)
        path = str(o["filename"])
        direct = opt_bool(o, "cache.direct", False)
        aio = opt_enum(o, "aio", ("threads", "native", "io_uring"), "threads")
        engine = choose_engine("io_uring" if aio == "native" else aio)
        disk = open_image(path, "raw", read_only=read_only, direct=direct,
                          logical_block_size=lbs)
        self._lock(disk.fd, path, read_only, opt_enum(o, "locking", ("auto", "on", "off"), "auto"),
                   disk.close)
        return FileStorage(disk, engine, io_threads)

    def _open_qcow2(self, spec: NodeSpec, read_only: bool, lbs: int,
                    io_threads: int) -> FileStorage:
        file = spec.children["file"]
        f = dict(file.options)
        read_only = read_only or file.read_only
        path = str(f["filename"])
        if opt_bool(f, "cache.direct", False):
            raise StorageError(f"{spec.name}: cache.direct=on is not supported under qcow2")
        aio = opt_enum(f, "aio", ("threads", "native", "io_uring"), "threads")
        engine = choose_engine("io_uring" if aio == "native" else aio)
        disk = open_image(path, "qcow2", read_only=read_only, logical_block_size=lbs)
        self._lock(disk.fd, path, read_only, opt_enum(f, "locking", ("auto", "on", "off"), "auto"),
                   disk.close)
        return FileStorage(disk, engine, io_threads)

    @staticmethod
    def _lock(fd: int, path: str, read_only: bool, locking: str, close: Any) -> None:
        if locking == "off":
            return
        try:
            lock_image(fd, path, writable=not read_only)
        except ImageLockError as exc:
            if exc.unsupported and locking == "auto":
                log.warning("%s; serving it unlocked", exc)
                return
            close()
            raise StorageError(str(exc)) from None


def _registered(driver: str) -> type:
    try:
        cls = load_registered(driver)
    except StorageError as exc:
        raise NodeError(str(exc)) from None
    if cls is None:
        raise NodeError(f"Parameter 'driver' does not accept value '{driver}'")
    return cls
