"""The compiled end of a worker pass changes nothing observable: a differential test.

:meth:`SplitQueue.end_pass` states the end of a pass -- :meth:`~SplitQueue.enable_notifications`
(avail_event or the used flags, a fence, the re-check of avail.idx), then
:meth:`~SplitQueue.publish_used` (one used.idx store, the in-flight area's batch, a fence, the
EVENT_IDX need_event decision with its 16-bit wrap, or the driver's NO_INTERRUPT flag).
``UsedRing.end_pass`` (:mod:`vhost.queue._split_core`), which the worker calls through
:meth:`SplitQueue.pass_ender`, does it in C.  Here hypothesis drives two identical queues -- one
pure Python (``VHOST_USER_BLK_CORE=python``), one compiled -- through random ring states: the
used and avail indices anywhere in 16 bits (wrapping), entries completed or not since the last
publish, chains the driver made available behind the device's back, used_event anywhere (around
the batch just published too), the avail flags, EVENT_IDX on or off, an in-flight area or not.
After each end of a pass the return values, every byte of guest memory and of the in-flight area,
and the queue's publish state must be equal.

Both implementations must have run: the Python side has no compiled core and its ender is
:meth:`SplitQueue.end_pass`; on the compiled side every end of a pass went through the C method
and never through the Python one (except while dirty pages are logged, which it hands over).
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
from vhost.queue.base import PASS_AGAIN, PASS_CALL, PASS_QUIET
from vhost.queue.split import VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_WRITE, SplitQueue
from vhost.runner.process import PublishingQueue

CORE = "vhost.queue._split_core"

pytestmark = pytest.mark.skipif(
    optional_module(CORE) is None,
    reason=f"{CORE} is not built (cythonize -i -3 vhost/queue/_split_core.pyx)")

NAMES = {PASS_AGAIN: "again", PASS_QUIET: "quiet", PASS_CALL: "call"}


def _outcome(call: Callable[[], Any]) -> tuple[Any, tuple[str, str] | None]:
    """What ``call`` returned, and the exception it raised as (type, message)."""
    try:
        return call(), None
    except Exception as exc:  # every exception is compared, whatever it is
        return None, (type(exc).__name__, str(exc))


class _Counted:
    """A queue's compiled used side, counting its ``end_pass`` calls."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.ends = 0

    def add_used_many(self, queue: SplitQueue, done: list[tuple[int, int]],
                      next_used: int) -> int:
        added: int = self.core.add_used_many(queue, done, next_used)
        return added

    def end_pass(self, queue: SplitQueue, done: list[tuple[int, int]]) -> int:
        self.ends += 1
        ended: int = self.core.end_pass(queue, done)
        return ended

    def release(self) -> None:
        self.core.release()


