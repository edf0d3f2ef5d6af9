"""The bounded simple-chain pop (:meth:`SplitQueue.peek_simple` / :meth:`SplitQueue.claim`).

What the fast path relies on: a chain in Linux's shape -- [readable header] [data runs, all
readable or all writable] [one writable trailer], direct or through one indirect table -- comes
back as a :data:`SimpleChain` with the pieces the generic pop would give; anything else (another
shape, a broken rule, a queue that is broken or has chains to resubmit) gives None, and neither
answer changes the queue: not ``next_avail``, not the in-flight flags, not the in-flight area.
A property test holds the two pops together over random rings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from guestmem import GuestMemory
from tests.unit.vhost.test_ring_fuzz import REGIONS as FUZZ_REGIONS
from tests.unit.vhost.test_ring_fuzz import build as build_fuzz
from tests.unit.vhost.test_ring_fuzz import rings as fuzz_rings
from vhost.messages import VirtioFeature
from vhost.queue import inflight as inf
from vhost.queue.base import (
    CHAIN_DATA,
    CHAIN_DATA_LEN,
    CHAIN_HEAD,
    CHAIN_REGION,
    DescriptorChain,
    RingAddresses,
    SimpleChain,
    simple_chains,
)
from vhost.queue.split import (
    DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    SplitQueue,
)

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
FEATURES = int(VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC)
BASE = 0x10000
#: Two adjacent regions (a piece may span them), then a hole, then a third one.
REGIONS = ((BASE, 0x8000), (BASE + 0x8000, 0x4000), (BASE + 0x10000, 0x1000))
DESC_GPA, AVAIL_GPA, USED_GPA = BASE, BASE + 0x400, BASE + 0x800
TABLE = BASE + 0x1000  # indirect tables
HDR, DATA, STATUS = BASE + 0x2000, BASE + 0x3000, BASE + 0x4000
SIZE = 8


@dataclass
class Rig:
    """A split ring of ``SIZE`` in three bytearray regions, with an in-flight area."""

    features: int = FEATURES
    area: bytearray = field(default_factory=lambda: bytearray(inf.queue_stride(SIZE)))
    next_avail: int = 0

    def __post_init__(self) -> None:
        self.buffers = [bytearray(n) for _, n in REGIONS]
        self.mem = GuestMemory()
        for (gpa, _), buf in zip(REGIONS, self.buffers, strict=True):
            self.mem.add_buffer(gpa, buf)
        self.avail_idx = self.next_avail
        self._set_avail_idx()
        self.vq = SplitQueue(self.mem, SIZE, RingAddresses(DESC_GPA, AVAIL_GPA, USED_GPA),
                             self.features, self.next_avail,
                             inflight=inf.InflightQueue(memoryview(self.area), SIZE))

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.mem.write(DESC_GPA + 16 * i, DESC.pack(addr, length, flags, nxt))

    def table(self, gpa: int, descs: list[tuple[int, int, int, int]]) -> None:
        self.mem.write(gpa, b"".join(DESC.pack(*d) for d in descs))

    def publish(self, *heads: int) -> None:
        for head in heads:
            self.mem.write(AVAIL_GPA + 4 + 2 * (self.avail_idx % SIZE), struct.pack("<H", head))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._set_avail_idx()

    def _set_avail_idx(self) -> None:
        self.mem.write(AVAIL_GPA + 2, struct.pack("<H", self.avail_idx))

    def direct(self, pieces: list[tuple[int, int, bool]], head: int = 0) -> None:
        """``pieces`` chained from descriptor ``head`` on, in order."""
        for i, (addr, length, writable) in enumerate(pieces):
            last = i + 1 == len(pieces)
            self.desc(head + i, addr, length, (WRITE if writable else 0) | (0 if last else NEXT),
                      0 if last else head + i + 1)

    def indirect(self, pieces: list[tuple[int, int, bool]], head: int = 0,
                 gpa: int = TABLE) -> None:
        """``pieces`` in an indirect table at ``gpa``, written in order; ``head`` points to it."""
        n = len(pieces)
        self.table(gpa, [(addr, length, (WRITE if w else 0) | (NEXT if i + 1 < n else 0),
                          i + 1 if i + 1 < n else 0)
                         for i, (addr, length, w) in enumerate(pieces)])
        self.desc(head, gpa, 16 * n, INDIRECT)

    def state(self) -> tuple[object, ...]:
        """Everything peek_simple must leave as it was."""
        vq = self.vq
        return (vq.next_avail, bytes(vq._in_flight), vq.in_flight_count, vq.broken,
                vq.replay_pending, bytes(self.area), tuple(bytes(b) for b in self.buffers))


READ_IN = [(HDR, 16, False), (DATA, 4096, True), (STATUS, 1, True)]
WRITE_OUT = [(HDR, 16, False), (DATA, 512, False), (DATA + 512, 512, False), (STATUS, 1, True)]


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize("pieces", [READ_IN, WRITE_OUT], ids=["in", "out"])
def test_a_simple_chain_is_found_and_claimed(pieces: list[tuple[int, int, bool]],
                                             indirect: bool) -> None:
    rig = Rig()
    (rig.indirect if indirect else rig.direct)(pieces, head=3 if indirect else 2)
    head = 3 if indirect else 2
    rig.publish(head)
    before = rig.state()
    chain = rig.vq.peek_simple(130)
    assert chain is not None and rig.state() == before, "peek_simple changed the queue"
    into_guest = pieces is READ_IN
    data = [(a, n) for a, n, _ in pieces[1:-1]]
    *fields, token, region = chain
    assert fields == [head, HDR, 16, data, sum(n for _, n in data), into_guest, STATUS, 1]
    assert token == 0  # the avail index it was found at
    assert region is not None and region.gpa == BASE  # all pieces in region 0
    assert rig.vq.peek_simple(130) is not None and rig.state() == before  # still there
    rig.vq.claim(chain)
    assert rig.vq.next_avail == 1 and rig.vq.in_flight_count == 1 and rig.vq._in_flight[head]
    assert rig.area != before[5], "claim did not record the head in the in-flight area"
    assert rig.vq.peek_simple(130) is None  # nothing more available
    with pytest.raises(ValueError):
        rig.vq.claim(chain)  # not the next avail entry any more
    rig.vq.add_used_many([(head, 1)])
    assert rig.vq.in_flight_count == 0


def test_pieces_in_two_regions_are_simple_without_a_shared_region() -> None:
    """Each piece in one region, but not all in the same one: the chain is simple and
    ``region`` is None (the device looks each piece up)."""
    rig = Rig()
    rig.direct([(HDR, 16, False), (BASE + 0x8000, 4096, True), (STATUS, 1, True)])
    rig.publish(0)
    chain = rig.vq.peek_simple(130)
    assert chain is not None and chain[CHAIN_REGION] is None
    rig2 = Rig()  # the indirect table in region 0, the pieces in region 1
    rig2.indirect([(BASE + 0x8000, 16, False), (BASE + 0x9000, 512, True),
                   (BASE + 0xA000, 1, True)])
    rig2.publish(0)
    chain = rig2.vq.peek_simple(130)
    assert chain is not None
    region = chain[CHAIN_REGION]
    assert region is not None and region.gpa == BASE + 0x8000
    rig3 = Rig()  # a direct header in region 1, then an indirect table in region 0
    rig3.desc(0, BASE + 0x8000, 16, NEXT, 1)
    rig3.table(TABLE, [(DATA, 512, WRITE | NEXT, 1), (STATUS, 1, WRITE, 0)])
    rig3.desc(1, TABLE, 32, INDIRECT)
    rig3.publish(0)
    chain = rig3.vq.peek_simple(130)
    assert chain is not None and chain[CHAIN_REGION] is None


def _spanning(rig: Rig) -> None:
    rig.direct([(HDR, 16, False), (BASE + 0x7000, 0x2000, True), (STATUS, 1, True)])


def _loop(rig: Rig) -> None:
    rig.desc(0, HDR, 16, NEXT, 1)
    rig.desc(1, DATA, 512, NEXT | WRITE, 0)


def _nested(rig: Rig) -> None:
    rig.table(TABLE, [(TABLE + 0x100, 48, INDIRECT, 0)])
    rig.desc(0, TABLE, 16, INDIRECT)


#: Chains peek_simple must decline: (what, how to lay it out, does the generic pop break).
MALFORMED: list[tuple[str, object, bool]] = [
    ("no header", lambda r: r.direct([(DATA, 512, True), (STATUS, 1, True)]), False),
    ("no data", lambda r: r.direct([(HDR, 16, False), (STATUS, 1, True)]), False),
    ("mixed data", lambda r: r.direct([(HDR, 16, False), (DATA, 512, False),
                                       (DATA + 512, 512, True), (STATUS, 1, True)]), False),
    ("no trailer", lambda r: r.direct([(HDR, 16, False), (DATA, 512, False)]), False),
    ("only data", lambda r: r.direct([(DATA, 512, False)]), False),
    ("readable after writable", lambda r: r.direct([(HDR, 16, False), (DATA, 512, True),
                                                    (STATUS, 1, False)]), True),
    ("spans two regions", _spanning, False),
    ("outside memory", lambda r: r.direct([(HDR, 16, False), (BASE + 0xC000, 512, True),
                                           (STATUS, 1, True)]), True),
    ("next out of range", lambda r: r.desc(0, HDR, 16, NEXT, SIZE), True),
    ("loop", _loop, True),
    ("head out of range", lambda r: r.publish(SIZE), True),
    ("indirect with NEXT", lambda r: (r.indirect(READ_IN), r.desc(0, TABLE, 48,
                                                                 INDIRECT | NEXT, 1)), True),
    ("indirect of 40 bytes", lambda r: (r.indirect(READ_IN), r.desc(0, TABLE, 40, INDIRECT)),
     True),
    ("indirect table outside memory", lambda r: r.desc(0, BASE + 0xC000, 48, INDIRECT), True),
    ("nested indirect", _nested, True),
    ("more pieces than asked", lambda r: r.direct(
        [(HDR, 16, False)] + [(DATA + 512 * i, 512, True) for i in range(4)]
        + [(STATUS, 1, True)]), False),
]


@pytest.mark.parametrize(("layout", "breaks"), [(m[1], m[2]) for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_chains_are_declined_and_nothing_changes(layout: object, breaks: bool) -> None:
    rig = Rig()
    layout(rig)  # type: ignore[operator]
    if rig.avail_idx == 0:  # (the layouts that publish a head themselves publish a bad one)
        rig.publish(0)
    before = rig.state()
    assert rig.vq.peek_simple(5) is None
    assert rig.state() == before, "peek_simple changed the queue"
    chains = rig.vq.pop_batch(1)  # the generic pop takes it and says what is wrong
    assert rig.vq.broken == breaks
    assert len(chains) == (0 if breaks else 1)


def test_no_chain_while_the_queue_cannot_hand_one_over() -> None:
    """Broken, head in flight, avail.idx too far ahead, chains to resubmit: None, unchanged."""
    rig = Rig()
    rig.direct(READ_IN)
    rig.publish(0)
    rig.vq.broken = True
    before = rig.state()
    assert rig.vq.peek_simple(130) is None and rig.state() == before
    rig.vq.broken = False
    assert rig.vq.pop_batch(1)  # head 0 in flight now; the driver offers it again
    rig.publish(0)
    before = rig.state()
    assert rig.vq.peek_simple(130) is None and rig.state() == before
    rig = Rig()
    rig.direct(READ_IN)
    rig.avail_idx = SIZE + 1
    rig._set_avail_idx()
    before = rig.state()
    assert rig.vq.peek_simple(130) is None and rig.state() == before
    rig.vq.pop_batch()
    assert rig.vq.broken


def test_no_chain_while_requests_wait_to_be_resubmitted() -> None:
    first = Rig()
    first.direct(READ_IN)
    first.publish(0)
    assert first.vq.pop_batch()  # in flight when the backend "dies"
    first.direct(READ_IN, head=4)
    first.publish(4)  # made available, not popped yet: the new backend takes it after head 0
    first.vq.release()
    again = SplitQueue(first.mem, SIZE, RingAddresses(DESC_GPA, AVAIL_GPA, USED_GPA), FEATURES,
                       0, inflight=inf.InflightQueue(memoryview(first.area), SIZE))
    assert again.replay_pending
    before = (again.next_avail, bytes(again._in_flight), bytes(first.area))
    assert again.peek_simple(130) is None
    assert (again.next_avail, bytes(again._in_flight), bytes(first.area)) == before
    assert [c.head for c in again.pop_batch()] == [0, 4]


# ---------------------------------------------------------------------- the two pops agree
def _in_one_region(gpa: int, length: int, regions: tuple[tuple[int, int], ...]) -> bool:
    return any(start <= gpa and gpa + length <= start + size for start, size in regions)


def _is_simple(chain: DescriptorChain, regions: tuple[tuple[int, int], ...]) -> bool:
    """The model: Linux's shape, every piece inside one region."""
    r, w = chain.readable, chain.writable
    shaped = (len(r) == 1 and len(w) >= 2) or (len(r) >= 2 and len(w) == 1)
    return shaped and all(_in_one_region(a, n, regions) for a, n in r + w)


