"""RBD and NBD storage through the device, against real servers: a one-node Ceph cluster,
qemu-nbd on a raw file and nbdkit's memory plugin (Unix socket and TCP on 127.0.0.1).

Every request type, the features that follow what the storage offers, server-side errors, and
the bytes checked from the host afterwards (``rbd export``, ``qemu-img convert`` of the export).
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockdev.backends import open_storage
from blockdev.storage import Storage, StorageError
from remote_testbed.ceph import CephCluster
from remote_testbed.nbd_servers import free_port
from tests.remote.fixtures import MakeNbd
from tests.unit.blk.conftest import BlkEnv, MakeBlk
from tests.unit.blk.test_modes import set_writeback
from vhost_frontend.blk import T_FLUSH, T_IN, T_OUT
from virtio_blk.request import SEGMENT_F_UNMAP, BlkFeature, Status

MiB = 1 << 20
BACKENDS = ("rbd", "qemu-nbd-unix", "qemu-nbd-tcp", "nbdkit-unix", "nbdkit-tcp")


@dataclass
class Remote:
    """A device on remote storage, and a way to read that storage from the host."""

    env: BlkEnv
    storage: Storage
    host_read: Callable[[int, int], bytes]


@pytest.fixture
def make_remote(request: pytest.FixtureRequest, make_nbd: MakeNbd, make_blk: MakeBlk,
                tmp_path: Path) -> Callable[..., Remote]:
    def make(backend: str, num_queues: int = 1, **options: object) -> Remote:
        if backend == "rbd":
            cluster: CephCluster = request.getfixturevalue("ceph_cluster")
            image = request.getfixturevalue("rbd_image")
            spec = cluster.spec(image)

            def host_read(offset: int, length: int) -> bytes:
                out = tmp_path / "export.raw"
                out.unlink(missing_ok=True)
                cluster.rbd("export", f"rbd/{image}", str(out))
                with open(out, "rb") as f:
                    f.seek(offset)
                    return f.read(length)
        else:
            kind, transport = backend.rsplit("-", 1)
            server = make_nbd(kind, transport)
            spec = server.uri

            def host_read(offset: int, length: int) -> bytes:
                if server.kind == "qemu-nbd":
                    return server.read(offset, length)
                out = tmp_path / "export.raw"
                out.unlink(missing_ok=True)
                subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", spec,
                                str(out)], check=True, capture_output=True, timeout=60)
                with open(out, "rb") as f:
                    f.seek(offset)
                    return f.read(length)
        storage = open_storage(spec, **options)  # type: ignore[arg-type]
        env = make_blk(storage=storage, num_queues=num_queues)
        return Remote(env, storage, host_read)

    return make


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_request_type(make_remote: Callable[..., Remote], backend: str) -> None:
    r = make_remote(backend)
    drv, dev = r.env.drv, r.env.device
    features = dev.features()
    for bit in (BlkFeature.FLUSH, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES):
        assert features & bit, bit.name
    assert not features & BlkFeature.RO
    assert dev.limits.capacity == (64 * MiB) >> 9

    data = os.urandom(3 * 4096 + 512)
    # scattered guest pieces (not sector-multiples each), one request
    pieces = drv.pieces([1000, 4096 + 24, 2048, len(data) - 1000 - 4096 - 24 - 2048])
    assert drv.write(8, data, pieces=pieces).status == Status.OK
    res = drv.read(8, len(data), pieces=drv.pieces([512, len(data) - 512]))
    assert (res.status, res.used) == (Status.OK, len(data) + 1)
    assert res.data == data
    # a request bigger than one NBD command may be (qemu-nbd: 32 MiB) and several pieces
    big = os.urandom(2 * MiB)
    assert drv.write(40 * 2048, big, pieces=drv.pieces([MiB, MiB])).status == Status.OK
    assert drv.read(40 * 2048, 2 * MiB).data == big
    # a read into 120 separate pages: many NBD commands and replies for one request
    res = drv.read(40 * 2048, 120 * 4096, pieces=drv.pieces([4096] * 120))
    assert (res.status, res.data) == (Status.OK, big[: 120 * 4096])
    assert drv.flush().status == Status.OK

    # write-zeroes reads back zeroes, with and without UNMAP
    assert drv.write_zeroes((9, 2)).status == Status.OK
    assert drv.write_zeroes((16, 4, SEGMENT_F_UNMAP)).status == Status.OK
    expect = bytearray(data)
    expect[512:1536] = bytes(1024)
    expect[8 * 512 : 12 * 512] = bytes(2048)
    assert drv.read(8, len(data)).data == bytes(expect)
    # a discard of whole 4 MiB objects (RBD skips partial ones) reads back zeroes after it
    assert drv.write(8 * 2048, os.urandom(4096)).status == Status.OK
    assert drv.discard((8 * 2048, 8192)).status == Status.OK
    assert drv.read(8 * 2048, 4096).data == bytes(4096)
    assert drv.flush().status == Status.OK
    s = dev.stats
    assert (s.writes, s.reads, s.flushes, s.write_zeroes, s.discards, s.errors) == \
        (3, 5, 2, 2, 1, 0)

    # the storage holds it, as the host sees it
    assert r.host_read(8 * 512, len(data)) == bytes(expect)
    assert r.host_read(40 * MiB, 2 * MiB) == big


@pytest.mark.parametrize("backend", ["rbd", "qemu-nbd-unix"])
def test_write_through_mode_writes_are_durable_before_completion(
        make_remote: Callable[..., Remote], backend: str) -> None:
    r = make_remote(backend)
    assert set_writeback(r.env, 0) == 0  # the guest picks write-through
    assert not r.env.device.writeback
    data = os.urandom(8192)
    assert r.env.drv.write(0, data).status == Status.OK
    assert r.host_read(0, 8192) == data


def test_read_only_nbd_server_makes_a_read_only_device(make_nbd: MakeNbd,
                                                        make_blk: MakeBlk) -> None:
    server = make_nbd("qemu-nbd", "unix", read_only=True)
    storage = open_storage(server.uri)
    assert storage.info.read_only
    env = make_blk(storage=storage)
    f = env.device.features()
    assert f & BlkFeature.RO
    assert not f & (BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES)
    assert env.drv.read(0, 4096).status == Status.OK
    assert env.drv.write(0, bytes(512)).status == Status.IOERR


def test_features_follow_what_the_nbd_server_offers(make_nbd: MakeNbd,
                                                    make_blk: MakeBlk) -> None:
    # nbdkit's nozero filter takes NBD_CMD_WRITE_ZEROES away: so does the device
    server = make_nbd("nbdkit", "unix", extra=("--filter=nozero",))
    storage = open_storage(server.uri)
    assert not storage.caps.write_zeroes and storage.caps.discard and storage.caps.flush
    env = make_blk(storage=storage)
    f = env.device.features()
    assert not f & BlkFeature.WRITE_ZEROES
    assert f & BlkFeature.DISCARD and f & BlkFeature.FLUSH
    # a driver that sends it anyway gets UNSUPP, and nothing reaches the server
    assert env.drv.write_zeroes((0, 8)).status == Status.UNSUPP
    assert env.device.stats.unsupported == 1


def test_nbd_server_errors_become_ioerr_and_the_connection_stays(
        make_nbd: MakeNbd, make_blk: MakeBlk, tmp_path: Path) -> None:
    trigger = tmp_path / "fail-now"
    server = make_nbd("nbdkit", "unix", extra=("--filter=error",),
                      params=("error=EIO", "error-rate=100%", f"error-file={trigger}"))
    env = make_blk(storage=open_storage(server.uri))
    assert env.drv.write(0, b"a" * 4096).status == Status.OK
    trigger.touch()
    assert env.drv.read(0, 4096).status == Status.IOERR
    assert env.drv.write(0, b"b" * 4096).status == Status.IOERR
    assert env.drv.request(T_FLUSH).status in (Status.IOERR, Status.OK)
    trigger.unlink()
    res = env.drv.read(0, 4096)
    assert (res.status, res.data) == (Status.OK, b"a" * 4096)
    assert env.device.stats.errors >= 2


def test_rbd_snapshot_is_a_read_only_export(ceph_cluster: CephCluster, rbd_image: str,
                                           make_blk: MakeBlk) -> None:
    first = os.urandom(4096)
    env = make_blk(storage=open_storage(ceph_cluster.spec(rbd_image)))
    assert env.drv.write(0, first).status == Status.OK
    assert env.drv.flush().status == Status.OK
    ceph_cluster.rbd("snap", "create", f"rbd/{rbd_image}@s1")
    assert env.drv.write(0, os.urandom(4096)).status == Status.OK  # the image moves on

    snap = open_storage(ceph_cluster.spec(rbd_image, "s1"))
    assert snap.info.read_only
    senv = make_blk(storage=snap)
    assert senv.device.features() & BlkFeature.RO
    res = senv.drv.read(0, 4096)
    assert (res.status, res.data) == (Status.OK, first)
    assert senv.drv.write(0, bytes(4096)).status == Status.IOERR
    assert senv.drv.write_zeroes((0, 8)).status == Status.IOERR


def test_rbd_discard_of_part_of_an_object_is_allowed_to_do_nothing(
        make_remote: Callable[..., Remote]) -> None:
    # rbd_skip_partial_discard: a discard smaller than an object keeps the data (a discard is
    # advisory), while write-zeroes of the same range zeroes it.
    r = make_remote("rbd")
    data = os.urandom(4096)
    assert r.env.drv.write(0, data).status == Status.OK
    assert r.env.drv.discard((0, 8)).status == Status.OK
    assert r.env.drv.read(0, 4096).data in (data, bytes(4096))
    assert r.env.drv.write_zeroes((0, 8)).status == Status.OK
    assert r.env.drv.read(0, 4096).data == bytes(4096)


# ---------------------------------------------------------------- lost connections
def _engine(env: BlkEnv):
    return env.queue_handler().engine


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_nbd_server_killed_and_restarted_within_the_delay_shows_no_error(
        make_nbd: MakeNbd, make_blk: MakeBlk, transport: str) -> None:
    server = make_nbd("qemu-nbd", transport)
    env = make_blk(storage=open_storage(server.uri, reconnect_delay=20))
    drv = env.drv
    assert drv.write(0, b"1" * 4096).status == Status.OK
    server.kill()  # kill -9: the connection drops with nothing said
    datas = [os.urandom(4096) for _ in range(8)]
    pending = [drv.start(T_OUT, 8 * (i + 1), out=d) for i, d in enumerate(datas)]
    pending.append(drv.start(T_IN, 0, in_len=4096))
    time.sleep(1.0)
    server.start()
    results = drv.wait(pending, timeout=30)
    assert [r.status for r in results] == [Status.OK] * len(pending)
    assert results[-1].data == b"1" * 4096
    assert drv.flush().status == Status.OK
    for i, d in enumerate(datas):
        assert server.read(8 * (i + 1) * 512, 4096) == d
    assert _engine(env).reconnects == 1
    assert env.device.stats.errors == 0


def test_nbd_outage_longer_than_the_delay_fails_requests_then_recovers(
        make_nbd: MakeNbd, make_blk: MakeBlk) -> None:
    server = make_nbd("qemu-nbd", "unix")
    env = make_blk(storage=open_storage(server.uri, reconnect_delay=1))
    drv = env.drv
    assert drv.write(0, b"2" * 512).status == Status.OK
    server.kill()
    t0 = time.monotonic()
    assert drv.read(0, 512, timeout=30).status == Status.IOERR
    waited = time.monotonic() - t0
    assert 0.9 <= waited < 10, waited
    # still down: new requests fail at once instead of waiting another delay
    t0 = time.monotonic()
    assert drv.write(8, bytes(512), timeout=30).status == Status.IOERR
    assert time.monotonic() - t0 < 0.9
    server.start()
    deadline = time.monotonic() + 30
    while True:  # the engine keeps trying (backoff up to 2 s) and comes back
        res = drv.read(0, 512, timeout=30)
        if res.status == Status.OK or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (res.status, res.data) == (Status.OK, b"2" * 512)


def test_rbd_exclusive_lock_of_a_killed_server_is_taken_over(
        ceph_cluster: CephCluster, rbd_image: str, make_blk: MakeBlk, tmp_path: Path) -> None:
    spec = ceph_cluster.spec(rbd_image)
    # another process opens the image, writes (so it owns the exclusive lock) and is killed
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, spec], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).parents[3])
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        holder.kill()
        holder.wait(10)
    finally:
        if holder.poll() is None:
            holder.kill()
    env = make_blk(storage=open_storage(spec))
    data = os.urandom(4096)
    t0 = time.monotonic()
    res = env.drv.write(0, data, timeout=120)  # waits for the dead client's watch to expire
    took = time.monotonic() - t0
    assert res.status == Status.OK, took
    assert took > 1  # it did wait for the lock (the takeover happened, it was not free)
    assert env.drv.flush().status == Status.OK
    assert env.drv.read(0, 4096).data == data
    assert env.device.stats.errors == 0


_LOCK_HOLDER = """
import ctypes, mmap, select, sys, time
from guestmem import IoBuffer
from blockdev.backends import open_storage
from blockdev.engine import IoOp
from blockdev.ops import OpKind
s = open_storage(sys.argv[1])
e = s.open_engine(0)
m = mmap.mmap(-1, 4096)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
op = IoOp(OpKind.WRITE, 0, [IoBuffer(memoryview(m), addr)], 4096)
e.submit(op)
ep = select.epoll(); ep.register(e.completion_fd, select.EPOLLIN)
while not e.reap():
    ep.poll(1)
