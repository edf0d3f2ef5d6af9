"""Echo devices with controllable timing, for tests that need the worker at a known point.

:class:`GateDevice` holds the worker inside ``submit`` until the test opens the gate (to look at
the rings while the backend is draining them); :class:`ReverseDevice` keeps requests in flight and
completes each batch in reverse order (out-of-order completion, deterministically).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from typing import NoReturn

from guestmem import GuestMemory
from tests.unit.vhost.helpers import WAIT
from tests.vhost_devices import EchoDevice, EchoHandler
from vhost.device import QueueHandler
from vhost.queue.base import DescriptorChain


class GateHandler(EchoHandler):
    """An echo handler that waits in ``submit`` until its device's gate opens."""

    device: GateDevice

    def submit(self, chain: DescriptorChain) -> int:
        self.device.entered.set()
        if not self.device.gate.wait(WAIT):
            raise RuntimeError("the test never opened the gate")
        return super().submit(chain)


class GateDevice(EchoDevice):
    """Echo device whose handlers block in ``submit`` until :attr:`gate` is set."""

    def __init__(self, num_queues: int = 1) -> None:
        super().__init__(num_queues)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def create_handler(self, queue_index: int, memory: GuestMemory) -> QueueHandler:
        return GateHandler(self, queue_index, memory)


class ReverseHandler(EchoHandler):
    """Keeps every chain of a batch in flight and completes the batch in reverse order."""

    device: ReverseDevice
    completion_fd: int  # always set: completions come back through it

    def __init__(self, device: ReverseDevice, index: int, memory: GuestMemory) -> None:
        super().__init__(device, index, memory)
        self.completion_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._done: list[tuple[int, int]] = []

    def submit_batch(self, chains: Sequence[DescriptorChain]) -> list[tuple[int, int]]:
        for chain in reversed(chains):
            self._done.append((chain.head, EchoHandler.submit(self, chain)))
        self.device.seen_batches.append([c.head for c in chains])
        os.eventfd_write(self.completion_fd, 1)
        return []

    def submit(self, chain: DescriptorChain) -> NoReturn:  # pragma: no cover - batch path only
        raise AssertionError("the worker submits in batches")

    def reap(self) -> list[tuple[int, int]]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.completion_fd)
        done, self._done = self._done, []
        return done

    def close(self) -> bool:
        os.close(self.completion_fd)
        return True


class ReverseDevice(EchoDevice):
    def __init__(self, num_queues: int = 1) -> None:
        super().__init__(num_queues)
        self.seen_batches: list[list[int]] = []

    def create_handler(self, queue_index: int, memory: GuestMemory) -> QueueHandler:
        return ReverseHandler(self, queue_index, memory)


class ProcessEchoDevice(EchoDevice):
    """An echo device whose queues run in processes of their own (vhost.runner.pool), as a
    multi-queue disk's do: each queue process rebuilds it with :func:`rebuild_echo`."""

    queue_processes = True

    def process_recipe(self) -> tuple[str, dict[str, object], list[int]]:
        return "tests.unit.vhost.devices:rebuild_echo", {"num_queues": self.num_queues}, []


def rebuild_echo(kwargs: dict[str, object], fds: list[int]) -> EchoDevice:
    """In a queue process: the echo device :class:`ProcessEchoDevice` described."""
    num_queues = kwargs["num_queues"]
    assert isinstance(num_queues, int) and not fds
    return EchoDevice(num_queues)
