"""Guest benchmark on remote storage: this server and qemu-storage-daemon on the same RBD image
and the same NBD export, alternately (the same guest fio workloads as :mod:`benchmarks.guest`).

    python -m benchmarks.remote                       # throw-away Ceph cluster + qemu-nbd
    python -m benchmarks.remote --rbd 'rbd:rbd/img1:conf=/etc/ceph/ceph.conf:id=admin' \\
                                --nbd 'nbd+unix:///disk?socket=/run/nbd.sock'

qsd serves them with ``--blockdev driver=rbd,pool=..,image=..,conf=..,user=..`` and
``driver=nbd,server.type=unix,server.path=..,export=..``.  Without ``--rbd``/``--nbd`` a one-node
Ceph cluster (memstore OSD; remote_testbed.ceph) with a filled image and ``qemu-nbd`` on a filled
raw file are started for the run.  The server order is reversed every other round.  These
machines are shared and noisy: compare the ratios.
qsd's rbd driver is in Debian's ``qemu-block-extra`` package.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from benchmarks.common import Measurement, make_image, print_table, round_order
from benchmarks.common import write_json as write_rows
from benchmarks.guest import WORKLOADS, run_one
from qemu_guest import ensure_guest

log = logging.getLogger("benchmarks.remote")


@contextlib.contextmanager
def throwaway_storage(tmp: Path, size: int, want: set[str]) -> Iterator[dict[str, str]]:
    """A Ceph cluster with a filled image and qemu-nbd on a filled file: their specs."""
    from remote_testbed.ceph import CephCluster
    from remote_testbed.nbd_servers import NbdServer

    specs: dict[str, str] = {}
    raw = tmp / "fill.raw"
    make_image(raw, size, fill=True)
    with contextlib.ExitStack() as stack:
        if "rbd" in want:
            cluster = CephCluster(tmp / "ceph", memstore_bytes=size + (1 << 30))
            stack.callback(cluster.stop)
            log.info("starting a one-node Ceph cluster")
            cluster.start()
            cluster.rbd("import", "--no-progress", str(raw), "rbd/bench", timeout=600)
            specs["rbd"] = cluster.spec("bench")
        if "nbd" in want:
            (tmp / "nbd").mkdir()
            server = NbdServer("qemu-nbd", "unix", tmp / "nbd", size=size, image=raw)
            stack.callback(server.stop)
            server.start()
            specs["nbd"] = server.uri
        yield specs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.remote", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rbd", help="an rbd: spec to use instead of a throw-away cluster")
    p.add_argument("--nbd", help="an nbd:// or nbd+unix:// URI to use instead of qemu-nbd")
    p.add_argument("--only", choices=("rbd", "nbd"), help="benchmark one kind only")
    p.add_argument("--workloads", nargs="+", default=["randread-4k", "randwrite-4k"],
                   choices=list(WORKLOADS))
    p.add_argument("--runtime", type=float, default=4.0, help="seconds per fio workload")
    p.add_argument("--rounds", type=int, default=1, help="alternate the servers this many times")
    p.add_argument("--size", default="1G", help="size of the throw-away image")
    p.add_argument("--server-args", default="", help="extra arguments for our server")
    p.add_argument("--json", type=Path, help="also write the measurements here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from blockdev.disk import parse_size

    want = {args.only} if args.only else {"rbd", "nbd"}
    ensure_guest()
    rows: list[Measurement] = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        given = {k: v for k, v in (("rbd", args.rbd), ("nbd", args.nbd)) if v and k in want}
        with throwaway_storage(tmp, parse_size(args.size), want - set(given)) as made:
            specs = {**made, **given}
            for rnd in range(args.rounds):
                for kind in sorted(specs):
                    for server in round_order(("python", "qsd"), rnd):
                        got = run_one(server, specs[kind], tmp, 1, False,
                                      args.workloads, args.runtime, args.server_args.split())
                        for m in got:
                            m.workload = f"{kind}-{m.workload}"
                            m.extra["round"] = rnd + 1
                            log.info("round %d %-6s %-18s %8.0f IOPS %6.1f us CPU/IO", rnd + 1,
                                     server, m.workload, m.ops, m.cpu_us_per_op)
                        rows.extend(got)
    print_table(rows, f"guest fio on remote storage, {args.rounds} rounds in alternating order")
    if args.json:
        write_rows(rows, args.json)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
