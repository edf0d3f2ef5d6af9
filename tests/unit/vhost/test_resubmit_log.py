"""The count of requests resubmitted after a restart is logged, once they are handed over.

The kill -9 e2e tests (tests/e2e/workloads.py) read this line to prove that a restart really
resubmitted something; here it is checked against what the queue actually handed back.
"""

from __future__ import annotations

import logging
import struct

import pytest

from guestmem import GuestMemory
from vhost.messages import VirtioFeature
from vhost.queue import inflight as inf
from vhost.queue.base import RingAddresses
from vhost.queue.split import SplitQueue

SIZE = 8
ADDRS = RingAddresses(0x1000, 0x2000, 0x3000)


def ring(heads: tuple[int, ...]) -> GuestMemory:
    mem = GuestMemory.from_buffer(bytearray(1 << 16))
    view = mem.view(0, 1 << 16)
    for head in range(SIZE):  # each head: one 16-byte writable buffer
        struct.pack_into("<QIHH", view, 0x1000 + 16 * head, 0x8000 + 16 * head, 16, 2, 0)
    avail = view[0x2000:].cast("H")
    for i, head in enumerate(heads):
        avail[2 + i] = head
    avail[1] = len(heads)
    return mem


def test_resubmitted_count_is_logged_after_the_heads_are_handed_over(
        caplog: pytest.LogCaptureFixture) -> None:
    mem = ring((3, 6, 1, 2))
    area = bytearray(inf.queue_stride(SIZE))
    first = SplitQueue(mem, SIZE, ADDRS, int(VirtioFeature.VERSION_1), 0, index=2,
                      inflight=inf.InflightQueue(memoryview(area), SIZE))
    first.pop_batch()
    first.add_used(6, 16)
    first.publish_used()  # 3, 1 and 2 are in flight when the backend "dies"
    caplog.set_level(logging.INFO, logger="vhost.queue.split")
    restarted = SplitQueue(mem, SIZE, ADDRS, int(VirtioFeature.VERSION_1), 1, index=2,
                          inflight=inf.InflightQueue(memoryview(area), SIZE))
    assert "resubmitted" not in caplog.text  # not before they are handed to the device
    assert [c.head for c in restarted.pop_batch()] == [3, 1, 2]
    assert caplog.text.count("queue 2: resubmitted 3 in-flight requests") == 1
    restarted.pop_batch()
    assert caplog.text.count("resubmitted") == 1


def test_nothing_in_flight_logs_no_resubmission(caplog: pytest.LogCaptureFixture) -> None:
    mem = ring((0, 1))
    area = bytearray(inf.queue_stride(SIZE))
    caplog.set_level(logging.INFO, logger="vhost.queue.split")
    vq = SplitQueue(mem, SIZE, ADDRS, int(VirtioFeature.VERSION_1), 0,
                   inflight=inf.InflightQueue(memoryview(area), SIZE))
    assert [c.head for c in vq.pop_batch()] == [0, 1]
    assert "resubmitted" not in caplog.text
