"""Growing a disk while it is served, and telling the frontend through the backend channel.

The frontend here plays QEMU 7.2's vhost-user-blk: it hands over one end of a socket pair with
SET_BACKEND_REQ_FD, receives CONFIG_CHANGE_MSG on it, re-reads the config space with GET_CONFIG
on the main socket (while the backend waits for the ack) and acks.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from blockdev.backends import open_storage
from blockdev.images import create as create_image_file
from blockdev.storage import StorageError
from tests.unit.blk.conftest import BlkEnv, MakeBlk, MiB
from tests.unit.blk.test_block_device import loop_device  # noqa: F401 (fixture)
from vhost import messages as m
from vhost.backend_channel import BackendRequest
from vhost.messages import ProtocolFeature, Request
from vhost_frontend import Frontend
from vhost_frontend.blk import BlkDriver
from virtio_blk.request import Status


def capacity(env: BlkEnv) -> int:
    """The capacity (sectors) in the config space, read as the frontend reads it."""
    cfg = env.frontend.get_config(0, 8)
    return struct.unpack("<Q", cfg[-8:])[0]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as ex:
        yield ex


def give_channel(env: BlkEnv) -> socket.socket:
    """SET_BACKEND_REQ_FD with one end of a socket pair; the frontend's end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env.frontend.checked(Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
    finally:
        theirs.close()
    ours.settimeout(5)
    return ours


def recv_request(chan: socket.socket) -> tuple[int, int, bytes]:
    request, flags, size = m.HEADER.unpack(chan.recv(m.HEADER_SIZE, socket.MSG_WAITALL))
    payload = chan.recv(size, socket.MSG_WAITALL) if size else b""
    return request, flags, payload


def ack(chan: socket.socket, request: int, status: int = 0) -> None:
    chan.sendall(m.HEADER.pack(request, m.VERSION | m.FLAG_REPLY, 8) + struct.pack("<Q", status))


# ---------------------------------------------------------------------------- the device


def test_resize_grows_the_file_and_the_capacity_requests_see(blk: BlkEnv) -> None:
    end = MiB >> 9
    assert blk.drv.read(end, 4096).status == Status.IOERR  # beyond the end
    blk.device.resize(2 * MiB)
    assert os.path.getsize(blk.image) == 2 * MiB
    assert capacity(blk) == 2 * MiB >> 9
    assert blk.device.limits.capacity == 2 * MiB >> 9
    # The running queue checks against the new capacity: the new end is readable (zeroes)
    # and writable, and one block past it is still refused.
    res = blk.drv.read(end, 4096)
    assert res.status == Status.OK and res.data == bytes(4096)
    assert blk.drv.write((2 * MiB >> 9) - 8, b"\x5a" * 4096).status == Status.OK
    assert blk.file(2 * MiB - 4096, 4096) == b"\x5a" * 4096
    assert blk.drv.read(2 * MiB >> 9, 4096).status == Status.IOERR
    assert blk.drv.read((2 * MiB >> 9) - 1, 1024).status == Status.IOERR


