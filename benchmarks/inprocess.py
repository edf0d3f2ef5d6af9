"""In-process benchmark: the project's vhost-user frontend driver pushes 4k requests at a server.

No guest: a Python driver (vhost_frontend) plays QEMU and the guest, keeps ``--depth`` requests
in flight on each of ``--queues`` queues, and counts completions.  The server under test runs as
its own process -- this project's ``vhost-user-blk`` or qemu-storage-daemon with each of its
engines -- on the same image, and its CPU time (all threads and queue processes, from /proc) is
divided by the requests it served.

What keeps it honest:

* requests have Linux's shape by default: one indirect descriptor to a table of header, data and
  status (``--shape direct`` for 3-descriptor chains);
* qsd runs with both of its engines for the cache mode (buffered: aio=threads and aio=io_uring;
  ``--direct``: aio=native and aio=io_uring) and the faster is the reference;
* the server order is reversed every other round (project first, then qsd first), and the
  table gives medians of ``--rounds`` rounds with their spread;
* the image holds data (``--data sparse`` reads holes instead), read once into the page cache
  before a buffered run; a request that completes with an error status stops the run.

    python -m benchmarks.inprocess                       # buffered image, 1 and 2 queues
    python -m benchmarks.inprocess --direct --rounds 5   # O_DIRECT
    python -m benchmarks.inprocess --queues 1 --workloads randread --json out.json
    python -m benchmarks.inprocess --format qcow2        # a fully allocated qcow2
    python -m benchmarks.inprocess --servers python python-pure qsd   # both cores, and qsd
    python -m benchmarks.inprocess --servers python --blockdev \
        driver=python,node-name=ram,module=examples.ramdisk,class=RamDisk,size=1G  # a plugin
    nbdkit -U /tmp/nbd.sock memory 1G &                   # both serve one NBD export:
    python -m benchmarks.inprocess --queues 1 --nbd 'nbd+unix:///?socket=/tmp/nbd.sock'

``--nbd URI`` is short for the same ``--blockdev driver=nbd,...`` and ``--qsd-blockdev`` for both
servers: qemu-storage-daemon then serves that node through its own NBD client (one ``qsd`` row,
the aio engines do not apply), so the ratio compares the two NBD clients and nothing else.

The driver itself is Python and is the bottleneck for requests/s well before qsd is (both
servers see the same driver, so the IOPS ratio understates qsd's lead); the CPU-per-request
figure is the backend's alone, and the one to compare.
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

from benchmarks.common import (
    PURE_PYTHON,
    SHAPES,
    Measurement,
    cpu_seconds,
    descriptors_per_request,
    lay_out_request,
    make_image,
    print_table,
    qsd_servers,
    read_json,
    remote_blockdev,
    round_order,
    rss_bytes,
    running_server,
    warm_page_cache,
    write_json,
)
from vhost.messages import ProtocolFeature, Request, VirtioFeature, u64
from vhost.queue.base import full_fence
from vhost.queue.split import DESC_SIZE
from vhost_frontend import DriverQueue, Frontend, FrontendMemory

log = logging.getLogger("benchmarks.inprocess")

BLK_FEATURES = (1 << 1) | (1 << 2) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 12) | (1 << 13)
WANT_FEATURES = int(
    VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC | VirtioFeature.RING_EVENT_IDX
    | VirtioFeature.PROTOCOL_FEATURES
) | BLK_FEATURES
WANT_PROTOCOL = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG


class QueueLoad:
    """``depth`` fixed requests (header, data, status) cycling on one queue, each one indirect
    descriptor pointing at its own 3-entry table (``shape="indirect"``, Linux's shape) or a
    3-descriptor direct chain (``shape="direct"``).

    Linux allocates a fresh table per request; a fixed table per slot costs the server the same
    (it reads and checks the table on every request) and keeps the driver cheap.
    """

    def __init__(self, mem: FrontendMemory, q: DriverQueue, depth: int, bs: int,
                 sectors: int, write: bool, shape: str = "indirect") -> None:
        self.per_slot = descriptors_per_request(shape)
        if depth * self.per_slot > q.size:
            raise ValueError(f"{depth} {shape} requests need {depth * self.per_slot} "
                             f"descriptors; the queue has {q.size}")
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
            table = mem.alloc(3 * DESC_SIZE, 16) if shape == "indirect" else None
            lay_out_request(q, slot, [(hdr, 16, False), (data, bs, not write), (status, 1, True)],
                            table)
            self.headers.append(mem.guest.view(hdr, 16))
            self.statuses.append(mem.guest.view(status, 1, for_write=True))
        self.completed = 0
        self.errors = 0

    def release(self) -> None:
        """Drop the views into guest memory so it can be unmapped."""
        for view in (*self.headers, *self.statuses):
            view.release()

    def _post(self, slot: int) -> None:
        sector = self.rng.randrange(0, self.sectors // 8) * 8
        self.headers[slot][:] = (int(self.write)).to_bytes(4, "little") + bytes(4) + \
            sector.to_bytes(8, "little")
        self.q.publish(slot * self.per_slot)

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
                    slot = head // self.per_slot
                    self.completed += 1
                    if self.statuses[slot][0]:  # a fast error is no IOPS
                        self.errors += 1
                    self.statuses[slot][0] = 0xFF
                    self._post(slot)
                full_fence()  # used_event store before the used.idx load
                if q.used_idx() == q.last_used:
                    break
            if q.avail_idx != old and q.kick_needed(old):
                q.kick()


def measure(server: str, image: Path, tmp: Path, queues: int, direct: bool, workload: str,
            depth: int, seconds: float, warmup: float, extra: list[str],
            fmt: str = "raw", shape: str = "indirect",
            blockdev: list[str] | None = None,
            qsd_blockdev: list[str] | None = None) -> Measurement:
    write = workload.endswith("write")
    bs = 4096
    sock = tmp / f"{server}.sock"
    with running_server(server, image, sock, queues, direct, extra, fmt,
                        blockdev or (), qsd_blockdev or ()) as proc:
        fe = Frontend(sock)
        mem = FrontendMemory([(0, 256 << 20, 0)])
        try:
            features = _negotiate(fe)
            if shape == "indirect" and not features & VirtioFeature.RING_INDIRECT_DESC:
                raise SystemExit(f"{server} does not offer VIRTIO_F_RING_INDIRECT_DESC: "
                                 "use --shape direct")
            fe.set_mem_table(mem)
            capacity = int.from_bytes(fe.get_config(0, 8), "little")
            loads = []
            for qi in range(queues):
                q = fe.setup_queue(qi, size=256)
                loads.append(QueueLoad(mem, q, depth, bs, capacity, write, shape))
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
            errors = sum(ld.errors for ld in loads)
            for ld in loads:
                ld.release()
        finally:
            fe.close()
            mem.close()
    if errors:
        raise RuntimeError(f"{server} {workload}: {errors} requests completed with an error "
                           "status (their speed is no figure)")
    if c1 == c0:
        raise RuntimeError(f"{server} {workload}: no request completed in {seconds} s")
    ops = (c1 - c0) / (t1 - t0)
    cpu = cpu1 - cpu0
    return Measurement(server, workload, queues, direct, ops, ops * bs, cpu,
                       cpu / max(c1 - c0, 1) * 1e6, rss,
                       {"shape": shape, "requests": c1 - c0, "seconds": t1 - t0})


def _negotiate(fe: Frontend) -> int:
    """QEMU's sequence, taking only features both servers implement (qsd offers LOG_ALL too);
    the features agreed."""
    features = fe.get_u64(Request.GET_FEATURES) & WANT_FEATURES
    proto = ProtocolFeature(fe.get_u64(Request.GET_PROTOCOL_FEATURES)) & WANT_PROTOCOL
    fe.command(Request.SET_PROTOCOL_FEATURES, u64(int(proto)), ack=False)
    fe.protocol = proto
    fe.checked(Request.SET_OWNER)
    fe.features = features
    fe.checked(Request.SET_FEATURES, u64(features))
    return features


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queues", type=int, nargs="+", default=[1, 2])
    p.add_argument("--direct", action="store_true",
                   help="O_DIRECT (qsd: cache.direct=on, aio=native and aio=io_uring)")
    p.add_argument("--workloads", nargs="+", default=["randread", "randwrite"],
                   choices=["randread", "randwrite"])
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--shape", choices=SHAPES, default="indirect",
                   help="indirect (default): one descriptor to a table of header, data, status, "
                   "as Linux sends every request; direct: a 3-descriptor chain")
    p.add_argument("--data", choices=("filled", "sparse"), default="filled",
                   help="filled (default): the image holds data, so reads copy real page-cache "
                   "pages (buffered: read once before measuring); sparse: reads hit holes")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds; the server order is reversed every other round (default 3)")
    p.add_argument("--size", default="1G", help="image size")
    p.add_argument("--dir", default=None, help="where to put the image (default: a temp dir)")
    p.add_argument("--server-args", default="", help="extra arguments for our server")
    p.add_argument("--servers", nargs="+", default=["python", "qsd"],
                   choices=["python", PURE_PYTHON, "qsd"],
                   help="python: this server (on the compiled core where it is built); "
                   f"{PURE_PYTHON}: this server on its pure-Python core; qsd: qemu-storage-daemon "
                   "with each engine (default: python qsd)")
    p.add_argument("--qsd-aio", nargs="+", choices=("threads", "native", "io_uring"),
                   help="qsd engines to measure (default: threads and io_uring buffered, native "
                   "and io_uring with --direct)")
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                   help="serve the image as raw, or converted to a fully allocated qcow2")
    p.add_argument("--blockdev", action="append", default=[], metavar="OPTIONS",
                   help="our server serves these --blockdev nodes (the last one, exported "
                   "writable) instead of the image: e.g. driver=python,node-name=ram,"
                   "module=examples.ramdisk,class=RamDisk,size=1G (repeatable)")
    p.add_argument("--qsd-blockdev", action="append", default=[], metavar="OPTIONS",
                   help="qemu-storage-daemon serves these --blockdev nodes (the last one, "
                   "exported writable) instead of the image, as one 'qsd' row: e.g. "
                   "driver=nbd,node-name=n0,server.type=unix,server.path=SOCK,export= "
                   "(repeatable)")
    p.add_argument("--nbd", metavar="URI",
                   help="both servers serve this NBD export (nbd://HOST[:PORT]/EXPORT or "
                   "nbd+unix:///EXPORT?socket=PATH) through their NBD clients: the same "
                   "driver=nbd node as --blockdev and --qsd-blockdev")
    p.add_argument("--json", type=Path, help="also write the measurements here")
    p.add_argument("--table", type=Path, metavar="JSON",
                   help="measure nothing: print the table of measurements saved with --json")
    args = p.parse_args(argv)
    if args.table:
        print_table(read_json(args.table), f"in-process, from {args.table}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from blockdev.disk import parse_size

    if args.nbd:
        if args.blockdev or args.qsd_blockdev:
            p.error("--nbd is short for --blockdev and --qsd-blockdev: give one or the other")
        from blockdev.spec import SpecError, parse_nbd

        try:
            parse_nbd(args.nbd)
        except SpecError as e:
            p.error(str(e))
        node = remote_blockdev(args.nbd)
        assert node is not None  # an NBD URI, checked above
        args.blockdev = args.qsd_blockdev = [node]
    servers = [s for s in ("python", PURE_PYTHON) if s in args.servers]
    if "qsd" in args.servers and args.qsd_blockdev:
        if args.qsd_aio:
            p.error("--qsd-aio does not apply to --qsd-blockdev nodes (give the node's aio=)")
        servers.append("qsd")
    elif "qsd" in args.servers:
        try:
            servers += qsd_servers(args.direct, args.qsd_aio)
        except ValueError as e:
            p.error(str(e))
    size = parse_size(args.size)
    rows: list[Measurement] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as td:
        tmp = Path(td)
        image = tmp / "bench.img"
        # no image when every server serves its --blockdev / --qsd-blockdev nodes
        if any(not (args.blockdev if s == "python" else args.qsd_blockdev) for s in servers):
            log.info("making a %d MiB %s image in %s", size >> 20, args.data, tmp)
            make_image(image, size, fill=args.data == "filled")
            if args.format == "qcow2":
                qcow2 = tmp / "bench.qcow2"
                subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(image),
                                str(qcow2)], check=True)
                image = qcow2
            if not args.direct:
                warm_page_cache(image)
        for rnd in range(args.rounds):
            for queues in args.queues:
                for wl in args.workloads:
                    for server in round_order(servers, rnd):
                        m = measure(server, image, tmp, queues, args.direct, wl, args.depth,
                                    args.seconds, args.warmup, args.server_args.split(),
                                    args.format, args.shape, args.blockdev,
                                    args.qsd_blockdev)
                        m.extra["round"] = rnd + 1
                        log.info("round %d %-12s %-9s q=%d: %8.0f req/s, %6.1f us CPU/req, "
                                 "RSS %.0f MiB", rnd + 1, server, wl, queues, m.ops,
                                 m.cpu_us_per_op, m.rss / 2**20)
                        rows.append(m)
    served = (f"NBD export {args.nbd}" if args.nbd else
              f"{args.format}, {args.data} image, {'O_DIRECT' if args.direct else 'buffered'}")
    print_table(rows, f"in-process, {served}, 4k QD{args.depth}, {args.shape} requests, "
                      f"{args.rounds} rounds in alternating order")
    if args.json:
        write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
