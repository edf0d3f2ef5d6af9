"""QEMU's KEY=VALUE,... syntax (``--blockdev``, ``--export``, ``--object``), sans IO.

The grammar is QEMU's (util/keyval.c), so a qemu-storage-daemon command line means the same here::

    key-vals     = [ key-val { ',' key-val } [ ',' ] ]
    key-val      = key '=' val          (the first may be a bare val where an implied key exists)
    key          = key-fragment { '.' key-fragment }
    key-fragment = / [A-Za-z][A-Za-z0-9_-]* / | / [0-9]+ /
    val          = { / [^,]+ / | ',,' }          (',,' is a literal comma)

Dotted keys build nested dicts (``server.type=unix,server.path=/x`` ->
``{"server": {"type": "unix", "path": "/x"}}``); a dict whose keys are exactly ``0..n-1`` becomes
a list, as QEMU's array keys do.  A key given twice keeps its last value (QEMU's rule); a key used
both as a value and as a parent (``a=1,a.b=2``) is an error.  Every value is a string: what it
means (a number, ``on``/``off``) is for the consumer to decide, as QEMU's keyval visitor does.
An argument that starts with ``{`` is JSON instead (QSD's ``--blockdev '{"driver": ...}'``),
and its values keep their JSON types.

Errors are :class:`KeyvalError`, one line worded as QEMU words them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

#: QEMU refuses longer keys (a whole dotted key, in bytes).
MAX_KEY = 128

_FRAGMENT = re.compile(r"[A-Za-z][A-Za-z0-9_-]*|[0-9]+")


class KeyvalError(ValueError):
    """The text is not valid KEY=VALUE,... (or JSON); the message is one line for the user."""


def parse(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """The nested dict ``text`` stands for.  ``implied_key``: the key a leading bare value
    belongs to (``--object throttle-group,id=x`` -> ``qom-type``); None where there is none."""
    root: dict[str, Any] = {}
    pos = 0
    n = len(text)
    first = True
    while pos < n:
        # The key: up to '=' or ',' (a ',' first means a bare value).
        end = pos
        while end < n and text[end] not in "=,":
            end += 1
        if end == n or text[end] == ",":
            if not (first and implied_key is not None):
                if first and implied_key is None and end > pos:
                    raise KeyvalError(f"No implicit parameter name for value "
                                      f"'{text[pos:end]}'")
                raise KeyvalError(f"Expected '=' after parameter '{text[pos:end]}'")
            key = implied_key
            value, pos = _value(text, pos)
        else:
            key = text[pos:end]
            value, pos = _value(text, end + 1)
        _put(root, key, value)
        first = False
        if pos < n:
            pos += 1  # the ',' that ended the value
    return _listify(root, "")


def _value(text: str, pos: int) -> tuple[str, int]:
    """The value starting at ``pos`` (',,' unescaped) and where it ended (at a lone ',')."""
    out: list[str] = []
    n = len(text)
    while pos < n:
        comma = text.find(",", pos)
        if comma < 0:
            out.append(text[pos:])
            return "".join(out), n
        out.append(text[pos:comma])
        if comma + 1 < n and text[comma + 1] == ",":
            out.append(",")
            pos = comma + 2
            continue
        return "".join(out), comma
    return "".join(out), n


def _put(root: dict[str, Any], key: str, value: str) -> None:
    if len(key.encode()) > MAX_KEY:
        raise KeyvalError(f"Parameter '{key[:MAX_KEY]}...' is too long")
    fragments = key.split(".")
    for frag in fragments:
        if not _FRAGMENT.fullmatch(frag):
            raise KeyvalError(f"Invalid parameter '{key}'")
    cur = root
    for i, frag in enumerate(fragments[:-1]):
        nxt = cur.setdefault(frag, {})
        if not isinstance(nxt, dict):
            raise KeyvalError(f"Parameters '{'.'.join(fragments[:i + 1])}.*' used "
                              "inconsistently")
        cur = nxt
    last = fragments[-1]
    if isinstance(cur.get(last), dict):
        raise KeyvalError(f"Parameters '{key}.*' used inconsistently")
    cur[last] = value  # a repeated key: the last one wins, as in QEMU


def _listify(node: dict[str, Any], prefix: str) -> dict[str, Any]:
    for k, v in node.items():
        if isinstance(v, dict):
            node[k] = _as_list_or_dict(_listify(v, f"{prefix}{k}."), f"{prefix}{k}")
    return node


def _as_list_or_dict(node: dict[str, Any], where: str) -> dict[str, Any] | list[Any]:
    digits = [k.isdigit() for k in node]
    if not any(digits):
        return node
    if not all(digits):
        raise KeyvalError(f"Parameters '{where}.*' used inconsistently")
    for i in range(len(node)):
        if str(i) not in node:
            raise KeyvalError(f"Parameter '{where}.{i}' missing")
    return [node[str(i)] for i in range(len(node))]


def format(opts: Mapping[str, Any]) -> str:
    """The KEY=VALUE,... text of ``opts`` (nested dicts and lists of strings), ',' escaped:
    ``parse(format(d)) == d``."""
    return ",".join(f"{k}={v.replace(',', ',,')}" for k, v in _flatten(opts, ""))


def _flatten(node: Mapping[str, Any] | list[Any], prefix: str) -> list[tuple[str, str]]:
    items = node.items() if isinstance(node, Mapping) else enumerate(node)
    out: list[tuple[str, str]] = []
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, Mapping | list):
            out.extend(_flatten(v, key + "."))
        elif isinstance(v, str):
            out.append((key, v))
        else:
            raise KeyvalError(f"Parameter '{key}': only strings can be written as key=value")
    return out


def parse_option(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """A command-line option's value: JSON if it starts with '{' (as QSD takes it), else
    KEY=VALUE,..."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise KeyvalError(f"JSON parse error: {exc}") from None
        if not isinstance(value, dict):
            raise KeyvalError("JSON parse error: an object was expected")
        return value
    return parse(text, implied_key)
