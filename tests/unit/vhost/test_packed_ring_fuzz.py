"""Fuzzing the packed ring: the twin of :mod:`.test_ring_fuzz` for VIRTIO_F_RING_PACKED.

Hypothesis writes random descriptor rings -- addresses, lengths and ids biased to the edges,
every combination of NEXT/WRITE/INDIRECT and of the AVAIL/USED bits (wrap counter games) --
random indirect tables, and a random starting position (both wrap counters), into guest memory
made of bytearrays.  Whatever the driver wrote: :meth:`PackedQueue.pop_batch` never raises (a
violation is a QueueError in ``vq.error``), every piece it returns lies in guest memory, ids are
distinct and in range, the chains in flight never hold more slots than the ring;
:meth:`PackedQueue.peek_simple` never raises either, and a chain it finds is the one the
generic pop returns, piece for piece.  Derandomized: CI runs the same examples every time.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from guestmem import GuestMemory
from tests.unit.vhost.test_ring_fuzz import BASE, EDGES, REGIONS, SCRATCH, in_guest_memory
from vhost.messages import VirtioFeature
from vhost.queue.base import MAX_CHAIN_BYTES, QueueError, RingAddresses
from vhost.queue.packed import (
    DESC,
    DESC_SIZE,
    F_AVAIL,
    F_INDIRECT,
    F_NEXT,
    F_USED,
    F_WRITE,
    PackedQueue,
    decode_base,
    encode_base,
)

U64 = (1 << 64) - 1
inside = st.integers(BASE, BASE + 0x11000)
addresses = st.one_of(inside, inside, st.sampled_from(EDGES), st.integers(0, U64))
lengths = st.one_of(st.integers(0, 64), st.integers(0, 64),
                    st.sampled_from([0, 1, 15, 16, 17, 32, 48, 0x4000, 1 << 31, (1 << 32) - 1]),
                    st.integers(0, (1 << 32) - 1))
kinds = st.sampled_from([0, 0, F_WRITE, F_WRITE, F_NEXT, F_NEXT | F_WRITE, F_INDIRECT])
#: AVAIL/USED: mostly "available in the lap" (filled in per slot), else any of the four.
marks = st.one_of(st.none(), st.none(), st.none(), st.sampled_from([0, F_AVAIL, F_USED,
                                                                     F_AVAIL | F_USED]))


@st.composite
def rings(draw: st.DrawFn) -> dict:
    size = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    ids = st.one_of(st.integers(0, size - 1), st.integers(0, size - 1), st.integers(0, 0xFFFF))
    clean = st.tuples(st.integers(BASE + 0x1000, BASE + 0xBF00), st.integers(1, 64), ids,
                      st.sampled_from([0, F_WRITE, F_NEXT, F_NEXT | F_WRITE]), marks)
    wild = st.tuples(addresses, lengths, ids, st.one_of(kinds, kinds, st.integers(0, 0x7F)),
                     marks)
    avail = draw(st.integers(0, size - 1))
    # slots held by a previous backend (mostly none)
    used_back = draw(st.one_of(st.just(0), st.just(0), st.integers(0, size)))
    wrap = draw(st.integers(0, 1))
    kind = draw(st.integers(0, 2))
    if kind == 2:  # Linux's requests, 3 slots each from the avail position: the fast path's
        entries: list[tuple[int, int, int, int, int | None] | None] = [None] * size
        out = draw(st.booleans())
        for n in range(size // 3):
            buf_id = draw(st.one_of(st.just(n), st.just(n), ids))
            data, length = draw(st.integers(BASE + 0x1000, BASE + 0x7F00)), draw(st.integers(1, 64))
            chain = [(BASE + 0x1000 + 64 * n, 16, buf_id, F_NEXT, None),
                     (data, length, buf_id, F_NEXT | (0 if out else F_WRITE), None),
                     (BASE + 0x1010 + 64 * n, 1, buf_id, F_WRITE, draw(marks))]
            for k, entry in enumerate(chain):
                entries[(avail + 3 * n + k) % size] = entry
        ring = [e if e is not None else draw(wild) for e in entries]
    else:
        ring = draw(st.lists(clean if kind == 0 else wild, min_size=size, max_size=size))
    return {
        "size": size,
        "features": draw(st.sampled_from([0, int(VirtioFeature.RING_INDIRECT_DESC),
                                          int(VirtioFeature.RING_INDIRECT_DESC
                                              | VirtioFeature.RING_EVENT_IDX)])),
        "ring": ring,
        "avail": (avail, wrap),
        "used_back": used_back,
        "scratch": draw(st.lists(st.tuples(addresses, lengths, ids, kinds), max_size=8)),
        "noise": draw(st.binary(max_size=64)),
    }


def build(ring: dict) -> tuple[GuestMemory, PackedQueue]:
    size = ring["size"]
    buffers = [bytearray(n) for _, n in REGIONS]
    mem = GuestMemory()
    for (gpa, _), buf in zip(REGIONS, buffers, strict=True):
        mem.add_buffer(gpa, buf)
    main = buffers[0]
    desc, driver, device = BASE, BASE + 0x400, BASE + 0x800
    avail, wrap = ring["avail"]
    for i, (addr, length, buf_id, kind, mark) in enumerate(ring["ring"]):
        lap = wrap if i >= avail else wrap ^ 1  # slots before the avail position: next lap
        if mark is None:
            mark = F_AVAIL if lap else F_USED
        DESC.pack_into(main, desc - BASE + i * DESC_SIZE, addr, length, buf_id, kind | mark)
    scratch = b"".join(DESC.pack(*d) for d in ring["scratch"]) + ring["noise"]
    main[SCRATCH - BASE : SCRATCH - BASE + len(scratch)] = scratch
    used = avail - ring["used_back"]
    used_wrap = wrap
    if used < 0:
        used, used_wrap = used + size, wrap ^ 1
    vq = PackedQueue(mem, size, RingAddresses(desc, driver, device), ring["features"],
                     encode_base(avail, wrap, used, used_wrap))
    return mem, vq


def held(vq: PackedQueue) -> int:
    avail, avail_wrap, used, used_wrap = decode_base(vq.vring_base())
    return avail - used + (0 if avail_wrap == used_wrap else vq.size)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rings())
def test_packed_pop_survives_any_ring(ring: dict) -> None:
    mem, vq = build(ring)
    size = ring["size"]
    try:
        simple = vq.peek_simple(130)  # must not raise either
        chains = vq.pop_batch()
        event(f"chains popped: {min(len(chains), 3)}{'+' if len(chains) >= 3 else ''}")
        event("error: " + (re.sub(r"0x[0-9a-f]+|\d+", "N", str(vq.error))[:60]
                           if vq.error else "none"))
        event(f"peek_simple found one: {simple is not None}")
        assert len(chains) <= size
        if vq.error is not None:
            assert isinstance(vq.error, QueueError) and vq.broken
        else:
            assert not vq.broken
        assert len({c.head for c in chains}) == len(chains)
        assert 0 <= held(vq) <= size
        for chain in chains:
            assert 0 <= chain.head < size
            for gpa, length in chain.readable + chain.writable:
                assert length > 0
                assert in_guest_memory(gpa, length), f"piece {gpa:#x}+{length:#x} outside"
            assert chain.readable_len == sum(n for _, n in chain.readable)
            assert chain.writable_len == sum(n for _, n in chain.writable)
            assert chain.readable_len + chain.writable_len < MAX_CHAIN_BYTES
        if simple is not None:  # the fast path's view of the first chain is the generic one
            first = chains[0]
            head, hdr, hdr_len, data, _, into_guest, status, status_len, _, _ = simple
            assert head == first.head
            header = [(hdr, hdr_len)]
            trailer = [(status, status_len)]
            if into_guest:
                assert (first.readable, first.writable) == (header, data + trailer)
            else:
                assert (first.readable, first.writable) == (header + data, trailer)
        # Whatever was popped can be completed, and popping again never raises either.
        vq.add_used_many([(chain.head, 0) for chain in chains])
        vq.publish_used()
        assert vq.in_flight_count == 0
        again = vq.pop_batch()
        assert len(again) <= size
        assert 0 <= held(vq) <= size
    finally:
        vq.release()
        mem.close()
