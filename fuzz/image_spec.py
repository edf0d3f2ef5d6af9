"""Fuzz ``--image`` specs (:func:`blockdev.spec.parse_image`): rbd:, nbd:// and paths.

Input: a prefix choice (``rbd:``, ``nbd://``, ``nbd+unix://``, other schemes, none) and the
rest of the spec as text (undecodable bytes kept as the surrogates ``os.fsdecode`` makes of
them, as a command line gives them).  Asserts: the only exception is :class:`SpecError` (the
one the callers catch and print); the syntax alone decides the kind (``rbd:`` -> RbdSpec,
``nbd://``/``nbd+unix://`` -> NbdSpec, anything else a FileSpec of exactly the text); an RbdSpec
has a pool and an image without ``/``, options only from conf/id; an NbdSpec of ``nbd://`` has a
host, one of ``nbd+unix://`` a socket; every spec prints; parsing is deterministic.
"""

from __future__ import annotations

import os
import urllib.parse

import atheris

with atheris.instrument_imports(include=["blockdev.spec", "urllib"]):
    from _common import run

    from blockdev.spec import FileSpec, NbdSpec, RbdSpec, SpecError, parse_image

PREFIXES = ("", "rbd:", "nbd://", "nbd+unix://", "NBD://", "nbd+unix:///", "nbds://",
            "nbd+vsock://", "/", "./rbd:", "rbd:pool/", "nbd://[", "nbd://host:")


def check(text: str) -> None:
    try:
        spec = parse_image(text)
    except SpecError as exc:
        assert str(exc), "a SpecError needs a message"
        return
    str(spec)
    assert parse_image(text) == spec
    lower = text.lower()
    if text.startswith("rbd:"):
        assert isinstance(spec, RbdSpec), spec
        assert spec.pool and spec.image and "/" not in spec.image, spec
        assert spec.snapshot != "" and spec.conf != "" and spec.user != "", spec
    elif lower.startswith(("nbd://", "nbd+unix://")):
        assert isinstance(spec, NbdSpec) and spec.uri == text, spec
        u = urllib.parse.urlsplit(text)
        if u.scheme == "nbd":
            assert u.hostname, spec
        else:
            assert urllib.parse.parse_qs(u.query, keep_blank_values=True)["socket"][0], spec
    else:
        assert isinstance(spec, FileSpec) and spec.path == text, spec


def test_one_input(data: bytes) -> None:
    if not data:
        return
    check(PREFIXES[data[0] % len(PREFIXES)] + os.fsdecode(data[1:]))


if __name__ == "__main__":
    run("image_spec", test_one_input)
