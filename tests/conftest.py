"""Shared fixtures: a vhost-user daemon serving a test device on a temporary socket."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vhost_devices import EchoDevice
from vhost.daemon import VhostUserDaemon


class RunningDaemon:
    """A VhostUserDaemon serving on a background thread."""

    def __init__(self, device, path: Path) -> None:
        self.device = device
        self.path = path
        self.daemon = VhostUserDaemon(device, path)
        self.thread = threading.Thread(target=self.daemon.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.daemon.shutdown()
        self.thread.join(30)
        assert not self.thread.is_alive(), "daemon did not stop"
        self.daemon.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "vhost.sock"


@pytest.fixture
def serve(sock_path: Path) -> Iterator:
    """serve(device) starts a daemon for ``device``; it is stopped after the test."""
    started: list[RunningDaemon] = []

    def start(device=None) -> RunningDaemon:
        running = RunningDaemon(device or EchoDevice(), sock_path)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture(autouse=True)
def _log_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


from tests.remote.fixtures import ceph_cluster, make_nbd, rbd_image  # noqa: E402, F401