print("locked", flush=True)
time.sleep(600)
"""


# ---------------------------------------------------------------- what cannot be served
def _serve(image: str, tmp_path: Path, *extra: str) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "storage_daemon", "--socket",
                           str(tmp_path / "s.sock"), "--image", image, *extra],
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[3])
    return proc.returncode, proc.stderr, time.monotonic() - t0


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_nbd_server_not_listening_is_one_line_exit_2(tmp_path: Path) -> None:
    code, err, took = _serve(f"nbd+unix:///disk?socket={tmp_path}/nobody.sock", tmp_path)
    assert code == 2 and took < 30
    assert "nbd+unix:///disk" in _one_line(err)
    port = free_port()
    code, err, took = _serve(f"nbd://127.0.0.1:{port}/disk", tmp_path)
    assert code == 2 and took < 30
    assert "refused" in _one_line(err).lower()


def test_nbd_export_missing_is_one_line_exit_2(make_nbd: MakeNbd, tmp_path: Path) -> None:
    server = make_nbd("qemu-nbd", "unix")
    code, err, took = _serve(f"nbd+unix:///nope?socket={server.sock}", tmp_path)
    assert code == 2 and took < 30
    assert "nope" in _one_line(err)


def test_nbd_server_that_never_answers_is_one_line_exit_2_within_30s(tmp_path: Path) -> None:
    with socket.socket() as mute:  # accepts (the kernel does) and never says a word
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        code, err, took = _serve(f"nbd://127.0.0.1:{mute.getsockname()[1]}/x", tmp_path)
    assert code == 2 and took < 30, took
    assert "handshake" in _one_line(err)


def test_rbd_that_cannot_be_served_is_one_line_exit_2(ceph_cluster: CephCluster,
                                                     rbd_image: str, tmp_path: Path) -> None:
    conf = ceph_cluster.conf
    for image, want in (
        (f"rbd:nopool/x:conf={conf}", "pool nopool"),
        (f"rbd:rbd/noimage:conf={conf}", "no image 'noimage'"),
        (f"rbd:rbd/{rbd_image}@nosnap:conf={conf}", "snapshot 'nosnap'"),
        (f"rbd:rbd/{rbd_image}:conf={tmp_path}/missing.conf", "missing.conf"),
        ("rbd:rbd", "rbd:POOL/IMAGE"),
    ):
        code, err, took = _serve(image, tmp_path)
        assert code == 2 and took < 30, (image, took)
        assert want in _one_line(err), err


def test_unreachable_ceph_cluster_is_one_line_exit_2_within_30s(ceph_cluster: CephCluster,
                                                                tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"  # the cluster's keys, a monitor address nobody listens on
    text = ceph_cluster.conf.read_text()
    conf.write_text(text.replace(f"127.0.0.1:{ceph_cluster.port}", f"127.0.0.1:{free_port()}"))
    code, err, took = _serve(f"rbd:rbd/img:conf={conf}", tmp_path)
    assert code == 2 and took < 30, took
    assert "cluster" in _one_line(err)


def test_a_missing_client_library_names_the_debian_package(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from blockdev.nbd import libnbd
    from blockdev.rbd import librbd

    def no_library(name: str, *args: object, **kwargs: object) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(libnbd, "_lib", None)
    monkeypatch.setattr(librbd, "_libs", None)
    monkeypatch.setattr(ctypes, "CDLL", no_library)
    with pytest.raises(StorageError, match="apt-get install libnbd0"):
        open_storage("nbd+unix:///x?socket=/nonexistent")
    with pytest.raises(StorageError, match="apt-get install librados2"):
        open_storage("rbd:rbd/x")


# ---------------------------------------------------------------- several queues
@pytest.mark.parametrize("backend", ["rbd", "nbdkit-unix"])
def test_two_queues_in_parallel(make_remote: Callable[..., Remote], backend: str) -> None:
    """Each queue gets its completions (RBD: the queues share the image's eventfd and sort its
    completions; NBD: a connection per queue)."""
    from vhost_frontend.blk import BlkDriver

    r = make_remote(backend, num_queues=2)
    env = r.env
    q1 = env.frontend.setup_queue(1, size=64)
    drv1 = BlkDriver(env.frontend, q1, env.mem)
    drivers = (env.drv, drv1)
    for rnd in range(5):
        blobs: list[list[bytes]] = [[], []]
        pending: list[list] = [[], []]
        for qi, drv in enumerate(drivers):
            for i in range(16):
                data = os.urandom(4096)
                blobs[qi].append(data)
                sector = (qi * 16 + i) * 8
                pending[qi].append(drv.start(T_OUT, sector, out=data, kick=False))
        for drv in drivers:
            drv.kick()
        for qi, drv in enumerate(drivers):
            assert [x.status for x in drv.wait(pending[qi], timeout=60)] == [Status.OK] * 16
        reads = [[drv.start(T_IN, (qi * 16 + i) * 8, in_len=4096, kick=False)
                  for i in range(16)] for qi, drv in enumerate(drivers)]
        for drv in drivers:
            drv.kick()
        for qi, drv in enumerate(drivers):
            got = drv.wait(reads[qi], timeout=60)
            assert [g.data for g in got] == blobs[qi], (rnd, qi)
    assert env.device.stats.errors == 0


def test_no_python_binding_is_imported(make_remote: Callable[..., Remote]) -> None:
    """The C libraries are called directly (ctypes): the project runs in any Python 3.11, where
    Debian's python3-rbd/python3-rados/python3-libnbd extension modules do not load."""
    make_remote("nbdkit-unix")
    make_remote("rbd")
    assert not {"rbd", "rados", "nbd", "libnbdmod"} & set(sys.modules)