def test_resize_refuses_shrinking_partial_blocks_and_read_only(make_blk: MakeBlk) -> None:
    env = make_blk(lbs=4096)
    with pytest.raises(StorageError, match="shrinking"):
        env.device.resize(MiB // 2)
    with pytest.raises(StorageError, match="multiple of the 4096-byte"):
        env.device.resize(MiB + 512)
    env.device.resize(MiB)  # the same size: nothing to do
    assert os.path.getsize(env.image) == MiB
    ro = make_blk(read_only=True)
    with pytest.raises(StorageError, match="read-only"):
        ro.device.resize(2 * MiB)
    assert os.path.getsize(ro.image) == MiB and ro.device.limits.capacity == MiB >> 9


def test_queue_started_after_a_resize_sees_the_new_capacity(make_blk: MakeBlk) -> None:
    env = make_blk(num_queues=2)
    env.device.resize(3 * MiB)
    q1 = env.frontend.setup_queue(1, size=64)
    drv1 = BlkDriver(env.frontend, q1, env.mem)
    assert drv1.write((3 * MiB >> 9) - 8, b"\x11" * 4096).status == Status.OK
    assert env.file(3 * MiB - 4096, 4096) == b"\x11" * 4096


# ---------------------------------------------------------------------------- the channel


def test_backend_req_is_offered_and_config_change_reaches_the_frontend(
        blk: BlkEnv, pool: ThreadPoolExecutor) -> None:
    assert blk.frontend.protocol & ProtocolFeature.BACKEND_REQ
    chan = give_channel(blk)
    daemon = blk.daemon.daemon
    blk.device.resize(4 * MiB)
    told: Future[bool] = pool.submit(daemon.notify_config_change)
    request, flags, payload = recv_request(chan)
    assert request == BackendRequest.CONFIG_CHANGE_MSG and payload == b""
    assert flags & m.FLAG_NEED_REPLY  # REPLY_ACK was negotiated: the backend waits for us
    assert not told.done()
    # What QEMU does before it acks: re-read the config on the main socket.
    assert capacity(blk) == 4 * MiB >> 9
    ack(chan, request)
    assert told.result(5) is True
    chan.close()


def test_config_change_without_reply_ack_does_not_wait(make_blk: MakeBlk) -> None:
    env = make_blk()
    # A fresh connection that negotiates everything but REPLY_ACK (after the first one is
    # gone: the server serves one frontend at a time and turns a second away).
    env.frontend.close()
    deadline = time.monotonic() + 5
    while env.daemon.daemon.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    fe = Frontend(env.daemon.path)
    try:
        fe.get_u64(Request.GET_FEATURES)
        offered = ProtocolFeature(fe.get_u64(Request.GET_PROTOCOL_FEATURES))
        fe.negotiate(protocol=offered & ~ProtocolFeature.REPLY_ACK)
        ours, theirs = socket.socketpair()
        fe.command(Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        theirs.close()
        ours.settimeout(5)
        _wait_for_channel(env)
        assert env.daemon.daemon.notify_config_change() is True
        request, flags, _ = recv_request(ours)
        assert request == BackendRequest.CONFIG_CHANGE_MSG and not flags & m.FLAG_NEED_REPLY
        ours.close()
    finally:
        fe.close(queues=False)


def _wait_for_channel(env: BlkEnv) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        handler = env.daemon.daemon.handler
        if handler is not None and handler.backend_channel is not None:
            return
        time.sleep(0.01)
    pytest.fail("the backend channel was not set up")


def test_frontend_that_never_acks_costs_a_timeout_not_a_hang(blk: BlkEnv) -> None:
    chan = give_channel(blk)
    handler = blk.daemon.daemon.handler
    assert handler is not None and handler.backend_channel is not None
    handler.backend_channel.timeout = 0.3
    assert blk.daemon.daemon.notify_config_change() is False
    # A late ack of that request is not taken for the ack of the next one.
    ack(chan, BackendRequest.CONFIG_CHANGE_MSG)
    handler.backend_channel.timeout = 10.0
    done = threading.Event()
    result: list[bool] = []

    def notify() -> None:
        result.append(blk.daemon.daemon.notify_config_change())
        done.set()

    threading.Thread(target=notify, daemon=True).start()
    recv_request(chan)  # the stale ack was drained; the next request arrives
    recv_request(chan)
    assert not done.wait(0.1)
    ack(chan, BackendRequest.CONFIG_CHANGE_MSG, status=1)  # a failure ack
    assert done.wait(5) and result == [False]
    chan.close()


def test_failed_and_closed_channel(blk: BlkEnv) -> None:
    assert blk.daemon.daemon.notify_config_change() is False  # no channel given
    chan = give_channel(blk)
    chan.close()
    assert blk.daemon.daemon.notify_config_change() is False  # the frontend's end is gone


def test_disconnect_wakes_a_sender_waiting_for_its_ack(blk: BlkEnv,
                                                       pool: ThreadPoolExecutor) -> None:
    chan = give_channel(blk)
    told = pool.submit(blk.daemon.daemon.notify_config_change)
    recv_request(chan)
    blk.frontend.close()  # QEMU goes away without acking
    assert told.result(5) is False
    chan.close()


def test_block_device_grows_only_as_far_as_the_device(make_blk: MakeBlk,
                                                      loop_device: tuple[Path, Path]  # noqa: F811
                                                      ) -> None:
    """A block device cannot be grown from here: block_resize succeeds once its owner grew it
    (here: the loop device's backing file, then ``losetup -c``)."""
    dev, backing = loop_device
    env = make_blk(image=dev)
    with pytest.raises(StorageError, match="grow the device itself first"):
        env.device.resize(16 * MiB)
    assert env.device.limits.capacity == 8 * MiB >> 9
    os.truncate(backing, 16 * MiB)
    subprocess.run(["losetup", "-c", str(dev)], check=True, timeout=30)
    env.device.resize(16 * MiB)
    assert capacity(env) == 16 * MiB >> 9
    assert env.drv.write((16 * MiB >> 9) - 8, b"\x77" * 4096).status == Status.OK
    assert env.drv.flush().status == Status.OK  # through the loop device's page cache
    with open(backing, "rb") as f:
        assert os.pread(f.fileno(), 4096, 16 * MiB - 4096) == b"\x77" * 4096


def test_backend_req_fd_that_is_not_a_socket_is_refused(blk: BlkEnv) -> None:
    r, w = os.pipe()
    try:
        assert blk.frontend.command(Request.SET_BACKEND_REQ_FD, b"", [r]) == 1
        handler = blk.daemon.daemon.handler
        assert handler is not None and handler.backend_channel is None
    finally:
        os.close(r)
        os.close(w)
    assert blk.drv.flush().status == Status.OK  # the connection carries on


def test_qcow2_grows_live_within_its_l1_table(make_blk: MakeBlk, tmp_path: Path) -> None:
    """block_resize on qcow2: the header's size and L1 size change in one write; what was
    written stays, the new area reads as zeros and takes writes, and qemu-img agrees."""
    img = tmp_path / "d.qcow2"
    assert create_image_file(str(img), 64 * MiB, "qcow2")
    env = make_blk(storage=open_storage(str(img), fmt="qcow2"))
    first = os.urandom(4096)
    assert env.drv.write(8, first).status == Status.OK
    end = (64 * MiB) >> 9
    assert env.drv.read(end, 4096).status == Status.IOERR  # past the end
    env.device.resize(2048 * MiB)  # 4 L1 entries now, still inside the L1 cluster
    assert env.device.limits.capacity == (2048 * MiB) >> 9
    assert env.drv.read(end, 4096).data == bytes(4096)
    data = os.urandom(8192)
    last = ((2048 * MiB) >> 9) - 16
    assert env.drv.write(last, data).status == Status.OK
    assert env.drv.read(last, 8192).data == data
    assert env.drv.read(8, 4096).data == first
    assert env.drv.flush().status == Status.OK
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(img)],
                          capture_output=True, text=True, check=True).stdout
    assert '"virtual-size": 2147483648' in info
    with pytest.raises(StorageError, match="shrinking"):
        env.device.resize(64 * MiB)
    # While served, the allocator holds a synced batch of reserved clusters (returned at
    # close), which qemu-img counts as leaks: exit 3.  Corruption would be exit 2.
    check = subprocess.run(["qemu-img", "check", "-U", str(img)], capture_output=True,
                           text=True, check=False)
    assert check.returncode in (0, 3), check.stdout + check.stderr
    assert "ERROR" not in check.stdout


