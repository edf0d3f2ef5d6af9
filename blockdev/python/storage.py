"""The ``python`` driver: any Python object with ``size()`` and ``pread()`` served as a disk.

The protocol (version :data:`API_VERSION`; a class that declares ``API_VERSION`` must declare
this one -- a plugin written for a later protocol is refused rather than half-served):

* ``size() -> int``: bytes, a whole number of logical blocks (asked once, at open);
* ``pread(buf: memoryview, offset: int) -> None``: fill ``buf`` exactly;
* ``pwrite(buf: memoryview, offset: int) -> None``: optional; without it the disk is read-only
  (VIRTIO_BLK_F_RO).  ``buf`` is read-only;
* ``flush()``, ``trim(offset, length)``, ``zero(offset, length)``: optional; FLUSH, DISCARD and
  WRITE_ZEROES are offered exactly when they exist (a disk without ``flush`` has no volatile
  cache: its writes are durable when ``pwrite`` returns);
* ``close()``: optional, called once when the node goes away (shutdown, blockdev-del);
* ``thread_model``: ``"serialized"`` (the default: one call at a time, under one lock) or
  ``"parallel"`` (calls may overlap, from several threads).

Calls run on the engine's IO threads, never on a queue's worker: a slow plugin holds up only its
own requests, never the ring.  ``buf`` is guest memory itself when the request's data is one
contiguous piece of it (no copy; Linux's requests mostly are), a bounce buffer otherwise.
Every queue of an export calls the one instance: a disk of anything but a raw file is served
by queue threads of the process that opened it (never by queue processes), and that process
maps guest memory itself, so the views stay zero-copy.

Errors: an ``OSError`` fails that request with IOERR; the device logs one rate-limited line
for it, no traceback (it is the plugin saying "this IO failed").  Any other exception fails the
request too, and is logged -- rate-limited -- with its traceback as a plugin bug.  Either way
the server keeps serving.
"""

from __future__ import annotations

import errno
import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from blockdev.disk import MAX_IMAGE_SIZE, DiskInfo
from blockdev.engine import Engine, ThreadPoolEngine
from blockdev.ratelimit import RateLimitedLog
from blockdev.storage import Capabilities, Storage, StorageError

log = logging.getLogger(__name__)

#: The protocol version this server speaks.
API_VERSION = 1
#: Entry-point group installed plugins register short driver names in.
ENTRY_POINT_GROUP = "vhost_user_blk.storage"
THREAD_MODELS = ("serialized", "parallel")
#: IO threads per queue for a parallel plugin (a serialized one gets one: more would only queue
#: on its lock).
PARALLEL_THREADS = 8


class PluginStorage(Storage):
    """A plugin instance as a :class:`Storage`; one instance for every queue."""

    def __init__(self, plugin: Any, name: str, *, read_only: bool = False,
                 logical_block_size: int = 512, threads: int = PARALLEL_THREADS) -> None:
        self.plugin = plugin
        self.name = name
        version = getattr(plugin, "API_VERSION", API_VERSION)
        if version != API_VERSION:
            raise StorageError(f"{name}: the plugin speaks protocol version {version!r}; this "
                               f"server speaks {API_VERSION}")
        model = getattr(plugin, "thread_model", "serialized")
        if model not in THREAD_MODELS:
            raise StorageError(f"{name}: thread_model {model!r}: want 'serialized' or "
                               "'parallel'")
        self.thread_model = model
        for method in ("size", "pread"):
            if not callable(getattr(plugin, method, None)):
                raise StorageError(f"{name}: the plugin has no {method}() method")
        found = {m: getattr(plugin, m, None) for m in
                 ("pwrite", "flush", "trim", "zero", "close")}
        self._methods: dict[str, Callable[..., Any]] = {
            m: f for m, f in found.items() if callable(f)}
        self._lock: threading.Lock | None = threading.Lock() if model == "serialized" else None
        #: Plugin bugs (exceptions that are not OSError): tracebacks, rate-limited.
        self.buglog = RateLimitedLog(log)
        try:
            size = plugin.size()
        except Exception as exc:
            raise StorageError(f"{name}: size() failed: {type(exc).__name__}: {exc}") from None
        if type(size) is not int or not 0 < size <= MAX_IMAGE_SIZE:
            raise StorageError(f"{name}: size() returned {size!r}: want a positive int of bytes")
        if size % logical_block_size:
            raise StorageError(f"{name}: size() returned {size}, not a multiple of the "
                               f"{logical_block_size}-byte block size")
        read_only = read_only or "pwrite" not in self._methods
        self.info = DiskInfo(size, logical_block_size, read_only, False, 1, 1, False)
        self.caps = Capabilities(flush="flush" in self._methods,
                                 discard="trim" in self._methods,
                                 write_zeroes="zero" in self._methods)
        self.threads = 1 if self._lock is not None else max(1, threads)
        self._disk = _PluginDisk(self)
        self._closed = False

    def has(self, method: str) -> bool:
        """Whether the plugin defines the optional ``method``."""
        return method in self._methods

    def call(self, method: str, *args: Any) -> Any:
        """Call the plugin (under its lock when serialized).  OSError passes through (it fails
        the request); anything else is logged with its traceback as a plugin bug and becomes
        EIO, so no exception of the plugin's ever ends an IO thread."""
        fn: Callable[..., Any] = self._methods.get(method) or getattr(self.plugin, method)
        try:
            if self._lock is None:
                return fn(*args)
            with self._lock:
                return fn(*args)
        except OSError:
            raise
        except BaseException as exc:
            self.buglog.log(logging.ERROR, "%s: plugin bug: %s() raised %s: %s", self.name,
                            method, type(exc).__name__, exc, exc_info=True)
            raise OSError(errno.EIO, f"plugin bug: {method}() raised "
                          f"{type(exc).__name__}") from None

    # ------------------------------------------------------------------ Storage
    def open_engine(self, queue_index: int) -> Engine:
        return ThreadPoolEngine(self._disk, self.threads, name=f"plugin{queue_index}")

    def make_durable(self) -> None:
        if not self.info.read_only and self.has("flush"):
            self.call("flush")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.has("close"):
            try:
                self.call("close")
            except OSError as exc:
                log.error("%s: close() failed: %s", self.name, exc)
        self.buglog.close()


