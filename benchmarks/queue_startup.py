"""Queue start-up cost: from a frontend's connect to the first used entry, threads vs processes.

Issue 25 measured about 0.43 s per new frontend connection with two queues (a queue process
spawned per queue) against 2 ms with one.  This repeats the measurement: a server (the daemon
on a thread of this process, as the unit tests run it) serving a 1 MiB raw image, and a
frontend that connects, negotiates, sends its memory table, sets up every queue (as QEMU does at
boot) and reads 4 KiB on queue 0.  Per configuration it prints the median, minimum and maximum
of the whole sequence and of its parts, over ``--runs`` connections.

    python3 -m benchmarks.queue_startup [--runs 10]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path

from blockdev.disk import Disk
from vhost.daemon import VhostUserDaemon
from vhost_frontend import Frontend, FrontendMemory
from vhost_frontend.blk import BlkDriver
from virtio_blk.device import BlkDevice
from virtio_blk.request import Status

MiB = 1 << 20
#: (label, queues, queue_processes: None = the default, processes when more than one queue)
CONFIGS = [("1 queue, threads", 1, False), ("1 queue, process", 1, True),
           ("2 queues, processes (default)", 2, None), ("2 queues, threads", 2, False)]


def one_connection(path: Path, mem: FrontendMemory, queues: int) -> dict[str, float]:
    """Connect, set up every queue, read once on queue 0; the times of each step (s)."""
    t0 = time.perf_counter()
    fe = Frontend(path, timeout=30.0)
    try:
        fe.negotiate()
        fe.set_mem_table(mem)
        t_setup = time.perf_counter()
        qs = [fe.setup_queue(i, size=128) for i in range(queues)]
        t_started = time.perf_counter()
        result = BlkDriver(fe, qs[0], mem).read(0, 4096)
        t_used = time.perf_counter()
        assert result.status == Status.OK
    finally:
        fe.close()
    return {"negotiate": t_setup - t0, "queue start": t_started - t_setup,
            "first request": t_used - t_started, "connect to first used": t_used - t0}


def measure(label: str, queues: int, processes: bool | None, runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "disk.img"
        image.write_bytes(bytes(MiB))
        disk = Disk(image)
        device = BlkDevice(disk, num_queues=queues, queue_processes=processes)
        sock = Path(tmp) / "vhost.sock"
        daemon = VhostUserDaemon(device, sock)
        thread = threading.Thread(target=daemon.serve_forever, daemon=True)
        thread.start()
        mem = FrontendMemory(((0, 32 * MiB, 0),))
        samples: list[dict[str, float]] = []
        try:
            for _ in range(runs + 1):  # the first connection warms imports and caches
                samples.append(one_connection(sock, mem, queues))
                deadline = time.monotonic() + 30
                while daemon.handler is not None and time.monotonic() < deadline:
                    time.sleep(0.001)  # the next frontend is served once this one is gone
        finally:
            daemon.shutdown()
            thread.join(30)
            daemon.close()
            mem.close()
            disk.close()
    print(f"{label}:")
    for key in samples[0]:
        values = sorted(s[key] * 1000 for s in samples[1:])
        print(f"  {key:>22}: median {statistics.median(values):8.1f} ms "
              f"(min {values[0]:.1f}, max {values[-1]:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for label, queues, processes in CONFIGS:
        measure(label, queues, processes, args.runs)


if __name__ == "__main__":
    main()
