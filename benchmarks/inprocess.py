"""In-process benchmark: the project's vhost-user frontend driver pushes 4k requests at a server.

No guest: a Python driver (vhost_frontend) plays QEMU and the guest, keeps ``--depth`` requests
in flight on each of ``--queues`` queues, and counts completions.  The server under test runs as
its own process -- this project's ``vhost-user-blk`` or qemu-storage-daemon, alternately, on the
same image -- and its CPU time (all threads, from /proc) is divided by the requests it served.

    python -m benchmarks.inprocess                       # buffered image, 1 and 2 queues
    python -m benchmarks.inprocess --direct --rounds 3   # O_DIRECT against aio=native
    python -m benchmarks.inprocess --json out.json
    python -m benchmarks.inprocess --format qcow2        # a fully allocated qcow2

The driver itself is Python and can be the bottleneck for requests/s (both servers see the same
driver, so the ratio is still fair); the CPU-per-request figure is the backend's alone.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import select
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from vhost.messages import ProtocolFeature, Request, VirtioFeature, u64
from vhost.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, full_fence
from vhost_frontend import DriverQueue, Frontend, FrontendMemory

from .common import (
    Measurement,
    cpu_seconds,
    make_image,
    print_table,
    rss_bytes,
    running_server,
    write_json,
)

log = logging.getLogger("benchmarks.inprocess")

BLK_FEATURES = (1 << 1) | (1 << 2) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 12) | (1 << 13)
WANT_FEATURES = int(
    VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC | VirtioFeature.RING_EVENT_IDX
    | VirtioFeature.PROTOCOL_FEATURES
) | BLK_FEATURES
WANT_PROTOCOL = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG


class QueueLoad:
    """``depth`` fixed 3-descriptor chains (header, data, status) cycling on one queue."""

    def __init__(self, mem: FrontendMemory, q: DriverQueue, depth: int, bs: int,
                 sectors: int, write: bool) -> None:
        self.mem = mem
        self.q = q
        self.depth = depth
        self.bs = bs
        self.write = write
        self.sectors = sectors - bs // 512
        self.rng = random.Random(q.index)
        self.headers = []
        self.statuses = []
        for slot in range(depth):
            hdr = mem.alloc(16, 16)
            data = mem.alloc(bs, 4096)
            status = mem.alloc(1, 1)
            d = slot * 3
            data_flags = 0 if write else VIRTQ_DESC_F_WRITE
            q.write_desc(d, hdr, 16, VIRTQ_DESC_F_NEXT, d + 1)
            q.write_desc(d + 1, data, bs, data_flags | VIRTQ_DESC_F_NEXT, d + 2)
            q.write_desc(d + 2, status, 1, VIRTQ_DESC_F_WRITE, 0)
            self.headers.append(mem.guest.view(hdr, 16))
            self.statuses.append(status)
        self.completed = 0
        self.errors = 0

    def _post(self, slot: int) -> None:
        sector = self.rng.randrange(0, self.sectors // 8) * 8
        self.headers[slot][:] = (int(self.write)).to_bytes(4, "little") + bytes(4) + \
            sector.to_bytes(8, "little")
        self.q.publish(slot * 3)

    def run(self, stop: threading.Event) -> None:
        q = self.q
        old = q.avail_idx
        for slot in range(self.depth):
            self._post(slot)
        if q.kick_needed(old):
            q.kick()
        while not stop.is_set():
            select.select([q.call_fd], [], [], 0.1)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(q.call_fd)
            old = q.avail_idx
            while True:
                for head, _ in q.take_used(free_descriptors=False):  # fixed chains per slot
                    self.completed += 1
                    self._post(head // 3)
                full_fence()  # used_event store before the used.idx load
                if q.used_idx() == q.last_used:
                    break
            if q.avail_idx != old and q.kick_needed(old):
                q.kick()


def measure(server: str, image: Path, tmp: Path, queues: int, direct: bool, workload: str,
            depth: int, seconds: float, warmup: float, extra: list[str],
            fmt: str = "raw") -> Measurement:
    write = workload.endswith("write")
    bs = 4096
    sock = tmp / f"{server}.sock"
    with running_server(server, image, sock, queues, direct, extra, fmt) as proc:
        fe = Frontend(sock)
        mem = FrontendMemory([(0, 256 << 20, 0)])
        try:
            _negotiate(fe)
            fe.set_mem_table(mem)
            capacity = int.from_bytes(fe.get_config(0, 8), "little")
            loads = []
            for qi in range(queues):
                q = fe.setup_queue(qi, size=256)
                loads.append(QueueLoad(mem, q, depth, bs, capacity, write))
            stop = threading.Event()
            threads = [threading.Thread(target=ld.run, args=(stop,), daemon=True) for ld in loads]
            for t in threads:
                t.start()
            time.sleep(warmup)
            c0 = sum(ld.completed for ld in loads)
            cpu0 = cpu_seconds(proc.pid)
            t0 = time.monotonic()
            time.sleep(seconds)
            c1 = sum(ld.completed for ld in loads)
            cpu1 = cpu_seconds(proc.pid)
            t1 = time.monotonic()
            rss = rss_bytes(proc.pid)
            stop.set()
            for t in threads:
                t.join(5)
        finally:
            fe.close()
            mem.close()
    ops = (c1 - c0) / (t1 - t0)
    cpu = cpu1 - cpu0
    return Measurement(server, workload, queues, direct, ops, ops * bs, cpu,
                       cpu / max(c1 - c0, 1) * 1e6, rss)


def _negotiate(fe: Frontend) -> None:
    """QEMU's sequence, taking only features both servers implement (qsd offers LOG_ALL too)."""
    features = fe.get_u64(Request.GET_FEATURES) & WANT_FEATURES
    proto = ProtocolFeature(fe.get_u64(Request.GET_PROTOCOL_FEATURES)) & WANT_PROTOCOL
    fe.command(Request.SET_PROTOCOL_FEATURES, u64(int(proto)), ack=False)
    fe.protocol = proto
    fe.checked(Request.SET_OWNER)
    fe.features = features
    fe.checked(Request.SET_FEATURES, u64(features))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queues", type=int, nargs="+", default=[1, 2])
    p.add_argument("--direct", action="store_true", help="O_DIRECT (qsd: aio=native)")
    p.add_argument("--workloads", nargs="+", default=["randread", "randwrite"],
                   choices=["randread", "randwrite"])
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=1, help="alternate the servers this many times")
    p.add_argument("--size", default="1G", help="image size (filled with data)")
    p.add_argument("--dir", default=None, help="where to put the image (default: a temp dir)")
    p.add_argument("--server-args", default="", help="extra arguments for our server")
    p.add_argument("--servers", nargs="+", default=["python", "qsd"], choices=["python", "qsd"])
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                   help="serve the image as raw, or converted to a fully allocated qcow2")
    p.add_argument("--json", type=Path, help="also write the measurements here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from virtio_blk.disk import parse_size

    size = parse_size(args.size)
    rows: list[Measurement] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as td:
        tmp = Path(td)
        image = tmp / "bench.img"
        log.info("filling a %d MiB image in %s", size >> 20, tmp)
        make_image(image, size, fill=True)
        if args.format == "qcow2":
            qcow2 = tmp / "bench.qcow2"
            subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(image), str(qcow2)],
                           check=True)
            image = qcow2
        for rnd in range(args.rounds):
            for queues in args.queues:
                for wl in args.workloads:
                    for server in args.servers:
                        m = measure(server, image, tmp, queues, args.direct, wl, args.depth,
                                    args.seconds, args.warmup, args.server_args.split(),
                                    args.format)
                        log.info("round %d %-6s %-9s q=%d: %8.0f req/s, %6.1f us CPU/req, "
                                 "RSS %.0f MiB", rnd + 1, server, wl, queues, m.ops,
                                 m.cpu_us_per_op, m.rss / 2**20)
                        rows.append(m)
    print_table(rows, f"in-process, {args.format}, 4k QD{args.depth}, "
                      f"{'O_DIRECT' if args.direct else 'buffered'} (ratio = python / qsd)")
    if args.json:
        write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
