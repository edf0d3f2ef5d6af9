"""QMP without sockets: JSON stream framing, the session rules, the commands' argument checks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from storage_daemon import version_info
from storage_daemon.commands import Commands
from storage_daemon.qmp_protocol import (
    JsonStream,
    ParseError,
    QmpError,
    QmpSession,
    encode,
    event,
)

# ---------------------------------------------------------------------------- framing


def feed_all(stream: JsonStream, *chunks: bytes) -> list[Any]:
    out = []
    for chunk in chunks:
        out.extend(stream.feed(chunk))
    return out


def test_messages_split_anywhere_and_several_per_read() -> None:
    text = b'{"execute": "a", "arguments": {"x": "}{\\"]"}}{"execute":"b"}\n  [1, {"c": [2]}]'
    whole = feed_all(JsonStream(), text)
    assert whole == [{"execute": "a", "arguments": {"x": '}{"]'}}, {"execute": "b"},
                     [1, {"c": [2]}]]
    for cut in range(1, len(text)):
        assert feed_all(JsonStream(), text[:cut], text[cut:]) == whole
    assert feed_all(JsonStream(), *(text[i:i + 1] for i in range(len(text)))) == whole


def test_malformed_json_is_one_error_and_the_stream_goes_on() -> None:
    s = JsonStream()
    out = feed_all(s, b'{"execute": bad}', b'{"execute": "ok"}')
    assert isinstance(out[0], ParseError) and "JSON parse error" in out[0].reason
    assert out[1] == {"execute": "ok"}
    out = feed_all(s, b"42 nonsense\n", b"}", b' "str" ', b'{"execute":"x"}')
    assert out[:2] == [42, ParseError(out[1].reason)]
    assert isinstance(out[2], ParseError)  # a stray closing brace
    assert out[3:] == ["str", {"execute": "x"}]
    bad_utf8 = feed_all(s, b'{"a": "\xff"}')
    assert len(bad_utf8) == 1 and isinstance(bad_utf8[0], ParseError)


def test_oversized_and_too_deep_input_is_refused_then_recovers() -> None:
    s = JsonStream(max_message=100)
    out = s.feed(b'{"x": "' + b"a" * 200)
    assert len(out) == 1 and "larger than 100" in out[0].reason
    assert s.feed(b'aaa"}\n{"execute": "y"}') == [{"execute": "y"}]  # skipped to the newline
    # However the nested garbage is cut into reads, parsing resumes after the next newline.
    for chunks in ([b"[" * 5000], [b"[" * 1000, b"[" * 4000], [b"[" * 1024, b"[", b"[" * 3975]):
        s2 = JsonStream()
        out = feed_all(s2, *chunks, b'\n{"execute": "x"}')
        assert len(out) == 2 and "too deep" in out[0].reason and out[1] == {"execute": "x"}


def test_encoding_and_events() -> None:
    line = encode({"return": {}})
    assert line.endswith(b"\r\n") and json.loads(line) == {"return": {}}
    ev = event("BLOCK_EXPORT_DELETED", {"id": "e0"}, now=1700000000.25)
    assert ev == {"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"},
                  "timestamp": {"seconds": 1700000000, "microseconds": 250000}}


# ---------------------------------------------------------------------------- session


def echo(name: str, args: dict[str, Any]) -> Any:
    if name == "fail":
        raise QmpError("GenericError", "it failed")
    return {"name": name, "args": args}


def test_greeting_and_negotiation_first() -> None:
    s = QmpSession(echo, version_info())
    g = s.greeting()
    assert g["QMP"]["capabilities"] == [] and set(g["QMP"]["version"]) == {"qemu", "package"}
    assert s.handle({"execute": "query-version", "id": 1}) == {
        "error": {"class": "CommandNotFound",
                  "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
        "id": 1}
    assert s.handle({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})[
        "error"]["class"] == "GenericError"
    assert not s.negotiated
    assert s.handle({"execute": "qmp_capabilities", "id": "x"}) == {"return": {}, "id": "x"}
    assert s.handle({"execute": "qmp_capabilities"})["error"]["class"] == "CommandNotFound"
    assert s.handle({"execute": "thing", "arguments": {"a": 1}, "id": [1, 2]}) == {
        "return": {"name": "thing", "args": {"a": 1}}, "id": [1, 2]}
    assert s.handle({"execute": "fail", "id": 7}) == {
        "error": {"class": "GenericError", "desc": "it failed"}, "id": 7}


@pytest.mark.parametrize(("item", "desc"), [
    (ParseError("JSON parse error, x"), "JSON parse error, x"),
    ([1], "QMP input must be a JSON object"),
    ({"id": 3}, "QMP input lacks member 'execute'"),
    ({"execute": 5}, "QMP input member 'execute' must be a string"),
    ({"execute": "a", "arguments": []}, "QMP input member 'arguments' must be an object"),
    ({"execute": "a", "extra": 1}, "QMP input member 'extra' is unexpected"),
    ({"exec-oob": "a"}, "QMP input member 'exec-oob' is unexpected (out-of-band execution "
                        "is not offered)"),
])
def test_bad_input_objects(item: Any, desc: str) -> None:
    s = QmpSession(echo, version_info())
    s.negotiated = True
    reply = s.handle(item)
    assert reply["error"] == {"class": "GenericError", "desc": desc}
    if isinstance(item, dict) and "id" in item:
        assert reply["id"] == item["id"]


# ---------------------------------------------------------------------------- commands


class FakeExport:
    export_id = "e0"
    node_name = "n0"
    shutting_down = False

    def __init__(self) -> None:
        self.resized: list[int] = []

    def resize(self, size: int) -> None:
        if size < 4096:
            raise QmpError("GenericError", "shrinking is not supported")
        self.resized.append(size)

    def blockstats(self) -> dict[str, Any]:
        return {"rd_bytes": 1}


@pytest.fixture
def cmds() -> tuple[Commands, FakeExport, list[int]]:
    export = FakeExport()
    quits: list[int] = []
    return Commands(export, version_info(), lambda: quits.append(1)), export, quits


def test_commands_answers(cmds: tuple[Commands, FakeExport, list[int]]) -> None:
    c, export, quits = cmds
    assert c("query-version", {}) == version_info()
    assert c("query-block-exports", {}) == [
        {"type": "vhost-user-blk", "id": "e0", "node-name": "n0", "shutting-down": False}]
    assert c("query-blockstats", {}) == [{"device": "", "node-name": "n0",
                                          "stats": {"rd_bytes": 1}}]
    assert c("query-blockstats", {"query-nodes": True})[0]["node-name"] == "n0"
    assert c("block_resize", {"node-name": "n0", "size": 8192}) == {} and export.resized == [8192]
    assert {"name": "block_resize"} in c("query-commands", {})
    assert c("quit", {}) == {} and quits == [1]


@pytest.mark.parametrize(("name", "args", "cls", "desc"), [
    ("nope", {}, "CommandNotFound", "The command nope has not been found"),
    ("query-version", {"x": 1}, "GenericError", "Parameter 'x' is unexpected"),
    ("block_resize", {"node-name": "n0"}, "GenericError", "Parameter 'size' is missing"),
    ("block_resize", {"node-name": "n0", "size": "1G"}, "GenericError",
     "Invalid parameter type for 'size', expected: integer"),
    ("block_resize", {"node-name": "n0", "size": True}, "GenericError",
     "Invalid parameter type for 'size', expected: integer"),
    ("block_resize", {"node-name": 3, "size": 1}, "GenericError",
     "Invalid parameter type for 'node-name', expected: string"),
    ("block_resize", {"node-name": "other", "size": 8192}, "GenericError",
     "Cannot find device='' nor node-name='other'"),
    ("block_resize", {"device": "n0", "size": 8192}, "GenericError",
     "Cannot find device='n0' nor node-name=''"),
    ("block_resize", {"node-name": "n0", "size": -1}, "GenericError",
     "Parameter 'size' expects a >0 size"),
    ("block_resize", {"node-name": "n0", "size": 512}, "GenericError",
     "shrinking is not supported"),
    ("query-blockstats", {"query-nodes": 1}, "GenericError",
     "Invalid parameter type for 'query-nodes', expected: boolean"),
])
def test_command_errors(cmds: tuple[Commands, FakeExport, list[int]], name: str,
                        args: dict[str, Any], cls: str, desc: str) -> None:
    c, export, _ = cmds
    with pytest.raises(QmpError) as info:
        c(name, args)
    assert (info.value.cls, info.value.desc) == (cls, desc)
    assert export.resized == []
