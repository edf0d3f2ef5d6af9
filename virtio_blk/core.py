"""Which core serves the per-request path: the compiled one, or pure Python.

The fast path (:mod:`virtio_blk.fastpath`) has two implementations of one interface
(:class:`FastPathLike`), the way uvloop, asyncpg and msgpack ship a compiled core beside their
Python code: the pure-Python :class:`~virtio_blk.fastpath.FastPath`, and the compiled
:mod:`virtio_blk._fastpath_core`, built from Cython when the package is installed on a machine
with a C compiler (and silently left out where there is none -- the package then runs on the
pure-Python core alone).  A differential property test holds both to the generic path.

The environment variable ``VHOST_USER_BLK_CORE`` chooses, the convention of
``AIOHTTP_NO_EXTENSIONS`` or ``MSGPACK_PUREPYTHON``: ``auto`` (the default: the compiled core
if it was built, else pure Python), ``compiled`` (an error at start if it was not built) or
``python``.  It is read by every process (queue processes and pool workers inherit it).  The
server logs which core runs when it starts (:func:`describe`).

Even with the compiled core, a queue it cannot serve -- NBD, RBD, a filter, a Python plugin or
the thread pool underneath (it serves raw and qcow2 images on io_uring, split and packed
rings) -- keeps the Python fast path (:func:`make_fast_path` says why at debug level).
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from vhost.compiled import CHOICES as CHOICES
from vhost.compiled import ENV, CoreUnavailable, built_module, import_problem, requested
from virtio_blk.fastpath import FastPath

if TYPE_CHECKING:
    from vhost.queue.base import Queue
    from virtio_blk.blk_request import BlkRequest
    from virtio_blk.fastpath import FastPathHost

log = logging.getLogger(__name__)

# The variable's rule (ENV, CHOICES, requested, CoreUnavailable) is vhost.compiled's: the vhost
# layer has a compiled core too, and reads it the same way.
COMPILED_MODULE = "virtio_blk._fastpath_core"


class FastPathLike(Protocol):
    """What the device's queue handler uses of a fast path, whichever core implements it."""

    @property
    def vq(self) -> Queue: ...

    @property
    def taken(self) -> int: ...

    def drain(self, limit: int = ...) -> list[tuple[int, int]]: ...

    def complete(self, req: BlkRequest) -> int: ...

    def complete_reaped(self) -> list[tuple[int, int]]: ...

    def settings_changed(self) -> None: ...


def compiled_module() -> ModuleType | None:
    """The compiled core's module, or None if it was not built (or does not load here: the
    reason is kept for :func:`describe`)."""
    return built_module(COMPILED_MODULE)


def core_name() -> str:
    """``compiled`` or ``python``: the core this process runs.  CoreUnavailable when the
    compiled core is asked for by name and was not built."""
    choice = requested()
    if choice == "python":
        return "python"
    if compiled_module() is not None:
        return "compiled"
    if choice == "compiled":
        raise CoreUnavailable(f"{ENV}=compiled: the compiled core is not built here "
                              f"({import_problem(COMPILED_MODULE)}); reinstall with a C "
                              f"compiler, or use {ENV}=python")
    return "python"


def describe() -> str:
    """One line for the log: the core that runs, and why the compiled one does not."""
    name = core_name()
    if name == "compiled":
        module = compiled_module()
        return f"per-request core: compiled ({getattr(module, '__file__', COMPILED_MODULE)})"
    if requested() == "python":
        return f"per-request core: pure Python ({ENV}=python)"
    return (f"per-request core: pure Python (the compiled core is not built: "
            f"{import_problem(COMPILED_MODULE)})")


def make_fast_path(handler: FastPathHost, vq: Queue) -> FastPathLike:
    """The fast path of one queue: the compiled core's where it runs and can serve this queue,
    else the Python one."""
    if core_name() == "compiled":
        module = compiled_module()
        assert module is not None
        why_not = module.applicable(handler, vq)
        if why_not is None:
            return module.FastPath(handler, vq)
        log.debug("queue %d: the Python fast path serves %s", vq.index, why_not)
    return FastPath(handler, vq)
