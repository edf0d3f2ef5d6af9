"""Point 5, ring half: every rule a hostile driver can break in the rings stops *that* queue.

Each test breaks one rule on queue 0 of a two-queue device and checks: the worker logs an error
naming the rule, the queue is marked broken, its err eventfd is signalled, nothing more is served
on it, queue 1 keeps serving, the driver can reset queue 0 and use it again, and a later
connection is served.  Valid edge cases next to each rule (a chain of exactly the queue size, one
of 2**32 - 1 bytes, a buffer spanning two adjacent regions) are checked to *work*.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.unit.vhost.helpers import (
    ODD_LAYOUT,
    WAIT,
    MiB,
    Session,
    all_features_but,
    assert_fresh_frontend_works,
    backend_vq,
    errors_logged,
    session,
    wait_err,
)
from tests.vhost_devices import EchoDevice
from vhost.messages import VirtioFeature
from vhost.queue.split import (
    DESC,
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from vhost_frontend import DriverQueue

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
SIZE = 8

Corrupt = Callable[[Session, DriverQueue], None]


def _indirect_table(s: Session, descs: list[tuple[int, int, int, int]]) -> int:
    """Write an indirect table of (addr, len, flags, next) entries; its guest address."""
    table = s.mem.alloc(DESC_SIZE * max(len(descs), 1))
    s.mem.write(table, b"".join(DESC.pack(*d) for d in descs))
    return table


def _publish(q: DriverQueue, head: int) -> None:
    q.publish(head)
    q.kick()


def check_violation(serve, caplog, corrupt: Corrupt, expect: str, *,
                    layout=((0, 4 * MiB, 0),), features: int | None = None,
                    completed_before_error: int = 0, before: Corrupt | None = None) -> None:
    """Break queue 0 with ``corrupt``; assert the queue (only) stops, with ``expect`` logged."""
    running = serve(EchoDevice(num_queues=2))
    with session(running.path, layout=layout) as s:
        s.start(features=features)
        bad, good = s.queue(0, SIZE), s.queue(1, SIZE)
        s.echo(bad)  # it worked before
        if before is not None:
            before(s, bad)
        used = bad.used_idx()
        corrupt(s, bad)
        wait_err(bad)
        vq = backend_vq(running, 0)
        assert vq is not None and vq.broken
        assert expect in str(vq.error), f"{expect!r} not in {vq.error}"
        assert errors_logged(caplog, "queue 0 stopped"), "the worker logged no error"
        assert errors_logged(caplog, expect), f"no error log line mentions {expect!r}"
        # The other queue never noticed.
        s.echo(good)
        assert not backend_vq(running, 1).broken
        # Nothing after the violation is served on the broken queue, even a valid request.
        src, dst = s.mem.alloc(4), s.mem.alloc(4)
        bad.free = list(range(SIZE))  # the driver's bookkeeping is moot on a broken queue
        bad.add_chain([(src, 4, False), (dst, 4, True)])
        bad.kick()
        s.echo(good)
        s.fe.get_vring_base(0)  # joins the worker
        assert bad.used_idx() == (used + completed_before_error) & 0xFFFF
        assert running.daemon.handler.vrings[0].broken
        # A driver reset of the queue (fresh rings, SET_VRING_ADDR) brings it back.
        s.fe.queues.pop(0).close()
        s.echo(s.queue(0, SIZE))
        s.echo(good)
    assert_fresh_frontend_works(running, num_queues=2)


# ---------------------------------------------------------------------------- avail ring


def test_avail_idx_more_than_queue_size_ahead(serve, caplog) -> None:
    def corrupt(s: Session, q: DriverQueue) -> None:
        q.set_avail_idx(q.avail_idx + SIZE + 1)
        q.kick()

    check_violation(serve, caplog, corrupt, "more than the queue size")


def test_avail_idx_exactly_queue_size_ahead_is_valid(serve, open_session) -> None:
    running = serve(EchoDevice())
    s = open_session(running).start()
    q = s.queue(0, SIZE)
    for _ in range(SIZE):
        src, dst = s.mem.alloc(1), s.mem.alloc(1)
        q.add_chain([(src, 1, False)] if len(q.free) == 1 else [(src, 1, False), (dst, 1, True)],
                    indirect=True)
    q.kick()
    assert len(q.wait_used(SIZE, WAIT)) == SIZE


def test_head_out_of_range(serve, caplog) -> None:
    check_violation(serve, caplog, lambda s, q: _publish(q, SIZE), f">= queue size {SIZE}")


def test_head_made_available_twice(serve, caplog) -> None:
    """A head published again while in flight; the chain popped before it is still completed."""
    def corrupt(s: Session, q: DriverQueue) -> None:
        src, dst = s.mem.alloc(4), s.mem.alloc(4)
        head = q.add_chain([(src, 4, False), (dst, 4, True)])
        _publish(q, head)

    check_violation(serve, caplog, corrupt, "made available again",
                    completed_before_error=1)


# ---------------------------------------------------------------------------- descriptor table


def test_next_out_of_range(serve, caplog) -> None:
    def corrupt(s: Session, q: DriverQueue) -> None:
        q.write_desc(0, s.mem.alloc(4), 4, NEXT, SIZE)
        _publish(q, 0)

    check_violation(serve, caplog, corrupt, f"next {SIZE} >= table size {SIZE}")


def test_descriptor_loop_is_capped_at_queue_size(serve, caplog) -> None:
    def corrupt(s: Session, q: DriverQueue) -> None:
        buf = s.mem.alloc(4)
        q.write_desc(0, buf, 4, NEXT, 1)
        q.write_desc(1, buf, 4, NEXT, 2)
        q.write_desc(2, buf, 4, NEXT, 0)
        _publish(q, 1)

    check_violation(serve, caplog, corrupt, f"loops (more than {SIZE} descriptors)")


def test_chain_of_exactly_queue_size_descriptors_is_valid(serve, open_session) -> None:
    running = serve(EchoDevice())
    s = open_session(running).start()
    q = s.queue(0, SIZE)
    src, dst = s.mem.alloc(SIZE), s.mem.alloc(SIZE)
    s.mem.write(src, b"abcdefgh")
    pieces = [(src + i, 1, False) for i in range(SIZE // 2)]
    pieces += [(dst + i, 1, True) for i in range(SIZE // 2)]
    head = s.fe.submit(q, pieces)
    assert q.wait_used(1, WAIT) == [(head, SIZE // 2)]
    assert s.mem.read(dst, SIZE // 2) == b"ABCD"


def test_indirect_loop_is_capped_at_the_table_length(serve, caplog) -> None:
    def corrupt(s: Session, q: DriverQueue) -> None:
        buf = s.mem.alloc(4)
        table = _indirect_table(s, [(buf, 4, NEXT, 1), (buf, 4, NEXT, 2), (buf, 4, NEXT, 1)])
        q.write_desc(0, table, 3 * DESC_SIZE, INDIRECT)
        _publish(q, 0)

    check_violation(serve, caplog, corrupt, "loops (more than 3 descriptors)")


def test_indirect_table_longer_than_the_queue_is_valid(serve, open_session) -> None:
    """An indirect table may hold more descriptors than the queue size."""
    running = serve(EchoDevice())
    s = open_session(running).start()
    q = s.queue(0, SIZE)
    n = 3 * SIZE
    src, dst = s.mem.alloc(n), s.mem.alloc(n)
    s.mem.write(src, bytes(range(97, 97 + n)))
    pieces = [(src + i, 1, False) for i in range(n)] + [(dst, n, True)]
    head = s.fe.submit(q, pieces, indirect=True)
    assert q.wait_used(1, WAIT) == [(head, n)]
    assert s.mem.read(dst, n) == bytes(range(97, 97 + n)).upper()


BIG = 1 << 32  # a 2 GiB region up there holds the huge buffers (sparse memfd: costs nothing)
BIG_LAYOUT = ((0, 4 * MiB, 0), (BIG, 2 << 30, 0))


def _huge_chain(q: DriverQueue, lengths: list[int]) -> None:
    for i, length in enumerate(lengths):
        last = i + 1 == len(lengths)
        q.write_desc(i, BIG, length, WRITE | (0 if last else NEXT), i + 1)
    _publish(q, 0)


def test_chain_of_2_pow_32_bytes(serve, caplog) -> None:
    def almost(s: Session, q: DriverQueue) -> None:
        # 2**32 - 1 bytes in two descriptors is still a valid chain.
        _huge_chain(q, [1 << 31, (1 << 31) - 1])
        assert q.wait_used(1, WAIT) == [(0, 0)]

    check_violation(serve, caplog, lambda s, q: _huge_chain(q, [1 << 31, 1 << 31]),
                    "2**32 bytes or longer", layout=BIG_LAYOUT, before=almost)


# ---------------------------------------------------------------------------- indirect descriptors


@pytest.mark.parametrize("length", [0, 24, 8], ids=["empty", "1.5-descriptors", "half"])
def test_indirect_table_length_invalid(serve, caplog, length) -> None:
    def corrupt(s: Session, q: DriverQueue) -> None:
        q.write_desc(0, s.mem.alloc(32), length, INDIRECT)
        _publish(q, 0)

    check_violation(serve, caplog, corrupt, f"indirect table of {length} bytes")


def test_nested_indirect(serve, caplog) -> None:
    def corrupt(s: Session, q: DriverQueue) -> None:
        inner = _indirect_table(s, [(s.mem.alloc(4), 4, 0, 0)])
        outer = _indirect_table(s, [(inner, DESC_SIZE, INDIRECT, 0)])
        q.write_desc(0, outer, DESC_SIZE, INDIRECT)
        _publish(q, 0)

    check_violation(serve, caplog, corrupt, "nested indirect")


def test_indirect_with_next(serve, caplog) -> None:
    def corrupt(s: Session, q: DriverQueue) -> None:
        table = _indirect_table(s, [(s.mem.alloc(4), 4, 0, 0)])
        q.write_desc(0, table, DESC_SIZE, INDIRECT | NEXT, 1)
        q.write_desc(1, s.mem.alloc(4), 4, WRITE)
        _publish(q, 0)

    check_violation(serve, caplog, corrupt, "indirect descriptor with NEXT")


def test_indirect_without_the_feature(serve, caplog) -> None:
    def corrupt(s: Session, q: DriverQueue) -> None:
        table = _indirect_table(s, [(s.mem.alloc(4), 4, 0, 0)])
        q.write_desc(0, table, DESC_SIZE, INDIRECT)
        _publish(q, 0)

    check_violation(serve, caplog, corrupt, "without VIRTIO_RING_F_INDIRECT_DESC",
                    features=all_features_but(VirtioFeature.RING_INDIRECT_DESC))


def test_indirect_table_outside_guest_memory(serve, caplog) -> None:
    def corrupt(s: Session, q: DriverQueue) -> None:
        q.write_desc(0, 64 * MiB, 2 * DESC_SIZE, INDIRECT)
        _publish(q, 0)

    check_violation(serve, caplog, corrupt, "indirect table 0x4000000+0x20")


# ---------------------------------------------------------------------------- buffer rules


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize("zero_length", [False, True], ids=["sized", "zero-length"])
def test_readable_after_writable(serve, caplog, indirect, zero_length) -> None:
    def corrupt(s: Session, q: DriverQueue) -> None:
        buf = s.mem.alloc(8)
        descs = [(buf, 4, WRITE | NEXT, 1), (buf + 4, 0 if zero_length else 4, 0, 0)]
        if indirect:
            q.write_desc(0, _indirect_table(s, descs), 2 * DESC_SIZE, INDIRECT)
        else:
            for i, d in enumerate(descs):
                q.write_desc(i, *d)
        _publish(q, 0)

    check_violation(serve, caplog, corrupt, "readable descriptor after writable")


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (ODD_LAYOUT[1][0] + MiB - 8, 16),  # runs off the end of region 1 into the hole
        (4 * MiB, 16),  # inside the hole
        (ODD_LAYOUT[2][0] + MiB - 1, 2),  # runs off the end of the last region
        (16 * MiB, 1),  # past everything
        ((1 << 64) - 8, 16),  # wraps the address space
    ],
    ids=["into-hole", "in-hole", "off-the-end", "past-the-end", "wraps"],
)
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_buffer_not_inside_guest_memory(serve, caplog, gpa, length, indirect) -> None:
    def valid_spanning(s: Session, q: DriverQueue) -> None:
        # Spanning two *adjacent* regions is fine (the counterpart of the violation).
        boundary = ODD_LAYOUT[1][0]
        s.mem.write(boundary - 4, b"spanning")
        head = s.fe.submit(q, [(boundary - 4, 8, False), (boundary + 64, 8, True)], indirect)
        assert q.wait_used(1, WAIT) == [(head, 8)]
        assert s.mem.read(boundary + 64, 8) == b"SPANNING"

    def corrupt(s: Session, q: DriverQueue) -> None:
        src = s.mem.alloc(4)
        descs = [(src, 4, NEXT, 1), (gpa, length, WRITE, 0)]
        if indirect:
            q.write_desc(0, _indirect_table(s, descs), 2 * DESC_SIZE, INDIRECT)
        else:
            for i, d in enumerate(descs):
                q.write_desc(i, *d)
        _publish(q, 0)

    check_violation(serve, caplog, corrupt, f"buffer {gpa:#x}+{length:#x} is not in guest memory",
                    layout=ODD_LAYOUT, before=valid_spanning)