def _pieces(chain: SimpleChain) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    _, hdr, hdr_len, data, _, into_guest, status, status_len, _, _ = chain
    header = [(hdr, hdr_len)]
    trailer = [(status, status_len)]
    if into_guest:
        return header, data + trailer
    return header + data, trailer


good = st.sampled_from([HDR, DATA, DATA + 0x800, STATUS, BASE + 0x8000, BASE + 0x10000])
any_gpa = st.one_of(good, st.sampled_from([BASE + 0x7F00, BASE + 0xBFF0, BASE + 0xC000]))
any_pieces = st.lists(st.tuples(any_gpa, st.sampled_from([0, 1, 16, 256, 512]), st.booleans()),
                      min_size=1, max_size=6)


@st.composite
def simple_pieces(draw: st.DrawFn) -> list[tuple[int, int, bool]]:
    """[header] [1-4 data runs, one direction] [status], at addresses mostly in memory."""
    into_guest = draw(st.booleans())
    runs = draw(st.lists(st.tuples(good, st.sampled_from([1, 512, 4096])), min_size=1,
                         max_size=4))
    return ([(draw(good), 16, False)] + [(a, n, into_guest) for a, n in runs]
            + [(draw(good), 1, True)])


#: A descriptor field overwritten: (which descriptor, which field, value).
damage = st.one_of(st.none(), st.none(), st.tuples(st.integers(0, 5), st.integers(0, 3),
                                                   st.integers(0, 0xFFFF)))


