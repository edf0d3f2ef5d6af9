"""A worker pass takes at most PASS_LIMIT chains, and publishes them before it takes more.

Why it matters (:data:`vhost.queue.base.PASS_LIMIT`): a driver that made a whole batch
available sleeps until the device publishes; a pass that publishes only once it has done the
whole batch leaves the driver idle through it.  Here 20 requests are made available at once
and served by the real worker code (:class:`benchmarks.hotpath.Rig`), with each core and each
ring layout: every pass (a call of the fast path's drain, then the generic pop) must take at
most PASS_LIMIT of them, and -- on the split ring, whose used index the driver reads -- the
completions of the first pass must be in the ring before the second pass starts.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.common import make_image
from benchmarks.hotpath import USED_GPA, Rig
from tests.property.test_fastpath_differential import compiled_core_or_skip
from vhost.queue.base import PASS_LIMIT, DescriptorChain
from virtio_blk import core as cores

REQUESTS = 20  # more than two passes' worth, not a multiple of the limit


@pytest.fixture(params=[("compiled", "split"), ("compiled", "packed"), ("python", "split"),
                        ("python", "packed")], ids=lambda p: "-".join(p))
def rig(request: pytest.FixtureRequest, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    core, layout = request.param
    compiled_core_or_skip(core)
    monkeypatch.setenv(cores.ENV, core)
    image = tmp_path / "disk.img"
    make_image(image, 32 << 20, fill=False)
    r = Rig("io_uring", str(image), slots=32, layout=layout)
    try:
        yield r
    finally:
        r.close()


def record_passes(rig: Rig) -> list[tuple[int, int]]:
    """From now on, per worker pass: (chains it took -- the fast path's drain, then the generic
    pop --, the used index the driver saw when it started)."""
    worker = rig.worker
    vq = rig.vq
    drain = worker._submit_from_ring
    assert drain is not None, "a first pass made the fast path"
    pop_batch = vq.pop_batch
    passes: list[tuple[int, int]] = []

    def observed_drain(limit: int) -> list[tuple[int, int]]:
        used_idx = struct.unpack("<H", rig.mem.read(USED_GPA + 2, 2))[0]
        before = vq.in_flight_count
        done = drain(limit)
        passes.append((vq.in_flight_count - before, used_idx))
        return done

    def observed_pop(limit: int | None = None) -> list[DescriptorChain]:
        chains = pop_batch(limit)
        n, seen = passes[-1]
        passes[-1] = (n + len(chains), seen)
        return chains

    worker._submit_from_ring = observed_drain
    vq.pop_batch = observed_pop  # type: ignore[method-assign]
    return passes


def test_a_pass_takes_at_most_the_limit_and_publishes_before_the_next(rig: Rig) -> None:
    assert 2 * PASS_LIMIT < REQUESTS
    rig.round(1)  # (the first pass makes the fast path, and finishes its request in it)
    passes = record_passes(rig)
    rig.round(REQUESTS)
    rig.check_statuses()
    taken = [n for n, _ in passes]
    assert sum(taken) == REQUESTS, passes
    assert max(taken) <= PASS_LIMIT, passes
    assert taken[:2] == [PASS_LIMIT, PASS_LIMIT], passes  # the fast path fills each pass
    if not rig.packed:
        first_seen = passes[0][1]
        # the driver sees the first pass's completions when the second pass starts
        assert (passes[1][1] - first_seen) & 0xFFFF == PASS_LIMIT, passes


@pytest.mark.parametrize("fast_path", [True, False], ids=["python-fast-path", "generic-pop"])
def test_a_pass_after_one_that_finished_nothing_takes_the_whole_batch(
        fast_path: bool, tmp_path: Path) -> None:
    """On the threads engine every request completes later, from the pool: nothing could be
    published early, so the limit would only add passes (O_DIRECT's case on io_uring)."""
    image = tmp_path / "disk.img"
    make_image(image, 32 << 20, fill=False)
    rig = Rig("threads", str(image), slots=32, fast_path=fast_path)
    try:
        rig.round(1)
        passes = record_passes(rig)
        fast = rig.handler._fast  # type: ignore[attr-defined]
        taken_before = fast.taken if fast_path else 0
        rig.round(REQUESTS)
        rig.check_statuses()
        assert passes[0][0] == REQUESTS, passes
        if fast_path:  # the fast path itself, not the generic pop after it
            assert fast.taken - taken_before == REQUESTS
    finally:
        rig.close()
