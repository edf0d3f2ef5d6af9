"""Wake-up benchmark: the REAL queue thread loop, woken by a driver in another process.

:mod:`benchmarks.hotpath` calls the worker's ``_service`` directly, so it sees the per-request
path but not what each wake-up adds: the ``epoll_wait``, the thread switch, the kick the driver
sends, the call eventfd the worker writes, the notification bookkeeping (EVENT_IDX's
avail_event / used_event).  Here a :class:`vhost.runner.thread.QueueWorker` runs on its own
thread exactly as the server runs it, on guest memory shared (a memfd) with a driver process
that behaves like Linux's virtio-blk with EVENT_IDX: it keeps ``--depth`` 4k reads in flight,
kicks only when avail_event asks for it, sleeps on the call eventfd, asks for an interrupt on
the next completion (used_event) and re-checks the used ring before sleeping.

With ``--depth 1`` every request is one kick, one wake-up and one call: what a TCG guest
(~1.2 requests per kick) costs.  Figures: the backend process's CPU per request (the driver is
another process, so it is not in it), wall time per request, wake-ups (worker passes), kicks and
calls per request, and any wait for a call that timed out (a lost notification; must be 0).

    python -m benchmarks.wakeup                       # depth 1 and 32, 20000 requests each
    python -m benchmarks.wakeup --depth 1 --repeat 5

Instructions per request of the worker thread, repeatable on a busy machine: callgrind counts
only inside the worker thread (``thread_run``: the one Python thread of this process); run two
request counts and take the difference, so starting and stopping the queue cancel out (the
driver is exec'd and not traced)::

    for n in 1000 2000; do valgrind --tool=callgrind --collect-atstart=no \\
        --toggle-collect=thread_run python -m benchmarks.wakeup --depth 1 --requests $n \\
        --repeat 1; done          # ("Collected" of 2000 - of 1000) / 1000
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import SHAPES, make_image, warm_page_cache
from benchmarks.hotpath import AVAIL_GPA, DESC_GPA, MEMORY, SIZE, USED_GPA, Rig
from guestmem import GuestMemory
from vhost.queue.base import RingAddresses
from vhost_frontend import DriverRing

#: A wait for a call longer than this is counted as a lost notification (and the driver kicks
#: again and goes on, so a lost one costs a second, not a hang).
CALL_TIMEOUT_MS = 1000


def shared_memory(fd: int) -> GuestMemory:
    """The rig's guest memory over the memfd ``fd`` (MAP_SHARED: both processes see it)."""
    mem = GuestMemory()
    mem.add_buffer(0, mmap.mmap(fd, MEMORY))
    return mem


