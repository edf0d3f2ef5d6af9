"""Hot-path benchmark: the Python cost of one request, without sockets, eventfds or a guest.

A split ring in an anonymous mapping, a :class:`virtio_blk.device.BlkDevice` on a page-cached
image, and the real worker code (:meth:`vhost.runner.thread.QueueWorker._service`) called directly:
``--batch`` 4k reads are made available, serviced and completed per round.  What is left is the
per-request path -- pop and validate the chain, check the header, build the RequestBuffers,
lock, issue the IO, reap, write the status, publish -- which is what profiling needs to see.

Requests have Linux's shape (one indirect descriptor to a table of header, data and status;
``--shape direct`` for 3-descriptor chains) and read real data from a filled, page-cached image
(``--data sparse`` reads holes, which skips the page-cache lookup of real pages).

    python -m benchmarks.hotpath                     # io_uring, batches of 32 and of 1
    python -m benchmarks.hotpath --engine inline     # preadv on the worker thread
    python -m benchmarks.hotpath --profile           # and a cProfile listing
    python -m benchmarks.hotpath --fast-path off     # the generic path only
    python -m benchmarks.hotpath --accounting off    # without latency accounting (what a
                                                     # server without --qmp/--metrics does)
    python -m benchmarks.hotpath --dirty-log         # also with migration dirty logging on
    python -m benchmarks.hotpath --shape both        # what indirect costs, in one process
    python -m benchmarks.hotpath --data both         # what real data costs over holes
    python -m benchmarks.hotpath --layout packed     # a packed ring (VIRTIO_F_RING_PACKED)
    python -m benchmarks.hotpath --layout both       # split and packed, alternately
    python -m benchmarks.hotpath --core python       # the pure-Python core (default: compiled
                                                     # where it is built)
    python -m benchmarks.hotpath --format both       # raw and a fully allocated qcow2 of the
                                                     # same data, alternately, with the ratio
    python -m benchmarks.hotpath --op write          # 4k writes instead of reads

Instructions per request, repeatable on a busy machine (one shape, batch and mode per run;
callgrind counts only inside the ``any()`` that runs the ``--requests`` measured requests):

    valgrind --tool=callgrind --collect-atstart=no --toggle-collect=builtin_any \
        python -m benchmarks.hotpath --instructions --fast-path on --shape direct \
        --batches 32 --requests 1024        # "Collected" / 1024

That count includes the rig's driver: posting each round's requests and taking the used ring
back, Python code that costs little on a split ring and most of the count on a packed one (a
descriptor written per request, each through a struct).  The server's part alone -- the
worker's passes of each measured round, nothing of the driver nor of the warm-up -- runs
inside ``operator.call`` (called nowhere else in the process: a toggle function called again
inside the counted code would switch the count off there), so
``--toggle-collect=_operator_call`` instead of ``builtin_any`` counts only it.

What a wake-up adds (epoll, the kick, the call eventfd, notification bookkeeping) is not here:
:mod:`benchmarks.wakeup` runs the real queue thread against a driver process.  (Nor is the call:
the rig never moves used_event, so after the first round the worker is not asked for one.)

With ``--fast-path both`` (the default) the two are measured alternately in one process, and the
median of ``--repeat`` runs is printed with the ratio (CPU time per request is robust against
other load on the machine; the spread of the runs says how much it was disturbed).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from operator import call
from pathlib import Path

from benchmarks.common import (
    SHAPES,
    descriptors_per_request,
    lay_out_request,
    make_image,
    warm_page_cache,
)
from blockdev.engine import ENGINES
from blockdev.images import open_image
from guestmem import GuestMemory
from guestmem.dirty_log import DirtyLog, DirtyMarker
from vhost.messages import VirtioFeature
from vhost.queue.base import Queue, RingAddresses
from vhost.queue.packed import DESC as PACKED_DESC
from vhost.queue.packed import F_INDIRECT, F_NEXT, F_WRITE, PackedQueue
from vhost.queue.split import DESC_SIZE, SplitQueue
from vhost.runner.thread import Notifier, QueueWorker
from vhost_frontend import DriverRing
from vhost_frontend.packed import PackedDriverRing
from virtio_blk import core as cores
from virtio_blk.device import BlkDevice
from virtio_blk.request import HEADER, HEADER_SIZE, ReqType

SIZE = 256
#: Bytes of guest memory a rig uses (rings, tables, headers, data, status bytes).
MEMORY = 64 << 20
DATA = ("filled", "sparse")
LAYOUTS = ("split", "packed")
FORMATS = ("raw", "qcow2")
OPS = ("read", "write")
DESC_GPA, AVAIL_GPA, USED_GPA, TABLE_GPA = 0x1000, 0x10000, 0x20000, 0x400000


class Rig:
    """One queue of a BlkDevice with ``slots`` fixed 4k read requests, each one indirect
    descriptor to a table of header, data and status (``shape="indirect"``: what Linux sends
    once the device offers VIRTIO_F_RING_INDIRECT_DESC) or a 3-descriptor direct chain."""

    def __init__(self, engine: str, image: str, slots: int = 32, fast_path: bool = True,
                 accounting: bool = True, shape: str = "indirect",
                 layout: str = "split", fmt: str = "raw", op: str = "read",
                 memory: GuestMemory | None = None) -> None:
        # (``memory``: 64 MiB from the caller, shared with a driver process by
        # benchmarks.wakeup)
        self.mem = GuestMemory.anonymous(MEMORY) if memory is None else memory
        features = int(VirtioFeature.RING_EVENT_IDX | VirtioFeature.VERSION_1
                       | VirtioFeature.RING_INDIRECT_DESC)
        addresses = RingAddresses(DESC_GPA, AVAIL_GPA, USED_GPA)
        self.packed = layout == "packed"
        self.vq: Queue
        if self.packed:
            self.vq = PackedQueue(self.mem, SIZE, addresses,
                                  features | int(VirtioFeature.RING_PACKED))
        else:
            self.vq = SplitQueue(self.mem, SIZE, addresses, features)
        self.disk = open_image(image, fmt)
        self.device = BlkDevice(self.disk, engine=engine, fast_path=fast_path,
                                latency_accounting=accounting)
        self.handler = self.device.create_handler(0, self.mem)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = Notifier(self.call_fd)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.worker = QueueWorker(self.vq, self.handler, self.kick, self.call)
        # The driver side of the rig's layout (the other one's is never made: it would write
        # its own fields into the rings).
        self.driver: DriverRing | PackedDriverRing
        if self.packed:
            self.driver = PackedDriverRing(self.mem, SIZE, addresses, event_idx=True)
        else:
            self.driver = DriverRing(self.mem, SIZE, addresses, event_idx=True)
        self.per_slot = descriptors_per_request(shape)
        self.statuses = []
        self.data = []
        #: Packed: each slot's ring descriptors (addr, len, flags), made available per round
        #: (a packed ring has no table to leave them in).
        self.chains: list[list[tuple[int, int, int]]] = []
        for slot in range(slots):
            hdr, data, status = 0x100000 + 16 * slot, 0x200000 + 4096 * slot, 0x300000 + slot
            table = TABLE_GPA + 3 * DESC_SIZE * slot if shape == "indirect" else None
            writing = op == "write"
            pieces = [(hdr, HEADER_SIZE, False), (data, 4096, not writing), (status, 1, True)]
            if isinstance(self.driver, DriverRing):
                lay_out_request(self.driver, slot, pieces, table)
            elif table is not None:
                self.mem.write(table, b"".join(PACKED_DESC.pack(a, n, 0, F_WRITE if w else 0)
                                               for a, n, w in pieces))
                self.chains.append([(table, DESC_SIZE * len(pieces), F_INDIRECT)])
            else:
                self.chains.append([(a, n, (F_WRITE if w else 0) | (F_NEXT if i < 2 else 0))
                                    for i, (a, n, w) in enumerate(pieces)])
            # 4k blocks spread over the first 32 MiB of the image, not 32 neighbours
            self.mem.write(hdr, HEADER.pack(ReqType.OUT if writing else ReqType.IN, 0,
                                            8 * 257 * slot % (64 << 10)))
            self.statuses.append(status)
            self.data.append(data)
        self.slots = slots
        self.next_slot = 0
        #: The server's part of a round (count_instructions wraps it).
        self.serve: Callable[[], None] = self._serve

    def round(self, batch: int) -> None:
        """Make ``batch`` requests available and service them to completion."""
        first = self.next_slot
        driver = self.driver
        if isinstance(driver, PackedDriverRing):
            for i in range(batch):
                slot = (first + i) % self.slots
                driver.add_raw(self.chains[slot], slot)
        else:
            driver.publish(*(self.per_slot * ((first + i) % self.slots) for i in range(batch)))
        self.next_slot = (first + batch) % self.slots
        self.serve()  # (inside operator.call while counted: see count_instructions)
        if isinstance(driver, PackedDriverRing):
            driver.take_used(free_ids=False)  # (the slots' ids are fixed)
        # The call eventfd is not read back: a driver's cost, not the server's (reading an
        # eventfd with nothing in it raises, some 4k instructions a round); its counter cannot
        # overflow in a run.

    def _serve(self) -> None:
        """The worker's passes of one round: a kick, then until nothing is in flight."""
        self.worker._service(kick=True)
        while self.vq.in_flight_count:
            self.worker._service(kick=False)

    def poison_statuses(self) -> None:
        """Set every status byte to a value no device writes, for :meth:`check_statuses`."""
        for status in self.statuses:
            self.mem.write(status, b"\xff")

    def check_statuses(self) -> None:
        """Refuse a figure made of failed requests (an error is fast, and no read)."""
        bad = {self.mem.read(status, 1)[0] for status in self.statuses} - {0}
        if bad:
            raise RuntimeError(f"requests completed with status {sorted(bad)}, not OK")

    def log_dirty_pages(self, on: bool) -> None:
        """Switch dirty logging on (a memfd log over the rig's memory, as QEMU hands over)
        or off, the way the handler does: one marker shared by the ring and the device."""
        if on and self.vq.dirty is None:
            self.log_fd = os.memfd_create("hotpath-log", os.MFD_CLOEXEC)
            size = MEMORY // 4096 // 8
            os.ftruncate(self.log_fd, size)
            self.dirty_log = DirtyLog(self.log_fd, size)
            marker = DirtyMarker(self.dirty_log)
            self.vq.dirty = marker
            self.handler.dirty = marker
        elif not on and self.vq.dirty is not None:
            self.handler.dirty = None
            self.vq.dirty = None
            self.dirty_log.close()
            os.close(self.log_fd)

    def close(self) -> None:
        self.log_dirty_pages(False)
        self.driver.release()
        self.vq.release()
        self.handler.close()
        self.call.close()
        os.close(self.kick)
        self.disk.close()
        self.mem.close()


