"""A throttle group from QSD's command line, measured with a vhost-user frontend: two queues
busy run at the group's iops-total within 15%, at a new limit within 15% after qom-set, and
query-blockstats and the metrics show the time requests were held."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.unit.cli_harness import Server, assert_one_line_error, qmp, run
from vhost_frontend import Frontend, FrontendMemory
from vhost_frontend.blk import PAGE, T_IN, BlkDriver, header
from virtio_blk.request import Status


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Requests in flight per queue.
DEPTH = 4


class Load:
    """One thread per queue reading 4 KiB, DEPTH at a time, as fast as the server answers;
    completions counted."""

    def __init__(self, drivers: list[BlkDriver]) -> None:
        self.done = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(d,), daemon=True)
                         for d in drivers]
        for t in self._threads:
            t.start()

    def _run(self, q: BlkDriver) -> None:
        # The buffers of DEPTH requests, reused (BlkDriver.read would allocate fresh guest
        # memory for every request and run out in a few seconds).
        chains = [(q.pieces([16]), [*q.pieces([4096]), (q.alloc(1, PAGE - 1), 1)])
                  for _ in range(DEPTH)]
        sector = 0
        while not self._stop.is_set():
            pending = []
            for hdr, writable in chains:
                q.fill(hdr, header(T_IN, sector))
                sector = (sector + 8) % 2048
                pending.append(q.start_chain(hdr, writable, poison=False))
            results = q.wait(pending)
            with self._lock:
                for r in results:
                    if r.status == Status.OK:
                        self.done += 1
                    else:
                        self.failed += 1

    def rate(self, seconds: float) -> float:
        with self._lock:
            start = self.done
        t0 = time.monotonic()
        time.sleep(seconds)
        with self._lock:
            end = self.done
        return (end - start) / (time.monotonic() - t0)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


@pytest.mark.parametrize("processes", ["off", "on", "pool"])
def test_group_limit_with_two_queues_busy_and_qom_set(tmp_path: Path, servers: list[Server],
                                                      processes: str) -> None:
    """Queue threads, then queue processes (one per queue, sharing the group's budget and the
    node's held time through shared memory), then a pool of 2 workers serving the queues."""
    img, sock, mon = tmp_path / "d.img", tmp_path / "s.sock", tmp_path / "qmp.sock"
    img.write_bytes(bytes(1 << 20))
    port = _free_port()
    server = Server(
        "--object", "throttle-group,id=tg0,limits.iops-total=200",
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", "driver=throttle,node-name=t0,throttle-group=tg0,file=f0",
        "--export", f"type=vhost-user-blk,id=e0,node-name=t0,addr.type=unix,addr.path={sock},"
                    "num-queues=2",
        "--qmp", str(mon), "--metrics", f"127.0.0.1:{port}", "--queue-processes", processes,
        "--workers", "2")
    servers.append(server)
    server.started()
    fe = Frontend(sock)
    mem = FrontendMemory([(0, 8 << 20, 0)])
    load = None
    try:
        fe.negotiate()
        fe.set_mem_table(mem)
        drivers = [BlkDriver(fe, fe.setup_queue(i, size=64), mem) for i in range(2)]
        load = Load(drivers)
        time.sleep(0.5)  # past the group's initial burst (avg/10)
        children = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True,
                                  text=True, check=False).stdout.split()
        assert len(children) == (0 if processes == "off" else 2)
        before = load.rate(2.5)
        (reply,) = qmp(mon, json.dumps({"execute": "qom-set", "arguments": {
            "path": "tg0", "property": "limits", "value": {"iops-total": 400}}}))
        assert reply == {"return": {}}
        time.sleep(1.0)  # "within a second"
        after = load.rate(2.5)
        load.stop()
        assert load.failed == 0
        print(f"queue processes {processes}: limit 200: {before:.1f} IOPS; after qom-set to "
              f"400: {after:.1f} IOPS")
        assert 200 * 0.85 <= before <= 200 * 1.15, before
        assert 400 * 0.85 <= after <= 400 * 1.15, after
        got, stats = qmp(mon, json.dumps({"execute": "qom-get", "arguments": {
            "path": "/objects/tg0", "property": "limits"}}),
            json.dumps({"execute": "query-blockstats"}))
        assert got["return"]["iops-total"] == 400 and got["return"]["bps-total"] == 0
        held = stats["return"][0]["stats"]["x-throttled-time-ns"]
        assert held > 1e9  # two queues, each waiting most of ~6 s
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        line = next(ln for ln in text.splitlines()
                    if ln.startswith('vhost_user_blk_throttled_seconds_total{group="tg0"'))
        assert float(line.split()[-1]) > 1.0
        # In use: object-del refused; a bad limit refused in QEMU's words, nothing changed.
        refused, bad = qmp(mon, json.dumps({"execute": "object-del",
                                            "arguments": {"id": "tg0"}}),
                           json.dumps({"execute": "qom-set", "arguments": {
                               "path": "tg0", "property": "limits",
                               "value": {"iops-read": 5}}}))
        assert refused["error"]["desc"] == "object 'tg0' is in use, can not be deleted"
        assert bad["error"]["desc"] == ("bps/iops/max total values and read/write values "
                                        "cannot be used at the same time")
        rc, _ = server.terminate()
        assert rc == 0
    finally:
        if load is not None:
            load.stop()
        fe.close()
        mem.close()


