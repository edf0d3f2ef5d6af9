"""Which implementation runs the per-request code: compiled (Cython) or pure Python.

Several layers ship a compiled core beside their Python code -- :mod:`vhost.queue._split_core`
(the used ring of a split queue, the in-flight area's bookkeeping) and
:mod:`virtio_blk._fastpath_core` (the device's fast path) -- each an implementation of the same
interface as the Python code beside it, built when the package is installed on a machine with a
C compiler and absent where there is none.  One environment variable chooses for all of them,
and its rule is stated here, in the lowest layer that has a compiled core, so vhost and
virtio_blk read it the same way (:mod:`virtio_blk.core` imports it from here).

``VHOST_USER_BLK_CORE``, the convention of ``AIOHTTP_NO_EXTENSIONS`` or ``MSGPACK_PUREPYTHON``:
``auto`` (the default: the compiled code where it was built, else pure Python), ``compiled``
(the server refuses to start if it was not built: :func:`virtio_blk.core.core_name`) or
``python``.  Every process reads it (queue processes and pool workers inherit it).
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

log = logging.getLogger(__name__)

ENV = "VHOST_USER_BLK_CORE"
CHOICES = ("auto", "compiled", "python")


class CoreUnavailable(Exception):
    """The core asked for cannot run here; the message is one line for the user."""


def requested() -> str:
    """The core the environment asks for (``auto`` when unset); CoreUnavailable for a value
    that is not one of :data:`CHOICES`."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise CoreUnavailable(f"{ENV}={value!r}: choose one of {', '.join(CHOICES)}")
    return value


_modules: dict[str, ModuleType | None] = {}
_problems: dict[str, str] = {}


def built_module(name: str) -> ModuleType | None:
    """The compiled module ``name`` if it was built (imported once, whatever the environment
    says), else None; :func:`import_problem` says why not."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(name)
        except ImportError as exc:
            log.debug("%s is not built (%s): its Python implementation runs", name, exc)
            _modules[name] = None
            _problems[name] = str(exc) or type(exc).__name__
    return _modules[name]


def import_problem(name: str) -> str | None:
    """Why :func:`built_module` found no ``name`` (None if it did, or was not asked)."""
    return _problems.get(name)


def optional_module(name: str) -> ModuleType | None:
    """The compiled module ``name`` if the environment allows compiled code and it was built,
    else None (the caller runs its Python implementation).

    Read when a queue starts, not per request.  A value of :data:`ENV` that is not one of
    :data:`CHOICES`, or ``compiled`` where the module was not built, gives None here: the server
    checks the variable once at start and refuses to run then (:mod:`virtio_blk.core`), so a
    queue started by a test or a library user never fails over the choice of implementation.
    """
    try:
        if requested() == "python":
            return None
    except CoreUnavailable:
        return None
    return built_module(name)
