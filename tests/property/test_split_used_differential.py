"""The compiled used side of a split queue changes nothing observable: a differential test.

:mod:`vhost.queue._split_core` implements :meth:`SplitQueue.add_used_many` (with the in-flight
area's :meth:`InflightQueue.used` bookkeeping) and :meth:`InflightQueue.popped_many` in C.  Here
hypothesis drives two identical split queues -- same guest memory, same in-flight area, same
ring position -- one served by the pure-Python code (``VHOST_USER_BLK_CORE=python``), one by the
compiled code, through random claims (chains made available and popped), publishes and
``add_used_many`` batches: valid heads, heads not in flight, out of range, negative, duplicates,
a bool, lengths past a u32, batches wrapping the used ring and its 16-bit index.  After each step
every byte of guest memory (the used ring's elements among them), ``next_used``, the in-flight
flags and count, the in-flight area's bytes and batch, and the exception raised (type and text)
must be equal.

Both implementations must have run: the Python side's compiled hook is None and its Python loop
ran for every call; on the compiled side the C function ran for every call and added exactly the
plain entries at the start of each batch (the Python loop only the rest).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.unit.vhost.ring import EVENT_IDX, INDIRECT, Ring
from vhost.compiled import ENV, optional_module
from vhost.queue import inflight as inf
from vhost.queue.split import VIRTQ_DESC_F_WRITE, SplitQueue

CORE = "vhost.queue._split_core"

pytestmark = pytest.mark.skipif(
    optional_module(CORE) is None,
    reason=f"{CORE} is not built (cythonize -i -3 vhost/queue/_split_core.pyx)")

U32 = 0xFFFFFFFF


def _outcome(call: Callable[[], Any]) -> tuple[Any, tuple[str, str] | None]:
    """What ``call`` returned, and the exception it raised as (type, message)."""
    try:
        return call(), None
    except Exception as exc:  # every exception is compared, whatever it is
        return None, (type(exc).__name__, str(exc))


class _Counted:
    """A queue's compiled used side, recording ``(added, entries)`` of each call."""

    def __init__(self, core: Any, calls: list[tuple[int, int]]) -> None:
        self.core = core
        self.calls = calls

    def add_used_many(self, queue: SplitQueue, done: list[tuple[int, int]],
                      next_used: int) -> int:
        added: int = self.core.add_used_many(queue, done, next_used)
        self.calls.append((added, len(done)))
        return added

    def release(self) -> None:
        self.core.release()


class Side:
    """One of the two queues: a ring in a bytearray, its in-flight area, and call counts."""

    def __init__(self, core: str, size: int, start: int, tracked: bool) -> None:
        with mock.patch.dict(os.environ, {ENV: core}):
            self.ring = Ring(size=size, next_avail=start, used_idx=start)
            self.area = bytearray(inf.queue_stride(size))
            self.iq = inf.InflightQueue(memoryview(self.area), size) if tracked else None
            self.vq = SplitQueue(self.ring.mem, size, self.ring.addresses,
                                 EVENT_IDX | INDIRECT, start, None, inflight=self.iq)
        for head in range(size):  # every head a one-piece chain the device may write
            self.ring.write_desc(head, self.ring.data + 16 * head, 16, VIRTQ_DESC_F_WRITE)
        self.compiled_added: list[tuple[int, int]] = []  # (added, entries) per call
        self.python_calls = 0
        used_core = self.vq._used_core
        if used_core is not None:
            self.vq._used_core = _Counted(used_core, self.compiled_added)  # type: ignore[assignment]
        python = self.vq._add_used_python

        def counted_python(done: list[tuple[int, int]]) -> None:
            self.python_calls += 1
            python(done)
        self.vq._add_used_python = counted_python  # type: ignore[method-assign]

    def claim(self, heads: list[int]) -> list[int]:
        self.ring.publish(*heads)
        return [chain.head for chain in self.vq.pop_batch()]

    def state(self) -> tuple[object, ...]:
        vq = self.vq
        return (bytes(self.ring.buf), vq.next_used, bytes(vq._in_flight), vq.in_flight_count,
                vq.broken, bytes(self.area), None if self.iq is None else list(self.iq._batch),
                None if self.iq is None else self.iq.counter)


def _plain_prefix(batch: list[tuple[Any, Any]], in_flight: bytearray) -> int:
    """How many entries at the start of ``batch`` the compiled code takes itself: exact ints,
    the head in range and in flight (each taken clears it), the length a u32."""
    flags = bytearray(in_flight)
    for n, (head, length) in enumerate(batch):
        if (type(head) is not int or type(length) is not int or not 0 <= head < len(flags)
                or not flags[head] or not 0 <= length <= U32):
            return n
        flags[head] = 0
    return len(batch)


def _entries(size: int, in_flight: list[int]) -> st.SearchStrategy[tuple[Any, Any]]:
    valid = st.sampled_from(in_flight) if in_flight else st.integers(0, size - 1)
    head = st.one_of(valid, valid, valid, st.integers(0, size - 1),
                     st.integers(size, size + 3), st.integers(-3, -1),
                     st.sampled_from([2**15, 2**16 + 1, 2**63, 2**70, True]))
    length = st.one_of(st.integers(0, U32), st.integers(0, 4096),
                       st.sampled_from([0, U32, U32 + 1, -1, 2**64]))
    return st.tuples(head, length)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), size=st.sampled_from([1, 2, 4, 8, 16]),
       start=st.one_of(st.integers(0, 0xFFFF), st.integers(0xFFF0, 0xFFFF)),
       tracked=st.booleans())