@st.composite
def plausible(draw: st.DrawFn) -> dict:
    """Chains close to Linux's: mostly the simple shape, direct or indirect, sometimes another
    shape or one field damaged -- so both answers of peek_simple are common."""
    shape = draw(st.one_of(simple_pieces(), simple_pieces(), any_pieces))
    return {"pieces": shape, "indirect": draw(st.booleans()), "damage": draw(damage),
            "features": draw(st.sampled_from([FEATURES, FEATURES,
                                              int(VirtioFeature.VERSION_1)]))}


def build_plausible(spec: dict) -> tuple[SplitQueue, tuple[tuple[int, int], ...]]:
    rig = Rig(features=spec["features"])
    (rig.indirect if spec["indirect"] else rig.direct)(spec["pieces"])
    if spec["damage"] is not None:
        i, which, value = spec["damage"]
        gpa = (TABLE if spec["indirect"] and i else DESC_GPA) + 16 * i
        fields = list(DESC.unpack(rig.mem.read(gpa, 16)))
        fields[which] = value if which else BASE + value
        rig.mem.write(gpa, DESC.pack(*fields))
    rig.publish(0)
    return rig.vq, REGIONS


rings = st.one_of(plausible().map(lambda spec: ("plausible", spec)),
                  fuzz_rings().map(lambda ring: ("fuzz", ring)))


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rings)
def test_peek_simple_agrees_with_the_generic_pop(example: tuple[str, dict]) -> None:
    """On two copies of one ring: a chain peek_simple returns is what pop_batch(1) returns,
    piece for piece; a ring pop_batch breaks on, or a chain not in the simple shape, gives
    None -- and a simple chain the generic pop accepts is never declined."""
    kind, spec = example

    def build() -> tuple[SplitQueue, tuple[tuple[int, int], ...]]:
        if kind == "plausible":
            return build_plausible(spec)
        return build_fuzz(spec)[1], FUZZ_REGIONS

    peeked_vq, regions = build()
    popped_vq, _ = build()
    state = (peeked_vq.next_avail, bytes(peeked_vq._in_flight), peeked_vq.broken)
    chain = peeked_vq.peek_simple(130)
    assert (peeked_vq.next_avail, bytes(peeked_vq._in_flight), peeked_vq.broken) == state
    popped = popped_vq.pop_batch(1)
    event(f"{kind}: peek {'chain' if chain else 'None'}, pop "
          f"{'broken' if popped_vq.broken else len(popped)}")
    if chain is not None:
        assert not popped_vq.broken and len(popped) == 1
        assert popped[0].head == chain[CHAIN_HEAD]
        assert (popped[0].readable, popped[0].writable) == _pieces(chain)
        assert chain[CHAIN_DATA_LEN] == sum(n for _, n in chain[CHAIN_DATA])
        peeked_vq.claim(chain)
        assert (peeked_vq.next_avail, bytes(peeked_vq._in_flight)) == (
            popped_vq.next_avail, bytes(popped_vq._in_flight))
    else:
        assert popped_vq.broken or not popped or not _is_simple(popped[0], regions), (
            f"peek_simple declined a simple chain the generic pop accepts: {popped[0]}")


