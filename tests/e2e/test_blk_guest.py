"""End to end: a real Linux guest in QEMU 7.2 drives this project's server with fio and friends.

Each test starts ``python -m storage_daemon`` on a fresh image (as a user would, stopped with
SIGTERM
and required to exit 0), boots the test guest (qemu-configs/build-guest.sh) with
``-device vhost-user-blk-pci`` against it under TCG, runs a workload script, and checks what the
guest reported and what the image file on the host holds afterwards.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from qemu_guest import Guest, run_guest
from tests.e2e.conftest import image_bytes
from tests.e2e.workloads import FIO, check_fio, fio_job, kill_and_restart_under_fio

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def test_fio_random_4k(server) -> None:
    """1. 4k random read and write at QD32: no errors, IOPS reported."""
    srv = server()
    script = "\n".join([
        fio_job("randread", "randread", "4k", 32),
        fio_job("randwrite", "randwrite", "4k", 32),
    ])
    res = run_guest(srv.sock, script, timeout=300)
    read_iops = check_fio(res, "randread")
    write_iops = check_fio(res, "randwrite")
    print(f"guest 4k QD32: randread {read_iops:.0f} IOPS, randwrite {write_iops:.0f} IOPS")
    assert srv.alive


def test_fio_sequential_1m(server) -> None:
    """2. 1 MiB sequential read and write."""
    srv = server()
    script = "\n".join([
        fio_job("seqwrite", "write", "1m", 8),
        fio_job("seqread", "read", "1m", 8),
    ])
    res = run_guest(srv.sock, script, timeout=300)
    for name in ("seqwrite", "seqread"):
        check_fio(res, name)
        print(f"guest 1M {name}: {res.fio(name).bw / MiB:.1f} MiB/s")


def test_fio_verify_unaligned_buffers(server) -> None:
    """3. Write+verify (crc32c), 512 B..128 KiB blocks, buffers aligned only to 512 bytes.

    Buffers that start mid-page make the guest split requests at odd offsets (pieces that are
    sector-aligned but not page-aligned, several per request): every byte must survive.
    """
    srv = server()
    script = (f"result verify {FIO} --name=verify --rw=randwrite --bsrange=512-128k "
              "--iomem_align=512 --verify=crc32c --verify_fatal=1 --do_verify=1 --size=64M "
              "--iodepth=16 --randrepeat=0\n"
              f"result verify_seq {FIO} --name=verify_seq --rw=write --bsrange=512-64k "
              "--iomem_align=512 --verify=crc32c --verify_fatal=1 --do_verify=1 --size=32M "
              "--offset=256M --iodepth=8\n")
    res = run_guest(srv.sock, script, timeout=600)
    for name in ("verify", "verify_seq"):
        check_fio(res, name)
        text = res.text(name)
        assert "verify:" not in text.split("{", 1)[0], text[:2000]
        job = res.fio(name).jobs[0].raw
        assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0


def test_written_pattern_reaches_image(server) -> None:
    """4. What the guest writes (and flushes) is in the image file after it powers off."""
    srv = server()
    script = (
        "dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null\n"
        "result write dd if=/tmp/pat of=/dev/vda bs=1M seek=37 oflag=direct conv=fsync\n"
        "result sum md5sum /tmp/pat\n"
    )
    res = run_guest(srv.sock, script, timeout=300)
    assert res.rc("write") == 0, res.text("write")
    guest_md5 = res.text("sum").split()[0]
    assert srv.stop() == 0
    host_md5 = hashlib.md5(image_bytes(srv.image, 37 * MiB, 8 * MiB)).hexdigest()
    assert host_md5 == guest_md5
    flushes = re.search(r"stopped: \d+ requests \(\d+ reads, \d+ writes, (\d+) flushes\)",
                        srv.log)
    assert flushes and int(flushes.group(1)) > 0, f"no FLUSH reached the server:\n{srv.log}"


def test_ext4_file_system(server) -> None:
    """5. mkfs, mount, write and read back files, unmount; then e2fsck on the host is clean."""
    srv = server()
    script = (
        "result mkfs mkfs.ext4 -q -F /dev/vda\n"
        "mkdir -p /mnt/t\n"
        "result mount mount -t ext4 /dev/vda /mnt/t\n"
        "result_sh write 'for i in 1 2 3 4 5 6; do dd if=/dev/urandom of=/mnt/t/f$i bs=64k "
        "count=$((i * 8)) 2>/dev/null || exit 1; done; mkdir -p /mnt/t/d/e; "
        "cp /mnt/t/f1 /mnt/t/d/e/g; md5sum /mnt/t/f* /mnt/t/d/e/g > /tmp/sums && sync'\n"
        "result umount umount /mnt/t\n"
        "result mount2 mount -t ext4 /dev/vda /mnt/t\n"
        "result verify md5sum -c /tmp/sums\n"
        "result umount2 umount /mnt/t\n"
    )
    res = run_guest(srv.sock, script, timeout=300)
    for name in ("mkfs", "mount", "write", "umount", "mount2", "verify", "umount2"):
        assert res.rc(name) == 0, f"{name}: {res.text(name)}"
    assert srv.stop() == 0
    fsck = subprocess.run(["e2fsck", "-fn", str(srv.image)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_two_queues_two_jobs(server) -> None:
    """6a. num-queues=2 with -smp 2: the guest uses both queues, fio with two jobs."""
    srv = server("--num-queues", "2")
    script = (
        "result mq ls /sys/block/vda/mq\n"
        f"result mqfio {FIO} --name=mqfio --rw=randrw --bs=4k --iodepth=16 --numjobs=2 "
        "--cpus_allowed=0-1 --cpus_allowed_policy=split --runtime=3 --time_based "
        "--group_reporting\n"
    )
    res = run_guest(srv.sock, script, num_queues=2, smp=2, timeout=400)
    assert res.text("mq").split() == ["0", "1"], res.text("mq")
    check_fio(res, "mqfio")
    assert "queue 0 started" in srv.log and "queue 1 started" in srv.log, srv.log


def test_read_only_export(tmp_path: Path, server) -> None:
    """6b. --read-only: reads work, writes fail, the image is unchanged.

    The server offers VIRTIO_BLK_F_RO, so the guest kernel marks the disk read-only and refuses
    writes itself (EPERM), even after ``blockdev --setrw`` (Linux 6.1 keeps the disk-level flag).
    The server's own refusal (IOERR for OUT, DISCARD and WRITE_ZEROES on a read-only export) is
    tested through the frontend driver in tests/unit/blk, where requests can bypass a kernel.
    """
    image = tmp_path / "disk.img"
    pattern = os.urandom(MiB)
    with image.open("wb") as f:
        f.truncate(256 * MiB)
        f.write(pattern)
    srv = server("--read-only", size="256M")
    script = (
        "result ro blockdev --getro /dev/vda\n"
        "result_sh read 'dd if=/dev/vda bs=4096 count=256 iflag=direct 2>/dev/null | md5sum'\n"
        "result write dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct\n"
        "result setrw blockdev --setrw /dev/vda\n"
        "result write2 dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct\n"
    )
    res = run_guest(srv.sock, script, timeout=300)
    assert res.text("ro").strip() == "1"
    assert res.text("read").split()[0] == hashlib.md5(pattern).hexdigest()
    assert res.rc("write") != 0, res.text("write")
    assert res.rc("write2") != 0, res.text("write2")
    for name in ("write", "write2"):
        out = res.text(name)
        assert "Operation not permitted" in out or "I/O error" in out, out
    assert image_bytes(image, 0, MiB) == pattern


def test_discard_and_write_zeroes(server) -> None:
    """7. blkdiscard -z zeroes a range; blkdiscard deallocates one (a hole in the image)."""
    srv = server(size="256M")
    script = (
        "result fill dd if=/dev/urandom of=/dev/vda bs=1M count=16 oflag=direct\n"
        "result zero /usr/sbin/blkdiscard -z -o 1048576 -l 4194304 /dev/vda\n"
        "result_sh zsum 'dd if=/dev/vda bs=1M skip=1 count=4 iflag=direct 2>/dev/null | md5sum'\n"
        "result discard /usr/sbin/blkdiscard -o 8388608 -l 4194304 /dev/vda\n"
        "result_sh dsum 'dd if=/dev/vda bs=1M skip=8 count=4 iflag=direct 2>/dev/null | md5sum'\n"
    )
    res = run_guest(srv.sock, script, timeout=300)
    for name in ("fill", "zero", "discard"):
        assert res.rc(name) == 0, f"{name}: {res.text(name)}"
    zeros_md5 = hashlib.md5(bytes(4 * MiB)).hexdigest()
    assert res.text("zsum").split()[0] == zeros_md5
    assert res.text("dsum").split()[0] == zeros_md5  # a punched hole reads back as zeroes
    assert srv.stop() == 0
    assert image_bytes(srv.image, MiB, 4 * MiB) == bytes(4 * MiB)
    assert image_bytes(srv.image, 0, MiB) != bytes(MiB)  # the data around is still there
    with srv.image.open("rb") as f:
        next_data = os.lseek(f.fileno(), 8 * MiB, os.SEEK_DATA)
    assert next_data >= 12 * MiB, "the discarded range is still allocated in the image"


@pytest.mark.parametrize("queue_processes", ["off", "on"])
def test_survives_qemu_killed_mid_io(server, queue_processes: str) -> None:
    """8. QEMU killed during fio: the server stays up and serves the next QEMU (with the queue
    on a thread, and in a queue process)."""
    srv = server("--queue-processes", queue_processes)
    script = ("marker FIO-START\n"
              f"result long {FIO} --name=long --rw=randrw --bs=4k --iodepth=32 --runtime=60 "
              "--time_based\n")
    with Guest(srv.sock, script, timeout=300) as g:
        g.wait_for(r"^@@FIO-START$")
        time.sleep(3)  # let fio get going
        g.kill()
        g.wait()
    deadline = time.monotonic() + 30
    while "frontend disconnected" not in srv.log and time.monotonic() < deadline:
        time.sleep(0.2)
    assert srv.alive, srv.log
    assert "frontend disconnected" in srv.log
    res = run_guest(srv.sock, fio_job("after", "randread", "4k", 8, runtime=2), timeout=300)
    check_fio(res, "after")
    assert srv.alive
    assert srv.log.count("frontend connected") >= 2


def test_direct_io_verify(server) -> None:
    """O_DIRECT image (--direct, the io_uring engine): verify with sub-page guest buffers."""
    srv = server("--direct")
    script = (f"result dverify {FIO} --name=dverify --rw=randwrite --bsrange=512-64k "
              "--iomem_align=512 --verify=crc32c --verify_fatal=1 --do_verify=1 --size=32M "
              "--iodepth=16\n"
              + fio_job("drandread", "randread", "4k", 32))
    res = run_guest(srv.sock, script, timeout=400)
    check_fio(res, "dverify")
    check_fio(res, "drandread")
    assert "O_DIRECT" in srv.log and "aio=io_uring" in srv.log, srv.log
    assert "thread pool" not in srv.log, srv.log  # no queue fell back from io_uring


@pytest.mark.parametrize("queue_processes", ["off", "on"])
def test_server_killed_and_restarted_under_fio(tmp_path: Path, server,
                                                queue_processes: str) -> None:
    """kill -9 the server under guest fio writes, restart it: the guest goes on, verify passes.

    QEMU reconnects (``reconnect=1``) and hands the new server the inflight area the old one
    kept up to date; the requests it had popped are resubmitted, none lost, none done twice
    (fio's crc32c verify reads every block back at the end).  With ``--queue-processes on``
    the queue process dies with the server (PR_SET_PDEATHSIG) and the restarted server's queue
    process does the resubmitting.
    """
    kill_and_restart_under_fio(
        lambda *args, **kw: server("--queue-processes", queue_processes, *args, **kw), tmp_path)
