"""An in-flight area that is not writable: the compiled cores never store through it, and the
server never maps one.

The compiled cores store into the in-flight area through a raw pointer taken from the area's
memoryview: :mod:`vhost.queue._packed_core` (``popped_many``, ``publishing`` and ``published``,
each through its one ``_writable_area`` check) and :mod:`vhost.queue._split_core`
(``popped_many``, and ``UsedRing``, which keeps the pointer while its queue runs).  A pointer
ignores the buffer's read-only flag: the store would change a ``bytes`` object or a buffer its
owner exported read-only, or fault on a PROT_READ mapping and kill the whole process with
SIGSEGV.  So each core refuses a read-only area and the Python method runs instead; that one
cannot write through it either, and raises the TypeError that ``struct`` and ``memoryview``
raise, with nothing stored.

A read-only area does not reach the cores through the server: :meth:`InflightArea.map` is the
one place an area is mapped (SET_INFLIGHT_FD in the handler, ``map_connection`` in a queue
process), it maps MAP_SHARED and read-write, and it refuses an fd not open O_RDWR
(``check_mappable``) or a memfd sealed against writes (the read-write mmap fails with EPERM); and
a tracker's ``recover`` writes the area before the first pop.  So the cores' checks are tested
here where they live, on trackers built over read-only views, and the entry point is tested to
refuse those fds from a hostile frontend, on a packed ring and on a split one.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import pytest

from guestmem import GuestMemory
from tests.unit.vhost.helpers import Session, assert_refused, tracebacks
from tests.vhost_devices import EchoDevice
from vhost import messages as m
from vhost.compiled import ENV, optional_module
from vhost.messages import Request, VirtioFeature
from vhost.queue import inflight as inf
from vhost.queue import inflight_packed as infp
from vhost.queue.base import RingAddresses
from vhost.queue.inflight_packed import RING_DESC, PackedInflightQueue
from vhost.queue.split import SplitQueue

SIZE = 8

PACKED_CORE = optional_module(infp.COMPILED_MODULE)
SPLIT_CORE = optional_module(inf.COMPILED_MODULE)
needs_packed_core = pytest.mark.skipif(
    PACKED_CORE is None, reason=f"{infp.COMPILED_MODULE} does not run here (not built or {ENV})")
needs_split_core = pytest.mark.skipif(
    SPLIT_CORE is None, reason=f"{inf.COMPILED_MODULE} does not run here (not built or {ENV})")

#: Three chains of two, one and two descriptors, in the ring's own format.
COUNTS = [2, 1, 2]
RING = b"".join(RING_DESC.pack(0x10000 + 0x100 * i, 512, i, 0x80) for i in range(sum(COUNTS)))

#: Read-only buffers a tracker could be handed: a bytearray exported read-only
#: (``memoryview.toreadonly()``: a store through a pointer changes it unseen) and an immutable
#: ``bytes`` object.  Both filled with a pattern, so a store of zero (``published`` clears
#: bytes) shows.
READ_ONLY_KINDS: dict[str, Callable[[int], Any]] = {
    "read-only-view": lambda n: memoryview(bytearray(b"\xa5" * n)).toreadonly(),
    "bytes": lambda n: bytes(b"\xa5" * n),
}


def _outcome(call: Callable[[], object]) -> tuple[object, tuple[str, str] | None]:
    try:
        return call(), None
    except Exception as exc:  # compared whatever it is
        return None, (type(exc).__name__, str(exc))


def _packed_tracker(buf: Any, compiled: bool) -> PackedInflightQueue:
    tracker = PackedInflightQueue(memoryview(buf), SIZE)
    if compiled:
        assert tracker._popped_compiled is not None
        assert tracker._publishing_compiled is not None
        assert tracker._published_compiled is not None
    else:
        tracker._popped_compiled = None
        tracker._publishing_compiled = tracker._published_compiled = None
    return tracker


def _packed_state(t: PackedInflightQueue) -> tuple[object, ...]:
    return list(t._next), list(t._last), t._free_head, t.counter, list(t._batch)


def _pop(t: PackedInflightQueue, out: list[int]) -> None:
    t.popped_many(RING, list(COUNTS), out)


# For a publication: heads 0 and 3 handed back (never popped -- nothing can be over a read-only
# area -- which the tracker does not check; their ``last`` is 0, so the compiled code takes the
# batch as a plain one and would write it).

def _publishing(t: PackedInflightQueue, out: list[int]) -> None:
    t.used(0)
    t.used(3)
    t.publishing(5, 1)


def _published(t: PackedInflightQueue, out: list[int]) -> None:
    t.used(0)
    t.used(3)
    t.published()


PACKED_STEPS = {"popped_many": _pop, "publishing": _publishing, "published": _published}


@needs_packed_core
@pytest.mark.parametrize("kind", list(READ_ONLY_KINDS))
@pytest.mark.parametrize("step", list(PACKED_STEPS))
def test_packed_core_leaves_a_read_only_area_to_the_python_method(step: str, kind: str) -> None:
    """The compiled step over a read-only area does what the Python one does: the same
    TypeError, the same tracker state, not one byte of the area changed."""
    nbytes = infp.queue_stride(SIZE)
    make = READ_ONLY_KINDS[kind]
    results = []
    for compiled in (False, True):
        buf = make(nbytes)
        before = bytearray(buf)  # (a copy: bytes(buf) of a bytes object is that object)
        tracker = _packed_tracker(buf, compiled)
        out: list[int] = []
        outcome = _outcome(partial(PACKED_STEPS[step], tracker, out))
        assert bytes(buf) == before, f"the area was written ({'compiled' if compiled else 'py'})"
        results.append((outcome, out, _packed_state(tracker)))
    assert results[1] == results[0]
    assert results[0][0][1] is not None and results[0][0][1][0] == "TypeError", results[0]


@needs_packed_core
@pytest.mark.parametrize("kind", list(READ_ONLY_KINDS))
def test_packed_core_functions_refuse_a_read_only_area(kind: str) -> None:
    """Called directly, each compiled function says it did nothing, and did nothing."""
    assert PACKED_CORE is not None
    buf = READ_ONLY_KINDS[kind](infp.queue_stride(SIZE))
    before = bytearray(buf)
    tracker = _packed_tracker(buf, compiled=True)
    out: list[int] = []
    assert PACKED_CORE.popped_many(tracker, RING, list(COUNTS), out) == 0
    assert out == [] and tracker._free_head == 0 and tracker.counter == 0
    tracker.used(0)
    tracker.used(3)
    assert PACKED_CORE.publishing(tracker, 5, 1) is False
    assert PACKED_CORE.published(tracker) is False
    assert tracker._batch == [0, 3] and tracker._free_head == 0
    assert bytes(buf) == before


def _in_child(work: Callable[[], object]) -> str:
    """``work()``'s result, computed in a forked child: a store through a PROT_READ mapping
    would kill this process (SIGSEGV), and a test must fail, not take the run down with it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            os.write(w, repr(work()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            result = f.read().decode()
    finally:
        _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        pytest.fail(f"the child died of signal {os.WTERMSIG(status)} (a store through a "
                    f"read-only mapping)")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status:#x}"
    return result


@needs_packed_core
@needs_split_core
def test_cores_do_not_store_through_a_read_only_mapping() -> None:
    """A PROT_READ mapping of the area (what a read-only mmap of a hostile fd would give): no
    core stores through it -- each returns 'nothing done' -- and the process lives."""
    assert PACKED_CORE is not None and SPLIT_CORE is not None
    packed_core, split_core = PACKED_CORE, SPLIT_CORE

    def work() -> object:
        packed_map = mmap.mmap(-1, infp.queue_stride(SIZE), prot=mmap.PROT_READ)
        split_map = mmap.mmap(-1, inf.queue_stride(SIZE), prot=mmap.PROT_READ)
        packed = PackedInflightQueue(memoryview(packed_map), SIZE)
        split = inf.InflightQueue(memoryview(split_map), SIZE)
        packed.used(0)
        return [packed_core.popped_many(packed, RING, list(COUNTS), []),
                packed_core.publishing(packed, 1, 1), packed_core.published(packed),
                split_core.popped_many(split, [0, 5])]

    assert _in_child(work) == repr([0, False, False, 0])


@needs_split_core
@pytest.mark.parametrize("kind", list(READ_ONLY_KINDS))
def test_split_popped_many_leaves_a_read_only_area_to_the_python_method(kind: str) -> None:
    """The split core's record of pops over a read-only area: nothing done, the Python method's
    TypeError, the counter unmoved, no byte changed."""
    assert SPLIT_CORE is not None
    nbytes = inf.queue_stride(SIZE)
    results = []
    for compiled in (False, True):
        buf = READ_ONLY_KINDS[kind](nbytes)
        before = bytearray(buf)  # (a copy: bytes(buf) of a bytes object is that object)
        tracker = inf.InflightQueue(memoryview(buf), SIZE)
        if compiled:
            assert tracker._popped_compiled is not None
            assert SPLIT_CORE.popped_many(tracker, [1, 4]) == 0
        else:
            tracker._popped_compiled = None
        outcome = _outcome(partial(tracker.popped_many, [1, 4]))
        assert bytes(buf) == before
        results.append((outcome, tracker.counter, list(tracker._batch)))
    assert results[1] == results[0]
    assert results[0][0][1] is not None and results[0][0][1][0] == "TypeError", results[0]
    assert results[0][1] == 0


@needs_split_core
def test_split_used_ring_refuses_a_read_only_area() -> None:
    """``UsedRing`` keeps a pointer to the area for the queue's life: over a read-only one it is
    not made (ValueError, which SplitQueue takes as 'the Python used side runs').  A SplitQueue
    cannot be built over a read-only area (its tracker's ``recover`` writes first), so the queue
    is built over a writable one and handed a read-only tracker of the same bytes."""
    assert SPLIT_CORE is not None
    mem = GuestMemory.from_buffer(bytearray(1 << 16))
    area = bytearray(inf.queue_stride(SIZE))
    queue = SplitQueue(mem, SIZE, RingAddresses(0x1000, 0x2000, 0x3000),
                       int(VirtioFeature.VERSION_1), 0,
                       inflight=inf.InflightQueue(memoryview(area), SIZE))
    try:
        assert queue._used_core is not None  # (over the writable area it is made)
        queue.inflight_area = inf.InflightQueue(memoryview(area).toreadonly(), SIZE)
        with pytest.raises(ValueError, match="in-flight area is read-only"):
            SPLIT_CORE.UsedRing(queue)
    finally:
        queue.release()


# ---------------------------------------------------------------------------- the entry point

#: fcntl's F_SEAL_FUTURE_WRITE (Linux 5.1; Python 3.11's fcntl does not name it)
F_SEAL_FUTURE_WRITE = 0x10


@contextmanager
def _unwritable_fd(kind: str, size: int) -> Iterator[int]:
    """A memfd of ``size`` bytes that cannot be mapped for writing, as ``kind`` says."""
    rw = os.memfd_create("inflight-ro", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    fds = [rw]
    try:
        os.ftruncate(rw, size)
        if kind == "read-only-fd":
            fds.append(os.open(f"/proc/self/fd/{rw}", os.O_RDONLY | os.O_CLOEXEC))
        elif kind == "seal-write":
            fcntl.fcntl(rw, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        else:
            assert kind == "seal-future-write"
            fcntl.fcntl(rw, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
        yield fds[-1]
    finally:
        for fd in fds:
            os.close(fd)


UNWRITABLE = ["read-only-fd", "seal-write", "seal-future-write"]


@pytest.mark.parametrize("kind", UNWRITABLE)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split"])
def test_set_inflight_fd_refuses_an_area_it_cannot_map_for_writing(serve, caplog, packed: bool,
                                                                    kind: str) -> None:
    """A hostile frontend's SET_INFLIGHT_FD with a read-only fd or a write-sealed memfd (an
    O_RDWR fd, so only the read-write mapping refuses it): a failed ack and a log line, no area
    kept; the same connection then sets a good area and its queue runs with it."""
    running = serve(EchoDevice())
    s = Session(running.path)
    try:
        s.fe.negotiate(packed=packed)
        s.fe.set_mem_table(s.mem)
        size = inf.area_size(1, SIZE, packed=packed)
        with _unwritable_fd(kind, size) as fd:
            assert_refused(s.fe, caplog, Request.SET_INFLIGHT_FD, m.inflight(size, 0, 1, SIZE),
                           [fd])
        assert running.daemon.handler.inflight is None
        fd, got = s.fe.get_inflight_fd(1, SIZE)
        try:
            assert got == size
            s.fe.set_inflight_fd(fd, size, 1, SIZE)
        finally:
            os.close(fd)
        area = running.daemon.handler.inflight
        assert area is not None and area.packed == packed
        q = s.fe.setup_packed_queue(0, size=SIZE) if packed else s.queue(0, SIZE)
        s.echo(q)
        s.echo(q)
        # (the queue took the area into use: its tracker initialised the region's version)
        assert struct.unpack_from("<H", area.mapping, 8)[0] == inf.VERSION
    finally:
        s.close()
    assert tracebacks(caplog) == []
