"""Driving a Storage's engines directly, the way a queue worker does: submit, end the batch,
sleep on the completion fd, reap."""

from __future__ import annotations

import itertools
import select
import time
from dataclasses import dataclass

from blockdev.engine import Engine, IoOp
from blockdev.ops import OpKind
from blockdev.storage import Storage
from guestmem import IoBuffer

TIMEOUT = 10.0


@dataclass
class Seg:
    """A discard / write-zeroes range, as the device's request parser makes them."""

    offset: int
    length: int
    unmap: bool = False


def end_batch(engine: Engine) -> None:
    """What the worker calls after a batch of submissions (batched engines hand it on)."""
    engine.submit_batch()


def run(engine: Engine, *ops: IoOp, timeout: float = TIMEOUT) -> list[IoOp]:
    """Submit ``ops`` and wait for all of them; each op's result is set on return."""
    waiting = {id(op) for op in ops if not engine.submit(op)}
    end_batch(engine)
    deadline = time.monotonic() + timeout
    while waiting:
        for op in engine.reap():
            waiting.discard(id(op))
        if not waiting:
            break
        left = deadline - time.monotonic()
        assert left > 0, f"{len(waiting)} ops never completed"
        fd = engine.completion_fd
        assert fd is not None
        select.select([fd], [], [], min(left, 0.05))
    return list(ops)


def read(engine: Engine, offset: int, length: int, pieces: int = 1) -> bytes | OSError:
    """Read through ``engine`` into ``pieces`` separate buffers (several: a bounce).  The
    buffers start as 0xA5 bytes, as guest memory holds stale data: zeros must be read."""
    size = length // pieces
    sizes = [size] * (pieces - 1) + [length - size * (pieces - 1)]
    bufs = [bytearray(b"\xa5" * n) for n in sizes]
    op = IoOp(OpKind.READ, offset, [IoBuffer(memoryview(b)) for b in bufs], length)
    run(engine, op)
    if isinstance(op.result, OSError):
        return op.result
    assert op.result == length
    return b"".join(bufs)


def write(engine: Engine, offset: int, data: bytes, pieces: int = 1) -> int | OSError | None:
    size = len(data) // pieces
    cuts = [i * size for i in range(pieces)] + [len(data)]
    bufs = [bytearray(data[a:b]) for a, b in itertools.pairwise(cuts)]
    op = IoOp(OpKind.WRITE, offset, [IoBuffer(memoryview(b)) for b in bufs], len(data))
    run(engine, op)
    return op.result


def ranged(engine: Engine, kind: OpKind, offset: int, length: int) -> int | OSError | None:
    op = IoOp(kind)
    op.segments = [Seg(offset, length)]
    run(engine, op)
    return op.result


def flush(engine: Engine) -> int | OSError | None:
    op = IoOp(OpKind.FLUSH)
    run(engine, op)
    return op.result


def engines(storage: Storage, n: int = 2) -> list[Engine]:
    return [storage.open_engine(i) for i in range(n)]
