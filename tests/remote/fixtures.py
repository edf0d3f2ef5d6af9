"""Fixtures for the RBD and NBD tests: a session-wide Ceph cluster and NBD servers per test.

A missing server binary fails the test with the package to install (CI installs them all):
skipping would report a backend as tested when it was not.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from remote_testbed.ceph import CephCluster, missing_binaries
from remote_testbed.nbd_servers import NbdServer, missing

MakeNbd = Callable[..., NbdServer]


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    """One monitor + one memstore OSD on 127.0.0.1 for the whole session; pool ``rbd``."""
    absent = missing_binaries()
    if absent:
        pytest.fail(f"{', '.join(absent)} missing: apt-get install ceph-mon ceph-osd "
                    "ceph-common libfuse2")
    root = Path(tempfile.mkdtemp(prefix="ceph-test-"))
    cluster = CephCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def rbd_image(ceph_cluster: CephCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh 64 MiB image (exclusive-lock on, Ceph's default); its name."""
    name = f"t{abs(hash(request.node.nodeid)) % 10**10}"
    ceph_cluster.rbd("create", "--size", "64M", f"rbd/{name}")
    yield name
    try:
        ceph_cluster.rbd("snap", "purge", f"rbd/{name}")
        ceph_cluster.rbd("rm", f"rbd/{name}")
    except Exception:  # a test that left the image open (killed server) must not fail here
        pass


@pytest.fixture
def make_nbd(tmp_path: Path) -> Iterator[MakeNbd]:
    """``make_nbd(kind, transport, **options)`` -> a started :class:`NbdServer`, stopped after
    the test."""
    servers: list[NbdServer] = []

    def make(kind: str = "qemu-nbd", transport: str = "unix", **options: object) -> NbdServer:
        if missing(kind):
            package = "qemu-utils" if kind == "qemu-nbd" else "nbdkit"
            pytest.fail(f"{kind} missing: apt-get install {package}")
        d = tmp_path / f"nbd{len(servers)}"
        d.mkdir()
        server = NbdServer(kind, transport, d, **options)  # type: ignore[arg-type]
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()
