"""guestmem.dirty_log: QEMU's bitmap layout, page rounding, bounds, and no lost mark under
concurrent markers (threads and another process) while a clearer takes bits as QEMU does."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guestmem.dirty_log import ATOMIC, DirtyLog, DirtyLogError, DirtyMarker, add_range

REPO = Path(__file__).resolve().parents[2]
PAGE = 4096


def memfd(size: int) -> int:
    fd = os.memfd_create("dirty-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def log_fd() -> Iterator[int]:
    fd = memfd(8192)
    yield fd
    os.close(fd)


@pytest.fixture
def dlog(log_fd: int) -> Iterator[DirtyLog]:
    d = DirtyLog(log_fd, 4096)  # 32768 pages = 128 MiB of guest memory
    yield d
    d.close()


def pages_of(gpa: int, length: int) -> list[int]:
    pending: dict[int, int] = {}
    add_range(pending, gpa, length)
    out = []
    for word, mask in sorted(pending.items()):
        out += [word * 64 + b for b in range(64) if mask >> b & 1]
    return out


# ---------------------------------------------------------------- page rounding
@pytest.mark.parametrize(("gpa", "length", "pages"), [
    (0, 1, [0]),
    (4095, 1, [0]),
    (4095, 2, [0, 1]),          # two bytes across a page boundary: both pages
    (4096, 4096, [1]),          # exactly one page
    (4096, 4097, [1, 2]),
    (0x3000 + 17, 3 * PAGE, [3, 4, 5, 6]),
    (0, 0, []),                 # nothing written, nothing marked
    (63 * PAGE, 2 * PAGE, [63, 64]),   # across a u64 word
    (60 * PAGE, 140 * PAGE, list(range(60, 200))),  # spans three words
])
def test_page_rounding(gpa: int, length: int, pages: list[int]) -> None:
    assert pages_of(gpa, length) == pages


def test_qemu_layout_bit_per_page_little_endian(dlog: DirtyLog, log_fd: int) -> None:
    """Page p is bit p%64 of LE u64 word p//64, i.e. bit p%8 of byte p//8."""
    for page in (0, 9, 63, 64, 1000, 32767):
        dlog.mark(page * PAGE + 123, 1)
    raw = os.pread(log_fd, 4096, 0)
    for page in (0, 9, 63, 64, 1000, 32767):
        assert raw[page // 8] >> (page % 8) & 1, page
    assert sum(bin(b).count("1") for b in raw) == 6
    assert dlog.dirty_pages() == [0, 9, 63, 64, 1000, 32767]


def test_take_clears_like_qemu(dlog: DirtyLog) -> None:
    dlog.mark(5 * PAGE, 3 * PAGE)
    assert dlog.take() == [5, 6, 7]
    assert dlog.take() == []
    assert dlog.dirty_pages() == []


def test_offset_into_the_fd(log_fd: int) -> None:
    d = DirtyLog(log_fd, 1024, offset=4096 + 8)
    try:
        d.mark(0, 1)
        d.mark(64 * PAGE, 1)
        raw = os.pread(log_fd, 24, 4096)
        assert raw[8] == 1 and raw[16] == 1 and raw[:8] == bytes(8)
    finally:
        d.close()


@pytest.mark.parametrize(("size", "offset", "why"), [
    (0, 0, "positive"), (12, 0, "multiple of 8"), (4096, 4, "offset"),
    (12288, 0, "does not fit"), (8192, 8, "does not fit"), (1 << 40, 0, "up to"),
])
def test_bad_log_is_refused(log_fd: int, size: int, offset: int, why: str) -> None:
    with pytest.raises(DirtyLogError, match=why):
        DirtyLog(log_fd, size, offset)


def test_bad_fd_is_refused() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(DirtyLogError):
            DirtyLog(r, 4096)
    finally:
        os.close(r)
        os.close(w)


# ---------------------------------------------------------------- the marker
def test_marker_commits_what_it_recorded(dlog: DirtyLog) -> None:
    calls = []
    marker = DirtyMarker(dlog, lambda: calls.append(1))
    marker.record(10 * PAGE, 1)
    marker.record(10 * PAGE + 100, 8)  # same page: counted once per commit
    marker.record_ranges([(20 * PAGE - 1, 2), (0, 0)])
    assert dlog.dirty_pages() == []  # nothing before the commit
    marker.commit()
    assert dlog.dirty_pages() == [10, 19, 20]
    assert marker.pages == 3 and calls == [1]
    marker.commit()  # nothing pending: no write, no notification
    assert calls == [1]
    marker.mark(2, 2)
    assert dlog.dirty_pages() == [0, 10, 19, 20] and marker.pages == 4


def test_marks_beyond_the_log_are_dropped_and_counted(dlog: DirtyLog, caplog) -> None:
    marker = DirtyMarker(dlog)
    marker.record((32768 - 1) * PAGE, 2 * PAGE)  # last page in, the next one out
    marker.record(1 << 50, 1)
    marker.commit()
    assert dlog.dirty_pages() == [32767]
    assert marker.pages == 1 and marker.outside == 2
    assert any("too small" in r.getMessage() for r in caplog.records)
    marker.mark(1 << 40, 2)  # the one-page fast path checks the bounds too
    assert marker.outside == 3 and dlog.dirty_pages() == [32767]


def test_marker_follows_a_swapped_log(dlog: DirtyLog) -> None:
    other_fd = memfd(4096)
    other = DirtyLog(other_fd, 4096)
    try:
        marker = DirtyMarker(dlog)
        marker.record(3 * PAGE, 1)
        marker.log = other  # a resize: pending marks go to the log QEMU reads from now on
        marker.commit()
        assert other.dirty_pages() == [3] and dlog.dirty_pages() == []
    finally:
        other.close()
        os.close(other_fd)


# ---------------------------------------------------------------- concurrency
def test_atomic_or_is_available() -> None:
    """libatomic1 is installed (.ci/run): marks are atomic against other processes too."""
    assert ATOMIC


def test_concurrent_markers_and_clearer_lose_nothing(dlog: DirtyLog) -> None:
    """Threads mark pages unique to them (interleaved bits of the same words, so every OR
    contends), while a clearer keeps taking bits as QEMU's sync does; every page marked is
    either taken by the clearer or still set at the end.  Bounded to ~2 s."""
    threads_n = 4
    marked: list[set[int]] = [set() for _ in range(threads_n)]
    taken: list[int] = []
    stop = threading.Event()
    deadline = time.monotonic() + 1.5

    def marker_thread(t: int) -> None:
        m = DirtyMarker(dlog)
        rnd = 0
        while time.monotonic() < deadline and rnd * threads_n < dlog.pages:
            page = rnd * threads_n + t
            m.record(page * PAGE, 1)
            if rnd % 3 == 0:
                m.commit()  # sometimes one word per commit, sometimes several
            marked[t].add(page)
            rnd += 1
        m.commit()

    def clearer() -> None:
        while not stop.is_set():
            taken.extend(dlog.take())

    workers = [threading.Thread(target=marker_thread, args=(t,)) for t in range(threads_n)]
    clear = threading.Thread(target=clearer)
    clear.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join(10)
    stop.set()
    clear.join(10)
    taken.extend(dlog.take())
    every = set().union(*marked)
    assert len(every) > 1000, "the markers did too little to test anything"
    assert every - set(taken) == set(), f"{len(every - set(taken))} marks lost"
    assert set(taken) - every == set()


_CHILD = r"""
import os, sys, time
from guestmem.dirty_log import DirtyLog
fd, start, count, step = map(int, sys.argv[1:])
log = DirtyLog(fd, 4096)
for i in range(count):
    log.mark((start + i * step) * 4096, 1)
print("done", flush=True)
"""


def test_another_process_marking_the_same_log(dlog: DirtyLog, log_fd: int) -> None:
    """Another backend of the VM shares QEMU's log: its marks and ours, interleaved in the
    same words, all survive a concurrent clearer."""
    count = 8000
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(log_fd), "1", str(count), "2"],
                             cwd=REPO, pass_fds=[log_fd], stdout=subprocess.PIPE, text=True)
    taken: list[int] = []
    ours = DirtyMarker(dlog)
    for i in range(count):  # even pages here, odd ones in the child
        ours.mark(2 * i * PAGE, 1)
        if i % 16 == 0:
            taken.extend(dlog.take())
    assert child.wait(30) == 0
    assert child.stdout is not None and child.stdout.read().strip() == "done"
    child.stdout.close()
    taken.extend(dlog.take())
    assert sorted(taken) == list(range(2 * count))