# ---------------------------------------------------------------------- the two walkers agree
@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rings, st.sampled_from([130, 4, 3]))
def test_the_simple_walker_takes_only_what_the_full_walk_accepts(example: tuple[str, dict],
                                                                 max_pieces: int) -> None:
    """Both pops try ``_simple`` first and walk with ``_walk`` only what it does not take; so
    ``_simple`` must never accept what ``_walk`` (which states every rule) refuses, nor give
    other pieces or another region.  (The test above cannot see that: it compares two pops that
    both take the chain through ``_simple``.)  Its None is not checked here -- the full walk
    then decides -- but the test above holds that a simple chain is still found."""
    kind, spec = example
    vq, _ = (build_plausible(spec) if kind == "plausible" else
             (build_fuzz(spec)[1], FUZZ_REGIONS))
    if not vq.has_avail():
        return
    head = vq._avail[2 + (vq.next_avail & vq._mask)]
    chain = vq._simple(head, max_pieces)
    event(f"{kind} max {max_pieces}: {'simple' if chain else 'None'}")
    if chain is None:
        return
    try:
        readable, writable, rlen, wlen, spread = vq._walk(head, max_pieces, "avail ring")
    except Exception as exc:  # any refusal of the full walk is the failure
        raise AssertionError(f"_simple took a chain the full walk refuses: {exc!r}") from exc
    assert (readable, writable) == _pieces(chain)
    _, _, hdr_len, _, data_len, into_guest, _, status_len, _, region = chain
    assert (rlen, wlen) == (hdr_len + (0 if into_guest else data_len),
                            status_len + (data_len if into_guest else 0))
    assert spread != 2 and (region is None) == bool(spread)
    if region is not None:
        assert all(region.gpa <= a and a + n <= region.gpa + region.size
                   for a, n in readable + writable)


