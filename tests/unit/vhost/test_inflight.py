"""In-flight tracking (INFLIGHT_SHMFD): the shared area, and recovery after a backend is killed.

The end-to-end case is the one that matters: requests popped by a backend that is then killed
with SIGKILL are resubmitted by the next backend, exactly once, and the avail ring continues
after them -- none lost, none done twice.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import TypedDict

import pytest

from guestmem import GuestMemory
from tests.unit.vhost.helpers import wait_for
from vhost.messages import ProtocolFeature, Request, VirtioFeature
from vhost.queue import inflight as inf
from vhost.queue.base import RingAddresses
from vhost.queue.split import SplitQueue
from vhost_frontend import Frontend, FrontendMemory

REPO = Path(__file__).resolve().parents[3]
SIZE = 8


def make_queue(size: int = SIZE) -> tuple[inf.InflightQueue, memoryview]:
    area = bytearray(inf.queue_stride(size))
    view = memoryview(area)
    return inf.InflightQueue(view, size), view


def state(view: memoryview, head: int) -> tuple[int, int, int]:
    return inf.DESC_STATE.unpack_from(view, inf.HEADER_SIZE + 16 * head)


def test_layout_sizes() -> None:
    assert inf.queue_stride(8) == 192  # 16 + 8*16 = 144, rounded up to 64
    assert inf.queue_stride(128) == 2048 + 64
    assert inf.area_size(2, 8) == 384
    fd, size = inf.create_area(2, 8)
    try:
        assert size == 384 and os.fstat(fd).st_size == 384
        assert os.pread(fd, 384, 0) == bytes(384)
    finally:
        os.close(fd)


def test_fresh_region_is_initialised_and_nothing_resubmitted() -> None:
    q, view = make_queue()
    view[inf.HEADER_SIZE] = 1  # garbage in a fresh (version 0) region is wiped
    assert q.recover(used_idx=7) == []
    features, version, desc_num, last, used = inf.HEADER.unpack_from(view, 0)
    assert (features, version, desc_num, last, used) == (0, 1, SIZE, 0xFFFF, 7)
    assert state(view, 0)[0] == 0


def test_pop_complete_publish_and_recover_order() -> None:
    q, view = make_queue()
    q.recover(0)
    for head in (5, 2, 7):
        q.popped(head)
    assert [state(view, h)[0] for h in (5, 2, 7)] == [1, 1, 1]
    assert [state(view, h)[2] for h in (5, 2, 7)] == [0, 1, 2]  # pop order
    q.used(2)
    q.published(1)
    assert state(view, 2)[0] == 0
    assert inf.HEADER.unpack_from(view, 0)[4] == 1
    # A new process on the same area: 5 then 7 (oldest first) come back, renumbered 0 and 1;
    # new pops continue from 2.
    again = inf.InflightQueue(view, SIZE)
    assert again.recover(used_idx=1) == [5, 7]
    assert [state(view, h)[2] for h in (5, 7)] == [0, 1]
    assert again.counter == 2


def test_recovery_clears_a_batch_published_but_not_recorded() -> None:
    """Killed after used.idx was published, before used_idx caught up: not done twice."""
    q, view = make_queue()
    q.recover(0)
    for head in (1, 3, 4):
        q.popped(head)
    q.used(1)
    q.used(3)
    # The used ring now says 2 (the store happened); the bits were never cleared.
    again = inf.InflightQueue(view, SIZE)
    assert again.recover(used_idx=2) == [4]
    assert inf.HEADER.unpack_from(view, 0)[4] == 2


def test_recovery_refuses_a_region_of_another_size_or_version() -> None:
    q, view = make_queue()
    q.recover(0)
    with pytest.raises(inf.InflightError):
        inf.InflightQueue(view, SIZE * 2).recover(0)
    struct.pack_into("<H", view, 8, 9)  # version 9
    with pytest.raises(inf.InflightError):
        inf.InflightQueue(view, SIZE).recover(0)


def test_map_checks_sizes() -> None:
    fd, size = inf.create_area(1, 8)
    try:
        with pytest.raises(inf.InflightError):
            inf.InflightArea.map(fd, size, 0, 2, 8)  # too small for two queues
        with pytest.raises(inf.InflightError):
            inf.InflightArea.map(fd, 8192, 0, 1, 8)  # past the end of the memfd
        with pytest.raises(inf.InflightError):
            inf.InflightArea.map(fd, size, 0, 1, 6)  # not a power of two
        area = inf.InflightArea.map(fd, size, 0, 1, 8)
        with pytest.raises(inf.InflightError):
            area.queue(0, 16)  # the ring is not the size the area was made for
        area.queue(0, 8).release()
        area.close()
    finally:
        os.close(fd)


def test_virtqueue_resubmits_before_new_requests() -> None:
    """SplitQueue over a bytearray: replayed heads first, then the avail ring from used+n."""
    mem = GuestMemory.from_buffer(bytearray(1 << 16))
    size = SIZE
    addrs = RingAddresses(0x1000, 0x2000, 0x3000)
    view = mem.view(0, 1 << 16)
    for head in range(size):  # each head: one 16-byte writable buffer
        struct.pack_into("<QIHH", view, 0x1000 + 16 * head, 0x8000 + 16 * head, 16, 2, 0)
    avail = view[0x2000:].cast("H")
    for i, head in enumerate((3, 6, 1, 2)):
        avail[2 + i] = head
    avail[1] = 4  # the driver made 4 requests available
    area = bytearray(inf.queue_stride(size))
    first = SplitQueue(mem, size, addrs, int(VirtioFeature.VERSION_1), 0,
                      inflight=inf.InflightQueue(memoryview(area), size))
    chains = first.pop_batch()
    assert [c.head for c in chains] == [3, 6, 1, 2]
    first.add_used(6, 16)
    first.publish_used()  # 6 is done; 3, 1 and 2 are in flight when the backend "dies"
    restarted = SplitQueue(mem, size, addrs, int(VirtioFeature.VERSION_1), 1,
                          inflight=inf.InflightQueue(memoryview(area), size))
    assert restarted.next_avail == 4  # used.idx 1 + 3 resubmitted
    assert restarted.replay_pending and not first.replay_pending
    assert [c.head for c in restarted.pop_batch()] == [3, 1, 2]
    assert not restarted.replay_pending  # (the fast paths take requests again)
    avail[2 + 4] = 6
    avail[1] = 5
    assert [c.head for c in restarted.pop_batch()] == [6]


# ---------------------------------------------------------------------------- a real crash


def start_echo_server(sock: Path, delay: float) -> subprocess.Popen[bytes]:
    code = ("import sys; from tests.vhost_devices import serve_echo; "
            "serve_echo(sys.argv[1], float(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(sock), str(delay)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: sock.exists() or proc.poll() is not None, "the server to listen", 20)
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    return proc


def connect(sock: Path, mem: FrontendMemory) -> Frontend:
    fe = Frontend(sock, timeout=10)
    fe.negotiate()
    assert fe.protocol & ProtocolFeature.INFLIGHT_SHMFD
    fe.set_mem_table(mem)
    return fe


def test_requests_in_flight_at_sigkill_are_resubmitted_exactly_once(tmp_path: Path) -> None:
    sock = tmp_path / "vhost.sock"
    mem = FrontendMemory([(0, 8 << 20, 0)])
    slow = start_echo_server(sock, delay=30.0)  # nothing completes before we kill it
    fe = connect(sock, mem)
    inflight_fd, inflight_size = fe.get_inflight_fd(1, 64)
    fe.set_inflight_fd(inflight_fd, inflight_size, 1, 64)
    q = fe.setup_queue(0, size=64)
    requests = {}
    for i in range(3):
        src, dst = mem.alloc(16), mem.alloc(16)
        mem.write(src, f"request-{i}-abcde".encode())
        requests[fe.submit(q, [(src, 16, False), (dst, 16, True)])] = dst
    area = mmap.mmap(inflight_fd, inflight_size)
    try:
        def marked() -> list[int]:
            return [h for h in range(64) if area[inf.HEADER_SIZE + 16 * h]]

        wait_for(lambda: len(marked()) == 3, "the backend to mark 3 requests in flight")
        assert sorted(marked()) == sorted(requests)
        slow.send_signal(signal.SIGKILL)
        slow.wait(10)
        fe.close(queues=False)
        assert q.used_idx() == 0  # nothing was completed
        # A new backend process, the same guest memory, rings and inflight area.
        sock.unlink()
        fast = start_echo_server(sock, delay=0.01)
        try:
            fe2 = connect(sock, mem)
            fe2.set_inflight_fd(inflight_fd, inflight_size, 1, 64)
            fe2.restart_queue(q, base=q.used_idx())  # what QEMU does: last_avail = used.idx
            done = q.wait_used(3, timeout=10)
            assert sorted(h for h, _ in done) == sorted(requests)
            for dst in requests.values():  # served by the new backend
                assert mem.read(dst, 16).startswith(b"REQUEST-")
            # New requests continue after the resubmitted ones, and nothing is done twice.
            src, dst = mem.alloc(16), mem.alloc(16)
            mem.write(src, b"after-the-crash!")
            head = fe2.submit(q, [(src, 16, False), (dst, 16, True)])
            assert q.wait_used(1, timeout=10) == [(head, 16)]
            assert mem.read(dst, 16) == b"AFTER-THE-CRASH!"
            time.sleep(0.2)
            assert q.take_used() == []
            assert fe2.get_vring_base(0) == 4
            assert marked() == []
            fe2.close()
        finally:
            fast.send_signal(signal.SIGTERM)
            fast.kill()
            fast.wait(10)
    finally:
        area.close()
        os.close(inflight_fd)
        mem.close()


def test_inflight_messages_are_validated(serve) -> None:
    from tests.vhost_devices import EchoDevice
    from vhost import messages as m

    running = serve(EchoDevice(num_queues=2))
    mem = FrontendMemory([(0, 1 << 20, 0)])
    try:
        fe = connect(running.path, mem)
        fd, size = fe.get_inflight_fd(2, 128)
        try:
            assert size == inf.area_size(2, 128)
            assert os.fstat(fd).st_size == size
            assert os.pread(fd, size, 0) == bytes(size)
            # An area too small for what it claims to hold is refused (and nothing breaks).
            status = fe.command(Request.SET_INFLIGHT_FD, m.inflight(size, 0, 2, 256), [fd])
            assert status != 0
            fe.set_inflight_fd(fd, size, 2, 128)
        finally:
            os.close(fd)
        fe.close()
        # More queues than the device has: GET_INFLIGHT_FD cannot be answered, so the
        # backend hangs up (a wrong reply would desynchronise the frontend).
        fe = connect(running.path, mem)
        fe.send(Request.GET_INFLIGHT_FD, m.inflight(0, 0, 3, 128))
        with pytest.raises(Exception):  # noqa: B017 - EOF or reset, either way a hang-up
            fe.recv()
        fe.close()
        fe = connect(running.path, mem)  # and the next frontend is served
        fe.close()
    finally:
        mem.close()


# ---------------------------------------------------------------------------- a hostile area
# The area is the frontend's memory: every field of it is input (issue 25).

MAX_COUNTER = (1 << 64) - 1


class RegionFields(TypedDict, total=False):
    """Keyword arguments of :func:`write_region`: the fields a hostile case sets."""

    features: int
    version: int
    desc_num: int | None
    last: int
    used_idx: int
    entries: dict[int, tuple[int, int, int, bytes]] | None


def write_region(view: memoryview, size: int = SIZE, *, features: int = 0, version: int = 1,
                 desc_num: int | None = None, last: int = inf.NO_HEAD, used_idx: int = 0,
                 entries: dict[int, tuple[int, int, int, bytes]] | None = None) -> None:
    """Lay out one queue region as a (maybe hostile) frontend left it; ``entries``: head ->
    (inflight, next, counter, padding)."""
    view[:] = bytes(view.nbytes)
    inf.HEADER.pack_into(view, 0, features, version, size if desc_num is None else desc_num,
                         last, used_idx)
    for head in range(size):
        flag, nxt, counter, pad = (entries or {}).get(head, (0, inf.NO_HEAD, 0, bytes(5)))
        struct.pack_into("<B5sHQ", view, inf.HEADER_SIZE + 16 * head, flag, pad, nxt, counter)


def test_counter_at_its_maximum_is_renumbered_not_continued() -> None:
    """Issue 25, case 1: a head in flight with counter 2**64-1 used to make the next counter
    2**64 and the resubmitted pop raise struct.error.  Counters order, nothing more: the heads
    come back oldest first, renumbered 0..n-1, and new pops continue from n."""
    q, view = make_queue()
    write_region(view, entries={3: (1, inf.NO_HEAD, MAX_COUNTER, bytes(5)),
                                5: (1, inf.NO_HEAD, 7, bytes(5)),
                                6: (1, inf.NO_HEAD, MAX_COUNTER - 1, bytes(5))})
    assert q.recover(used_idx=0) == [5, 6, 3]
    assert [state(view, h)[2] for h in (5, 6, 3)] == [0, 1, 2]
    assert q.counter == 3
    q.popped(1)  # a new request after the resubmitted ones
    assert state(view, 1) == (1, inf.NO_HEAD, 3)
    # A second crash now: the same order again, the new one last.
    assert inf.InflightQueue(view, SIZE).recover(used_idx=0) == [5, 6, 3, 1]


def test_recovery_twice_is_the_same_plan() -> None:
    """The control process checks a region before a queue process recovers it: checking
    changes nothing, and recovering twice gives the same heads in the same order."""
    q, view = make_queue()
    write_region(view, used_idx=0, last=4,
                 entries={4: (1, 2, 9, bytes(5)), 2: (1, inf.NO_HEAD, 8, bytes(5)),
                          7: (1, inf.NO_HEAD, 5, bytes(5)), 0: (1, inf.NO_HEAD, 1 << 40, bytes(5))})
    before = bytes(view)
    q.check(used_idx=2)  # 4 and 2 were published: the last batch
    assert bytes(view) == before
    assert q.recover(used_idx=2) == [7, 0]
    assert inf.InflightQueue(view, SIZE).recover(used_idx=2) == [7, 0]


HOSTILE_REGIONS: dict[str, tuple[RegionFields, int, str]] = {
    "features": ({"features": 1}, 0, "features"),
    "version-2": ({"version": 2}, 0, "version"),
    "version-0xffff": ({"version": 0xFFFF}, 0, "version"),
    "desc_num-small": ({"desc_num": SIZE // 2}, 0, "entries"),
    "desc_num-large": ({"desc_num": 0xFFFF}, 0, "entries"),
    "last_batch_head": ({"last": SIZE}, 0, "last batch head"),
    "used_idx-far": ({"used_idx": 0x8000}, 0, "past the tracked"),
    "used_idx-ahead": ({"used_idx": 1}, 0, "past the tracked"),
    "inflight-2": ({"entries": {1: (2, inf.NO_HEAD, 0, bytes(5))}}, 0, "entry 1"),
    "inflight-0xff": ({"entries": {0: (0xFF, inf.NO_HEAD, 0, bytes(5))}}, 0, "entry 0"),
    "pad": ({"entries": {2: (1, inf.NO_HEAD, 0, b"\0\0\x01\0\0")}}, 0, "padding"),
    "next": ({"entries": {3: (0, SIZE, 0, bytes(5))}}, 0, "next"),
    "batch-short": ({"last": 1, "entries": {1: (1, inf.NO_HEAD, 0, bytes(5))}}, 2, "lists 1"),
    "batch-none": ({}, 1, "lists 0"),
    "batch-loop": ({"last": 1, "entries": {1: (1, 2, 0, bytes(5)), 2: (1, 1, 0, bytes(5))}},
                   3, "loops"),
}


@pytest.mark.parametrize("case", list(HOSTILE_REGIONS))
def test_hostile_region_fields_are_refused_before_anything_is_written(case: str) -> None:
    fields, used_idx, why = HOSTILE_REGIONS[case]
    q, view = make_queue()
    write_region(view, **fields)
    before = bytes(view)
    with pytest.raises(inf.InflightError, match=why):
        q.check(used_idx)
    with pytest.raises(inf.InflightError, match=why):
        q.recover(used_idx)
    assert bytes(view) == before


def _memfd(size: int) -> int:
    fd = os.memfd_create("test-inflight", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize(
    ("kind", "mmap_size", "offset", "why"),
    [("eventfd", 1 << 63, 0, "not a file that can be mapped"),  # issue 25, case 3
     ("eventfd", 4096, 0, "not a file that can be mapped"),
     ("pipe", 4096, 0, "not a file that can be mapped"),
     ("devzero", 4096, 0, "not a file that can be mapped"),
     ("readonly", 4096, 0, "not open for reading and writing"),
     ("memfd", (1 << 64) - 4096, 4096, "overflows 64 bits"),
     ("memfd", 1 << 63, 0, "past the end"),
     ("memfd", 4096, 4096, "past the end")],
    ids=["eventfd-2**63", "eventfd", "pipe", "dev-zero", "read-only-memfd", "offset+size-2**64",
         "memfd-2**63", "memfd-offset-past-end"],
)
def test_map_refuses_an_fd_of_the_wrong_kind_or_range(kind: str, mmap_size: int, offset: int,
                                                      why: str) -> None:
    keep: list[int] = []
    if kind == "eventfd":
        fd = os.eventfd(0, os.EFD_CLOEXEC)
    elif kind == "pipe":
        fd, w = os.pipe()
        keep.append(w)
    elif kind == "devzero":
        fd = os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC)
    elif kind == "readonly":
        mfd = _memfd(4096)
        keep.append(mfd)
        fd = os.open(f"/proc/self/fd/{mfd}", os.O_RDONLY | os.O_CLOEXEC)
    else:
        fd = _memfd(4096)
    try:
        with pytest.raises(inf.InflightError, match=why):
            inf.InflightArea.map(fd, mmap_size, offset, 1, 8)
    finally:
        for f in (fd, *keep):
            os.close(f)


def test_map_maps_only_what_the_queues_use() -> None:
    """A larger announced area (inside the file) is fine; only the queues' part is mapped."""
    fd = _memfd(1 << 20)
    try:
        area = inf.InflightArea.map(fd, 1 << 20, 0, 1, 8)
        assert len(area.mapping) == inf.area_size(1, 8)
        area.close()
    finally:
        os.close(fd)