def test_object_add_and_del_over_qmp(tmp_path: Path, servers: list[Server]) -> None:
    img, sock, mon = tmp_path / "d.img", tmp_path / "s.sock", tmp_path / "qmp.sock"
    img.write_bytes(bytes(1 << 20))
    # t1 names g1 but is not exported (never opened): g1 is in use all the same, as in QEMU.
    server = Server("--object", "throttle-group,id=g1,x-iops-total=10",
                    "--blockdev", f"driver=file,node-name=f0,filename={img}",
                    "--blockdev", "driver=throttle,node-name=t1,throttle-group=g1,file=f0",
                    "--export", f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
                    f"addr.path={sock}", "--qmp", str(mon))
    servers.append(server)
    server.started()
    add = {"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "g2",
                                                  "limits": {"bps-total": 1048576}}}
    replies = qmp(mon, json.dumps(add), json.dumps(add),
                  json.dumps({"execute": "object-add", "arguments": {
                      "qom-type": "throttle-group", "id": "g3", "x-iops-write": 7}}),
                  json.dumps({"execute": "qom-get", "arguments": {"path": "g3",
                                                                  "property": "limits"}}),
                  json.dumps({"execute": "object-del", "arguments": {"id": "g2"}}),
                  json.dumps({"execute": "object-del", "arguments": {"id": "g2"}}),
                  json.dumps({"execute": "qom-get", "arguments": {"path": "g2",
                                                                  "property": "limits"}}),
                  json.dumps({"execute": "object-add", "arguments": {
                      "qom-type": "throttle-group", "id": "g4",
                      "limits": {"iops-total-max": 10}}}),
                  json.dumps({"execute": "object-del", "arguments": {"id": "g1"}}),
                  json.dumps({"execute": "qom-set", "arguments": {
                      "path": "g1", "property": "limits", "value": {"iops-total": "5"}}}),
                  json.dumps({"execute": "object-add", "arguments": {
                      "qom-type": "throttle-group", "id": "g5", "limits": [1]}}))
    assert replies[0] == {"return": {}}
    assert replies[1]["error"]["desc"] == ("attempt to add duplicate property 'g2' to object "
                                           "(type 'container')")
    assert replies[2] == {"return": {}}
    assert replies[3]["return"]["iops-write"] == 7
    assert replies[4] == {"return": {}}
    assert replies[5]["error"]["desc"] == "object 'g2' not found"
    assert replies[6]["error"]["class"] == "DeviceNotFound"
    assert replies[7]["error"]["desc"] == ("bps_max/iops_max require corresponding bps/iops "
                                           "values")
    assert replies[8]["error"]["desc"] == "object 'g1' is in use, can not be deleted"
    assert replies[9]["error"]["desc"] == ("Invalid parameter type for 'iops-total', "
                                           "expected: integer")  # QMP gives numbers
    assert replies[10]["error"]["desc"] == ("Invalid parameter type for 'limits', expected: "
                                            "object")
    assert server.terminate()[0] == 0


