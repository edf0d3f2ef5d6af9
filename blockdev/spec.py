"""``--image`` specs: which storage serves an image, decided by its syntax alone.

* ``rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER]`` -- QEMU's rbd filename syntax (a ``:`` inside
  a value is written ``\\:``).
* ``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH`` -- the NBD URI standard, as
  QEMU and libnbd take it (``nbds``/TLS is not supported).
* anything else is a file path: a file called ``rbd:x`` is served as ``./rbd:x``.  The contents
  of a file are never looked at to guess its kind.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass


class SpecError(ValueError):
    """The spec is malformed; the message is one line for the user."""


@dataclass(frozen=True)
class RbdSpec:
    pool: str
    image: str
    snapshot: str | None = None
    conf: str | None = None
    user: str | None = None

    def __str__(self) -> str:
        snap = f"@{self.snapshot}" if self.snapshot else ""
        return f"rbd:{self.pool}/{self.image}{snap}"


@dataclass(frozen=True)
class NbdSpec:
    uri: str

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class FileSpec:
    path: str

    def __str__(self) -> str:
        return self.path


ImageSpec = RbdSpec | NbdSpec | FileSpec

_RBD_OPTIONS = {"conf", "id"}


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts = re.split(r"(?<!\\)" + re.escape(sep), text)
    return [p.replace("\\" + sep, sep) for p in parts]


def parse_rbd(text: str) -> RbdSpec:
    body = text[len("rbd:"):]
    fields = _split_unescaped(body, ":")
    name, options = fields[0], fields[1:]
    pool, slash, image = name.partition("/")
    if not slash or not pool or not image:
        raise SpecError(f"{text}: want rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER]")
    image, at, snap = image.partition("@")
    if not image or (at and not snap):
        raise SpecError(f"{text}: empty image or snapshot name")
    if "/" in image:
        raise SpecError(f"{text}: rbd namespaces (POOL/NS/IMAGE) are not supported")
    opts: dict[str, str] = {}
    for item in options:
        key, eq, value = item.partition("=")
        if not eq or key not in _RBD_OPTIONS or not value:
            raise SpecError(f"{text}: unknown rbd option {item!r} (known: conf=PATH, id=USER)")
        opts[key] = value
    return RbdSpec(pool, image, snap or None, opts.get("conf"), opts.get("id"))


def parse_nbd(text: str) -> NbdSpec:
    try:
        # urlsplit raises ValueError of its own for an unbalanced IPv6 bracket and for a host
        # whose NFKC form holds '/?#@:'; the callers only catch SpecError.
        u = urllib.parse.urlsplit(text)
    except ValueError as exc:
        raise SpecError(f"{text}: {exc}") from None
    query = urllib.parse.parse_qs(u.query, keep_blank_values=True)
    if u.scheme == "nbd":
        if not u.hostname:
            raise SpecError(f"{text}: want nbd://HOST[:PORT]/EXPORT")
        try:
            u.port  # noqa: B018 - validates the port
        except ValueError:
            raise SpecError(f"{text}: bad port") from None
    elif u.scheme == "nbd+unix":
        if u.netloc:
            raise SpecError(f"{text}: nbd+unix takes no host (nbd+unix:///EXPORT?socket=PATH)")
        if not query.get("socket", [""])[0]:
            raise SpecError(f"{text}: want nbd+unix:///EXPORT?socket=PATH")
    else:
        raise SpecError(f"{text}: {u.scheme}:// is not supported (use nbd:// or nbd+unix://)")
    unknown = set(query) - {"socket"}
    if unknown:
        raise SpecError(f"{text}: unsupported URI parameter {sorted(unknown)[0]!r}")
    return NbdSpec(text)


def parse_image(text: str) -> ImageSpec:
    """The storage an ``--image`` argument names."""
    if text.startswith("rbd:"):
        return parse_rbd(text)
    lower = text.lower()
    if lower.startswith(("nbd://", "nbd+unix://")):
        return parse_nbd(text)
    if lower.startswith(("nbds://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://")):
        raise SpecError(f"{text}: only nbd:// and nbd+unix:// are supported (no TLS, no vsock)")
    return FileSpec(text)
