"""QEMU's leaky buckets (blockdev.throttle), on a fake clock: rates, bursts, iops-size,
directions, validation in QEMU's words, and properties against a simple model."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockdev.throttle import (
    CELLS,
    LIMIT_KEYS,
    Buckets,
    ThrottleConfig,
    ThrottleError,
    ThrottleGroup,
    ThrottleGroups,
    parse_group_options,
)
from tests.unit.cli_harness import REPO

MS = 1_000_000
S = 1_000_000_000


def buckets(**limits: int) -> Buckets:
    b = Buckets([0.0] * CELLS)
    b.configure(ThrottleConfig.empty().apply_limits(
        {k.replace("_", "-"): v for k, v in limits.items()}), 0)
    return b


def count_allowed(b: Buckets, seconds: float, is_write: bool = False, size: int = 4096,
                  step_ns: int = MS, start_ns: int = 0) -> int:
    """Requests let through by a client that asks again every ``step_ns``, as often as it
    is let through."""
    n = 0
    t = start_ns
    while t <= start_ns + seconds * S:
        while b.request(is_write, size, t) == 0:
            n += 1
            assert n < 100_000, "never refused"
        t += step_ns
    return n


def test_iops_rate_with_qemus_small_burst():
    b = buckets(iops_total=100)
    # At once: avg/10 = 10 may be queued up (and the one that finds it exactly full).
    assert count_allowed(b, 0) == 11
    b = buckets(iops_total=100)
    assert 1000 + 10 <= count_allowed(b, 10) <= 1000 + 11  # (float leaks: +-1)


def test_bps_rate_counts_bytes():
    b = buckets(bps_total=1 << 20)  # 1 MiB/s, 4 KiB requests: 256/s
    n = count_allowed(b, 4)
    assert 4 * 256 <= n <= 4 * 256 + 26 + 1  # + the avg/10 bucket (25.6 requests)


def test_read_and_write_buckets_are_separate_total_is_shared():
    def both(b: Buckets, seconds: int) -> tuple[int, int]:
        done = [0, 0]
        for ms in range(seconds * 1000 + 1):
            for is_write in (False, True):
                while b.request(is_write, 4096, ms * MS) == 0:
                    done[is_write] += 1
        return done[0], done[1]

    reads, writes = both(buckets(iops_read=50, iops_write=200), 2)
    assert 100 + 5 <= reads <= 100 + 6 and 400 + 20 <= writes <= 400 + 21
    reads, writes = both(buckets(iops_total=100), 2)
    assert 200 + 10 <= reads + writes <= 200 + 11  # one budget for both


def test_burst_then_average():
    # 10/s on average; bursts at up to 100/s for 2 s (a bucket of 200).
    b = buckets(iops_total=10, iops_total_max=100, iops_total_max_length=2)
    first = count_allowed(b, 2)
    assert 195 <= first <= 215  # the burst, paced at 100/s by the burst level
    rest = count_allowed(b, 10, start_ns=2 * S + MS)
    assert 100 <= rest <= 125  # the average, and what is left of the burst bucket
    later = count_allowed(b, 5, start_ns=12 * S + MS)
    assert 49 <= later <= 51  # then the average only


def test_burst_level_paces_the_burst():
    b = buckets(iops_total=10, iops_total_max=100, iops_total_max_length=2)
    assert count_allowed(b, 0) == 11  # max/10 at once, not the whole burst bucket


def test_iops_size_counts_big_requests_as_several():
    b = buckets(iops_total=100, iops_size=4096)
    assert 250 + 2 <= count_allowed(b, 10, size=16384) <= 250 + 4  # 10/4 at once
    b = buckets(iops_total=100, iops_size=4096)
    assert 1010 <= count_allowed(b, 10, size=512) <= 1011  # smaller ones count 1


def test_unlimited_never_waits():
    b = buckets()
    assert all(b.request(w, 1 << 30, 0) == 0 for w in (False, True) for _ in range(1000))


@pytest.mark.parametrize(("limits", "message"), [
    ({"iops-total": 1, "iops-read": 1},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"bps-total-max": 10, "bps-write-max": 10, "bps-total": 5, "bps-write": 5},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"iops-size": 4096, "bps-total": 10}, "iops size requires an iops value to be set"),
    ({"iops-total": 10, "iops-total-max-length": 0}, "the burst length cannot be 0"),
    ({"iops-total": 10, "iops-total-max-length": 5}, "burst length set without burst rate"),
    ({"bps-read-max": 10}, "bps_max/iops_max require corresponding bps/iops values"),
    ({"bps-read": 100, "bps-read-max": 10}, "bps_max/iops_max cannot be lower than bps/iops"),
    ({"iops-write": 10, "iops-write-max": 10 ** 14, "iops-write-max-length": 11},
     "burst length too high for this burst rate"),
    ({"bps-total": 10 ** 15 + 1}, "bps/iops/max values must be within [0, 1000000000000000]"),
    ({"iops-read-max-length": 1 << 32},
     "iops-read-max-length value must be in the range [0, 4294967295]"),
    ({"iops-total": "ten"}, "Parameter 'iops-total' expects an integer"),
    ({"iops-total": "\u0663"}, "Parameter 'iops-total' expects an integer"),  # not ASCII
    ({"iops-total": "-5"}, "Parameter 'iops-total' expects an integer"),
    ({"iops-total": 1.5}, "Invalid parameter type for 'iops-total', expected: integer"),
    ({"iops": 1}, "Parameter 'limits.iops' is unexpected"),
])
def test_invalid_limits_in_qemus_words(limits, message):
    with pytest.raises(ThrottleError) as exc:
        ThrottleConfig.empty().apply_limits(limits)
    assert str(exc.value) == message


def test_qom_limits_shape_and_partial_set():
    clock = [0]
    g = ThrottleGroup.create("g", {"iops-total": "100"}, clock=lambda: clock[0])
    try:
        limits = g.limits()
        assert list(limits) == list(LIMIT_KEYS) and len(limits) == 19
        assert limits["iops-total"] == 100 and limits["bps-total-max-length"] == 1
        g.set_limits({"bps-read": 1 << 20})  # the others stay, as QEMU's qom-set
        assert g.limits()["iops-total"] == 100 and g.limits()["bps-read"] == 1 << 20
        with pytest.raises(ThrottleError):
            g.set_limits({"iops-read": 5})  # total and read together
        assert g.limits()["iops-read"] == 0  # nothing changed
    finally:
        g.close()


def test_new_limits_take_effect_at_once():
    clock = [0]
    g = ThrottleGroup.create("g", {"iops-total": 10}, clock=lambda: clock[0])
    try:
        while g.request(False, 512) == 0:
            pass
        assert g.request(False, 512) > 50 * MS  # waiting at 10/s
        g.set_limits({"iops-total": 1000})
        assert g.request(False, 512) == 0  # the buckets restart under the new limits
    finally:
        g.close()


def test_a_change_of_which_buckets_are_limited_reaches_every_process():
    """Two Buckets over one set of cells (a queue process and the control process): new
    limits that limit other buckets are enforced by both at once."""
    cells = [0.0] * CELLS
    worker, control = Buckets(cells), Buckets(cells)
    control.configure(ThrottleConfig.empty().apply_limits({"iops-total": 1000}), 0)
    assert count_allowed(worker, 1) > 900
    control.configure(ThrottleConfig.empty().apply_limits({"iops-read": 10}), 2 * S)
    assert 10 <= count_allowed(worker, 1, start_ns=2 * S) <= 12
    assert all(worker.request(True, 4096, 3 * S) == 0 for _ in range(5000))  # writes: free


def test_group_options_both_spellings_and_errors():
    assert parse_group_options({"limits.iops-total": "5", "x-bps-read": "9"}) == \
        {"iops-total": "5", "bps-read": "9"}
    assert parse_group_options({"limits": {"iops-total": 5}}) == {"iops-total": 5}
    # QSD takes both spellings of one key: the later wins here.
    assert parse_group_options({"limits.iops-total": "5", "x-iops-total": "6"}) == \
        {"iops-total": "6"}
    with pytest.raises(ThrottleError, match=r"Property 'throttle-group\.size' not found"):
        parse_group_options({"size": "5"})


def test_groups_registry_duplicate_and_in_use():
    groups = ThrottleGroups()
    groups.add("g", {"limits.iops-total": "5"})
    with pytest.raises(ThrottleError, match="attempt to add duplicate property 'g'"):
        groups.add("g", {})
    with pytest.raises(ThrottleError, match="object 'g' is in use, can not be deleted"):
        groups.delete("g", in_use=True)
    with pytest.raises(ThrottleError, match="object 'h' not found"):
        groups.delete("h", in_use=False)
    groups.delete("g", in_use=False)
    assert groups.get("g") is None
    for bad in ("", "9g", "a\x00b", "a/b", "x" * 200):
        with pytest.raises(ThrottleError, match="Parameter 'id' expects an identifier"):
            groups.add(bad, {})
    assert groups.groups == {}


# ---------------------------------------------------------------------- properties
rates = st.integers(1, 100_000)


@settings(max_examples=150, deadline=None)
@given(avg=rates, burst=st.integers(0, 4), length=st.integers(1, 5),
       size=st.integers(1, 1 << 20), bps=st.booleans(),
       gaps=st.lists(st.integers(0, 50 * MS), min_size=1, max_size=60))
def test_never_more_than_rate_times_time_plus_bucket(avg, burst, length, size, bps, gaps):
    """The model: from empty buckets, what went by time t is at most avg*t plus the bucket
    (avg/10 without a burst rate, max*length with one) plus the one request that found it
    exactly full."""
    top = avg * burst if burst else 0
    prefix = "bps" if bps else "iops"
    limits = {f"{prefix}-write": avg}
    if top:
        limits |= {f"{prefix}-write-max": top, f"{prefix}-write-max-length": length}
    else:
        length = 1
    b = Buckets([0.0] * CELLS)
    b.configure(ThrottleConfig.empty().apply_limits(limits), 0)
    unit = size if bps else 1
    bucket = top * length if top else avg / 10
    went = 0.0
    t = 0
    for gap in gaps:
        t += gap
        while b.request(True, size, t) == 0:
            went += unit
            assert went <= avg * t / S + bucket + unit + 1e-6
        assert b.request(False, size, t) == 0  # reads are another direction


@settings(max_examples=150, deadline=None)
@given(avg=rates, top_factor=st.integers(0, 4), length=st.integers(1, 5),
       fill=st.integers(1, 400), size=st.integers(1, 1 << 16), bps=st.booleans())
def test_the_wait_is_what_it_takes(avg, top_factor, length, fill, size, bps):
    """A refused request asked again after the wait it was told goes; asked at 90% of the
    wait (when that is more than a few microseconds) it is still refused."""
    prefix = "bps" if bps else "iops"
    limits = {f"{prefix}-total": avg}
    if top_factor:
        limits |= {f"{prefix}-total-max": avg * top_factor,
                   f"{prefix}-total-max-length": length}
    b = Buckets([0.0] * CELLS)
    b.configure(ThrottleConfig.empty().apply_limits(limits), 0)
    for _ in range(fill):
        b.account(False, size)
    wait = b.request(False, size, 0)
    if not wait:
        return
    if wait > 10_000:
        probe = Buckets([b.c[i] for i in range(CELLS)])
        assert probe.request(True, size, wait * 9 // 10) > 0
    assert b.request(True, size, wait) == 0


# ---------------------------------------------------------------------- shared memory
HAMMER = """
import os, sys, time
from blockdev.throttle import ThrottleGroup
g = ThrottleGroup.attach("g", int(sys.argv[1]))
n = 0
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    w = g.request(False, 4096)
    if w:
        time.sleep(w / 1e9)
    else:
        n += 1
print(n)
"""


def test_two_processes_share_one_budget():
    """Two processes hammering one group get the group's rate between them, not each."""
    g = ThrottleGroup.create("g", {"iops-total": 500})
    try:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        procs = [subprocess.Popen([sys.executable, "-c", HAMMER, str(g.fd), "2"],
                                  pass_fds=[g.fd], stdout=subprocess.PIPE, text=True,
                                  cwd=REPO, env=env) for _ in range(2)]
        counts = [int(p.communicate(timeout=30)[0]) for p in procs]
    finally:
        g.close()
    total = sum(counts)
    # Each ran ~2 s (its start-up outside the window): 2 s at 500/s plus the small bucket.
    assert 0.85 * 1000 <= total <= 1.15 * 1000 + 51, counts
    assert min(counts) > 100, counts  # both got a share


def test_lock_cost_per_request_is_small():
    g = ThrottleGroup.create("g", {"iops-total": 10 ** 12})
    try:
        n = 20000
        t0 = time.perf_counter()
        for _ in range(n):
            g.request(False, 4096)
        per = (time.perf_counter() - t0) / n
    finally:
        g.close()
    print(f"group.request: {per * 1e6:.2f} us")
    assert per < 50e-6