def measure(rig: Rig, batch: int, requests: int) -> float:
    """CPU microseconds per request (and every slot's last request completed OK)."""
    rounds = max(1, requests // batch)
    for _ in range(max(1, 200 // batch)):
        rig.round(batch)
    rig.poison_statuses()
    t0 = time.process_time()
    for _ in range(rounds):
        rig.round(batch)
    us = (time.process_time() - t0) / (rounds * batch) * 1e6
    if rounds * batch >= rig.slots:
        rig.check_statuses()
    return us


def _none(fn: Callable[[int], None], arg: int) -> bool:
    fn(arg)
    return False


def count_instructions(rig: Rig, batch: int, requests: int) -> None:
    """Run ``requests`` requests (after a warm-up) inside one ``any()`` -- the only call of it
    in the process once set up, so callgrind's ``--toggle-collect=builtin_any`` counts exactly
    them: instruction counts do not move with the load of a shared machine as seconds do."""
    for _ in range(max(1, 200 // batch)):
        rig.round(batch)
    rig.poison_statuses()
    rounds = max(1, requests // batch)
    # The server's part of each counted round inside operator.call, which nothing else calls:
    # --toggle-collect=_operator_call counts those parts alone (the warm-up rounds above are
    # not wrapped, so not counted).
    rig.serve = partial(call, rig._serve)
    # (A generator expression of rig.round(batch) -- None, so every round runs; mypy will
    # not take the value of a function that returns None.)
    any(_none(rig.round, batch) for _ in range(rounds))
    rig.check_statuses()
    print(f"{rounds * batch} requests of batch {batch} counted")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hotpath", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Engines that finish page-cached IO in the worker's own thread: the thread pool would have
    # this harness spin while its threads work, which measures nothing useful.
    p.add_argument("--engine", choices=[e for e in ENGINES if e != "threads"],
                   default="io_uring")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 1])
    p.add_argument("--requests", type=int, default=50000)
    p.add_argument("--fast-path", choices=("on", "off", "both"), default="both")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure (median printed)")
    p.add_argument("--core", choices=cores.CHOICES, default=None,
                   help="the fast path's core (sets VHOST_USER_BLK_CORE for this run; default: "
                   "the environment's, else auto: compiled where built)")
    p.add_argument("--profile", action="store_true", help="also print a cProfile listing")
    p.add_argument("--accounting", choices=("on", "off"), default="on",
                   help="latency accounting (two clock reads and a histogram bucket per "
                   "request; on with --qmp or --metrics); default on")
    p.add_argument("--shape", choices=(*SHAPES, "both"), default="indirect",
                   help="indirect (default): one descriptor to a table of header, data, status, "
                   "as Linux sends every request; direct: a 3-descriptor chain; both: each, "
                   "alternately in one process, with the ratio")
    p.add_argument("--data", choices=(*DATA, "both"), default="filled",
                   help="filled (default): the image holds data, read once into the page cache "
                   "before measuring; sparse: reads hit holes; both: each, alternately")
    p.add_argument("--layout", choices=(*LAYOUTS, "both"), default="split",
                   help="split (default) or packed ring (VIRTIO_F_RING_PACKED); both: each, "
                   "alternately in one process, with the ratio")
    p.add_argument("--format", choices=(*FORMATS, "both"), default="raw",
                   help="raw (default) or qcow2 (the same data converted by qemu-img, every "
                   "cluster allocated); both: each, alternately in one process, with the ratio")
    p.add_argument("--op", choices=OPS, default="read",
                   help="read (default) or write: 4k requests of that direction")
    p.add_argument("--dirty-log", action="store_true",
                   help="also measure with dirty-page logging on (as during a live migration)")
    p.add_argument("--instructions", action="store_true",
                   help="run --requests requests of one shape, batch and mode inside any(), "
                   "for callgrind --collect-atstart=no --toggle-collect=builtin_any (see above)")
    args = p.parse_args(argv)
    if args.core is not None:
        os.environ[cores.ENV] = args.core
    core = cores.core_name()
    print(cores.describe())
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.fast_path]
    shapes = SHAPES if args.shape == "both" else (args.shape,)
    datas = DATA if args.data == "both" else (args.data,)
    layouts = LAYOUTS if args.layout == "both" else (args.layout,)
    formats = FORMATS if args.format == "both" else (args.format,)
    variants = [(shape, data) for data in datas for shape in shapes]
    with tempfile.TemporaryDirectory() as td:
        images = {}
        for data in datas:
            raw = images[data, "raw"] = Path(td) / f"hotpath-{data}.img"
            make_image(raw, 32 << 20, fill=data == "filled")
            warm_page_cache(raw)
            if "qcow2" in formats:  # the same data, every cluster allocated
                images[data, "qcow2"] = Path(td) / f"hotpath-{data}.qcow2"
                subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", "-S", "0", str(raw),
                                str(images[data, "qcow2"])], check=True)
                warm_page_cache(images[data, "qcow2"])
        accounting = args.accounting == "on"
        rigs = {(fmt, layout, shape, data, fast): Rig(
                    args.engine, str(images[data, fmt]), fast_path=fast, accounting=accounting,
                    shape=shape, layout=layout, fmt=fmt, op=args.op)
                for fmt in formats for layout in layouts for shape, data in variants
                for fast in modes}
        try:
            if args.instructions:
                if len(rigs) != 1 or len(args.batches) != 1:
                    p.error("--instructions measures one format, layout, shape, data, batch and "
                            "fast-path mode")
                count_instructions(next(iter(rigs.values())), args.batches[0], args.requests)
                return 0
            by_format: dict[str, dict[tuple[str, str, str, bool, int], list[float]]] = {
                fmt: {} for fmt in formats}
            for _ in range(args.repeat):
                for batch in args.batches:
                    for key, rig in rigs.items():
                        by_format[key[0]].setdefault((*key[1:], batch), []).append(
                            measure(rig, batch, args.requests // max(1, 32 // batch)))

            def label(layout: str) -> str:
                """The layout column, left out when only the default (split) runs."""
                return "" if layouts == ("split",) else f"{layout:6s} "

            def report(fmt: str) -> None:
                """The figures of one format (its column left out when only one runs)."""
                runs = by_format[fmt]
                name = f"{args.engine:9s} {fmt:5s} " if len(formats) == 2 else f"{args.engine:9s} "

                def us(layout: str, shape: str, data: str, fast: bool, batch: int) -> float:
                    return statistics.median(runs[layout, shape, data, fast, batch])

                for batch in args.batches:
                    for layout in layouts:
                        for shape, data in variants:
                            line = (f"{name}{label(layout)}{shape:8s} {data:6s} batch "
                                    f"{batch:3d} accounting {args.accounting:3s} {core:8s}:")
                            for fast in modes:
                                vals = runs[layout, shape, data, fast, batch]
                                line += (f"  fast path {'on ' if fast else 'off'} "
                                         f"{us(layout, shape, data, fast, batch):6.1f} us CPU "
                                         f"per 4k {args.op} "
                                         f"(runs {min(vals):.1f}..{max(vals):.1f})")
                            if len(modes) == 2:
                                on_off = (us(layout, shape, data, True, batch)
                                          / us(layout, shape, data, False, batch))
                                line += f"  on/off {on_off:.2f}"
                            print(line)
                        for fast in modes:
                            cmp = []
                            if len(shapes) == 2:
                                cmp += [f"{data} indirect/direct {ind / dr:.2f}" for data in datas
                                        for ind, dr in [(us(layout, "indirect", data, fast, batch),
                                                         us(layout, "direct", data, fast, batch))]]
                            if len(datas) == 2:
                                cmp += [f"{shape} filled/sparse {fi / sp:.2f}" for shape in shapes
                                        for fi, sp in [(us(layout, shape, "filled", fast, batch),
                                                        us(layout, shape, "sparse", fast, batch))]]
                            if cmp:
                                print(f"{'':9s} {label(layout)}batch {batch:3d} fast path "
                                      f"{'on ' if fast else 'off'}: " + ", ".join(cmp))
                    if len(layouts) == 2:
                        for fast in modes:
                            cmp = [f"{shape} {data} {pk / sp:.2f}" for shape, data in variants
                                   for pk, sp in [(us("packed", shape, data, fast, batch),
                                                   us("split", shape, data, fast, batch))]]
                            print(f"{'':9s} batch {batch:3d} fast path {'on ' if fast else 'off'} "
                                  "packed/split: " + ", ".join(cmp))
                    if args.dirty_log:
                        shape, data = variants[0]
                        for layout in layouts:
                            rig = rigs[fmt, layout, shape, data, modes[-1]]
                            rig.log_dirty_pages(True)
                            dirty = statistics.median(
                                measure(rig, batch, args.requests // max(1, 32 // batch))
                                for _ in range(args.repeat))
                            rig.log_dirty_pages(False)
                            print(f"{name}{label(layout)}{shape:8s} {data:6s} batch "
                                  f"{batch:3d} accounting {args.accounting:3s}:"
                                  f"  fast path {'on ' if modes[-1] else 'off'} {dirty:6.1f} us "
                                  f"CPU per 4k {args.op}, dirty log on")
            for fmt in formats:
                report(fmt)
            if len(formats) == 2:
                for batch in args.batches:
                    for fast in modes:
                        cmp = [f"{label(layout)}{shape} {data} "
                               f"{qc / rw:.2f}" for layout in layouts for shape, data in variants
                               for qc, rw in [(statistics.median(by_format["qcow2"][
                                   layout, shape, data, fast, batch]),
                                   statistics.median(by_format["raw"][
                                       layout, shape, data, fast, batch]))]]
                        print(f"{'':9s} batch {batch:3d} fast path {'on ' if fast else 'off'} "
                              f"qcow2/raw {args.op}: " + ", ".join(cmp))
            if args.profile:
                prof = cProfile.Profile()
                prof.runcall(measure, rigs[(formats[-1], layouts[0], *variants[0], modes[-1])],
                             args.batches[0], 5000)
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        finally:
            for rig in rigs.values():
                rig.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