def test_compiled_add_used_many_matches_python(data: st.DataObject, size: int, start: int,
                                               tracked: bool) -> None:
    py = Side("python", size, start, tracked)
    cc = Side("compiled", size, start, tracked)
    assert py.vq._used_core is None
    assert isinstance(cc.vq._used_core, _Counted) and not cc.compiled_added
    assert py.state() == cc.state()
    used_calls = 0
    for _ in range(data.draw(st.integers(1, 14), label="steps")):
        op = data.draw(st.sampled_from(["claim", "used", "used", "used", "publish"]), label="op")
        if op == "claim":
            free = [h for h in range(size) if not py.vq._in_flight[h]]
            if not free:
                continue
            heads = data.draw(st.lists(st.sampled_from(free), min_size=1, unique=True),
                              label="claim")
            assert py.claim(heads) == cc.claim(heads) == heads
        elif op == "publish":
            assert py.vq.publish_used() == cc.vq.publish_used()
        else:
            in_flight = [h for h in range(size) if py.vq._in_flight[h]]
            # Some in-flight heads once each (the plain case), then anything: the bad entries
            # are what the compiled code must leave to the Python loop, entries before them added.
            returned = data.draw(st.permutations(in_flight), label="returned")
            returned = returned[:data.draw(st.integers(0, len(returned)), label="count")]
            batch = [(head, data.draw(st.integers(0, U32), label="length"))
                     for head in returned]
            batch += data.draw(st.lists(_entries(size, in_flight), max_size=size + 3),
                               label="then")
            plain = _plain_prefix(batch, cc.vq._in_flight)
            before = py.vq.next_used
            outcomes = [_outcome(partial(side.vq.add_used_many, list(batch)))
                        for side in (py, cc)]
            assert outcomes[0] == outcomes[1]
            event(f"add_used_many: {'ok' if outcomes[0][1] is None else outcomes[0][1][0]}, "
                  f"{'all' if plain == len(batch) else 'part'} plain")
            added = (py.vq.next_used - before) & 0xFFFF
            if py.vq.next_used < before:
                event("the used index wrapped past 0xFFFF")
            if (before & (size - 1)) + added > size:
                event("a batch wrapped the used ring")
            used_calls += 1
            if batch:  # the compiled code took exactly the plain entries, Python the rest
                assert cc.compiled_added[-1] == (plain, len(batch))
        assert py.state() == cc.state()
    # Both implementations ran every call: Python on one side, C (then Python for what it left)
    # on the other.
    assert py.python_calls == used_calls
    assert len(cc.compiled_added) == used_calls
    assert cc.python_calls == sum(1 for added, entries in cc.compiled_added if added < entries)


def _popped_heads(limit: int) -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(0, limit - 1), st.integers(0, limit - 1),
                     st.integers(limit - 2, limit + 3), st.integers(-3, -1),
                     st.sampled_from([2**63, 2**70, True]))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), size=st.sampled_from([1, 2, 8, 16]),
       counter=st.one_of(st.integers(0, 1000), st.integers(2**64 - 4, 2**64 + 1)))
def test_compiled_popped_many_matches_python(data: st.DataObject, size: int,
                                             counter: int) -> None:
    """:meth:`InflightQueue.popped_many`: same area bytes, counter and exception."""
    queues = []
    calls: list[int] = []
    for core in ("python", "compiled"):
        with mock.patch.dict(os.environ, {ENV: core}):
            area = bytearray(inf.queue_stride(size))
            iq = inf.InflightQueue(memoryview(area), size)
        iq.recover(0)
        iq.counter = counter
        queues.append((iq, area))
    py_iq, cc_iq = queues[0][0], queues[1][0]
    assert py_iq._popped_compiled is None
    compiled = cc_iq._popped_compiled
    assert compiled is not None

    def counted(iq: inf.InflightQueue, heads: list[int]) -> int:
        done = compiled(iq, heads)
        calls.append(done)
        return done
    cc_iq._popped_compiled = counted
    # entries that lie wholly inside the area, padding up to the 64-byte stride included
    limit = (inf.queue_stride(size) - inf.HEADER_SIZE) // inf.DESC_STATE_SIZE
    for _ in range(data.draw(st.integers(1, 4), label="calls")):
        heads = data.draw(st.lists(_popped_heads(limit), max_size=2 * size + 2), label="heads")
        start = cc_iq.counter
        outcomes = [_outcome(partial(iq.popped_many, list(heads))) for iq, _ in queues]
        assert outcomes[0] == outcomes[1]
        assert py_iq.counter == cc_iq.counter
        assert bytes(queues[0][1]) == bytes(queues[1][1])
        if heads:
            plain = 0
            for head in heads:
                if (type(head) is not int or not 0 <= head < limit
                        or start + plain >= 2**64):
                    break
                plain += 1
            assert calls[-1] == plain  # the C code marked exactly the plain heads


def test_release_lets_go_of_what_the_compiled_used_side_held() -> None:
    """After the queue's release() nothing holds the used ring, the in-flight flags or the
    in-flight area for the compiled code (a held buffer would keep guest memory mapped), and a
    late completion meets the Python code's refusal (struct's TypeError for a released view),
    writing nothing."""
    side = Side("compiled", 8, 0, True)
    assert side.claim([3]) == [3]
    area = side.area
    vq = side.vq
    held = vq._used_core  # a reference kept elsewhere does not keep the buffers
    vq.release()
    vq._in_flight.extend(b"\0")  # resizable: no buffer of it is exported any more
    area.extend(b"\0")
    assert vq._used_core is None and held is not None
    before = bytes(side.ring.buf)
    with pytest.raises(TypeError, match="read-write bytes-like"):
        vq.add_used_many([(3, 1)])
    assert bytes(side.ring.buf) == before
