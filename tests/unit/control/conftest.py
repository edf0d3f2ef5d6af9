"""A served BlkDevice (the virtio-blk fixtures) with its control plane: QMP and metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage_daemon.plane import ControlPlane
from tests.unit.blk.conftest import BlkEnv, MakeBlk, make_blk  # noqa: F401 (fixture)


@dataclass
class Operated:
    env: BlkEnv
    plane: ControlPlane
    qmp_path: Path
    quits: list[int]

    @property
    def metrics_url(self) -> str:
        assert self.plane.metrics is not None
        return f"http://127.0.0.1:{self.plane.metrics.port}/metrics"


MakeOperated = Callable[..., Operated]


@pytest.fixture
def make_operated(make_blk: MakeBlk, tmp_path: Path) -> Iterator[MakeOperated]:  # noqa: F811
    """``make_operated(real_quit=False, **blk_options)``: a connected device with a running
    control plane (QMP socket, metrics on an ephemeral port); stopped after the test."""
    planes: list[ControlPlane] = []

    def make(real_quit: bool = False, **options: object) -> Operated:
        env = make_blk(**options)
        quits: list[int] = []
        path = tmp_path / f"qmp{len(planes)}.sock"
        plane = ControlPlane.for_one(env.device, env.daemon.daemon, export_id="export0",
                             node_name="disk0", qmp_path=str(path),
                             metrics_address=("127.0.0.1", 0),
                             quit=None if real_quit else (lambda: quits.append(1)))
        planes.append(plane)
        plane.start()
        return Operated(env, plane, path, quits)

    yield make
    for plane in planes:
        plane.stop()
