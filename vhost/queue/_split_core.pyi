"""Type stubs of the compiled used side of a split queue (vhost/queue/_split_core.pyx)."""

from vhost.queue.inflight import InflightQueue
from vhost.queue.split import SplitQueue

def add_used_many(queue: SplitQueue, done: list[tuple[int, int]]) -> int: ...
def popped_many(inflight: InflightQueue, heads: list[int]) -> int: ...