def test_qcow2_growth_that_needs_a_new_l1_table_moves_it(make_blk: MakeBlk,
                                                        tmp_path: Path) -> None:
    """With 4 KiB clusters one L1 cluster maps 1 GiB: growing to 4 GiB moves the L1 table to
    four new clusters under the running queue; data on both sides of the move stays, and
    qemu-img agrees about the size and finds no corruption."""
    img = tmp_path / "small.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                    str(img), "64M"], check=True)
    env = make_blk(storage=open_storage(str(img), fmt="qcow2"))
    first = os.urandom(4096)
    assert env.drv.write(8, first).status == Status.OK
    env.device.resize(1024 * MiB)  # still inside the one L1 cluster
    env.device.resize(4096 * MiB)
    assert env.device.limits.capacity == (4096 * MiB) >> 9
    last = ((4096 * MiB) >> 9) - 16
    data = os.urandom(8192)
    assert env.drv.write(last, data).status == Status.OK
    assert env.drv.read(last, 8192).data == data
    assert env.drv.read(8, 4096).data == first
    assert env.drv.read(((1024 * MiB) >> 9) + 8, 4096).data == bytes(4096)
    assert env.drv.flush().status == Status.OK
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(img)],
                          capture_output=True, text=True, check=True).stdout
    assert '"virtual-size": 4294967296' in info
    check = subprocess.run(["qemu-img", "check", "-U", str(img)], capture_output=True,
                           text=True, check=False)
    assert check.returncode in (0, 3), check.stdout + check.stderr  # 3: the reserve (leaks)
    assert "ERROR" not in check.stdout
