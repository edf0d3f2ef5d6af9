"""Type stubs of the compiled used side and in-flight records of a packed queue
(vhost/queue/_packed_core.pyx)."""

from vhost.queue.inflight_packed import PackedInflightQueue
from vhost.queue.packed import PackedQueue

def popped_many(tracker: PackedInflightQueue, ring: bytes, counts: list[int],
                out: list[int]) -> int: ...
def add_used_many(queue: PackedQueue, done: list[tuple[int, int]]) -> int: ...
def write_used(queue: PackedQueue,
               pending: list[tuple[int, int, int]]) -> tuple[int, int, int, int] | None: ...