def test_rbd_osd_down_fails_requests_after_the_delay_and_opening_within_30s(
        make_blk: MakeBlk, tmp_path: Path) -> None:
    """A private cluster (its memstore OSD cannot come back with its data): requests to an OSD
    that went away fail with IOERR after --reconnect-delay instead of hanging, and a server
    started meanwhile gives up opening the image within 30 s, in one line."""
    cluster = CephCluster(tmp_path / "ceph")
    try:
        cluster.start()
        cluster.rbd("create", "--size", "16M", "rbd/gone")
        env = make_blk(storage=open_storage(cluster.spec("gone"), reconnect_delay=3))
        assert env.drv.write(0, b"x" * 4096).status == Status.OK
        cluster.kill(f"osd.{cluster.osd_id}")
        t0 = time.monotonic()
        # (a write: a read of a never-written object is answered from the object map)
        assert env.drv.write(8 * 2048, b"y" * 4096, timeout=60).status == Status.IOERR
        waited = time.monotonic() - t0
        assert 2 <= waited < 20, waited
        code, err, took = _serve(cluster.spec("gone"), tmp_path)
        assert code == 2 and took < 30, took
        assert "did not answer" in _one_line(err)
    finally:
        cluster.stop()


def test_rbd_image_grows_live(ceph_cluster: CephCluster, rbd_image: str,
                              make_blk: MakeBlk) -> None:
    """block_resize on RBD is ``rbd resize`` of the served image: the capacity requests are
    checked against follows, the image itself has the new size, and shrinking is refused."""
    env = make_blk(storage=open_storage(ceph_cluster.spec(rbd_image)))
    end = 64 * MiB
    assert env.drv.write(end // 512, os.urandom(4096)).status == Status.IOERR  # past the end
    env.device.resize(96 * MiB)
    data = os.urandom(4096)
    assert env.drv.write(end // 512, data).status == Status.OK
    assert env.drv.read(end // 512, 4096).data == data
    info = json.loads(ceph_cluster.rbd("info", "--format", "json", f"rbd/{rbd_image}"))
    assert info["size"] == 96 * MiB
    with pytest.raises(StorageError, match="shrinking"):
        env.device.resize(64 * MiB)


def test_nbd_export_cannot_be_resized(make_remote: Callable[..., Remote]) -> None:
    remote = make_remote("qemu-nbd-unix")
    with pytest.raises(StorageError, match="cannot be resized"):
        remote.env.device.resize(remote.storage.info.size * 2)


def test_rbd_engine_close_waits_for_its_ops_in_librbd(ceph_cluster: CephCluster,
                                                      rbd_image: str) -> None:
    """librbd's threads write a read's data into guest memory until its completion is posted,
    and an aio op cannot be cancelled: closing a queue's engine (GET_VRING_BASE, teardown)
    waits for every op still in librbd -- here one the paused OSD never answers, which
    librbd fails after the OSD op timeout (the reconnect delay)."""
    import mmap
    import signal

    from blockdev.engine import IoOp
    from blockdev.ops import OpKind
    from blockdev.rbd.storage import RbdStorage
    from guestmem import IoBuffer

    st = open_storage(ceph_cluster.spec(rbd_image), reconnect_delay=2)
    assert isinstance(st, RbdStorage)
    m = mmap.mmap(-1, 4096)
    view = memoryview(m)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    pid = ceph_cluster.pid(f"osd.{ceph_cluster.osd_id}")
    assert pid is not None
    engine = st.open_engine(0)
    try:
        first = IoOp(OpKind.WRITE, 0, [IoBuffer(view, addr)], 4096)
        assert engine.submit(first) is False
        deadline = time.monotonic() + 30
        while not engine.reap():  # the exclusive lock taken, the OSD known
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(pid, signal.SIGSTOP)
        try:
            stuck = IoOp(OpKind.WRITE, 8 << 20, [IoBuffer(view, addr)], 4096)
            assert engine.submit(stuck) is False
            t0 = time.monotonic()
            assert engine.close(timeout=30) is True
            took = time.monotonic() - t0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert st._tokens == {}  # nothing left in librbd
        assert isinstance(stuck.result, OSError)
        assert 1 <= took < 25, took
    finally:
        st.close()  # (the mapping goes with the ops that still view it)
