"""QOM objects of the server (``--object`` / ``object-add``, ``object-del``, ``qom-get``,
``qom-set``): a registry by id, with one handler per ``qom-type``.

The daemon knows no object type by itself; a subsystem registers its type here (throttle
groups: ``register_type("throttle-group", ...)``), and the QMP commands and the command line
reach every type the same way.  Errors are QEMU's wording, as QmpError.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from storage_daemon.qmp_protocol import QmpError, generic_error


class QomObject(Protocol):
    """One live object: its properties read and written by name; ``close`` when deleted."""

    def get(self, prop: str) -> Any: ...

    def set(self, prop: str, value: Any) -> None: ...

    def close(self) -> None: ...


class QomType(Protocol):
    """Creates objects of one qom-type from object-add's properties (QmpError if wrong)."""

    def __call__(self, object_id: str, props: dict[str, Any]) -> QomObject: ...


#: The object types every server knows, by qom-type: a subsystem adds its own here (at import
#: of the module that defines it), and each new registry starts with them.
TYPES: dict[str, QomType] = {}


class ObjectRegistry:
    """The server's objects by id (``--object`` and ``object-add``), typed by ``TYPES``."""

    def __init__(self) -> None:
        self._types: dict[str, QomType] = dict(TYPES)
        self._objects: dict[str, tuple[str, QomObject]] = {}
        self._lock = threading.Lock()

    def register_type(self, qom_type: str, factory: QomType) -> None:
        self._types[qom_type] = factory

    @property
    def types(self) -> list[str]:
        return sorted(self._types)

    def add(self, qom_type: str, object_id: str, props: dict[str, Any], *,
            text: bool = False) -> None:
        """``text``: ``props`` are --object's (values are text, as keyval gives them), made by
        the type's ``from_text`` when it has one -- QMP's JSON numbers are checked as such."""
        factory = self._types.get(qom_type)
        if factory is None:
            # QEMU's QAPI enum visitor's words (qemu-storage-daemon 7.2, --object foo,id=x).
            raise generic_error(f"Parameter 'qom-type' does not accept value '{qom_type}'")
        if text:
            factory = getattr(factory, "from_text", factory)
        with self._lock:
            if object_id in self._objects:
                raise generic_error(f"attempt to add duplicate property '{object_id}' to "
                                    "object (type 'container')")
            self._objects[object_id] = (qom_type, factory(object_id, props))

    def add_option(self, text: str) -> None:
        """``--object qom-type,id=ID,...`` (QEMU's keyval or JSON); ValueError, one line."""
        from blockdev import keyval

        try:
            props = keyval.parse_option(text, implied_key="qom-type")
        except keyval.KeyvalError as exc:
            raise ValueError(f"--object {text}: {exc}") from None
        qom_type, object_id = props.pop("qom-type", None), props.pop("id", None)
        if not isinstance(qom_type, str) or not isinstance(object_id, str):
            raise ValueError(f"--object {text}: Parameter "
                             f"'{'qom-type' if not isinstance(qom_type, str) else 'id'}' "
                             "is missing")
        try:
            self.add(qom_type, object_id, props, text=True)
        except QmpError as exc:
            raise ValueError(f"--object {text}: {exc.desc}") from None

    def delete(self, object_id: str) -> None:
        """object-del; an object whose ``close`` refuses (QmpError: a throttle group still
        named by a node) stays registered."""
        with self._lock:
            entry = self._objects.get(object_id)
            if entry is None:
                raise generic_error(f"object '{object_id}' not found")
            entry[1].close()
            del self._objects[object_id]

    def find(self, path: str) -> tuple[str, QomObject]:
        """By id or QOM path (``/objects/ID``), as qom-get/qom-set name them."""
        object_id = path.removeprefix("/objects/")
        with self._lock:
            entry = self._objects.get(object_id)
        if entry is None:
            raise QmpError("DeviceNotFound", f"Device '{path}' not found")
        return entry

    def get(self, path: str, prop: str) -> Any:
        return self.find(path)[1].get(prop)

    def set(self, path: str, prop: str, value: Any) -> None:
        self.find(path)[1].set(prop, value)
