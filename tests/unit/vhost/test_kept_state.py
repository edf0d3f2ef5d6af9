"""KeptState: the fds a control process keeps per connection for the queue processes (or pool
workers) it starts later -- what both runners now share, so its contract is tested once here:
a later Start carries exactly the kept fds in the order a child takes them, and every replaced,
removed or dropped fd is closed (no fd leak across memory-table changes or migrations)."""

from __future__ import annotations

import os
import types
from collections.abc import Iterator

import pytest

from vhost.runner.pool import KeptState


def _region(gpa: int, size: int = 4096) -> types.SimpleNamespace:
    return types.SimpleNamespace(guest_phys_addr=gpa, memory_size=size,
                                 userspace_addr=gpa + 0x10000, mmap_offset=0)


def _open_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def source_fds() -> Iterator[list[int]]:
    fds = [os.memfd_create(f"kept{i}", os.MFD_CLOEXEC) for i in range(5)]  # distinct inodes
    yield fds
    for fd in fds:
        os.close(fd)


def test_start_carries_the_kept_fds_in_the_order_a_child_takes_them(
        source_fds: list[int]) -> None:
    kept = KeptState()
    region_a, region_b, inflight, log, log_call = source_fds
    kept.set_mem_table([_region(0), _region(0x100000)], [region_a, region_b])
    kept.set_inflight(inflight, (8192, 0, 2, 256))
    kept.set_log_base(log, 4096, 0)
    kept.set_log_fd(log_call)
    fds = kept.fds()
    assert len(fds) == 5
    # Duplicates, never the caller's fds (the caller closes its own).
    assert not set(fds) & set(source_fds)
    originals = [region_a, region_b, inflight, log, log_call]
    for dup, original in zip(fds, originals, strict=True):
        assert os.fstat(dup).st_ino == os.fstat(original).st_ino
    assert kept.start_fields() == {
        "regions": [(0, 4096, 0x10000, 0), (0x100000, 4096, 0x110000, 0)],
        "inflight": (8192, 0, 2, 256), "log": (4096, 0), "log_call": True}
    kept.close()
    assert not any(_is_open(fd) for fd in fds)
    assert kept.fds() == []


def test_replaced_removed_and_dropped_fds_are_closed(source_fds: list[int]) -> None:
    kept = KeptState()
    region_a, region_b, log, log_call, other = source_fds
    kept.add_region(_region(0), region_a)
    kept.add_region(_region(0x100000), region_b)
    dup_a, dup_b = kept.fds()
    raw = kept.remove_region(_region(0))
    assert raw == (0, 4096, 0x10000, 0)
    assert not _is_open(dup_a) and _is_open(dup_b)
    assert kept.start_fields()["regions"] == [(0x100000, 4096, 0x110000, 0)]
    before = _open_count()
    kept.set_mem_table([_region(0x200000)], [other])
    assert _open_count() == before  # dup_b closed, other's duplicate kept
    assert os.fstat(kept.fds()[0]).st_ino == os.fstat(other).st_ino
    kept.set_log_base(log, 4096, 0)
    before = _open_count()
    kept.set_log_base(log, 8192, 4096)
    assert _open_count() == before  # the first duplicate closed (its number may be reused)
    assert kept.start_fields()["log"] == (8192, 4096)
    kept.set_log_fd(log_call)
    log_fd, call_fd = kept.fds()[-2:]
    kept.drop_log()
    assert not _is_open(log_fd) and not _is_open(call_fd)
    assert kept.start_fields()["log"] is None and not kept.start_fields()["log_call"]
    kept.close()