def drive(mem_fd: int, kick_fd: int, call_fd: int, requests: int, depth: int,
          per_slot: int) -> dict[str, float]:
    """The driver process: ``requests`` reads, ``depth`` in flight, Linux's EVENT_IDX rules."""
    mem = shared_memory(mem_fd)
    ring = DriverRing(mem, SIZE, RingAddresses(DESC_GPA, AVAIL_GPA, USED_GPA), event_idx=True)
    kicks = calls = lost = 0
    poller = select.poll()
    poller.register(call_fd, select.POLLIN)

    def submit(slots: list[int]) -> None:
        nonlocal kicks
        old = ring.avail_idx
        ring.publish(*(per_slot * slot for slot in slots))
        if ring.kick_needed(old):
            os.eventfd_write(kick_fd, 1)
            kicks += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    submit(list(range(depth)))
    issued, done = depth, 0
    while done < requests:
        # take_used sets used_event to what it took (an interrupt on the next completion) and
        # the loop reads the used index again before sleeping: Linux's enable_cb + poll.
        used = ring.take_used(free_descriptors=False)
        if not used:
            if not poller.poll(CALL_TIMEOUT_MS):
                lost += 1  # reported, and the run goes on: kick again in case it was ours
                os.eventfd_write(kick_fd, 1)
            try:
                os.eventfd_read(call_fd)
                calls += 1
            except BlockingIOError:
                pass
            continue
        done += len(used)
        again = [head // per_slot for head, _ in used][:requests - issued]
        if again:
            issued += len(again)
            submit(again)
    wall = time.perf_counter() - t0
    result = {"requests": done, "kicks": kicks, "calls": calls, "lost": lost, "wall": wall,
              "driver_cpu": time.process_time() - cpu0}
    ring.release()
    mem.close()
    return result


def run(image: str, engine: str, shape: str, depth: int, requests: int,
        accounting: bool) -> dict[str, float]:
    """One run: a fresh rig and queue thread, a driver process for ``requests`` requests."""
    mem_fd = os.memfd_create("wakeup-guest")
    try:
        os.ftruncate(mem_fd, MEMORY)
        rig = Rig(engine, image, slots=max(32, depth), fast_path=True, accounting=accounting,
                  shape=shape, memory=shared_memory(mem_fd))
    except BaseException:
        os.close(mem_fd)
        raise
    worker = rig.worker
    try:
        # Only the first ``depth`` slots are used: poison those (a failed request is fast, and
        # would make a fine-looking figure), check them at the end.
        used_statuses = rig.statuses[:depth]
        for status in used_statuses:
            rig.mem.write(status, b"\xff")
        worker.start()
        cmd = [sys.executable, "-m", "benchmarks.wakeup", "--driver",
               ",".join(map(str, (mem_fd, rig.kick, rig.call_fd, requests, depth, rig.per_slot)))]
        cpu0 = time.process_time()
        out = subprocess.run(cmd, pass_fds=(mem_fd, rig.kick, rig.call_fd), check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        cpu = time.process_time() - cpu0
        passes, signals = worker.passes, rig.call.count
        if not worker.stop():
            raise RuntimeError("the queue thread did not drain")
        bad = {rig.mem.read(status, 1)[0] for status in used_statuses} - {0}
        if bad:
            raise RuntimeError(f"requests completed with status {sorted(bad)}, not OK")
    finally:
        if worker.alive:
            worker.stop()
        rig.close()
        os.close(mem_fd)
    result: dict[str, float] = json.loads(out)
    result.update(cpu=cpu, passes=passes, signals=signals)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wakeup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, nargs="+", default=[1, 32],
                   help="requests the driver keeps in flight (default: 1 and 32)")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=3, help="runs per figure (median printed)")
    p.add_argument("--engine", default="io_uring")
    p.add_argument("--shape", choices=SHAPES, default="indirect")
    p.add_argument("--accounting", choices=("on", "off"), default="on")
    p.add_argument("--driver", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.driver:
        mem_fd, kick, call, requests, depth, per_slot = map(int, args.driver.split(","))
        print(json.dumps(drive(mem_fd, kick, call, requests, depth, per_slot)))
        return 0
    if not all(1 <= d <= SIZE // 8 for d in args.depth):
        p.error(f"--depth must be 1..{SIZE // 8}")
    with tempfile.TemporaryDirectory() as td:
        image = Path(td) / "wakeup.img"
        make_image(image, 32 << 20, fill=True)
        warm_page_cache(image)
        for depth in args.depth:
            runs = [run(str(image), args.engine, args.shape, depth, args.requests,
                        args.accounting == "on") for _ in range(args.repeat)]

            def med(key: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.median(r[key] / r["requests"] for r in runs)

            cpus = [r["cpu"] / r["requests"] * 1e6 for r in runs]
            print(f"{args.engine:9s} {args.shape:8s} depth {depth:3d} accounting "
                  f"{args.accounting:3s}: backend {statistics.median(cpus):5.1f} us CPU per 4k "
                  f"read (runs {min(cpus):.1f}..{max(cpus):.1f}), "
                  f"{med('wall') * 1e6:5.1f} us wall, per request: "
                  f"{med('passes'):.2f} wake-ups, {med('kicks'):.2f} kicks, "
                  f"{med('calls'):.2f} calls taken ({med('signals'):.2f} signalled), "
                  f"driver {med('driver_cpu') * 1e6:.1f} us CPU; "
                  f"lost notifications {sum(int(r['lost']) for r in runs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
