"""Live migration end to end: a guest writing to a disk served by this project moves to another
QEMU (with its own server on the same image, ``--locking off``) and back, losing nothing.

Per test: two servers on one image; QEMU 1 boots and runs fio under TCG; QEMU 2 waits with
``-incoming unix:``; ``migrate`` over QMP while fio writes; QEMU 2 finishes the write and a full
verify (crc32c) with zero errors; then, while QEMU 2 verifies again, pass after pass (reads: the
data the backend writes into guest memory), the guest migrates back to a QEMU 3 on the first
server, which finishes the pass that was running with zero errors.  What the backends marked in
QEMU's dirty log and how long each migration took are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ConnectError
from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.protocol import StateError
from qemu.qmp.qmp_client import ExecInterruptedError

from qemu_guest import Guest, GuestError, GuestTimeout, parse_fio_json, parse_results

from .conftest import Server

pytestmark = pytest.mark.e2e
log = logging.getLogger(__name__)

FIO = ("fio --filename=/dev/vda --ioengine=libaio --direct=1 --output-format=json "
       "--name=mig --rw=write --bs=64k --iodepth=8 --verify=crc32c --verify_fatal=1")


#: Verify passes the guest runs after the first (the test quits QEMU long before).
MAX_PASSES = 100

#: Attempts at the whole scenario.  QEMU 7.2 under TCG sometimes kills or hangs the guest it
#: has just migrated, whichever backend serves the disk.  Measured on these machines (this
#: scenario, one run at a time, 2026-12-06): qemu-storage-daemon 3 failed tests of 16, this
#: server 7 of 24 (queue threads or processes); the same signatures with both -- the
#: destination's kernel panics in list or rbtree code, the scheduler or blk-mq completion, or
#: hangs -- with MTTCG or single-threaded TCG, ``-cpu max``, ``max,la57=off`` or ``qemu64``.  A
#: guest that dies that way is started over (twice at most); what the backend must get right
#: still fails at once: a verify error, a failed migration, a server error or crash.
ATTEMPTS = 3

#: How a guest that died or hung reaches the test: its QEMU exited, or stopped answering.
GUEST_DIED = (GuestError, GuestTimeout, StateError, ExecInterruptedError, ConnectError,
              EOFError, ConnectionError)


def workload(size_mb: int, jobs: int) -> str:
    """Write (rate-limited so that it lasts at least 20 s however fast the machine is: the
    first migration must fit inside it), verify, then verify again, pass after pass, until the
    test quits QEMU.

    The endless verify passes keep the second migration independent of how long a pass takes:
    fio's ``--rate`` does not hold for ``--verify_only`` passes (measured: 320 MiB verified
    twice within 24 s), so a single pass could end before the migration did, and the guest
    powered off under it.
    """
    rate = 16 // jobs
    job = (f"{FIO} --size={size_mb}M --numjobs={jobs} --offset_increment={size_mb}M "
           f"--rate={rate}m")
    return "\n".join([
        "echo @@PHASE write",
        f"result write {job} --do_verify=0",
        "echo @@PHASE verify",
        f"result verify {job} --verify_only",
        "i=0",
        f"while [ $i -lt {MAX_PASSES} ]; do",
        "  i=$((i+1))",
        "  echo @@PHASE reverify$i",
        f"  result reverify$i {job} --verify_only",
        "done",
    ])


class Qmp:
    """QMP on a QEMU started with ``-qmp unix:PATH,server=on,wait=off`` (qemu.qmp's sync API).

    A connection that drops means QEMU exited (its guest powered off or died): the command
    raises, which the test reads as a guest that died.
    """

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        deadline = time.monotonic() + timeout
        while True:
            self.qmp = QEMUMonitorProtocol(str(self.path))
            try:
                self.qmp.connect()
                return
            except (OSError, ConnectError):  # QEMU has not created the socket yet
                self.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def cmd(self, name: str, **args: object) -> Any:
        return self.qmp.cmd(name, **args)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # EOFError once QEMU has quit
            self.qmp.close()


def migrate(src: Qmp, uri: str, timeout: float = 300.0) -> dict:
    """Migrate to ``uri``; query-migrate's final answer (status 'completed')."""
    # QEMU's default bandwidth cap (32 MiB/s) is for real networks; this is a local socket.
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 2 << 30})
    src.cmd("migrate", uri=uri)
    deadline = time.monotonic() + timeout
    while True:
        info = src.cmd("query-migrate")
        assert isinstance(info, dict)
        status = info.get("status")
        if status == "completed":
            return info
        assert status not in ("failed", "cancelled"), f"migration {status}: {info}"
        assert time.monotonic() < deadline, f"migration not done in {timeout} s: {info}"
        time.sleep(0.2)


def qemu_args(tmp: Path, name: str, incoming: bool) -> tuple[list[str], Path]:
    qmp = tmp / f"{name}.qmp"
    args = ["-qmp", f"unix:{qmp},server=on,wait=off"]
    if incoming:
        args += ["-incoming", f"unix:{tmp / f'{name}.mig'}"]
    return args, qmp


def marked_pages(server: Server) -> list[int]:
    return [int(n) for n in re.findall(r"dirty log closed: (\d+) pages marked", server.log)]


def reverify_passes(console: str) -> list[str]:
    """The names of the verify passes that ended on ``console``."""
    return re.findall(r"^@@RESULT-END (reverify\d+) ", console, re.M)