EMPTY_PIECES = {
    "empty trailer": [(HDR, 16, False), (DATA, 512, True), (STATUS, 0, True)],
    "empty header": [(HDR, 0, False), (DATA, 512, False), (DATA + 512, 512, False),
                     (STATUS, 1, True)],
    "an empty run": [(HDR, 16, False), (DATA, 0, True), (DATA + 512, 512, True),
                     (STATUS, 1, True)],
    "only an empty run": [(HDR, 16, False), (DATA, 0, True), (STATUS, 1, True)],
}


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize("pieces", list(EMPTY_PIECES.values()), ids=list(EMPTY_PIECES))
def test_the_simple_walker_never_keeps_an_empty_piece(pieces: list[tuple[int, int, bool]],
                                                      indirect: bool) -> None:
    """The full walk drops zero-length descriptors, so a chain with one is not what it looks
    like by its descriptors: ``_simple`` leaves it to the full walk (None), or gives what that
    walk gives."""
    rig = Rig()
    (rig.indirect if indirect else rig.direct)(pieces)
    rig.publish(0)
    chain = rig.vq._simple(0, 130)
    readable, writable, *_ = rig.vq._walk(0, 130, "avail ring")
    assert chain is None or _pieces(chain) == (readable, writable)


# ---------------------------------------------------------------------- a pass of simple chains
class _PeekOnly:
    """A queue with peek_simple/claim and no simple_chains of its own (as a layout may be)."""

    def __init__(self, vq: SplitQueue) -> None:
        self.peek_simple = vq.peek_simple
        self.claim = vq.claim


