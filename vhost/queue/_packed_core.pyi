"""Type stubs of the compiled record of a packed queue's pops (vhost/queue/_packed_core.pyx)."""

from vhost.queue.inflight_packed import PackedInflightQueue

def popped_many(tracker: PackedInflightQueue, ring: bytes, counts: list[int],
                out: list[int]) -> int: ...
