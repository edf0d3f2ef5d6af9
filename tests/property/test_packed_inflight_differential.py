"""The compiled records of a packed queue's in-flight area change nothing observable: a
differential test.

:func:`vhost.queue._packed_core.popped_many` implements
:meth:`PackedInflightQueue.popped_many` (each chain's :meth:`~PackedInflightQueue.popped`) in C,
and :func:`~vhost.queue._packed_core.publishing` and :func:`~vhost.queue._packed_core.published`
the two steps of a publication.
Here hypothesis drives two identical packed in-flight regions -- one tracker with the compiled
hook switched off, one with it -- through random passes of chains popped (any descriptors, one
to a few per chain, sometimes more than the free list holds), completions and publications.
After each step every byte of both regions, the trackers' own links, free-list head and
counter, the head entries handed back and the exception raised (type and text) must be equal.

The compiled function must have run, and recorded chains itself (not left them all to the
Python loop): it is counted.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost.compiled import optional_module
from vhost.queue import inflight_packed
from vhost.queue.inflight import InflightArea, create_area
from vhost.queue.inflight_packed import RING_DESC, PackedInflightQueue

CORE = inflight_packed.COMPILED_MODULE

pytestmark = pytest.mark.skipif(optional_module(CORE) is None, reason=f"{CORE} is not built")

descs = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**16 - 1),
                  st.integers(0, 2**16 - 1))
chains = st.lists(descs, min_size=1, max_size=5)
steps = st.lists(st.one_of(
    st.tuples(st.just("pop"), st.lists(chains, min_size=1, max_size=6)),
    st.tuples(st.just("complete"), st.integers(0, 2**16)),
    st.tuples(st.just("publish"), st.integers(0, 2**16), st.integers(0, 1)),
), min_size=1, max_size=25)


def _outcome(call: Callable[[], Any]) -> tuple[Any, tuple[str, str] | None]:
    try:
        return call(), None
    except Exception as exc:  # every exception is compared, whatever it is
        return None, (type(exc).__name__, str(exc))


class Side:
    """One region and its tracker."""

    def __init__(self, size: int, compiled: bool, calls: list[tuple[int, int]]) -> None:
        fd, nbytes = create_area(1, size, packed=True)
        self.area = InflightArea.map(fd, nbytes, 0, 1, size, packed=True)
        os.close(fd)
        self.tracker = inflight_packed.tracker(self.area, 0, size)
        self.tracker.recover(lambda slot: 0, 0, 1)
        core = self.tracker._popped_compiled
        if not compiled:
            self.tracker._popped_compiled = None
            self.tracker._publishing_compiled = self.tracker._published_compiled = None
        else:
            publishing = self.tracker._publishing_compiled
            published = self.tracker._published_compiled
            assert publishing is not None and published is not None

            def counted_publishing(tracker: PackedInflightQueue, idx: int, wrap: int) -> bool:
                done = publishing(tracker, idx, wrap)
                calls.append((-1, int(done)))
                return done

            def counted_published(tracker: PackedInflightQueue) -> bool:
                done = published(tracker)
                calls.append((-2, int(done)))
                return done

            self.tracker._publishing_compiled = counted_publishing
            self.tracker._published_compiled = counted_published
            assert core is not None

            def counted(tracker: PackedInflightQueue, ring: bytes, counts: list[int],
                        out: list[int]) -> int:
                done = core(tracker, ring, counts, out)
                calls.append((done, len(counts)))
                return done

            self.tracker._popped_compiled = counted

    def state(self) -> tuple[object, ...]:
        t = self.tracker
        return (bytes(self.area.mapping), list(t._next), list(t._last), t._free_head,
                t.counter, list(t._batch))

    def close(self) -> None:
        self.tracker.release()
        self.area.close()


def run_both(size: int, plan: list[tuple[Any, ...]], calls: list[tuple[int, int]]) -> None:
    """Run ``plan`` on a Python and a compiled side, comparing after each step."""
    python, compiled = Side(size, False, calls), Side(size, True, calls)
    try:
        popped: list[int] = []
        for step in plan:
            if step[0] == "pop":
                ring = b"".join(RING_DESC.pack(*d) for chain in step[1] for d in chain)
                counts = [len(chain) for chain in step[1]]
                outs: list[list[int]] = [[], []]
                results = [_outcome(partial(s.tracker.popped_many, ring, counts, out))
                           for s, out in zip((python, compiled), outs, strict=True)]
                assert results[0] == results[1]
                assert outs[0] == outs[1]
                popped += outs[0]
            elif step[0] == "complete" and popped:
                head = popped.pop(step[1] % len(popped))
                for s in (python, compiled):
                    s.tracker.used(head)
            elif step[0] == "publish":
                for s in (python, compiled):
                    s.tracker.publishing(step[1] % size, step[2])
                    s.tracker.published()
            assert python.state() == compiled.state()
    finally:
        python.close()
        compiled.close()


def test_compiled_pops_record_what_python_records() -> None:
    """The property; then the floor: the C function ran, recorded chains itself, and left some
    to the Python loop (a free list run out: the InflightError both raise)."""
    calls: list[tuple[int, int]] = []

    @settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from((1, 4, 16)), steps)
    def alike(size: int, plan: list[tuple[Any, ...]]) -> None:
        run_both(size, plan, calls)

    alike()
    pops = [(done, total) for done, total in calls if done >= 0]
    assert sum(done for done, _ in pops) > 0, "the compiled pops recorded nothing"
    assert any(done < total for done, total in pops), "the Python loop never took over"
    assert (-1, 1) in calls and (-2, 1) in calls, "the compiled publication never ran"
