"""Several exports in one server: QMP over a live ExportSet (nodes and exports added and removed
at run time, the BLOCK_EXPORT_DELETED event), metrics per export, and one export's trouble
leaving the others serving.  In process, with vhost_frontend as the frontends."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from blockdev.nodes import BlockGraph
from blockdev.storage import Storage
from storage_daemon.exports import ExportSet
from storage_daemon.plane import ControlPlane
from storage_daemon.qmp_protocol import QmpError
from storage_daemon.qsd_options import ExportOptions
from tests.unit.cli_harness import connect
from virtio_blk.device import BlkDevice
from virtio_blk.request import Status

MiB = 1 << 20


class Client:
    """A QMP client on a bare socket that keeps the events it reads past."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        assert "QMP" in self._line()
        assert self.cmd("qmp_capabilities") == {"return": {}}

    def _line(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line.endswith(b"\r\n"), line
        return dict(json.loads(line))

    def cmd(self, name: str, **arguments: Any) -> dict[str, Any]:
        self.sock.sendall(json.dumps({"execute": name, "arguments": arguments}).encode())
        while True:
            msg = self._line()
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg

    def ok(self, name: str, **arguments: Any) -> Any:
        reply = self.cmd(name, **arguments)
        assert "return" in reply, (name, arguments, reply)
        return reply["return"]

    def error(self, name: str, **arguments: Any) -> str:
        reply = self.cmd(name, **arguments)
        assert reply.get("error", {}).get("class") == "GenericError", reply
        return str(reply["error"]["desc"])

    def event(self, name: str) -> dict[str, Any]:
        while not any(e["event"] == name for e in self.events):
            msg = self._line()
            assert "event" in msg, msg
            self.events.append(msg)
        return next(e for e in self.events if e["event"] == name)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@dataclass
class Served:
    tmp: Path
    exports: ExportSet
    plane: ControlPlane
    qmp: Client
    thread: threading.Thread

    def image(self, name: str, size: int = 4 * MiB) -> Path:
        path = self.tmp / name
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def add(self, export_id: str, node: str, **extra: Any) -> Path:
        """A file node and a writable export of it, over QMP; the export's socket."""
        self.qmp.ok("blockdev-add", driver="file", filename=str(self.image(f"{node}.img")),
                    **{"node-name": node})
        sock = self.tmp / f"{export_id}.sock"
        self.qmp.ok("block-export-add", type="vhost-user-blk", id=export_id, writable=True,
                    addr={"type": "unix", "path": str(sock)}, **{"node-name": node}, **extra)
        return sock

    @property
    def metrics_url(self) -> str:
        assert self.plane.metrics is not None
        return f"http://127.0.0.1:{self.plane.metrics.port}/metrics"


def _device(storage: Storage, opts: ExportOptions) -> BlkDevice:
    return BlkDevice(storage, num_queues=opts.num_queues, engine="inline",
                     queue_processes=False, latency_accounting=True)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    exports = ExportSet(_device, BlockGraph())
    plane = ControlPlane(exports, qmp_paths=[("--qmp", str(tmp_path / "qmp.sock"))],
                         metrics_address=("127.0.0.1", 0))
    plane.start()
    thread = threading.Thread(target=exports.serve_forever, daemon=True)
    thread.start()
    client = Client(tmp_path / "qmp.sock")
    s = Served(tmp_path, exports, plane, client, thread)
    try:
        yield s
    finally:
        client.close()
        exports.shutdown()
        thread.join(10)
        plane.stop()
        exports.close()
    assert not thread.is_alive()


def test_two_exports_serve_their_own_disks(served: Served) -> None:
    """Each export its own socket, device and image; the queries list both, per node."""
    sock_a = served.add("ea", "na")
    sock_b = served.add("eb", "nb")
    fe_a, _, drv_a = connect(sock_a)
    fe_b, _, drv_b = connect(sock_b)
    try:
        assert drv_a.write(0, b"\xaa" * 4096).status == Status.OK
        assert drv_b.write(8, b"\xbb" * 512).status == Status.OK
        assert drv_b.write(16, b"\xbb" * 512).status == Status.OK
        assert drv_a.read(0, 4096).data == b"\xaa" * 4096
        assert drv_b.read(0, 512).data == b"\0" * 512  # b's image, not a's
    finally:
        fe_a.close()
        fe_b.close()
    assert (served.tmp / "na.img").read_bytes()[:4096] == b"\xaa" * 4096
    assert (served.tmp / "nb.img").read_bytes()[4096:4608] == b"\xbb" * 512
    assert served.qmp.ok("query-block-exports") == [
        {"type": "vhost-user-blk", "id": "ea", "node-name": "na", "shutting-down": False},
        {"type": "vhost-user-blk", "id": "eb", "node-name": "nb", "shutting-down": False}]
    stats = {s["node-name"]: s["stats"]
             for s in served.qmp.ok("query-blockstats", **{"query-nodes": True})}
    assert (stats["na"]["wr_operations"], stats["na"]["rd_operations"]) == (1, 1)
    assert (stats["nb"]["wr_operations"], stats["nb"]["wr_bytes"]) == (2, 1024)
    nodes = {n["node-name"]: n for n in served.qmp.ok("query-named-block-nodes")}
    assert set(nodes) == {"na", "nb"}
    assert nodes["na"]["drv"] == "file" and nodes["na"]["image"]["virtual-size"] == 4 * MiB
    assert nodes["nb"]["file"] == str(served.tmp / "nb.img")
    # block_resize by node name reaches that export's disk only.
    assert served.qmp.ok("block_resize", **{"node-name": "nb", "size": 8 * MiB}) == {}
    assert (served.tmp / "nb.img").stat().st_size == 8 * MiB
    assert (served.tmp / "na.img").stat().st_size == 4 * MiB
    # Metrics: every family labelled by export, each export its own counts.
    with urllib.request.urlopen(served.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    writes = {}
    timed = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert "export" in s.labels, s
            if s.name == "vhost_user_blk_requests_total" and s.labels["op"] == "write":
                writes[s.labels["export"]] = s.value
            if s.name == "vhost_user_blk_request_seconds_count":
                timed[(s.labels["export"], s.labels["op"])] = s.value
    assert writes == {"ea": 1, "eb": 2}
    assert timed[("eb", "write")] == 2 and timed[("ea", "read")] == 1


def test_export_lifecycle_and_the_deleted_event(served: Served) -> None:
    """QSD's refusals while an export is in use, then del -> the event once it is gone."""
    q = served.qmp
    sock = served.add("e1", "n1")
    assert q.error("block-export-add", type="vhost-user-blk", id="e1",
                   addr={"type": "unix", "path": str(served.tmp / "x.sock")},
                   **{"node-name": "n1"}) == "Block export id 'e1' is already in use"
    assert q.error("block-export-add", type="vhost-user-blk", id="e2",
                   addr={"type": "unix", "path": str(served.tmp / "x.sock")},
                   **{"node-name": "zz"}) == "Cannot find device='' nor node-name='zz'"
    assert q.error("block-export-add", type="vhost-user-blk", id="e2", writable="on",
                   addr={"type": "unix", "path": str(served.tmp / "x.sock")},
                   **{"node-name": "n1"}) == \
        "Invalid parameter type for 'writable', expected: boolean"
    assert q.error("block-export-add", type="vhost-user-blk", id="e2", addr="x",
                   **{"node-name": "n1"}) == \
        "Invalid parameter type for 'addr', expected: object"
    assert q.error("blockdev-add", driver="file", filename="/x",
                   **{"node-name": "n1"}) == "Duplicate nodes with node-name='n1'"
    missing = served.tmp / "missing.img"
    assert q.error("blockdev-add", driver="raw", file={"driver": "file", "filename": str(missing)},
                   **{"node-name": "n2"}) == \
        f"Could not open '{missing}': No such file or directory"
    assert [n["node-name"] for n in q.ok("query-named-block-nodes")] == ["n1"]  # none left
    assert q.error("blockdev-del", **{"node-name": "n1"}) == "Node n1 is in use"
    assert q.error("blockdev-del", **{"node-name": "zz"}) == \
        "Failed to find node with node-name='zz'"
    assert q.error("block-export-del", id="zz") == "Export 'zz' is not found"
    assert q.error("block-export-del", id="e1", mode="soft") == \
        "Parameter 'mode' does not accept value 'soft'"
    fe, _, drv = connect(sock)
    try:
        assert drv.write(0, b"\x11" * 512).status == Status.OK
        assert q.error("block-export-del", id="e1") == "export 'e1' still in use"
        assert not q.events
        # hard: the frontend is dropped (its queue drained), then the export goes.
        assert q.ok("block-export-del", id="e1", mode="hard") == {}
        ev = q.event("BLOCK_EXPORT_DELETED")
        assert ev["data"] == {"id": "e1"}
    finally:
        fe.close()
    assert not sock.exists()
    assert q.ok("query-block-exports") == []
    assert q.ok("blockdev-del", **{"node-name": "n1"}) == {}
    assert q.ok("query-named-block-nodes") == []
    # The id and node name are free again; a safe del of an unconnected export goes at once.
    sock = served.add("e1", "n1")
    q.events.clear()
    assert q.ok("block-export-del", id="e1") == {}
    assert q.event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e1"}
    assert q.error("block-export-del", id="e1") == "Export 'e1' is not found"


def test_a_safe_del_after_the_frontend_hung_up_does_not_wait_for_the_teardown(
        served: Served) -> None:
    """QEMU's unplug (device_del, DEVICE_DELETED, chardev-remove) closes its socket; the
    loop's teardown of that connection (stopping queue processes) can still be running when
    the user's block-export-del comes: safe mode must see a frontend that is gone, not one
    "still in use" (the race CI hit with a hot-unplugged disk)."""
    q = served.qmp
    sock = served.add("e1", "n1")
    fe, _, drv = connect(sock)
    export = served.exports.find("e1")
    assert export is not None and export.daemon.handler is not None
    handler = export.daemon.handler
    entered, release = threading.Event(), threading.Event()
    real_close = handler.close

    def slow_close() -> None:  # the queue processes take their time to stop
        entered.set()
        release.wait(10)
        real_close()

    handler.close = slow_close  # type: ignore[method-assign]
    try:
        assert drv.write(0, b"\x22" * 512).status == Status.OK
        assert q.error("block-export-del", id="e1") == "export 'e1' still in use"
        fe.close()
        assert entered.wait(10), "the loop never began tearing the connection down"
        assert export.daemon.connected  # the teardown has not finished...
        assert q.ok("block-export-del", id="e1") == {}  # ...but nobody is there
    finally:
        release.set()
    assert q.event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e1"}
    assert not sock.exists()


def test_a_child_node_cannot_go_before_its_parent(served: Served) -> None:
    q = served.qmp
    q.ok("blockdev-add", driver="file", filename=str(served.image("c.img")),
         **{"node-name": "f0"})
    q.ok("blockdev-add", driver="raw", file="f0", **{"node-name": "r0"})
    assert q.error("blockdev-del", **{"node-name": "f0"}) == "Block device f0 is in use"
    q.ok("blockdev-del", **{"node-name": "r0"})
    q.ok("blockdev-del", **{"node-name": "f0"})


def test_one_export_failing_leaves_the_other_serving(served: Served,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Export a's frontend hangs up mid-session, then its daemon hits an internal error while
    serving it (again and again): a's frontend is dropped, b's keeps reading and writing, a
    takes a new one once the bug is gone."""
    sock_a = served.add("ea", "na")
    sock_b = served.add("eb", "nb")
    fe_b, _, drv_b = connect(sock_b)
    try:
        fe_a, _, _ = connect(sock_a)
        fe_a.close(queues=False)  # a frontend that crashed
        assert drv_b.write(0, b"\x01" * 512).status == Status.OK
        export_a = served.exports.find("ea")
        assert export_a is not None

        calls: list[int] = []

        def broken(ready: set[int]) -> None:
            calls.append(1)
            raise RuntimeError("a bug in export a")

        monkeypatch.setattr(export_a.daemon, "handle_ready", broken)
        fe_a2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fe_a2.connect(str(sock_a))  # makes a's listener ready: its handler raises
        for i in range(20):
            assert drv_b.write(i, bytes([i]) * 512).status == Status.OK
            assert drv_b.read(i, 512).data == bytes([i]) * 512
        time.sleep(0.3)
        # The error recurs (a's listener stays readable) but a is left alone for a while
        # after each: no loop spinning on it, no log flood.
        assert 1 <= len(calls) <= 2, len(calls)
        fe_a2.close()
        monkeypatch.undo()
        fe_a3, _, drv_a3 = connect(sock_a)
        try:
            assert drv_a3.write(0, b"\x0a" * 512).status == Status.OK
        finally:
            fe_a3.close()
        assert drv_b.read(0, 512).data == b"\0" * 512
    finally:
        fe_b.close()
    assert served.thread.is_alive()
    assert [e["id"] for e in served.qmp.ok("query-block-exports")] == ["ea", "eb"]


class _Box:
    """A QOM object type for the test: one property, ``limits``."""

    def __init__(self, object_id: str, props: dict[str, Any]) -> None:
        self.limits = props.get("limits", {})
        self.closed = False
        _Box.made.append(self)

    made: list[_Box] = []

    def get(self, prop: str) -> Any:
        if prop != "limits":
            raise QmpError("GenericError", f"Property '{prop}' not found")
        return self.limits

    def set(self, prop: str, value: Any) -> None:
        self.get(prop)
        self.limits = value

    def close(self) -> None:
        self.closed = True


def test_objects_through_the_registry(served: Served) -> None:
    """object-add/-del and qom-get/-set reach the type registered for the qom-type (the hook
    throttle groups use); QEMU's error classes for the rest."""
    q = served.qmp
    assert q.error("object-add", **{"qom-type": "box"}, id="b0") == (
        "Parameter 'qom-type' does not accept value 'box'")
    served.plane.objects.register_type("box", _Box)
    assert q.ok("object-add", **{"qom-type": "box"}, id="b0", limits={"iops-total": 100}) == {}
    assert "duplicate" in q.error("object-add", **{"qom-type": "box"}, id="b0")
    assert q.ok("qom-get", path="/objects/b0", property="limits") == {"iops-total": 100}
    assert q.ok("qom-set", path="b0", property="limits", value={"iops-total": 5}) == {}
    assert q.ok("qom-get", path="b0", property="limits") == {"iops-total": 5}
    assert q.cmd("qom-get", path="/objects/zz", property="limits")["error"] == {
        "class": "DeviceNotFound", "desc": "Device '/objects/zz' not found"}
    assert q.error("qom-set", path="b0", property="limits") == "Parameter 'value' is missing"
    assert q.ok("object-del", id="b0") == {} and _Box.made[-1].closed
    assert q.error("object-del", id="b0") == "object 'b0' not found"


def test_an_export_whose_storage_fails_leaves_the_other_serving(served: Served) -> None:
    """Export a's image fails every request (an error filter): its requests get IOERR and
    are counted failed; b, in the same server, serves normally."""
    q = served.qmp
    q.ok("blockdev-add", driver="file", filename=str(served.image("fa.img")),
         **{"node-name": "fa"})
    q.ok("blockdev-add", driver="error", file="fa", **{"node-name": "na", "error-rate": "1"})
    sock_a = served.tmp / "a.sock"
    q.ok("block-export-add", type="vhost-user-blk", id="ea", writable=True,
         addr={"type": "unix", "path": str(sock_a)}, **{"node-name": "na"})
    sock_b = served.add("eb", "nb")
    fe_a, _, drv_a = connect(sock_a)
    fe_b, _, drv_b = connect(sock_b)
    try:
        for i in range(5):
            assert drv_a.write(i, b"\x0a" * 512).status == Status.IOERR
            assert drv_b.write(i, b"\x0b" * 512).status == Status.OK
            assert drv_a.read(i, 512).status == Status.IOERR
            assert drv_b.read(i, 512).data == b"\x0b" * 512
    finally:
        fe_a.close()
        fe_b.close()
    stats = {s["node-name"]: s["stats"] for s in q.ok("query-blockstats")}
    assert stats["na"]["failed_wr_operations"] == 5 and stats["na"]["wr_operations"] == 0
    assert stats["nb"]["wr_operations"] == 5 and stats["nb"]["failed_wr_operations"] == 0


class ClosingRamDisk:
    """A RAM-disk plugin that records its close (blockdev-del must call it)."""

    closed: list[str] = []

    def __init__(self, size: str = "1M", label: str = "") -> None:
        self.data = bytearray(int(size.rstrip("M")) << 20)
        self.label = label

    def size(self) -> int:
        return len(self.data)

    def pread(self, buf: memoryview, offset: int) -> None:
        buf[:] = self.data[offset:offset + len(buf)]

    def pwrite(self, buf: memoryview, offset: int) -> None:
        self.data[offset:offset + len(buf)] = buf

    def close(self) -> None:
        ClosingRamDisk.closed.append(self.label)


def test_a_python_plugin_node_over_qmp(served: Served) -> None:
    """blockdev-add takes driver=python as --blockdev does: a class that cannot be loaded is
    the command's error; the class gets its options as strings; the export writes and reads it.
    The node is opened by the export that serves it and closed with it (QSD opens a node at
    blockdev-add and closes it at blockdev-del: a difference the README states)."""
    q = served.qmp
    ClosingRamDisk.closed.clear()
    q.ok("blockdev-add", driver="python", module=__name__, **{"class": "ClosingRamDisk"},
         size="1M", label="ram0", **{"node-name": "ram"})
    assert [n["node-name"] for n in q.ok("query-named-block-nodes")] == ["ram"]
    assert q.error("blockdev-add", driver="python", module=__name__, **{"class": "Nope"},
                   **{"node-name": "bad"}) == f"plugin module '{__name__}' has no class 'Nope'"
    assert [n["node-name"] for n in q.ok("query-named-block-nodes")] == ["ram"]
    sock = served.tmp / "ram.sock"
    q.ok("block-export-add", type="vhost-user-blk", id="r", writable=True,
         addr={"type": "unix", "path": str(sock)}, **{"node-name": "ram"})
    fe, _, drv = connect(sock)
    try:
        assert drv.write(8, b"\x5a" * 4096).status == Status.OK  # sector 8: byte 4096
        res = drv.read(8, 4096)
        assert res.status == Status.OK and res.data == b"\x5a" * 4096
    finally:
        fe.close()
    q.events.clear()
    assert q.ok("block-export-del", id="r", mode="hard") == {}
    q.event("BLOCK_EXPORT_DELETED")
    assert ClosingRamDisk.closed == ["ram0"]
    assert q.ok("blockdev-del", **{"node-name": "ram"}) == {}
    assert q.ok("query-named-block-nodes") == []