_QUEUE_PROCESS = r"""
import sys
from guestmem.dirty_log import DirtyLog, DirtyMarker
fd, first, count, step = map(int, sys.argv[1:])
marker = DirtyMarker(DirtyLog(fd, 4096))
sys.stdin.readline()  # start together
for i in range(count):
    marker.record((first + i * step) * 4096, 1)
    if i % 3 == 0:
        marker.commit()  # as a queue process commits before each used-index store
marker.commit()
print(marker.pages, flush=True)
"""


def test_queue_processes_marking_while_qemu_clears_lose_nothing(dlog: DirtyLog,
                                                                log_fd: int) -> None:
    """Queue processes of one server each map the log and mark it with their own marker:
    three of them, interleaved bits of the same words, started together while this process
    takes bits as QEMU's sync does -- every page is taken exactly once or still set."""
    procs_n, count = 3, 6000
    children = [
        subprocess.Popen([sys.executable, "-c", _QUEUE_PROCESS, str(log_fd), str(k), str(count),
                          str(procs_n)], cwd=REPO, pass_fds=[log_fd], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
        for k in range(procs_n)
    ]
    taken: list[int] = []
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.close()
    while any(child.poll() is None for child in children):
        taken.extend(dlog.take())
    taken.extend(dlog.take())
    for child in children:
        assert child.returncode == 0
        assert child.stdout is not None
        assert int(child.stdout.read()) == count  # each counted every page it marked
        child.stdout.close()
    assert sorted(taken) == list(range(procs_n * count))  # none lost, none taken twice
