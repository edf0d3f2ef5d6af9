"""The compiled used side of a packed queue changes nothing observable: a differential test.

:mod:`vhost.queue._packed_core` implements the plain entries of
:meth:`PackedQueue.add_used_many` (with the in-flight area's :meth:`PackedInflightQueue.used`
bookkeeping) and the element loop of :meth:`PackedQueue.publish_used` in C.  Here hypothesis
drives two identical packed queues -- same guest memory, same in-flight area, same ring
position -- one on the pure-Python code, one on the compiled code, through chains made available
and popped, ``add_used_many`` batches (ids in flight, not in flight, out of range, negative, a
bool, duplicates; lengths 0, past a u32, negative), publications and the driver taking the used
elements.  After each step every byte of guest memory and of the in-flight area, the queue's
positions, wrap counters, slots held, pending batch and in-flight ids and count, what the driver
read, and the exception raised (type and text) must be equal.

Both implementations must have run: on the compiled side the C functions ran, added entries and
wrote batches themselves, and the Python code took over where they stopped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.vhost.ring import EVENT_IDX, INDIRECT, PackedRing
from vhost.compiled import optional_module
from vhost.queue import inflight_packed
from vhost.queue.inflight import InflightArea, create_area
from vhost.queue.packed import COMPILED_MODULE, F_NEXT, F_WRITE, PackedQueue

pytestmark = pytest.mark.skipif(optional_module(COMPILED_MODULE) is None,
                                reason=f"{COMPILED_MODULE} is not built")

#: What an add_used_many entry names: a chain in flight (by its index among them), an id not in
#: flight, past the ring, negative, a bool.
IDS = st.one_of(st.tuples(st.just("flight"), st.integers(0, 64)),
                st.tuples(st.sampled_from(("idle", "past", "negative", "bool")),
                          st.integers(0, 3)))
LENGTHS = st.one_of(st.integers(0, 4096), st.sampled_from((0, 2**32 - 1, 2**32, -1)))
steps = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 6), st.integers(1, 3)),
    st.tuples(st.just("used"), st.lists(st.tuples(IDS, LENGTHS), min_size=1, max_size=6)),
    st.tuples(st.just("publish")),
    st.tuples(st.just("take")),
), min_size=1, max_size=30)


def _outcome(call: Callable[[], Any]) -> tuple[Any, tuple[str, str] | None]:
    try:
        return call(), None
    except Exception as exc:  # every exception is compared, whatever it is
        return None, (type(exc).__name__, str(exc))


class Counting:
    """A queue's compiled used side, counting what its methods did."""

    def __init__(self, core: Any, calls: dict[str, list[tuple[int, int]]]) -> None:
        self.core = core
        self.calls = calls

    def add_used_many(self, queue: PackedQueue, done: list[tuple[int, int]]) -> int:
        added = int(self.core.add_used_many(queue, done))
        self.calls["add"].append((added, len(done)))
        return added

    def write_used(self, queue: PackedQueue, pending: list[tuple[int, int, int]]) -> Any:
        written = self.core.write_used(queue, pending)
        self.calls["write"].append((written is not None, len(pending)))
        return written

    def release(self) -> None:
        self.core.release()


class Side:
    def __init__(self, size: int, compiled: bool,
                 calls: dict[str, list[tuple[int, int]]]) -> None:
        fd, nbytes = create_area(1, size, packed=True)
        self.area = InflightArea.map(fd, nbytes, 0, 1, size, packed=True)
        os.close(fd)
        self.ring = PackedRing(size, EVENT_IDX | INDIRECT,
                               inflight=inflight_packed.tracker(self.area, 0, size))
        vq = self.ring.vq
        if compiled:
            assert vq._used_core is not None
            vq._used_core = Counting(vq._used_core, calls)  # type: ignore[assignment]
        else:
            vq._used_core = None
            assert vq._inflight is not None
            vq._inflight._popped_compiled = None
            vq._inflight._publishing_compiled = vq._inflight._published_compiled = None
        self.taken: list[tuple[int, int]] = []

    def state(self) -> tuple[object, ...]:
        vq = self.ring.vq
        return (bytes(self.ring.buf), bytes(self.area.mapping), vq.vring_base(), vq._held,
                list(vq._pending), bytes(vq._slots), list(vq._entry), vq.in_flight_count,
                vq._published, vq._since_signal, vq.broken, list(self.taken))

    def close(self) -> None:
        self.ring.release()
        self.ring.vq.release()
        self.area.close()


def _entry(side: Side, flight: list[int], which: tuple[str, int]) -> Any:
    kind, k = which
    size = side.ring.vq.size
    if kind == "flight":
        return flight[k % len(flight)] if flight else 0
    if kind == "idle":
        idle = [i for i in range(size) if not side.ring.vq._slots[i]]
        return idle[k % len(idle)] if idle else size
    return {"past": size + k, "negative": -1 - k, "bool": True}[kind]


def run_both(size: int, plan: list[tuple[Any, ...]],
             calls: dict[str, list[tuple[int, int]]]) -> None:
    sides = [Side(size, False, calls), Side(size, True, calls)]
    try:
        flight: list[int] = []  # buffer ids popped, not yet returned
        for step in plan:
            if step[0] == "add":
                _, n, pieces = step
                for _ in range(n):
                    ring = sides[0].ring
                    if not ring.free_ids or ring.free_slots < pieces:
                        break
                    for side in sides:
                        r = side.ring
                        gpa = r.data + 64 * r.free_ids[-1]
                        descs = [(gpa + 8 * p, 8, F_NEXT) for p in range(pieces - 1)]
                        descs.append((gpa + 48, 8, F_WRITE))
                        r.add_raw(descs, r.free_ids.pop())
                got = [[c.head for c in s.ring.vq.pop_batch()] for s in sides]
                assert got[0] == got[1]
                flight += got[0]
            elif step[0] == "used":
                done = [(_entry(sides[0], flight, which), length) for which, length in step[1]]
                results = [_outcome(partial(s.ring.vq.add_used_many, list(done))) for s in sides]
                assert results[0] == results[1]
                flight = [i for i in flight if sides[0].ring.vq._slots[i]]
            elif step[0] == "publish":
                results = [_outcome(s.ring.vq.publish_used) for s in sides]
                assert results[0] == results[1]
            else:
                for s in sides:
                    s.taken += s.ring.take_used()
            assert sides[0].state() == sides[1].state()
    finally:
        for s in sides:
            s.close()


def test_compiled_used_side_does_what_python_does() -> None:
    """The property; then the floor: the compiled functions added entries and wrote batches
    themselves, and left some to the Python code."""
    calls: dict[str, list[tuple[int, int]]] = {"add": [], "write": []}

    @settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from((1, 4, 8)), steps)
    def alike(size: int, plan: list[tuple[Any, ...]]) -> None:
        run_both(size, plan, calls)

    alike()
    assert sum(added for added, _ in calls["add"]) > 0, "the compiled add_used_many added none"
    assert any(added < n for added, n in calls["add"]), "Python never took over add_used_many"
    assert any(w for w, _ in calls["write"]), "the compiled loop never wrote a batch"
    assert any(not w for w, _ in calls["write"]), "the Python loop never wrote a batch"
