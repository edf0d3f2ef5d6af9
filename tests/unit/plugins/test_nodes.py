"""--blockdev nodes: each driver opened for real where it can be (file, raw, qcow2, nbd, python,
filters), the rbd mapping, and the errors a QSD user would recognise."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from blockdev import keyval
from blockdev.filters import DelayStorage, ErrorStorage
from blockdev.images import create
from blockdev.nodes import BlockGraph, NodeError
from blockdev.python.storage import ENTRY_POINT_GROUP, PluginStorage
from blockdev.storage import FileStorage, StorageError
from remote_testbed.nbd_servers import EXPORT
from tests.remote.fixtures import MakeNbd
from tests.unit.plugins.helpers import engines, read, write

MiB = 1 << 20


def graph(*blockdevs: str) -> BlockGraph:
    g = BlockGraph()
    for text in blockdevs:
        g.add(keyval.parse_option(text))
    return g


def roundtrip(storage, offset: int = 4096, data: bytes = b"n" * 4096) -> None:
    q0, q1 = engines(storage)
    try:
        assert write(q0, offset, data) == len(data)
        assert read(q1, offset, len(data)) == data
    finally:
        q0.close()
        q1.close()


@pytest.fixture
def img(tmp_path: Path) -> Path:
    path = tmp_path / "a.img"
    path.write_bytes(bytes(MiB))
    return path


def test_file_node_and_raw_over_it(img):
    g = graph(f"driver=file,node-name=f0,filename={img},aio=threads,cache.direct=off",
              "driver=raw,node-name=r0,file=f0")
    st = g.open("r0", writable=True)
    assert isinstance(st, FileStorage) and st.engine_kind == "threads"
    assert st.info.size == MiB and not st.info.read_only
    roundtrip(st)
    st.close()
    assert img.read_bytes()[4096:8192] == b"n" * 4096


def test_file_locking_refuses_a_second_writer(img):
    g = graph(f"driver=file,node-name=f0,filename={img}",
              f"driver=file,node-name=f1,filename={img}",
              f"driver=file,node-name=f2,filename={img},locking=off")
    first = g.open("f0", writable=True)
    with pytest.raises(StorageError, match="failed to"):
        g.open("f1", writable=True)
    g.open("f2", writable=True).close()
    first.close()


def test_native_aio_is_io_uring_with_o_direct(img):
    g = graph(f"driver=file,node-name=f0,filename={img},aio=native,cache.direct=on")
    st = g.open("f0", writable=False)
    assert isinstance(st, FileStorage) and st.engine_kind == "io_uring" and st.info.direct
    assert st.info.read_only
    st.close()


def test_qcow2_over_a_file_node(tmp_path):
    path = tmp_path / "q.qcow2"
    create(str(path), 2 * MiB, "qcow2")
    g = graph(f'{{"driver": "qcow2", "node-name": "q", "file": {{"driver": "file", '
              f'"filename": "{path}"}}}}')
    st = g.open("q", writable=True)
    assert st.info.size == 2 * MiB and type(st.disk).__name__ == "Qcow2Disk"  # type: ignore[attr-defined]
    roundtrip(st)
    st.close()


def test_nbd_node_unix(make_nbd: MakeNbd):
    server = make_nbd("qemu-nbd", "unix")
    g = graph(f"driver=nbd,node-name=n,server.type=unix,server.path={server.sock},"
              f"export={EXPORT},reconnect-delay=5")
    st = g.open("n", writable=True)
    assert st.info.size == server.size
    roundtrip(st)
    st.close()


def test_rbd_node_maps_to_an_rbd_spec(monkeypatch):
    import blockdev.rbd.storage as rbd

    seen: dict[str, object] = {}

    class Fake(PluginStorage):
        def __init__(self, spec, **kw):
            seen.update(spec=spec, **kw)
            from examples.ramdisk import RamDisk
            super().__init__(RamDisk("1M"), "fake")

    monkeypatch.setattr(rbd, "RbdStorage", Fake)
    g = graph("driver=rbd,node-name=r,pool=p,image=i,snapshot=s,conf=/c,user=u")
    g.open("r", writable=False, logical_block_size=4096)
    assert seen["spec"] == rbd.RbdSpec("p", "i", "s", "/c", "u")
    assert seen["read_only"] and seen["logical_block_size"] == 4096


def test_python_node_and_a_filter_chain(tmp_path):
    log = tmp_path / "io.log"
    g = graph("driver=python,node-name=ram,module=examples.ramdisk,class=RamDisk,size=1M",
              f"driver=log,node-name=l,logfile={log},file.driver=delay,file.delay-read=1,"
              "file.file=ram")
    st = g.open("l", writable=True)
    assert isinstance(st.child, DelayStorage)  # type: ignore[attr-defined]
    assert isinstance(st.child.child, PluginStorage)  # type: ignore[attr-defined]
    roundtrip(st)
    st.close()
    assert len(log.read_text().splitlines()) == 2


def test_registered_plugin_driver(monkeypatch):
    import blockdev.python.storage as ps

    ep = importlib.metadata.EntryPoint("ram", "examples.ramdisk:RamDisk", ENTRY_POINT_GROUP)
    monkeypatch.setattr(ps, "registered_drivers", lambda: {"ram": ep})
    g = graph("driver=ram,node-name=r,size=64K")
    st = g.open("r", writable=True)
    assert isinstance(st, PluginStorage) and st.info.size == 64 << 10
    with pytest.raises(NodeError, match="Parameter 'driver' does not accept value 'disk'"):
        graph("driver=disk,node-name=x")


def test_discard_ignore_withdraws_discard_and_read_only_nodes(img):
    g = graph(f"driver=file,node-name=f,filename={img},discard=ignore,read-only=on")
    with pytest.raises(StorageError, match="Cannot export read-only node 'f' as writable"):
        g.open("f", writable=True)
    st = g.open("f", writable=False)
    assert not st.caps.discard and st.info.read_only
    st.close()


def test_filter_options_are_checked_at_open():
    g = graph("driver=python,node-name=ram,module=examples.ramdisk,class=RamDisk,size=64K",
              "driver=error,node-name=e,file=ram,error=EWHAT")
    with pytest.raises(StorageError, match="e: Parameter 'error': unknown errno name"):
        g.open("e", writable=True)
    st = graph("driver=python,node-name=ram,module=examples.ramdisk,class=RamDisk,size=64K",
               "driver=error,node-name=e,file=ram,error-rate=1").open("e", writable=True)
    assert isinstance(st, ErrorStorage)


@pytest.mark.parametrize(("blockdevs", "message"), [
    (["node-name=x"], "Parameter 'driver' is missing"),
    (["driver=file,filename=/x"], "Parameter 'node-name' is missing"),
    (["driver=file,node-name=1x,filename=/x"], "Invalid node-name: '1x'"),
    (["driver=file,node-name=x,filename=/x", "driver=file,node-name=x,filename=/y"],
     "Duplicate nodes with node-name='x'"),
    (["driver=file,node-name=x,filename=/x,bogus=1"], "Parameter 'bogus' is unexpected"),
    (["driver=file,node-name=x,filename=/x,cache.writeback=on"],
     "Parameter 'cache.writeback' is unexpected"),
    (["driver=file,node-name=x"], "Parameter 'filename' is missing"),
    (["driver=file,node-name=x,filename=/x,aio=posix"],
     "Parameter 'aio' does not accept value 'posix'"),
    (["driver=file,node-name=x,filename=/x,aio=native"], "requires cache.direct=on"),
    (["driver=file,node-name=x,filename=/x,read-only=maybe"],
     "Parameter 'read-only' expects 'on' or 'off'"),
    (["driver=raw,node-name=x,file=nowhere"], "Cannot find device='' nor node-name='nowhere'"),
    (["driver=raw,node-name=x"], "Parameter 'file' is missing"),
    (["driver=python,node-name=p,module=examples.ramdisk,size=1M"],
     "Parameter 'class' is missing"),
    (["driver=python,node-name=p,class=RamDisk"], "Parameter 'module' is missing"),
    (["driver=nbd,node-name=p,server.type=unix"], "Parameter 'server.path' is missing"),
    (["driver=nbd,node-name=p,server.path=/s"], "Parameter 'server.type' is missing"),
    (["driver=nbd,node-name=p,server.type=inet,server.host=h,server.port=70000"],
     "Parameter 'server.port' expects a value from 1 to 65535"),
    (["driver=rbd,node-name=p,pool=x"], "Parameter 'image' is missing"),
    (["driver=python,node-name=ram,module=m,class=C", "driver=qcow2,node-name=q,file=ram"],
     "qcow2: its 'file' must be a driver=file node"),
    (["driver=qcow2,node-name=q,file.driver=file,file.filename=/x,backing=b"],
     "'backing' is not supported"),
    (["driver=file,node-name=x,filename=/x,detect-zeroes=on"], "detect-zeroes"),
])
def test_declaration_errors(blockdevs, message):
    with pytest.raises(NodeError) as info:
        graph(*blockdevs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_failed_declaration_leaves_no_nested_node_behind():
    g = BlockGraph()
    with pytest.raises(NodeError, match="'bogus' is unexpected"):
        g.add(keyval.parse("driver=raw,node-name=r,file.driver=file,file.filename=/x,bogus=1"))
    assert g.nodes == {}


def test_open_errors_are_one_line(tmp_path):
    g = graph(f"driver=file,node-name=f,filename={tmp_path}/missing.img",
              "driver=python,node-name=p,module=nosuch_module,class=C")
    with pytest.raises(StorageError, match=r"missing\.img"):
        g.open("f", writable=True)
    with pytest.raises(StorageError, match="cannot import plugin module 'nosuch_module'"):
        g.open("p", writable=True)
    with pytest.raises(StorageError, match="Cannot find device='' nor node-name='zz'"):
        g.open("zz", writable=True)
