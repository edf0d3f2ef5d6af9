"""A block device as the disk (a loop device over a file): size, IO, discard, write-zeroes.

Block devices take other calls than files (BLKGETSIZE64, BLKSSZGET, BLKDISCARD, BLKZEROOUT);
these tests run them for real.  They need root and loop devices, as CI has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.blk.conftest import ENGINES, MakeBlk, MiB
from virtio_blk.request import Status


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(loop device, its backing file) of 8 MiB of random data."""
    if shutil.which("losetup") is None or os.geteuid() != 0:
        pytest.fail("these tests need root and losetup (util-linux); CI runs as root")
    backing = tmp_path / "backing.img"
    backing.write_bytes(os.urandom(8 * MiB))
    out = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                         text=True, timeout=30, check=False)
    if out.returncode != 0:
        pytest.fail(f"losetup failed: {out.stderr.strip()}")
    dev = Path(out.stdout.strip())
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "--detach", str(dev)], timeout=30, check=False)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_loop_device(make_blk: MakeBlk, loop_device: tuple[Path, Path], engine: str,
                     direct: bool) -> None:
    dev, backing = loop_device
    env = make_blk(image=dev, engine=engine, direct=direct)
    info = env.disk.info
    assert info.block_device and info.size == 8 * MiB
    assert env.device.limits.capacity == 8 * MiB // 512
    data = os.urandom(64 * 1024)
    assert env.drv.write(2048, data).status == Status.OK
    assert env.drv.read(2048, len(data)).data == data
    assert env.drv.flush().status == Status.OK
    assert env.drv.write_zeroes((4096, 256)).status == Status.OK  # BLKZEROOUT
    assert env.drv.read(4096, 256 * 512).data == bytes(256 * 512)
    assert env.drv.discard((8192, 256)).status == Status.OK  # BLKDISCARD
    assert env.drv.flush().status == Status.OK
    # Through the loop device into its backing file: the data is really there.
    with backing.open("rb") as f:
        assert os.pread(f.fileno(), len(data), 2048 * 512) == data
        assert os.pread(f.fileno(), 256 * 512, 4096 * 512) == bytes(256 * 512)
    res = env.drv.read(16384, 512)  # the last sector is 16383
    assert (res.status, res.used) == (Status.IOERR, 1)
