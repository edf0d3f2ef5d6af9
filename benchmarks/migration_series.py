"""Run the live-migration scenario again and again, to tell a QEMU/TCG guest crash from a bug
in a backend: the same scenario with QEMU's built-in virtio-blk, qemu-storage-daemon or this
server, no retries, one line per run and a table at the end.

    python -m benchmarks.migration_series --backend server --queues 2 --runs 5
    python -m benchmarks.migration_series --backend builtin server --queues 1 --packed --runs 3
    python -m benchmarks.migration_series --backend builtin qsd server --queues 1 2 --runs 3 \\
        --record /work/notes/migration-series.md

With several backends and queue counts the runs alternate (builtin 1q, qsd 1q, server 1q,
builtin 2q, ...) so that each gets a similar share of whatever else the machine is doing.  One
run at a time: the guests run under TCG and a loaded machine turns slow phases into hangs.

Each line says ok or the failure's signature (verify error, hang in phase X, guest panic with
the first oops line, migration failed, backend error); the diagnostics of a failed run (both
QEMUs' virtio ring state, the server's per-queue ring state, consoles, backend logs) go to
``RUN_DIR/diagnostics.txt``, kept with the run's consoles and logs.  ``--record FILE`` appends
every run to a markdown table as it finishes, so a series can go on over several sessions.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import itertools
import logging
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from qemu_guest import ensure_guest
from qemu_guest.migration import BACKENDS, PHASE_TIMEOUT, Outcome, run_scenario

log = logging.getLogger(__name__)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM as ^C: the run in progress tears down (its QEMUs and backends) and ends."""
    raise KeyboardInterrupt(f"signal {signum}")


def record_line(out: Outcome, when: datetime.datetime, run_dir: Path | None) -> str:
    """One markdown table row: date, backend, queues, outcome, signature, duration."""
    where = f" ({run_dir})" if run_dir is not None else ""
    sig = out.signature.replace("|", "/")
    queues = f"{out.queues} packed" if out.packed else str(out.queues)
    return (f"| {when:%Y-%m-%d %H:%M} | {out.backend} | {queues} | "
            f"{'ok' if out.ok else 'FAIL'} | {sig}{where if not out.ok else ''} | "
            f"{out.duration:.0f} s |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--queues", nargs="+", type=int, choices=(1, 2), default=[1, 2])
    p.add_argument("--packed", action="store_true",
                   help="packed=on on every QEMU: the guest must drive packed virtqueues")
    p.add_argument("--runs", type=int, default=1, help="runs per backend and queue count")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where runs go (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the directories of runs that passed")
    p.add_argument("--record", type=Path, default=None,
                   help="append each run as a markdown table row to this file")
    p.add_argument("--phase-timeout", type=float, default=PHASE_TIMEOUT,
                   help=f"seconds a phase may take before it counts as a hang "
                        f"(default {PHASE_TIMEOUT:.0f})")
    p.add_argument("--stop-on-failure", action="store_true")
    p.add_argument("--no-new-run-after", metavar="HH:MM", default=None,
                   help="start no run after this time of day (UTC): a series that must end by "
                        "then (a run takes 2-10 minutes)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")

    # A series runs for hours, often in the background (where ^C is ignored): SIGTERM or
    # SIGINT stops it without leaving QEMUs or backends behind.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    ensure_guest()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="migration-series-"))
    root.mkdir(parents=True, exist_ok=True)
    combos = [(b, q) for q in args.queues for b in args.backend]
    results: dict[tuple[str, int], list[Outcome]] = collections.defaultdict(list)
    print(f"runs in {root}", flush=True)
    runs = itertools.product(range(args.runs), combos)
    for n, (rnd, (backend, queues)) in enumerate(runs, 1):
        when = datetime.datetime.now(datetime.UTC)
        if args.no_new_run_after is not None and f"{when:%H:%M}" >= args.no_new_run_after:
            print(f"{when:%H:%M} UTC: no new run after {args.no_new_run_after}", flush=True)
            break
        layout = "p" if args.packed else ""
        run_dir = root / f"{when:%Y%m%dT%H%M%S}-{backend}-{queues}q{layout}"
        out = run_scenario(backend, queues, run_dir, args.phase_timeout, packed=args.packed)
        results[(backend, queues)].append(out)
        if not out.ok:
            (run_dir / "diagnostics.txt").write_text(out.diagnostics + "\n")
        line = (f"run {n} [{backend} {queues}q{layout} #{rnd + 1}] {out.duration:.0f} s: "
                f"{'ok' if out.ok else 'FAIL ' + out.signature}")
        if out.ok:
            line += f" -- {out.summary}"
        else:
            line += f" -- diagnostics in {run_dir / 'diagnostics.txt'}"
        print(line, flush=True)
        if args.record is not None:
            with args.record.open("a") as f:
                f.write(record_line(out, when, None if out.ok else run_dir) + "\n")
        if out.ok and not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        if not out.ok and args.stop_on_failure:
            break

    print("\n| backend | queues | runs | ok | failed | signatures |")
    print("|---|---|---|---|---|---|")
    for (backend, queues), outs in sorted(results.items()):
        failed = [o for o in outs if not o.ok]
        sigs = collections.Counter(o.signature.split(":")[0] for o in failed)
        sig_text = "; ".join(f"{k} x{v}" for k, v in sigs.items()) or "-"
        layout = " packed" if args.packed else ""
        print(f"| {backend} | {queues}{layout} | {len(outs)} | {len(outs) - len(failed)} | "
              f"{len(failed)} | {sig_text} |")
    return 0 if all(o.ok for outs in results.values() for o in outs) else 1


if __name__ == "__main__":
    sys.exit(main())
