"""The cheapest plugin there is (no data kept; pread leaves the buffer as it is): what the
python driver itself costs per request (benchmarks.inprocess --blockdev ...,module=
tests.unit.plugins.trivial,class=Trivial)."""

from __future__ import annotations


class Trivial:
    thread_model = "parallel"

    def __init__(self, size: str = "268435456") -> None:
        self._size = int(size)

    def size(self) -> int:
        return self._size

    def pread(self, buf: memoryview, offset: int) -> None:
        pass

    def pwrite(self, buf: memoryview, offset: int) -> None:
        pass
