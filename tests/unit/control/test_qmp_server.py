"""The QMP socket driven by QEMU's own client library (qemu.qmp's QMPClient) and by raw sockets.

The device is real and served (a frontend drives requests through it), so the numbers
query-blockstats reports are checked against what the driver did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import struct
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from qemu.qmp import ExecuteError, QMPClient

from storage_daemon import version_info
from tests.unit.control.conftest import MakeOperated, Operated
from vhost import messages as m
from vhost.backend_channel import BackendRequest
from vhost.messages import Request
from virtio_blk.request import Status

MiB = 1 << 20
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 30)
    return asyncio.run(bounded())


async def connect(op: Operated, name: str = "test") -> QMPClient:
    qmp = QMPClient(name)
    await qmp.connect(str(op.qmp_path))
    return qmp


class RawClient:
    """A QMP client on a bare socket, for what QMPClient will not send."""

    def __init__(self, op: Operated) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(op.qmp_path))
        self.file = self.sock.makefile("rb")
        self.greeting = self.recv()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    def execute(self, name: str, arguments: dict[str, Any] | None = None,
                **extra: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": name, **extra}
        if arguments is not None:
            msg["arguments"] = arguments
        self.send(json.dumps(msg).encode())
        return self.recv()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_every_command(make_operated: MakeOperated) -> None:
    op = make_operated()
    drv = op.env.drv
    assert drv.write(0, b"\x01" * 8192).status == Status.OK
    assert drv.write(64, b"\x02" * 4096).status == Status.OK
    for sector in (0, 8, 64):
        assert drv.read(sector, 4096).status == Status.OK
    assert drv.flush().status == Status.OK
    assert drv.discard((128, 16)).status == Status.OK
    assert drv.write_zeroes((256, 8)).status == Status.OK
    assert drv.read(MiB >> 9, 4096).status == Status.IOERR  # past the end: not an IO failure

    async def session() -> dict[str, Any]:
        qmp = await connect(op)
        try:
            out = {
                "greeting": qmp.greeting,
                "version": await qmp.execute("query-version"),
                "exports": await qmp.execute("query-block-exports"),
                "stats": await qmp.execute("query-blockstats"),
                "resize": await qmp.execute("block_resize",
                                            {"node-name": "disk0", "size": 2 * MiB}),
                "quit": await qmp.execute("quit"),
            }
        finally:
            await qmp.disconnect()
        return out

    out = run(session())
    assert out["greeting"].QMP.capabilities == []
    assert out["version"] == version_info()
    assert out["exports"] == [{"type": "vhost-user-blk", "id": "export0", "node-name": "disk0",
                               "shutting-down": False}]
    [entry] = out["stats"]
    assert entry["node-name"] == "disk0"
    st = entry["stats"]
    assert (st["rd_operations"], st["rd_bytes"]) == (3, 3 * 4096)
    assert (st["wr_operations"], st["wr_bytes"]) == (2, 3 * 4096)
    assert st["flush_operations"] == 1
    assert (st["unmap_operations"], st["unmap_bytes"]) == (2, 24 * 512)
    assert st["failed_rd_operations"] == st["failed_wr_operations"] == 0
    for kind in ("rd", "wr", "flush", "unmap"):
        assert st[f"{kind}_total_time_ns"] > 0
    assert out["resize"] == {} and os.path.getsize(op.env.image) == 2 * MiB
    assert op.env.device.limits.capacity == 2 * MiB >> 9
    assert out["quit"] == {} and op.quits == [1]


def test_errors_as_qemu_reports_them(make_operated: MakeOperated) -> None:
    op = make_operated(read_only=True)

    async def session() -> list[tuple[str, str]]:
        qmp = await connect(op)
        errors = []
        for cmd, args in [
            ("no-such-command", None),
            ("block_resize", {"node-name": "disk0"}),
            ("block_resize", {"node-name": "disk0", "size": "big"}),
            ("block_resize", {"node-name": "nope", "size": 2 * MiB}),
            ("block_resize", {"node-name": "disk0", "size": 2 * MiB}),  # read-only
            ("query-version", {"verbose": True}),
        ]:
            try:
                await qmp.execute(cmd, args)
            except ExecuteError as exc:
                errors.append((exc.error_class, exc.error.error.desc))
        await qmp.disconnect()
        return errors

    errors = run(session())
    assert [cls for cls, _ in errors] == ["CommandNotFound"] + ["GenericError"] * 5
    assert errors[1][1] == "Parameter 'size' is missing"
    assert errors[2][1] == "Invalid parameter type for 'size', expected: integer"
    assert errors[3][1] == "Cannot find device='' nor node-name='nope'"
    assert "read-only" in errors[4][1]
    assert errors[5][1] == "Parameter 'verbose' is unexpected"
    assert os.path.getsize(op.env.image) == MiB


def test_socket_mode_malformed_json_and_negotiation_over_a_raw_socket(
        make_operated: MakeOperated) -> None:
    op = make_operated()
    assert stat.S_IMODE(os.stat(op.qmp_path).st_mode) == 0o600
    c = RawClient(op)
    try:
        assert c.greeting["QMP"]["capabilities"] == []
        assert c.execute("query-version", id=1)["error"]["class"] == "CommandNotFound"
        c.send(b'{"execute": "qmp_capabilities", oops}\n')
        reply = c.recv()
        assert reply["error"]["class"] == "GenericError"
        assert reply["error"]["desc"].startswith("JSON parse error")
        c.send(b"[1, 2]")
        assert c.recv()["error"]["desc"] == "QMP input must be a JSON object"
        # The connection still works, negotiation included; ids come back as sent.
        assert c.execute("qmp_capabilities", id={"n": 1}) == {"return": {}, "id": {"n": 1}}
        # Two commands in one write, one of them split over two writes.
        c.send(b'{"execute": "query-block-exports", "id": 2}{"execute": "query-')
        c.send(b'version", "id": 3}')
        assert c.recv()["id"] == 2 and c.recv() == {"return": version_info(), "id": 3}
    finally:
        c.close()


def test_two_clients_at_once_and_the_export_deleted_event(make_operated: MakeOperated) -> None:
    op = make_operated()

    async def session() -> tuple[list[Any], Any, Any]:
        a, b = await connect(op, "a"), await connect(op, "b")
        results = await asyncio.gather(
            *(client.execute("query-block-exports") for client in (a, b, a, b)),
            a.execute("query-blockstats"), b.execute("query-version"))
        # The export goes away (as at SIGTERM or quit): both clients are told, then closed.
        await asyncio.get_running_loop().run_in_executor(None, op.plane.stop)
        ev_a = await a.events.get()
        ev_b = await b.events.get()
        for client in (a, b):
            with contextlib.suppress(EOFError):  # the server hung up first: that is the point
                await client.disconnect()
        return results, ev_a, ev_b

    results, ev_a, ev_b = run(session())
    assert all(r == results[0] for r in results[:4])
    assert results[5] == version_info()
    for ev in (ev_a, ev_b):
        assert ev["event"] == "BLOCK_EXPORT_DELETED" and ev["data"] == {"id": "export0"}
        assert set(ev["timestamp"]) == {"seconds", "microseconds"}
    assert not op.qmp_path.exists()


def test_client_gone_while_its_block_resize_waits_for_the_frontend(
        make_operated: MakeOperated) -> None:
    """The resize blocks the QMP thread until QEMU acks the config change; the client that asked
    hangs up meanwhile.  Its reply is dropped; the resize completes; other clients go on."""
    op = make_operated()
    ours, theirs = socket.socketpair()
    op.env.frontend.checked(Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
    theirs.close()
    ours.settimeout(10)
    c = RawClient(op)
    c.execute("qmp_capabilities")
    c.send(json.dumps({"execute": "block_resize",
                       "arguments": {"node-name": "disk0", "size": 3 * MiB}}).encode())
    request, _, _ = m.HEADER.unpack(ours.recv(m.HEADER_SIZE, socket.MSG_WAITALL))
    assert request == BackendRequest.CONFIG_CHANGE_MSG
    c.close()  # mid-command
    cfg = op.env.frontend.get_config(0, 8)
    assert struct.unpack("<Q", cfg[-8:])[0] == 3 * MiB >> 9
    ours.sendall(m.HEADER.pack(request, m.VERSION | m.FLAG_REPLY, 8) + struct.pack("<Q", 0))

    async def after() -> Any:
        qmp = await connect(op)
        stats = await qmp.execute("query-blockstats")
        await qmp.disconnect()
        return stats

    assert run(after())[0]["node-name"] == "disk0"
    assert os.path.getsize(op.env.image) == 3 * MiB
    ours.close()


def test_quit_stops_the_daemon(make_operated: MakeOperated) -> None:
    op = make_operated(real_quit=True)
    c = RawClient(op)
    try:
        c.execute("qmp_capabilities")
        assert c.execute("quit", id="q") == {"return": {}, "id": "q"}
        op.env.daemon.thread.join(10)
        assert not op.env.daemon.thread.is_alive(), "quit did not stop the daemon"
        with ThreadPoolExecutor(1) as ex:  # what the CLI does once serve_forever returned
            ex.submit(op.plane.stop).result(10)
        ev = c.recv()
        assert ev["event"] == "BLOCK_EXPORT_DELETED"
        assert c.file.readline() == b""  # and the server hung up
    finally:
        c.close()


@pytest.mark.parametrize("garbage", [b"\xff\xfe{}\n", b"}" * 10, b"[" * 5000],
                         ids=["bad-utf8", "closing-braces", "too-deep"])
def test_garbage_never_kills_the_server(make_operated: MakeOperated, garbage: bytes) -> None:
    op = make_operated()
    c = RawClient(op)
    try:
        c.send(garbage)
        c.send(b'\n{"execute": "qmp_capabilities", "id": "ok"}')
        while True:
            reply = c.recv()
            if reply.get("id") == "ok":
                break
            assert reply["error"]["class"] in ("GenericError", "CommandNotFound")
    finally:
        c.close()
    assert op.plane.qmp is not None
    d = RawClient(op)
    assert d.execute("qmp_capabilities") == {"return": {}}
    d.close()


def test_client_that_never_reads_is_dropped_and_holds_up_nobody(
        make_operated: MakeOperated, caplog: pytest.LogCaptureFixture) -> None:
    op = make_operated()
    hog = RawClient(op)
    hog.execute("qmp_capabilities")
    hog.sock.settimeout(30)
    command = b'{"execute": "query-blockstats"}'
    try:
        for _ in range(20000):  # ~15 MB of replies it never reads
            hog.send(command * 10)
    except (BrokenPipeError, ConnectionResetError):
        pass  # dropped while still sending
    other = RawClient(op)
    assert other.execute("qmp_capabilities") == {"return": {}}
    assert other.execute("query-block-exports")["return"][0]["id"] == "export0"
    other.close()
    hog.close()
    assert "bytes of output unread" in caplog.text