class _PluginDisk:
    """The plugin seen as a :class:`~blockdev.disk.BlockDisk`, for the thread-pool engine."""

    fd = -1

    def __init__(self, storage: PluginStorage) -> None:
        self.storage = storage
        self.path = storage.name
        self.info = storage.info
        self.read_only = storage.info.read_only

    def readv(self, buffers: Sequence[memoryview], offset: int) -> int:
        if len(buffers) == 1:  # guest memory (or the device's bounce buffer) as it is
            self.storage.call("pread", buffers[0], offset)
            return buffers[0].nbytes
        total = sum(b.nbytes for b in buffers)
        bounce = memoryview(bytearray(total))
        self.storage.call("pread", bounce, offset)
        pos = 0
        for b in buffers:
            b[:] = bounce[pos:pos + b.nbytes]
            pos += b.nbytes
        return total

    def writev(self, buffers: Sequence[memoryview], offset: int) -> int:
        view = buffers[0].toreadonly() if len(buffers) == 1 else memoryview(b"".join(buffers))
        self.storage.call("pwrite", view, offset)
        return view.nbytes

    def resume(self, write: bool, buffers: Sequence[memoryview], offset: int, done: int) -> int:
        raise OSError(errno.EIO, "a plugin's IO is never partial")

    def make_durable(self) -> None:
        if self.storage.has("flush"):
            self.storage.call("flush")

    def discard(self, offset: int, length: int) -> None:
        self.storage.call("trim", offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self.storage.call("zero", offset, length)

    def grow(self, size: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "a plugin's size is fixed")

    def close(self) -> None:
        """The storage closes the plugin, once, not each engine."""


# ---------------------------------------------------------------------- loading
def plugin_options(options: Mapping[str, Any], where: str) -> dict[str, str]:
    """``options`` as the strings a plugin's constructor gets (JSON numbers and booleans as
    their keyval spelling: ``1``, ``on``/``off``); nested options are refused."""
    out: dict[str, str] = {}
    for key, value in options.items():
        if isinstance(value, bool):
            out[key] = "on" if value else "off"
        elif isinstance(value, str | int | float):
            out[key] = str(value)
        else:
            raise StorageError(f"{where}: plugin option '{key}' must be a single value")
    return out


def load_class(module: str, class_name: str) -> type:
    """``module.class_name``, the module imported from ``sys.path`` (PYTHONPATH included)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise StorageError(f"cannot import plugin module '{module}': {exc}") from None
    except Exception as exc:
        log.debug("importing %s", module, exc_info=True)
        raise StorageError(f"importing plugin module '{module}' failed: "
                           f"{type(exc).__name__}: {exc}") from None
    cls = getattr(mod, class_name, None)
    if not isinstance(cls, type):
        raise StorageError(f"plugin module '{module}' has no class '{class_name}'")
    return cls


def registered_drivers() -> dict[str, importlib.metadata.EntryPoint]:
    """Short driver names installed plugins register (entry-point group
    :data:`ENTRY_POINT_GROUP`)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_registered(name: str) -> type | None:
    """The class registered as driver ``name``, None if none is."""
    ep = registered_drivers().get(name)
    if ep is None:
        return None
    try:
        cls = ep.load()
    except Exception as exc:
        raise StorageError(f"driver '{name}' ({ep.value}) cannot be loaded: "
                           f"{type(exc).__name__}: {exc}") from None
    if not isinstance(cls, type):
        raise StorageError(f"driver '{name}' ({ep.value}) is not a class")
    return cls


def open_plugin(cls: type, options: Mapping[str, Any], name: str, *, read_only: bool = False,
                logical_block_size: int = 512) -> PluginStorage:
    """Instantiate ``cls(**options)`` (string values) and open it as storage ``name``."""
    kwargs = plugin_options(options, name)
    try:
        plugin = cls(**kwargs)
    except Exception as exc:
        log.debug("%s: constructor", name, exc_info=True)
        raise StorageError(f"{name}: {cls.__name__}() failed: {type(exc).__name__}: "
                           f"{exc}") from None
    try:
        return PluginStorage(plugin, name, read_only=read_only,
                             logical_block_size=logical_block_size)
    except StorageError:
        close = getattr(plugin, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                log.exception("%s: close() after a failed open", name)
        raise
