"""No QMP client can break the control plane: hostile sizes, commands that fail unexpectedly,
too many clients, clients that never negotiate (issue 19, items 2 and 3)."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from storage_daemon import qmp, version_info
from tests.unit.control.conftest import MakeOperated
from tests.unit.control.test_qmp_server import RawClient

MiB = 1 << 20


@pytest.mark.parametrize("size", [
    2**64, 2**63, 2**73, 2**63 - 512, 2**63 - 1, -1, -(2**63), 0, 1.5, 1e300, True, "1M",
    None, [MiB * 2], {"n": 1},
])
def test_hostile_block_resize_is_an_error_reply_and_changes_nothing(
        make_operated: MakeOperated, size: Any) -> None:
    op = make_operated()
    c = RawClient(op)
    try:
        c.execute("qmp_capabilities")
        reply = c.execute("block_resize", {"node-name": "disk0", "size": size}, id="r")
        assert set(reply) == {"error", "id"}, reply
        assert reply["error"]["class"] == "GenericError"
        assert isinstance(reply["error"]["desc"], str) and reply["error"]["desc"]
        if isinstance(size, int) and not isinstance(size, bool) and size >= 2**63:
            # QAPI's int is int64: QEMU reports a larger number as a non-integer.
            assert reply["error"]["desc"] == ("Invalid parameter type for 'size', expected: "
                                              "integer")
        # The server goes on, on this connection and on a new one.
        assert c.execute("query-version", id="v") == {"return": version_info(), "id": "v"}
    finally:
        c.close()
    d = RawClient(op)
    assert d.execute("qmp_capabilities") == {"return": {}}
    d.close()
    assert os.path.getsize(op.env.image) == MiB
    assert op.env.device.limits.capacity == MiB >> 9
    assert op.env.device.storage.info.size == MiB


def test_a_command_that_fails_unexpectedly_is_a_generic_error_logged_a_few_times(
        make_operated: MakeOperated, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    op = make_operated()

    def broken(size: int) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(op.plane.export, "resize", broken)
    c = RawClient(op)
    try:
        c.execute("qmp_capabilities")
        with caplog.at_level(logging.ERROR):
            for i in range(30):
                reply = c.execute("block_resize", {"node-name": "disk0", "size": 2 * MiB}, id=i)
                assert reply == {"error": {"class": "GenericError",
                                           "desc": "internal error: RuntimeError: a bug"},
                                 "id": i}
        assert c.execute("query-block-exports")["return"][0]["id"] == "export0"
    finally:
        c.close()
    logged = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert 1 <= len(logged) <= 5 and logged[0].exc_info is not None


def test_a_reply_that_cannot_be_sent_drops_that_client_only(
        make_operated: MakeOperated, monkeypatch: pytest.MonkeyPatch) -> None:
    op = make_operated()
    monkeypatch.setattr(op.plane.export, "blockstats", lambda: {"x": object()})  # not JSON
    c = RawClient(op)
    try:
        c.execute("qmp_capabilities")
        c.send(b'{"execute": "query-blockstats"}')
        assert c.file.readline() == b""  # dropped
    finally:
        c.close()
    d = RawClient(op)
    assert d.execute("qmp_capabilities") == {"return": {}}
    assert d.execute("query-version") == {"return": version_info()}
    d.close()


def test_clients_beyond_the_limit_get_an_error_and_are_closed(
        make_operated: MakeOperated) -> None:
    op = make_operated()
    clients = [RawClient(op) for _ in range(qmp.MAX_CLIENTS)]
    try:
        assert all("QMP" in c.greeting for c in clients)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.settimeout(10)
            extra.connect(str(op.qmp_path))
            f = extra.makefile("rb")
            refusal = json.loads(f.readline())
            assert refusal["error"]["class"] == "GenericError"
            assert "too many QMP clients" in refusal["error"]["desc"]
            assert f.readline() == b""
        clients.pop().close()  # a slot is free again: the next client is served
        deadline = time.monotonic() + 10
        while True:
            late = RawClient(op)
            if "QMP" in late.greeting or time.monotonic() > deadline:
                break
            late.close()  # refused: the server had not seen the close yet
        assert late.execute("qmp_capabilities") == {"return": {}}
        late.close()
        assert clients[0].execute("qmp_capabilities") == {"return": {}}
    finally:
        for c in clients:
            c.close()


def test_a_client_that_never_negotiates_is_dropped(tmp_path: Path) -> None:
    server = qmp.QmpServer(tmp_path / "q.sock", lambda name, args: {}, version_info(),
                       handshake_timeout=0.5)
    server.start()
    try:
        def connect() -> tuple[socket.socket, Any]:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(tmp_path / "q.sock"))
            f = s.makefile("rb")
            assert "QMP" in json.loads(f.readline())
            return s, f

        idle, idle_f = connect()
        half, half_f = connect()
        half.sendall(b'{"execute": "qmp_capa')  # half a message, then nothing
        done, done_f = connect()
        done.sendall(b'{"execute": "qmp_capabilities"}')
        assert json.loads(done_f.readline()) == {"return": {}}
        t0 = time.monotonic()
        assert idle_f.readline() == b"" and half_f.readline() == b""
        assert time.monotonic() - t0 < 5
        # The negotiated client is not subject to the handshake timeout.
        time.sleep(0.6)
        done.sendall(b'{"execute": "query-version"}')
        assert json.loads(done_f.readline()) == {"return": {}}
        assert server.clients == 1
        for s in (idle, half, done):
            s.close()
    finally:
        server.stop()
