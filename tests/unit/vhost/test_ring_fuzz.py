"""Point 7: fuzzing the ring is one property test away.

Hypothesis writes random descriptor tables, indirect tables and avail entries (biased towards
the edges: sizes, region boundaries, huge lengths, every flag combination) into guest memory made
of bytearrays, then checks what :meth:`SplitQueue.pop_batch` promises whatever the driver wrote:
it never raises (a violation is recorded as a QueueError in ``vq.error``), every piece it returns
lies in guest memory, and it never returns more chains than the queue size.  Derandomized, so CI
runs the same 200 examples every time; to hunt for new failures locally, drop ``derandomize``.
"""

from __future__ import annotations

import re
import struct

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from guestmem import GuestMemory
from vhost.messages import VirtioFeature
from vhost.queue.base import MAX_CHAIN_BYTES, QueueError, RingAddresses
from vhost.queue.split import DESC, DESC_SIZE, SplitQueue

BASE = 0x10000
#: Two adjacent regions (a piece may span them) and one after a hole.
REGIONS = ((BASE, 0x8000), (BASE + 0x8000, 0x4000), (BASE + 0x10000, 0x1000))
SCRATCH = BASE + 0x2000  # random bytes here: indirect tables point into it
U64 = (1 << 64) - 1

EDGES = sorted({0, BASE - 1, BASE, SCRATCH, BASE + 0x7FF8, BASE + 0x8000 - 1, BASE + 0xBFFC,
                BASE + 0xC000, BASE + 0x10000, BASE + 0x10FFF, BASE + 0x11000, U64 - 7, U64})


def in_guest_memory(gpa: int, length: int) -> bool:
    """Model of "mapped": inside one region, or running through adjacent ones."""
    end = gpa + length
    pos = gpa
    for start, size in REGIONS:
        if start <= pos < start + size:
            pos = start + size
            if end <= pos:
                return True
    return False


inside = st.integers(BASE, BASE + 0x11000)  # mostly mapped (a hole at 0xC000..0x10000)
addresses = st.one_of(inside, inside, st.sampled_from(EDGES), st.integers(0, U64))
lengths = st.one_of(st.integers(0, 64), st.integers(0, 64),
                    st.sampled_from([0, 15, 16, 17, 24, 32, 48, 0x4000, 1 << 31, (1 << 32) - 1]),
                    st.integers(0, (1 << 32) - 1))
plain = st.sampled_from([0, 0, 2, 2, 1, 3])  # readable/writable, last or NEXT; no INDIRECT
flags = st.one_of(plain, plain, plain, st.integers(0, 7), st.integers(0, 0xFFFF))


@st.composite
def rings(draw: st.DrawFn) -> dict:
    """Mostly plausible rings, so the deep checks are reached: ``mode`` (drawn first) makes one
    example in eight have a wild avail.idx, one in eight one entry too many, the rest a valid
    number of entries; avail entries are mostly in range."""
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    nxt = st.one_of(st.integers(0, size - 1), st.integers(0, size - 1), st.integers(0, 0xFFFF))
    desc = st.tuples(addresses, lengths, flags, nxt)
    # One example in four has a clean table (buffers in memory, no indirect): chains get popped.
    clean = st.tuples(st.integers(BASE + 0x1000, BASE + 0xBF00), st.integers(1, 64), plain,
                      st.integers(0, size - 1))
    is_clean = draw(st.integers(0, 3)) == 0
    mode = draw(st.integers(0, 7))
    raw_ahead = draw(st.integers(0, 0xFFFF))
    ahead = raw_ahead if mode == 0 else size + 1 if mode == 1 else 1 + raw_ahead % size
    heads = draw(st.lists(st.integers(0, 0xFFFF), min_size=size, max_size=size))
    wild_heads = draw(st.integers(0, 7)) == 0
    return {
        "size": size,
        "features": draw(st.sampled_from([0, int(VirtioFeature.RING_INDIRECT_DESC),
                                          int(VirtioFeature.RING_INDIRECT_DESC
                                              | VirtioFeature.RING_EVENT_IDX)])),
        "table": draw(st.lists(clean if is_clean else desc, min_size=size, max_size=size)),
        "avail": heads if wild_heads else [h % size for h in heads],
        "next_avail": draw(st.one_of(st.just(0), st.integers(0xFFF0, 0xFFFF),
                                     st.integers(0, 0xFFFF))),
        "ahead": ahead,
        # Indirect tables: random descriptors, and raw noise, in the scratch area.
        "scratch": draw(st.lists(st.tuples(addresses, lengths, flags, st.integers(0, 9)),
                                 max_size=8)),
        "noise": draw(st.binary(max_size=64)),
    }


def build(ring: dict) -> tuple[GuestMemory, SplitQueue]:
    size = ring["size"]
    buffers = [bytearray(n) for _, n in REGIONS]
    mem = GuestMemory()
    for (gpa, _), buf in zip(REGIONS, buffers, strict=True):
        mem.add_buffer(gpa, buf)
    main = buffers[0]
    desc, avail, used = BASE, BASE + 0x400, BASE + 0x800
    for i, d in enumerate(ring["table"]):
        DESC.pack_into(main, desc - BASE + i * DESC_SIZE, *d)
    for i, head in enumerate(ring["avail"]):
        struct.pack_into("<H", main, avail - BASE + 4 + 2 * i, head)
    struct.pack_into("<H", main, avail - BASE + 2, (ring["next_avail"] + ring["ahead"]) & 0xFFFF)
    scratch = b"".join(DESC.pack(*d) for d in ring["scratch"]) + ring["noise"]
    main[SCRATCH - BASE : SCRATCH - BASE + len(scratch)] = scratch
    vq = SplitQueue(mem, size, RingAddresses(desc, avail, used), ring["features"],
                   ring["next_avail"])
    return mem, vq


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rings())
def test_pop_batch_survives_any_ring(ring: dict) -> None:
    mem, vq = build(ring)
    size = ring["size"]
    try:
        chains = vq.pop_batch()  # must not raise, whatever is in the ring
        # What the examples reached (see --hypothesis-show-statistics).
        event(f"chains popped: {min(len(chains), 3)}{'+' if len(chains) >= 3 else ''}")
        event("error: " + (re.sub(r"0x[0-9a-f]+|\d+", "N", str(vq.error))[:60]
                           if vq.error else "none"))
        assert len(chains) <= size
        if vq.error is not None:
            assert isinstance(vq.error, QueueError) and vq.broken
        else:
            assert not vq.broken
        assert len({c.head for c in chains}) == len(chains)
        for chain in chains:
            assert 0 <= chain.head < size
            for gpa, length in chain.readable + chain.writable:
                assert length > 0
                assert in_guest_memory(gpa, length), f"piece {gpa:#x}+{length:#x} outside"
            assert chain.readable_len == sum(n for _, n in chain.readable)
            assert chain.writable_len == sum(n for _, n in chain.writable)
            assert chain.readable_len + chain.writable_len < MAX_CHAIN_BYTES
        # Whatever was popped can be completed, and popping again never raises either.
        for chain in chains:
            vq.add_used(chain.head, 0)
        vq.publish_used()
        assert vq.in_flight_count == 0
        again = vq.pop_batch()
        assert len(again) <= size
    finally:
        vq.release()
        mem.close()