def _two_chains() -> Rig:
    rig = Rig()
    rig.direct(READ_IN, head=0)
    rig.indirect(WRITE_OUT, head=3)
    rig.publish(0, 3)
    return rig


@pytest.mark.parametrize("own", [True, False], ids=["split's own", "built on peek_simple"])
def test_simple_chains_claims_each_chain_when_asked_for_the_next(own: bool) -> None:
    """The fast path's pass: chains in ring order, each claimed once the next is asked for
    (the consumer calls nothing else); stopping at one leaves it and those after untouched
    (not claimed, not skipped)."""
    rig = _two_chains()
    queue = rig.vq if own else _PeekOnly(rig.vq)
    heads = [chain[CHAIN_HEAD] for chain in simple_chains(queue, 130)]  # type: ignore[arg-type]
    assert heads == [0, 3] and rig.vq.next_avail == 2 and rig.vq.in_flight_count == 2
    assert rig.vq.pop_batch() == [], "a chain of the pass was popped again"

    rig = _two_chains()
    queue = rig.vq if own else _PeekOnly(rig.vq)
    before = rig.state()
    chains = simple_chains(queue, 130)  # type: ignore[arg-type]
    assert next(chains)[CHAIN_HEAD] == 0
    chains.close()  # declined: the first chain stays where it is
    assert rig.state() == before
    assert [c.head for c in rig.vq.pop_batch()] == [0, 3]

    rig = _two_chains()
    queue = rig.vq if own else _PeekOnly(rig.vq)
    chains = simple_chains(queue, 130)  # type: ignore[arg-type]
    assert next(chains)[CHAIN_HEAD] == 0
    assert next(chains)[CHAIN_HEAD] == 3  # the first kept, the second declined
    del chains
    assert rig.vq.next_avail == 1 and rig.vq.in_flight_count == 1
    assert [c.head for c in rig.vq.pop_batch()] == [3]
