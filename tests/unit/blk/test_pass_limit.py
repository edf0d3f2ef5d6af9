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


def test_a_pass_takes_at_most_the_limit_and_publishes_before_the_next(rig: Rig) -> None:
    assert 2 * PASS_LIMIT < REQUESTS
    rig.round(1)  # (the first pass makes the fast path)
    worker = rig.worker
    drain = worker._submit_from_ring
    assert drain is not None
    vq = rig.vq
    passes: list[tuple[int, int]] = []  # per pass: (chains it took, used.idx the driver sees)

    def observed() -> list[tuple[int, int]]:
        used_idx = struct.unpack("<H", rig.mem.read(USED_GPA + 2, 2))[0]
        before = vq.in_flight_count
        done = drain()
        passes.append((vq.in_flight_count - before, used_idx))
        return done

    pop_batch = vq.pop_batch

    def observed_pop(limit: int | None = None) -> list[DescriptorChain]:
        chains = pop_batch(limit)
        n, seen = passes[-1]
        passes[-1] = (n + len(chains), seen)  # the generic pop's chains count in the pass
        return chains

    worker._submit_from_ring = observed
    vq.pop_batch = observed_pop  # type: ignore[method-assign]
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