def check_fio(console: str, name: str) -> None:
    """fio job ``name`` reported on ``console`` succeeded without a verify error."""
    results = parse_results(console)
    assert name in results, f"no result {name} on the console:\n{console[-3000:]}"
    rc, out = results[name]
    assert rc == 0, f"fio {name} failed:\n{out.decode(errors='replace')[-3000:]}"
    fio = parse_fio_json(out)
    assert not fio.errors, f"fio {name}: {fio.errors}"
    assert sum(j.write_io_bytes + j.read_io_bytes for j in fio.jobs) > 0


@pytest.mark.parametrize("queues", [1, 2], ids=["1-queue", "2-queues"])
def test_migrate_under_fio_and_back(tmp_path: Path, guest_image: Path, queues: int) -> None:
    for attempt in range(1, ATTEMPTS + 1):
        workdir = tmp_path / f"attempt{attempt}"
        workdir.mkdir()
        try:
            summary = migrate_there_and_back(workdir, queues)
        except GUEST_DIED as exc:
            if attempt == ATTEMPTS:
                raise
            log.warning("attempt %d: a migrated guest died or hung (%r; its console is printed "
                        "above); starting over", attempt, exc)
            print(f"\nattempt {attempt}: a migrated guest died or hung ({type(exc).__name__}); "
                  "starting over")
            continue
        print(f"\n{queues} queue(s), attempt {attempt}: {summary}")
        return


def migrate_there_and_back(tmp_path: Path, queues: int) -> str:
    """The scenario of the module docstring in ``tmp_path``; what it measured, as a line."""
    image = tmp_path / "disk.img"
    servers = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        # The default queue mode: 2 queues run in 2 queue processes, which mark the log too.
        servers.append(Server(workdir, "--locking", "off", "--num-queues", str(queues),
                              size="1G", image=image).start())
    a, b = servers
    size_mb = 320 // queues
    script = workload(size_mb, queues)
    guests: list[Guest] = []
    qmps: list[Qmp] = []
    try:
        args1, qmp1_path = qemu_args(tmp_path, "q1", incoming=False)
        g1 = Guest(a.sock, script, extra_qemu_args=args1, num_queues=queues, smp=queues,
                   timeout=900).start()
        guests.append(g1)
        args2, qmp2_path = qemu_args(tmp_path, "q2", incoming=True)
        g2 = Guest(b.sock, script, extra_qemu_args=args2, num_queues=queues, smp=queues,
                   timeout=900).start()
        guests.append(g2)
        qmp1, qmp2 = Qmp(qmp1_path), Qmp(qmp2_path)
        qmps += [qmp1, qmp2]

        # 1. Mid-write: a few seconds into fio's write pass.
        g1.wait_for(r"^@@PHASE write", timeout=300)
        time.sleep(1)
        t0 = time.monotonic()
        info1 = migrate(qmp1, f"unix:{tmp_path / 'q2.mig'}")
        took1 = time.monotonic() - t0
        assert "@@RESULT-END write" not in g1.console, "fio finished before the migration"
        assert qmp2.cmd("query-status")["status"] == "running"
        qmp1.cmd("quit")
        g1.wait(60)

        # 2. The destination finishes the write and verifies everything: zero errors.
        g2.wait_for(r"^@@RESULT-END verify ", timeout=300)
        for name in ("write", "verify"):
            check_fio(g2.console, name)

        # 3. Back to the first server, mid-verify (the backend writes read data into the guest).
        args3, qmp3_path = qemu_args(tmp_path, "q3", incoming=True)
        g3 = Guest(a.sock, script, extra_qemu_args=args3, num_queues=queues, smp=queues,
                   timeout=900).start()
        guests.append(g3)
        qmp3 = Qmp(qmp3_path)
        qmps.append(qmp3)
        g2.wait_for(r"^@@PHASE reverify", timeout=300)
        time.sleep(1)
        t0 = time.monotonic()
        info2 = migrate(qmp2, f"unix:{tmp_path / 'q3.mig'}")
        took2 = time.monotonic() - t0
        qmp2.cmd("quit")
        g2.wait(60)
        for name in reverify_passes(g2.console):  # passes done before the migration
            check_fio(g2.console, name)
        # The pass that was running when the guest moved ends on QEMU 3: zero errors.
        line = g3.wait_for(r"^@@RESULT-END reverify\d+ ", timeout=300)
        check_fio(g3.console, line.split()[1])
        qmp3.cmd("quit")
        g3.wait(60)
    except BaseException as exc:
        for i, g in enumerate(guests, 1):
            print(f"--- QEMU {i}: {g.report()}")
        for srv in servers:
            tail = "\n".join(srv.log.splitlines()[-30:])
            print(f"--- server {srv.workdir.name} log tail:\n{tail}")
        errors = [line for srv in servers for line in srv.log.splitlines()
                  if " ERROR " in line or "Traceback" in line]
        if isinstance(exc, GUEST_DIED) and errors:  # the server's fault, not QEMU's: no retry
            raise AssertionError(f"server errors: {errors}") from exc
        raise
    finally:
        for q in qmps:
            q.close()
        for g in guests:
            g.kill()
        for s in servers:
            rc = s.stop()
            assert rc == 0, s.log
    pages_a, pages_b = marked_pages(a), marked_pages(b)
    assert pages_a and pages_a[0] > 0, a.log  # source of the first migration marked pages
    assert pages_b and pages_b[0] > 0, b.log  # and of the second
    return (f"migration 1 {took1:.2f} s (QEMU total-time {info1['total-time']} ms, downtime "
            f"{info1.get('downtime')} ms, {info1['ram']['transferred'] >> 20} MiB sent, dirty "
            f"syncs {info1['ram'].get('dirty-sync-count')}), backend pages marked "
            f"{pages_a[0]}; migration 2 {took2:.2f} s (total-time {info2['total-time']} ms, "
            f"downtime {info2.get('downtime')} ms), pages marked {pages_b[0]}")
