"""Fuzz QMP framing and dispatch: :class:`JsonStream` -> :class:`QmpSession` -> the commands.

The server's read path (``QmpServer._read``) without the socket: bytes are fed to the client's
JsonStream in the chunks the input chooses, every item it yields is handed to the session and
the reply encoded; the commands act on a real :class:`BlockExport` of a :class:`BlkDevice` on a
small raw file (``block_resize`` really grows it; ``quit`` is recorded).

Two input shapes (first byte):

* raw bytes, cut into chunks: no exception may escape (one would end the server's thread), every
  reply is an object with exactly one of ``return``/``error`` (an error has a string class and
  description), and the replies are the same whether the bytes came in one piece or in chunks
  (framing must not depend on how the socket cut the stream);
* a list of JSON objects, one per line, built from the input (commands, arguments of every JSON
  type, ids, unknown members, numbers at every integer boundary): additionally exactly one
  reply per line, in order, each carrying its line's id.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import atheris

with atheris.instrument_imports(include=["storage_daemon", "virtio_blk", "blockdev", "vhost"]):
    from _common import Reader, run

    from blockdev.disk import Disk
    from storage_daemon.commands import Commands
    from storage_daemon.export import BlockExport
    from storage_daemon.qmp_protocol import JsonStream, QmpSession, encode
    from virtio_blk.device import BlkDevice

SIZE = 1 << 20
VERSION = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fuzz"}
COMMANDS = ("qmp_capabilities", "query-version", "query-commands", "query-block-exports",
            "query-blockstats", "block_resize", "quit", "system_reset", "", "x" * 300, "disk0",
            "export0")
KEYS = ("execute", "arguments", "id", "exec-oob", "enable", "size", "node-name", "device",
        "query-nodes", "", "size", "node-name")
NUMBERS = (0, 1, -1, 512, SIZE, SIZE + 512, 2 * SIZE, 513, (1 << 31), (1 << 32), (1 << 53) + 1,
           (1 << 62), (1 << 63) - 512, (1 << 63) - 1, 1 << 63, 1 << 64, -(1 << 63), 10 ** 30,
           -(10 ** 30), 1 << 1000)


class NoFrontend:
    """The daemon as the export sees it, with nobody connected (so resize tells no one)."""

    connected = False

    def notify_config_change(self) -> bool:
        return False


class Plane:
    """The control plane of one exported device (remade when a resize changed it)."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="fuzz-qmp-", suffix=".img",
                                         dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.close(fd)
        self.quits = 0
        self._open()

    def _open(self) -> None:
        os.truncate(self.path, SIZE)
        self.device = BlkDevice(Disk(self.path), engine="inline", queue_processes=False)
        export = BlockExport("export0", "disk0", self.device, NoFrontend())  # type: ignore[arg-type]
        self.commands = Commands(export, VERSION, self._quit)

    def _quit(self) -> None:
        self.quits += 1

    def reset(self) -> None:
        if self.device.storage.info.size != SIZE:
            self.device.storage.close()
            self._open()

    def serve(self, chunks: list[bytes]) -> list[dict[str, Any]]:
        """What one client sending ``chunks`` gets back (after the greeting)."""
        self.reset()
        session = QmpSession(self.commands, VERSION)
        encode(session.greeting())
        stream = JsonStream()
        replies = []
        for chunk in chunks:
            for item in stream.feed(chunk):
                reply = session.handle(item)
                encode(reply)
                check_reply(reply)
                replies.append(reply)
        return replies


def check_reply(reply: object) -> None:
    assert isinstance(reply, dict), reply
    assert ("return" in reply) != ("error" in reply), reply
    assert set(reply) <= {"return", "error", "id"}, reply
    if "error" in reply:
        err = reply["error"]
        assert isinstance(err, dict) and set(err) == {"class", "desc"}, reply
        assert isinstance(err["class"], str) and isinstance(err["desc"], str), reply


def value(r: Reader, depth: int = 0) -> Any:
    """A JSON value the input chooses."""
    kind = r.u8() % (9 if depth < 4 else 6)
    if kind == 0:
        return NUMBERS[r.u8() % len(NUMBERS)]
    if kind == 1:
        return r.u8() & 1 == 1
    if kind == 2:
        return None
    if kind == 3:
        return r.take(r.u8() % 24).decode("latin-1")
    if kind == 4:
        return COMMANDS[r.u8() % len(COMMANDS)]
    if kind == 5:
        return [1.5, float("inf"), float("nan"), -0.0, 1e308][r.u8() % 5]
    if kind in (6, 7):
        return {KEYS[r.u8() % len(KEYS)]: value(r, depth + 1) for _ in range(r.u8() % 4)}
    return [value(r, depth + 1) for _ in range(r.u8() % 4)]


def command(r: Reader, n: int) -> dict[str, Any]:
    """One QMP input object: mostly well-formed, every member open to the input."""
    obj: dict[str, Any] = {}
    flags = r.u8()
    if not flags & 1:
        obj["execute"] = COMMANDS[r.u8() % len(COMMANDS)] if flags & 2 else value(r)
    if flags & 4:
        if flags & 8:
            obj["arguments"] = {KEYS[r.u8() % len(KEYS)]: value(r) for _ in range(r.u8() % 4)}
        else:
            obj["arguments"] = value(r)
    if not flags & 16:
        obj["id"] = n if flags & 32 else value(r)
    if flags & 64:
        obj[KEYS[r.u8() % len(KEYS)]] = value(r)
    return obj


PLANE: Plane | None = None


def cut(r: Reader, data: bytes) -> list[bytes]:
    chunks, pos = [], 0
    while pos < len(data):
        n = 1 + r.u8() % 64
        chunks.append(data[pos : pos + n])
        pos += n
    return chunks


def test_one_input(data: bytes) -> None:
    global PLANE
    if PLANE is None:
        PLANE = Plane()
    if not data:
        return
    r = Reader(data)
    if data[0] & 1:  # raw bytes, whole or in chunks
        r.u8()
        text = r.take(r.u16() % 2048)
        whole = [encode(x) for x in PLANE.serve([text])]  # (NaN != NaN: compare the wire)
        chunked = [encode(x) for x in PLANE.serve(cut(r, text))]
        assert whole == chunked, f"chunking changed the replies: {whole} vs {chunked}"
        return
    r.u8()
    objs = [command(r, n) for n in range(1 + r.u8() % 8)]
    lines = [json.dumps(o).encode() + b"\n" for o in objs]
    replies = PLANE.serve(cut(r, b"".join(lines)))
    assert len(replies) == len(lines), f"{len(lines)} lines, {len(replies)} replies: {replies}"
    for obj, reply in zip(objs, replies, strict=True):
        if "id" in obj:
            assert "id" in reply and json.dumps(reply["id"]) == json.dumps(obj["id"]), (obj, reply)
        else:
            assert "id" not in reply, (obj, reply)


if __name__ == "__main__":
    run("qmp", test_one_input)
