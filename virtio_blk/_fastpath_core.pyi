"""Type stubs of the compiled fast path (virtio_blk/_fastpath_core.pyx)."""

from collections.abc import Callable

from blockdev.engine import IoOp
from vhost.queue.base import Queue
from virtio_blk.blk_request import BlkRequest
from virtio_blk.fastpath import FastPath as PyFastPath
from virtio_blk.fastpath import FastPathHost

def applicable(handler: FastPathHost, vq: Queue) -> str | None: ...

class FastPath:
    handler: FastPathHost
    vq: Queue
    python: PyFastPath
    taken: int
    result_hook: Callable[[IoOp], None] | None
    record: list[int] | None
    def __init__(self, handler: FastPathHost, vq: Queue) -> None: ...
    def drain(self, limit: int = ...) -> list[tuple[int, int]]: ...
    def complete(self, req: BlkRequest) -> int: ...
    def complete_reaped(self) -> list[tuple[int, int]]: ...
    def settings_changed(self) -> None: ...