def test_resubmission_keeps_the_order_if_interrupted() -> None:
    """Recovery renumbers the heads to resubmit; resubmitting one must not give it a newer
    counter than those still waiting, or a second restart would resubmit out of order.  Here
    the second resubmitted chain is bad (the queue stops after the first), the driver fixes
    it, and the next start resubmits both again in their first order."""
    mem = GuestMemory.from_buffer(bytearray(1 << 16))
    addrs = RingAddresses(0x1000, 0x2000, 0x3000)
    view = mem.view(0, 1 << 16)
    for head in range(SIZE):
        struct.pack_into("<QIHH", view, 0x1000 + 16 * head, 0x8000 + 16 * head, 16, 2, 0)
    struct.pack_into("<QIHH", view, 0x1000 + 16 * 2, 1 << 40, 16, 2, 0)  # head 2: unmapped
    area = memoryview(bytearray(inf.queue_stride(SIZE)))
    write_region(area, entries={5: (1, inf.NO_HEAD, 10, bytes(5)),
                                2: (1, inf.NO_HEAD, 20, bytes(5))})
    features = int(VirtioFeature.VERSION_1)
    first = SplitQueue(mem, SIZE, addrs, features, 0, inflight=inf.InflightQueue(area[:], SIZE))
    assert [c.head for c in first.pop_batch()] == [5]
    assert first.broken and "head 2" in str(first.error)
    first.release()
    struct.pack_into("<QIHH", view, 0x1000 + 16 * 2, 0x8000 + 32, 16, 2, 0)  # fixed
    again = SplitQueue(mem, SIZE, addrs, features, 0, inflight=inf.InflightQueue(area[:], SIZE))
    assert [c.head for c in again.pop_batch()] == [5, 2]
