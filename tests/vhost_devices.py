"""Small devices for driving the vhost library in tests (no disk involved)."""

from __future__ import annotations

import contextlib
import os
import queue
import threading

from guestmem import GuestMemory
from vhost.device import Device, QueueHandler
from vhost.queue.base import DescriptorChain


def _read_readable(memory: GuestMemory, chain: DescriptorChain) -> bytes:
    return b"".join(memory.read(a, n) for a, n in chain.readable)


def _write_writable(memory: GuestMemory, chain: DescriptorChain, data: bytes,
                    handler: QueueHandler | None = None) -> int:
    pos = 0
    for a, n in chain.writable:
        piece = data[pos : pos + n]
        if not piece:
            break
        memory.write(a, piece)
        dirty = handler.dirty if handler is not None else None
        if dirty is not None:  # live migration: the write is recorded after it is made
            dirty.record(a, len(piece))
        pos += len(piece)
    return pos


class _EchoBase(QueueHandler):
    """What the synchronous and the asynchronous echo handlers share: their device and queue.

    They are siblings, not parent and child: ``submit`` of one returns the bytes written, of
    the other None (completed later), and neither can stand in for the other.
    """

    def __init__(self, device: EchoDevice, index: int, memory: GuestMemory) -> None:
        self.device = device
        self.index = index
        self.memory = memory


class EchoHandler(_EchoBase):
    """Copies the readable bytes, upper-cased, into the writable pieces; synchronous."""

    def submit(self, chain: DescriptorChain) -> int:
        self.device.seen.append((self.index, chain))
        data = _read_readable(self.memory, chain).upper()
        return _write_writable(self.memory, chain, data, self)


class AsyncEchoHandler(_EchoBase):
    """Like EchoHandler but completes on timer threads after ``device.delay`` (in any order)."""

    completion_fd: int  # always set: completions come back through it

    def __init__(self, device: EchoDevice, index: int, memory: GuestMemory) -> None:
        super().__init__(device, index, memory)
        self.completion_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._done: queue.SimpleQueue[tuple[int, int, list[tuple[int, int]]]] = \
            queue.SimpleQueue()

    def submit(self, chain: DescriptorChain) -> None:
        self.device.seen.append((self.index, chain))
        threading.Timer(self.device.delay, self._complete, (chain,)).start()
        return None

    def _complete(self, chain: DescriptorChain) -> None:
        data = _read_readable(self.memory, chain).upper()
        used = _write_writable(self.memory, chain, data)
        written, left = [], used
        for a, n in chain.writable:  # recorded by reap(): markers belong to the queue's thread
            if left <= 0:
                break
            written.append((a, min(n, left)))
            left -= n
        self._done.put((chain.head, used, written))
        os.eventfd_write(self.completion_fd, 1)

    def reap(self) -> list[tuple[int, int]]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.completion_fd)
        out: list[tuple[int, int]] = []
        while True:
            try:
                head, used, written = self._done.get_nowait()
            except queue.Empty:
                return out
            if self.dirty is not None:
                self.dirty.record_ranges(written)
            out.append((head, used))

    def close(self) -> bool:
        os.close(self.completion_fd)
        return True


class EchoDevice(Device):
    """A made-up device with ``num_queues`` queues and a 16-byte config space."""

    logs_guest_writes = True

    def __init__(self, num_queues: int = 1, asynchronous: bool = False, delay: float = 0.01):
        self.num_queues = num_queues
        self.asynchronous = asynchronous
        self.delay = delay
        self.seen: list[tuple[int, DescriptorChain]] = []
        self.cfg = bytearray(b"ECHO-DEVICE-CFG!")
        self.acked = 0
        self.resets = 0

    def features(self) -> int:
        return 1 << 5

    def config(self) -> bytes:
        return bytes(self.cfg)

    def write_config(self, offset: int, data: bytes, flags: int) -> None:
        if offset + len(data) > 8:
            raise ValueError("only the first 8 config bytes are writable")
        self.cfg[offset : offset + len(data)] = data

    def set_features(self, features: int) -> None:
        self.acked = features

    def create_handler(self, queue_index: int, memory: GuestMemory) -> QueueHandler:
        cls = AsyncEchoHandler if self.asynchronous else EchoHandler
        return cls(self, queue_index, memory)

    def reset(self) -> None:
        self.resets += 1


def serve_echo(path: str, delay: float, num_queues: int = 1) -> None:
    """Serve an asynchronous EchoDevice on ``path`` until killed (crash-recovery tests)."""
    import logging

    from vhost.daemon import VhostUserDaemon

    logging.basicConfig(level=logging.INFO)
    daemon = VhostUserDaemon(EchoDevice(num_queues, asynchronous=True, delay=delay), path)
    daemon.serve_forever()