def test_command_line_errors_are_one_line(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    export = f"type=vhost-user-blk,id=e0,node-name=t0,addr.type=unix,addr.path={tmp_path}/s"
    file = f"driver=file,node-name=f0,filename={img}"
    proc = run("--blockdev", file, "--blockdev",
               "driver=throttle,node-name=t0,throttle-group=nope,file=f0", "--export", export)
    assert_one_line_error(proc, "Throttle group 'nope' does not exist")
    proc = run("--object", "throttle-group,id=g,limits.iops-total=10,limits.iops-read=5",
               "--blockdev", file, "--blockdev",
               "driver=throttle,node-name=t0,throttle-group=g,file=f0", "--export", export)
    assert_one_line_error(proc, "--object", "cannot be used at the same time")
    proc = run("--object", "iothread,id=io0", "--blockdev", file, "--export", export)
    assert_one_line_error(proc, "Parameter 'qom-type' does not accept value 'iothread'")
    proc = run("--blockdev", file, "--blockdev", "driver=throttle,node-name=t0,file=f0",
               "--export", export)
    assert_one_line_error(proc, "Parameter 'throttle-group' is missing")


@pytest.mark.parametrize("processes", ["off", "auto"])
def test_two_exports_share_one_group(tmp_path: Path, servers: list[Server],
                                     processes: str) -> None:
    """Two throttle nodes in one group, each over its own file and exported by the same
    server: both exports together run at the group's limit, not twice it.  ``auto`` with 2
    queues each: the worker pool (2 workers) serves the 4 queues, all on the group's one
    budget.  The group is the ObjectRegistry's object, its nodes the
    ExportSet's graph: object-del is refused while a node names it (and the group survives the
    refusal), allowed once the nodes are gone."""
    mon = tmp_path / "qmp.sock"
    args = ["--object", "throttle-group,id=tg,limits.iops-total=300"]
    socks = []
    for i in range(2):
        img = tmp_path / f"d{i}.img"
        img.write_bytes(bytes(1 << 20))
        socks.append(tmp_path / f"s{i}.sock")
        args += ["--blockdev", f"driver=file,node-name=f{i},filename={img}",
                 "--blockdev", f"driver=throttle,node-name=t{i},throttle-group=tg,file=f{i}",
                 "--export", f"type=vhost-user-blk,id=e{i},node-name=t{i},addr.type=unix,"
                             f"addr.path={socks[i]},num-queues=2"]
    server = Server(*args, "--qmp", str(mon), "--queue-processes", processes, "--workers", "2")
    servers.append(server)
    server.started()
    fes = [Frontend(sock) for sock in socks]
    mems = [FrontendMemory([(0, 8 << 20, 0)]) for _ in socks]
    load = None
    try:
        drivers = []
        for fe, mem in zip(fes, mems, strict=True):
            fe.negotiate()
            fe.set_mem_table(mem)
            drivers += [BlkDriver(fe, fe.setup_queue(i, size=64), mem) for i in range(2)]
        load = Load(drivers)
        time.sleep(0.5)  # past the group's initial burst
        children = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True,
                                  text=True, check=False).stdout.split()
        assert len(children) == (2 if processes == "auto" else 0)
        both = load.rate(2.5)
        load.stop()
        assert load.failed == 0
        print(f"queue processes {processes}: two exports, one group at 300: {both:.1f} IOPS")
        assert 300 * 0.85 <= both <= 300 * 1.15, both
        stats = qmp(mon, json.dumps({"execute": "query-blockstats"}))[0]["return"]
        assert {s["node-name"] for s in stats} == {"t0", "t1"}
        assert all(s["stats"]["x-throttled-time-ns"] > 0 for s in stats)
        for fe in fes:
            fe.close()
        fes = []
        del_export = [json.dumps({"execute": "block-export-del",
                                  "arguments": {"id": f"e{i}", "mode": "hard"}})
                      for i in range(2)]
        del_node = [json.dumps({"execute": "blockdev-del",
                                "arguments": {"node-name": f"{k}{i}"}})
                    for i in range(2) for k in "tf"]
        get = json.dumps({"execute": "qom-get",
                          "arguments": {"path": "tg", "property": "limits"}})
        obj_del = json.dumps({"execute": "object-del", "arguments": {"id": "tg"}})
        replies = qmp(mon, *del_export, obj_del, get)
        assert replies[:2] == [{"return": {}}] * 2, replies
        assert replies[2]["error"]["desc"] == "object 'tg' is in use, can not be deleted"
        assert replies[3]["return"]["iops-total"] == 300
        time.sleep(1.0)  # the exports finish closing
        # A node added over QMP names the group too; object-del waits for it as well.
        add = json.dumps({"execute": "blockdev-add", "arguments": {
            "driver": "throttle", "node-name": "t9", "throttle-group": "tg", "file": "f0"}})
        del9 = json.dumps({"execute": "blockdev-del", "arguments": {"node-name": "t9"}})
        replies = qmp(mon, add, obj_del, del9, *del_node, obj_del, get)
        assert replies[0] == {"return": {}}, replies[0]
        assert replies[1]["error"]["desc"] == "object 'tg' is in use, can not be deleted"
        assert all(r == {"return": {}} for r in replies[2:7]), json.dumps(replies)
        assert replies[7] == {"return": {}}
        assert replies[8]["error"]["class"] == "DeviceNotFound"
        rc, _ = server.terminate()
        assert rc == 0
    finally:
        if load is not None:
            load.stop()
        for fe in fes:
            fe.close()
        for mem in mems:
            mem.close()