class _Dirty:
    """A dirty-log marker that records what it is told (the Python path's calls)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def record(self, gpa: int, length: int) -> None:
        self.calls.append(("record", gpa, length))

    def mark(self, gpa: int, length: int) -> None:
        self.calls.append(("mark", gpa, length))

    def commit(self) -> None:
        self.calls.append(("commit",))


class Side:
    """One of the two queues: a ring in a bytearray, maybe an in-flight area, and counts."""

    def __init__(self, core: str, size: int, start: int, features: int, tracked: bool) -> None:
        with mock.patch.dict(os.environ, {ENV: core}):
            self.ring = Ring(size=size, features=features, next_avail=start, used_idx=start)
            self.area = bytearray(inf.queue_stride(size))
            self.iq = inf.InflightQueue(memoryview(self.area), size) if tracked else None
            self.vq = SplitQueue(self.ring.mem, size, self.ring.addresses, features, start,
                                 None, inflight=self.iq)
        for head in range(size):  # every head a one-piece chain the device may write
            self.ring.write_desc(head, self.ring.data + 16 * head, 16, VIRTQ_DESC_F_WRITE)
        self.counted: _Counted | None = None
        if self.vq._used_core is not None:
            self.counted = _Counted(self.vq._used_core)
            self.vq._used_core = self.counted  # type: ignore[assignment]
        self.python_ends = 0
        python = self.vq.end_pass

        def counted_python(done: list[tuple[int, int]]) -> int:
            self.python_ends += 1
            return python(done)
        self.vq.end_pass = counted_python  # type: ignore[method-assign]
        # (after the counting is in place: the ender binds the core it finds)
        self.end = self.vq.pass_ender()

    def state(self) -> tuple[object, ...]:
        vq = self.vq
        return (bytes(self.ring.buf), vq.next_used, vq.next_avail, vq._published_used,
                vq._signalled_used, bytes(vq._in_flight), vq.in_flight_count, bytes(self.area),
                None if self.iq is None else list(self.iq._batch))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), size=st.sampled_from([1, 2, 4, 8, 16]),
       start=st.one_of(st.integers(0, 0xFFFF), st.integers(0xFFF0, 0xFFFF)),
       event_idx=st.booleans(), tracked=st.booleans())
def test_compiled_end_pass_matches_python(data: st.DataObject, size: int, start: int,
                                          event_idx: bool, tracked: bool) -> None:
    features = INDIRECT | (EVENT_IDX if event_idx else 0)
    py = Side("python", size, start, features, tracked)
    cc = Side("compiled", size, start, features, tracked)
    sides = (py, cc)
    assert py.counted is None and py.end == py.vq.end_pass  # the Python method, nothing else
    assert cc.counted is not None and cc.counted.ends == 0
    assert py.state() == cc.state()
    ends = 0
    for _ in range(data.draw(st.integers(1, 8), label="passes")):
        # Chains the device popped, some of them completed since the last publish.
        free = [h for h in range(size) if not py.vq._in_flight[h]]
        heads = data.draw(st.lists(st.sampled_from(free), unique=True), label="claim") \
            if free else []
        for side in sides if heads else ():
            side.ring.publish(*heads)
            assert [c.head for c in side.vq.pop_batch()] == heads
        in_flight = [h for h in range(size) if py.vq._in_flight[h]]
        done = data.draw(st.lists(st.sampled_from(in_flight), unique=True), label="done") \
            if in_flight else []
        batch: list[tuple[Any, Any]] = [
            (head, data.draw(st.integers(0, 4096), label="length")) for head in done]
        # now and then an entry the add refuses (not in flight, out of range, a length past a
        # u32): the same exception, the entries before it added, nothing published
        if data.draw(st.integers(0, 7), label="bad entry") == 0:
            batch.append(data.draw(st.sampled_from(
                [(size, 1), (-1, 1), (0, 2**32), (0, -1), (True, 1)]), label="bad"))
        # The driver's side meanwhile: chains made available behind the device's back (the
        # re-check must see them), its flags, and used_event anywhere -- around the entries
        # about to be published too, where the 16-bit need_event comparison decides.
        free = [h for h in range(size) if not py.vq._in_flight[h]]
        behind = data.draw(st.lists(st.sampled_from(free), unique=True, max_size=2),
                           label="made available behind the device's back") \
            if free and data.draw(st.integers(0, 3), label="arrive") == 0 else []
        published = py.vq._published_used
        new = (py.vq.next_used + len(done)) & 0xFFFF  # (if the add goes through)
        near = data.draw(st.sampled_from([None, published, new]), label="used_event near")
        used_event = data.draw(st.integers(0, 0xFFFF), label="used_event") if near is None \
            else (near + data.draw(st.integers(-2, 2), label="used_event offset")) & 0xFFFF
        flags = data.draw(st.sampled_from([0, VIRTQ_AVAIL_F_NO_INTERRUPT]), label="flags")
        signalled = data.draw(st.one_of(st.none(), st.just(published),
                                        st.integers(0, 0xFFFF)), label="signalled")

        for side in sides:
            if behind:
                side.ring.publish(*behind)
            side.ring.set_used_event(used_event)
            side.ring.set_avail_flags(flags)
            side.vq._signalled_used = signalled
        assert py.state() == cc.state()
        outcomes = [_outcome(partial(side.end, list(batch))) for side in sides]
        ends += 1
        assert outcomes[0] == outcomes[1]
        assert py.state() == cc.state()
        ended, error = outcomes[0]
        if error is not None:  # the add refused an entry: the pass ends there, nothing published
            event(f"the add refused an entry: {error[0]}")
            assert py.vq._published_used == published
        else:
            event(f"event_idx {event_idx}: {NAMES[ended]}"
                  f"{' (nothing new)' if new == published else ''}")
            if new < published:
                event("the used index wrapped past 0xFFFF")
            assert (ended == PASS_AGAIN) == bool(behind)
        for side in sides if behind else ():  # the worker's loop drains what arrived
            assert [c.head for c in side.vq.pop_batch()] == behind
        assert py.state() == cc.state()
    # Both implementations ran every end of a pass: the Python method on one side, the C one
    # (and never the Python method) on the other.
    assert py.python_ends == ends
    assert cc.counted.ends == ends and cc.python_ends == 0


@pytest.mark.parametrize("event_idx", [True, False])
def test_compiled_end_pass_hands_dirty_logging_to_python(event_idx: bool) -> None:
    """While dirty pages are logged the Python method runs (it states the logging): the same
    marks, in the same order, and the same ring."""
    features = INDIRECT | (EVENT_IDX if event_idx else 0)
    py = Side("python", 8, 0xFFFE, features, True)
    cc = Side("compiled", 8, 0xFFFE, features, True)
    markers = (_Dirty(), _Dirty())
    for side, marker in zip((py, cc), markers, strict=True):
        side.ring.publish(1, 2, 3)
        assert [c.head for c in side.vq.pop_batch()] == [1, 2, 3]
        side.vq.dirty = marker  # type: ignore[assignment]
    assert py.end([(2, 7), (1, 0), (3, 4096)]) == cc.end([(2, 7), (1, 0), (3, 4096)]) \
        == PASS_CALL
    assert markers[0].calls == markers[1].calls and markers[0].calls
    assert py.state() == cc.state()
    assert cc.counted is not None and cc.counted.ends == 1 and cc.python_ends == 1


def _one_pass(core: str, event_idx: bool, used_event: int, signalled: int | None,
              flags: int = 0, ahead: int = 0) -> tuple[int, int]:
    """One completed request published at used index 0xFFFF -> 0 (a 16-bit wrap): what the end
    of the pass says, and the used.idx the driver sees."""
    side = Side(core, 4, 0xFFFF, INDIRECT | (EVENT_IDX if event_idx else 0), True)
    side.ring.publish(2)
    assert [c.head for c in side.vq.pop_batch()] == [2]
    side.ring.set_used_event(used_event)
    side.ring.set_avail_flags(flags)
    side.ring._avail_h[1] = (side.vq.next_avail + ahead) & 0xFFFF
    side.vq._signalled_used = signalled
    ended = side.end([(2, 1)])
    if core == "compiled":
        assert side.counted is not None and side.counted.ends == 1 and side.python_ends == 0
    return ended, side.ring.used_idx()


@pytest.mark.parametrize("core", ["python", "compiled"])
@pytest.mark.parametrize(("event_idx", "used_event", "signalled", "flags", "ahead", "expected"), [
    # virtio 2.7.10: re-check avail after enabling notifications; nothing is published then
    (True, 0xFFFF, 0xFFFF, 0, 1, (PASS_AGAIN, 0xFFFF)),
    (False, 0, 0xFFFF, 0, 1, (PASS_AGAIN, 0xFFFF)),
    # need_event(used_event, new=0, old=0xFFFF): a call only if used_event is the entry 0xFFFF
    (True, 0xFFFF, 0xFFFF, 0, 0, (PASS_CALL, 0)),
    (True, 0, 0xFFFF, 0, 0, (PASS_QUIET, 0)),
    (True, 0xFFFE, 0xFFFF, 0, 0, (PASS_QUIET, 0)),
    # since the last call the driver saw (0xFFFE): used_event 0xFFFE lies in the window now
    (True, 0xFFFE, 0xFFFE, 0, 0, (PASS_CALL, 0)),
    # never signalled: call
    (True, 0x1234, None, 0, 0, (PASS_CALL, 0)),
    # without EVENT_IDX the driver's NO_INTERRUPT flag decides
    (False, 0, 0xFFFF, 0, 0, (PASS_CALL, 0)),
    (False, 0, 0xFFFF, VIRTQ_AVAIL_F_NO_INTERRUPT, 0, (PASS_QUIET, 0)),
])
def test_end_pass_outcomes(core: str, event_idx: bool, used_event: int, signalled: int | None,
                           flags: int, ahead: int, expected: tuple[int, int]) -> None:
    """Each outcome, by hand, for both implementations (each line a case a broken re-check,
    need_event or flag test gets wrong)."""
    assert _one_pass(core, event_idx, used_event, signalled, flags, ahead) == expected


def test_a_queue_process_queue_tells_before_the_compiled_publish() -> None:
    """A queue process's queue (PublishingQueue: its counters told just before a used.idx store
    that moves) ends its passes through the compiled code too, and still tells first -- with
    the pass's completions already counted out of the requests in flight (told before that,
    the parent's in-flight gauge would show them until the next change)."""
    side = Side("compiled", 8, 0xFFFF, EVENT_IDX | INDIRECT, True)
    vq = side.vq
    vq.__class__ = PublishingQueue
    assert isinstance(vq, PublishingQueue)
    # (used.idx the driver sees, the queue's next_used, its requests in flight)
    told: list[tuple[int, int, int]] = []
    vq.changed = lambda: told.append((side.ring.used_idx(), vq.next_used, vq.in_flight_count))
    end = vq.pass_ender()
    side.ring.publish(5)
    assert [c.head for c in vq.pop_batch()] == [5]
    assert end([(5, 1)]) == PASS_CALL
    assert told == [(0xFFFF, 0, 0)]  # after the add, before the store of used.idx 0xFFFF -> 0
    assert side.ring.used_idx() == 0 and side.ring.used_elem(0xFFFF & 7) == (5, 1)
    assert end([]) == PASS_QUIET and len(told) == 1  # nothing moved: nothing told
    assert side.counted is not None and side.counted.ends == 2 and side.python_ends == 0
