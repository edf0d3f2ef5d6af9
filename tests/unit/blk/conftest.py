"""Fixtures for the virtio-blk tests: a BlkDevice on a temp image, served and connected."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockdev.disk import Disk
from blockdev.filters import open_filter
from blockdev.storage import FileStorage, Storage
from tests.conftest import RunningDaemon
from vhost.messages import Request
from vhost_frontend import DriverQueue, Frontend, FrontendMemory
from vhost_frontend.blk import BlkDriver
from vhost_frontend.packed import PackedDriverQueue
from virtio_blk.device import BlkDevice, BlkQueueHandler

MiB = 1 << 20
ENGINES = ("inline", "threads", "io_uring")


@dataclass
class BlkEnv:
    """One device on one image, served by a daemon and driven by a connected frontend."""

    image: Path
    disk: Disk
    device: BlkDevice
    daemon: RunningDaemon
    frontend: Frontend
    mem: FrontendMemory
    queue: DriverQueue | PackedDriverQueue
    drv: BlkDriver

    def file(self, offset: int, length: int) -> bytes:
        """The image's bytes as another opener of the file sees them."""
        fd = os.open(self.image, os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def queue_handler(self, queue: int = 0) -> BlkQueueHandler:
        """The handler serving ``queue`` in this process (the queue has been started)."""
        handler = self.daemon.daemon.handler
        assert handler is not None, "no frontend connected"
        queue_handler = handler.vrings[queue].queue_handler
        assert isinstance(queue_handler, BlkQueueHandler), queue_handler
        return queue_handler

    def put(self, offset: int, data: bytes) -> None:
        """Write the image behind the device's back."""
        fd = os.open(self.image, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)


MakeBlk = Callable[..., BlkEnv]
#: A filter layer for :func:`filter_stack`: its driver and its options, as ``--blockdev``
#: spells them after ``driver=`` (e.g. ``("error", {"error-read-rate": "1"})``).
Layer = tuple[str, dict[str, str]]


def filter_stack(disk: Disk, layers: Sequence[Layer], engine: str = "threads",
                 io_threads: int = 4) -> Storage:
    """``disk`` served by ``engine`` with the filters ``layers`` stacked on it, the first
    nearest the disk -- the storage a ``--blockdev driver=FILTER,file=...`` chain opens.

    Fault injection through the filters the user has: a test that fails or slows requests
    this way exercises the device exactly as a failing disk would, with no double to keep in
    step with the engines."""
    storage: Storage = FileStorage(disk, engine, io_threads)
    for n, (driver, options) in enumerate(layers):
        storage = open_filter(driver, storage, f"{driver}{n}", options)
    return storage


def stack_engine_name(engine: str, layers: Sequence[Layer]) -> str:
    """The name of the engine a queue of :func:`filter_stack` runs (each filter adds its own)."""
    return engine + "".join(f"+{driver}" for driver, _ in layers)


def make_image(path: Path, size: int, seed: int | None = 1) -> bytes:
    """A sparse ``size``-byte image; filled with seeded random bytes unless ``seed`` is None.
    Returns what the image holds."""
    with open(path, "wb") as f:
        if seed is None:
            os.truncate(f.fileno(), size)
            return bytes(size)
        data = random.Random(seed).randbytes(size)
        f.write(data)
        return data


@pytest.fixture
def make_blk(tmp_path: Path) -> Iterator[MakeBlk]:
    """``make_blk(**options)`` -> a connected :class:`BlkEnv`; everything is torn down after
    the test (frontend, daemon, guest memory, disk, in that order)."""
    cleanups: list[Callable[[], None]] = []
    counter = iter(range(1000))

    def make(*, size: int = MiB, seed: int | None = 1, engine: str = "threads",
             read_only: bool = False, direct: bool = False, lbs: int = 512,
             bounce_pages: int = 2048, serial: str = "", io_threads: int = 4,
             writeback: bool = True, num_queues: int = 1,
             mem_layout: Sequence[tuple[int, int, int]] = ((0, 32 * MiB, 0),),
             drop_features: int = 0, queue_size: int = 128,
             image: Path | None = None, queue_processes: bool | None = None,
             fast_path: bool = True, storage: Storage | None = None,
             engine_ran: str | None = None, packed: bool = False,
             filters: Sequence[Layer] = (), queue_pool: object = None) -> BlkEnv:
        """``storage``: serve that (closed after the test) instead of an image file.
        ``filters``: serve the image through these filter layers (:func:`filter_stack`);
        ``env.disk`` and ``env.image`` are still the image under them.

        The engine serving queue 0 (on a thread) must be ``engine_ran`` (default: ``engine``):
        a test parametrised with io_uring must not pass on a thread pool it fell back to."""
        n = next(counter)
        disk: Disk | Storage
        if storage is not None:
            disk = storage
        else:
            if image is None:
                image = tmp_path / f"disk{n}.img"
                make_image(image, size, seed)
            disk = Disk(image, read_only=read_only, direct=direct, logical_block_size=lbs)
        served: Disk | Storage = disk
        if filters:
            assert storage is None, "filters stack over the image, not over given storage"
            assert isinstance(disk, Disk)
            served = filter_stack(disk, filters, engine, io_threads)
            engine_ran = stack_engine_name(engine_ran or engine, filters)
        cleanups.append(served.close)  # (a filter stack closes the disk under it)
        device = BlkDevice(served, num_queues=num_queues, serial=serial, engine=engine,
                           io_threads=io_threads, bounce_pages=bounce_pages,
                           writeback=writeback, queue_processes=queue_processes,
                           fast_path=fast_path)
        device.queue_pool = queue_pool  # (a PoolRunner the test shares between devices)
        daemon = RunningDaemon(device, tmp_path / f"blk{n}.sock")
        cleanups.append(daemon.stop)
        mem = FrontendMemory(mem_layout)
        cleanups.append(mem.close)
        fe = Frontend(daemon.path, timeout=10.0)
        cleanups.append(fe.close)
        fe.negotiate(fe.get_u64(Request.GET_FEATURES) & ~int(drop_features) if drop_features
                     else None, packed=packed)
        fe.set_mem_table(mem)
        q = (fe.setup_packed_queue(0, size=queue_size) if packed
             else fe.setup_queue(0, size=queue_size))
        assert daemon.daemon.handler is not None
        served_by = daemon.daemon.handler.vrings[0].queue_handler
        if storage is None and served_by is not None:  # (None: in a queue process)
            assert isinstance(served_by, BlkQueueHandler), served_by
            assert served_by.engine.name == (engine_ran or engine), served_by.engine.name
        drv = BlkDriver(fe, q, mem)
        return BlkEnv(image, disk, device, daemon, fe, mem, q, drv)  # type: ignore[arg-type]

    yield make
    errors = []
    for cleanup in reversed(cleanups):
        try:
            cleanup()
        except Exception as exc:  # keep tearing down; report at the end
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def blk(make_blk: MakeBlk) -> BlkEnv:
    """The default device: 1 MiB random image, threads engine, 512-byte blocks."""
    return make_blk()


def uring_engine(env: BlkEnv, queue: int = 0):
    """The io_uring engine serving ``queue`` of a running device."""
    engine = env.queue_handler(queue).engine
    assert engine.name == "io_uring"
    return engine


def inject_uring_results(monkeypatch: pytest.MonkeyPatch, engine, kind, result) -> None:
    """Make the kernel's answer for every op of ``kind`` be ``result(op, res)``.

    io_uring does its IO in the kernel, so errors are injected where its completions are read.
    """
    real = engine.ring.reap

    def reap() -> list[tuple[int, int]]:
        out = []
        for ud, res in real():
            op = engine._ops.get(ud)
            out.append((ud, result(op, res) if op is not None and op.kind == kind else res))
        return out

    monkeypatch.setattr(engine.ring, "reap", reap)


@pytest.fixture
def fdatasync_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every fd os.fdatasync is called on (the call still happens)."""
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    return calls

