"""Live migration end to end: a guest writing to a disk served by this project moves to another
QEMU (with its own server on the same image, ``--locking off``) and back, losing nothing.

The scenario (see :mod:`qemu_guest.migration`, shared with ``python -m
benchmarks.migration_series``): two servers on one image; QEMU 1 boots and runs fio under TCG;
QEMU 2 waits with ``-incoming unix:``; ``migrate`` over QMP while fio writes; QEMU 2 finishes
the write and a full verify (crc32c) with zero errors; then, while QEMU 2 verifies again, pass
after pass (reads: the data the backend writes into guest memory), the guest migrates back to a
QEMU 3 on the first server, which finishes the pass that was running with zero errors.  Each
source server must have marked pages in QEMU's dirty log, and no server may log an error or
exit non-zero.

A guest that dies or hangs after a migration fails the test -- a lost or late completion around
GET_VRING_BASE looks like a hang, a duplicated completion or a wrong start index on the
destination like a guest kernel crash.  The failure output carries what is needed to tell
which: both QEMUs' ``x-query-virtio-status`` and, per queue, ``x-query-virtio-queue-element``
(the avail and used indices in guest memory), the servers' ring state per queue
(``x-query-vhost-queues``: last avail, used, in flight), the guest consoles and the server logs.

One exception, counted and printed: a guest panic after a completed migration whose crash QEMU's
built-in virtio-blk shows as well in the migration series (QEMU 7.2's TCG, no vhost-user
involved: :func:`qemu_guest.migration.builtin_also_crashes` -- those RIPs, a NULL pointer
dereference outside the disk path, or any crash in timer code, where the built-in device's,
qemu-storage-daemon's and this server's runs all crashed) runs the scenario once more, with the
first attempt's diagnostics printed.  Never for a hang, a verify error, a crash in blk-mq, virtio or
list code, or any other crash.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu_guest.migration import builtin_also_crashes, run_scenario

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(("queues", "packed"), [(1, False), (2, False), (1, True)],
                         ids=["1-queue", "2-queues", "1-queue-packed"])
def test_migrate_under_fio_and_back(tmp_path: Path, guest_image: Path, queues: int,
                                    packed: bool) -> None:
    """``packed``: every QEMU's device has ``packed=on`` and the guest must drive packed rings
    (each source server then logs the used-ring writes it makes to the descriptor ring)."""
    what = f"{queues} queue(s){', packed' if packed else ''}"
    out = run_scenario("server", queues, tmp_path / "attempt1", packed=packed)
    retried = 0
    if not out.ok and builtin_also_crashes(out.signature):
        print(out.diagnostics)
        print(f"\nRETRY (1 of at most 1): {what}: {out.signature} -- a crash QEMU's "
              f"built-in virtio-blk shows too after a migration; running the scenario again")
        retried = 1
        out = run_scenario("server", queues, tmp_path / "attempt2", packed=packed)
    if not out.ok:
        print(out.diagnostics)
        pytest.fail(f"{what}: {out.signature} (after {out.duration:.0f} s, "
                    f"{retried} retry before; the diagnostics are printed above, consoles and "
                    f"logs are in {tmp_path})", pytrace=False)
    print(f"\n{what}, retries {retried}: {out.summary}; {out.measurements}")
