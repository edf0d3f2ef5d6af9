"""The backend's side of the vhost-user protocol, without sockets: (message, fds) -> reply.

:class:`BackendHandler` holds one connection's state (features, memory table, per-queue vring
state) and turns each decoded message into a reply.  It never reads or writes a socket, so every
transition is a unit test; :mod:`vhost.connection` frames bytes and fds around it.  The only side
effects it has are the ones the protocol is about: mapping memory and starting/stopping queue
workers (through an injectable factory, so tests can watch them).

Error policy (the frontend is trusted no more than the guest):
* a message that breaks a rule is *refused*: logged, and answered with a failure ack when the
  frontend asked for one (REPLY_ACK); GET_CONFIG answers with an empty payload as the spec says;
* a request whose own reply cannot be produced (GET_VRING_BASE of a bad index, say) ends the
  connection: sending a wrong reply would desynchronise the frontend;
* fds are owned by the caller: a handler that keeps one removes it from the list, the caller
  closes the rest -- so a refused or unexpected fd is never leaked;
* an fd's kind (an eventfd, a file we can map, a socket) and the range to map in it are checked
  when its message arrives (:mod:`vhost.fdkinds`), so a wrong one is refused there and never
  fails later in a worker or a queue process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from guestmem import AccessError
from guestmem.dirty_log import DirtyLog, DirtyLogError
from vhost.backend_channel import BackendChannel, BackendChannelError
from vhost.device import RING_FEATURES, Device, QueueHandler
from vhost.dirty_logging import DirtyLogging
from vhost.fdkinds import FdKindError, check_mappable, take_eventfd
from vhost.memory import MemoryTable, MemoryTableError
from vhost.messages import (
    MAX_CONFIG_SIZE,
    MAX_MEM_SLOTS,
    VHOST_F_LOG_ALL,
    VRING_ADDR_F_LOG,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    Message,
    MessageSpec,
    ProtocolError,
    ProtocolFeature,
    Request,
    VirtioFeature,
    decode,
    encode_reply,
    spec_of,
    u64,
    vring_state,
)
from vhost.messages import (
    inflight as inflight_payload,
)
from vhost.queue.base import Queue, QueueError, RingAddresses
from vhost.queue.factory import (
    check_alignment,
    inflight_tracker,
    is_packed,
    open_queue,
    ring_sizes,
)
from vhost.queue.inflight import InflightArea, InflightError, create_area
from vhost.queue.inflight_packed import PackedInflightQueue
from vhost.queue.packed import decode_base
from vhost.queue.split import validate_size
from vhost.runner.pool import QueueProcessError, QueueProcesses
from vhost.runner.thread import Notifier, QueueWorker

log = logging.getLogger(__name__)

#: Protocol features the library implements (a device may add more).
LIBRARY_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIG
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.STATUS
    | ProtocolFeature.INFLIGHT_SHMFD
    | ProtocolFeature.BACKEND_REQ
)

#: Makes the worker of a starting queue (tests substitute one that records or delays).
WorkerFactory = Callable[[Queue, QueueHandler, int, Notifier, Notifier], QueueWorker]


class Refused(Exception):
    """The message is refused (logged; a failure ack if one was asked for)."""


@dataclass
class HandlerResult:
    """What the connection must do after a message."""

    reply: bytes | None = None
    #: fds to send with the reply; the connection closes them once sent.
    reply_fds: list[int] = field(default_factory=list)
    disconnect: bool = False


@dataclass
class Vring:
    """Everything the frontend told us about one queue, and its worker when it runs."""

    index: int
    size: int = 0
    ring_uaddrs: tuple[int, int, int] | None = None  # desc, avail, used (frontend addresses)
    log_addr: int | None = None  # guest address the used ring is logged at (VHOST_VRING_F_LOG)
    base: int = 0  # next avail index to use when the queue starts
    kick_fd: int | None = None
    call: Notifier = field(default_factory=Notifier)
    err: Notifier = field(default_factory=Notifier)
    enabled: bool = False
    broken: bool = False
    worker: QueueWorker | None = None
    queue_handler: QueueHandler | None = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def close_fds(self) -> None:
        if self.kick_fd is not None:
            os.close(self.kick_fd)
            self.kick_fd = None
        self.call.close()
        self.err.close()


class BackendHandler:
    """Protocol state of one frontend connection."""

    def __init__(self, device: Device, worker_factory: WorkerFactory = QueueWorker) -> None:
        self.device = device
        self.worker_factory = worker_factory
        self.memory = MemoryTable(MAX_MEM_SLOTS)
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.offered_features = int(device.features()) | int(RING_FEATURES) | int(
            VirtioFeature.PROTOCOL_FEATURES
        )
        self.offered_protocol = LIBRARY_PROTOCOL_FEATURES | device.protocol_features()
        #: Queues served in processes of their own (vhost.runner.pool), or None: threads here.
        self.processes: QueueProcesses | None = None
        wanted = device.queue_processes
        if wanted or (wanted is None and device.num_queues > 1):
            self.processes = QueueProcesses(device)
        # Live migration (see vhost.dirty_logging; queue processes get the log forwarded).
        if device.logs_guest_writes:
            self.offered_features |= VHOST_F_LOG_ALL
            self.offered_protocol |= ProtocolFeature.LOG_SHMFD
        self.acked_features = 0
        self.acked_protocol = ProtocolFeature(0)
        self.owner = False
        self.status = 0
        #: Written by the control thread only; other threads may send on it (it locks).
        self.backend_channel: BackendChannel | None = None
        self.inflight: InflightArea | None = None
        self.refused = 0
        self.dirty_logging = DirtyLogging()

    # ------------------------------------------------------------------ entry point
    def handle(self, message: Message, fds: list[int]) -> HandlerResult:
        """Process one message; ``fds`` it keeps are removed from the list, the rest are the
        caller's to close."""
        try:
            spec = decode(message, len(fds))
        except ProtocolError as exc:
            return self._refuse(message, spec_of(message.request), str(exc))
        method = getattr(self, "_on_" + Request(message.request).name.lower())
        try:
            payload = method(message, fds)
        except (Refused, MemoryTableError, QueueError, FdKindError) as exc:
            return self._refuse(message, spec, str(exc))
        if isinstance(payload, HandlerResult):  # a reply that carries fds
            return payload
        if spec.reply:
            return HandlerResult(reply=encode_reply(message.request, payload or b""))
        return self._ack(message, 0)

    def _ack(self, message: Message, status: int) -> HandlerResult:
        if message.need_reply and self.acked_protocol & ProtocolFeature.REPLY_ACK:
            return HandlerResult(reply=encode_reply(message.request, u64(status)))
        return HandlerResult()

    def _refuse(self, message: Message, spec: MessageSpec | None, why: str) -> HandlerResult:
        self.refused += 1
        log.warning("refused %s: %s", message.name, why)
        if message.request == Request.GET_CONFIG:
            return HandlerResult(reply=encode_reply(message.request, b""))
        if spec is not None and spec.reply:
            return HandlerResult(disconnect=True)
        return self._ack(message, 1)

    # ------------------------------------------------------------------ helpers
    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise Refused(f"queue index {index} >= {len(self.vrings)} queues")
        return self.vrings[index]

    def _vring_fd(self, message: Message, fds: list[int]) -> tuple[Vring, int | None]:
        value = message.fields.value
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise Refused(f"unknown bits in {value:#x}")
        vring = self._vring(value & VRING_IDX_MASK)
        nofd = bool(value & VRING_NOFD_MASK)
        if nofd == bool(fds):
            raise Refused(f"{'no-fd flag set with' if nofd else 'no fd and no no-fd flag, got'} "
                          f"{len(fds)} fds")
        if nofd:
            return vring, None
        # Kick, call and err fds are eventfds: a worker watches the kick fd with epoll (which
        # refuses a regular file) and writes counts to the others, never blocking on them.
        take_eventfd(fds[0], f"queue {vring.index} {message.name.removeprefix('SET_VRING_')}")
        return vring, fds.pop()

    def _protocol_features_on(self) -> bool:
        return bool(self.acked_features & VirtioFeature.PROTOCOL_FEATURES)

    def _start_if_ready(self, vring: Vring) -> None:
        if vring.running or vring.broken:
            return
        if vring.kick_fd is None or not vring.enabled:
            return
        if not vring.size or vring.ring_uaddrs is None or not len(self.memory):
            log.warning("queue %d kicked before size, addresses and memory were set", vring.index)
            return
        mem = self.memory
        if self.processes is not None:
            self._start_process(vring)
            return
        try:
            addrs = RingAddresses(*(
                mem.uva_to_gpa(addr, length)
                for addr, length in zip(vring.ring_uaddrs,
                                        ring_sizes(vring.size, is_packed(self.acked_features)),
                                        strict=True)
            ))
            tracker = (inflight_tracker(self.inflight, vring.index, vring.size)
                       if self.inflight is not None else None)
            vq = open_queue(mem.guest, vring.size, addrs, self.acked_features, vring.base,
                            vring.index, tracker)
        except (QueueError, MemoryTableError, InflightError) as exc:
            raise self._cannot_start(vring, exc) from exc
        try:
            handler = self.device.create_handler(vring.index, mem.guest)
        except Exception as exc:  # e.g. no io_uring or threads left: this queue cannot run
            log.exception("queue %d: the device could not set up its handler", vring.index)
            vq.release()
            raise self._cannot_start(vring, exc) from exc
        worker = self.worker_factory(vq, handler, vring.kick_fd, vring.call, vring.err)
        vring.queue_handler = handler
        vring.worker = worker
        self.dirty_logging.queue_starting(vring, self.acked_features)
        worker.start()
        log.info("queue %d started: size %d, %s ring, avail from %s%s", vring.index, vring.size,
                 vq.layout, self._base_text(vq.vring_base()), ", event idx" if vq.event_idx else "")

    def _start_process(self, vring: Vring) -> None:
        """Start ``vring`` in a queue process (which validates the ring as a thread would)."""
        assert self.processes is not None and vring.ring_uaddrs is not None
        assert vring.kick_fd is not None
        try:
            addrs = tuple(
                self.memory.uva_to_gpa(addr, length)
                for addr, length in zip(vring.ring_uaddrs,
                                        ring_sizes(vring.size, is_packed(self.acked_features)),
                                        strict=True)
            )
            check_alignment(RingAddresses(*addrs), is_packed(self.acked_features))
            self._check_inflight_region(vring, addrs[0], addrs[2])
            worker = self.processes.start(vring.index, vring.size, (addrs[0], addrs[1], addrs[2]),
                                          self.acked_features, vring.base, vring.kick_fd,
                                          vring.call, vring.err, vring.log_addr)
        except (QueueError, MemoryTableError, QueueProcessError, InflightError, OSError) as exc:
            raise self._cannot_start(vring, exc) from exc
        vring.worker = worker  # type: ignore[assignment]  # a QueueWorker look-alike
        log.info("queue %d started in a process: size %d, avail from %s", vring.index,
                 vring.size, self._base_text(vring.base))

    def _check_inflight_region(self, vring: Vring, desc_gpa: int, used_gpa: int) -> None:
        """Validate ``vring``'s in-flight region here, before a queue process is spawned for it.

        The process would refuse a bad region too, but only after its start-up (a fraction of a
        second) and from another process; checking here refuses the start with one log line.
        InflightError or MemoryTableError if it cannot be used.
        """
        if self.inflight is None:
            return
        if self.inflight.packed:
            packed = inflight_tracker(self.inflight, vring.index, vring.size)
            assert isinstance(packed, PackedInflightQueue)
            guest = self.memory.guest

            def ring_flags(slot: int) -> int:
                return int.from_bytes(guest.read(desc_gpa + 16 * slot + 14, 2), "little")

            try:
                packed.plan(ring_flags)
            except AccessError as exc:
                raise MemoryTableError(f"descriptor ring at {desc_gpa:#x}: {exc}") from exc
            finally:
                packed.release()
            return
        try:
            used_idx = int.from_bytes(self.memory.guest.read(used_gpa + 2, 2), "little")
        except AccessError as exc:
            raise MemoryTableError(f"used ring at {used_gpa:#x}: {exc}") from exc
        tracker = self.inflight.queue(vring.index, vring.size)
        try:
            tracker.check(used_idx)
        finally:
            tracker.release()

    def _base_text(self, base: int) -> str:
        """A vring base for a log line: the split ring's avail index, or the packed ring's
        positions and wrap counters (avail/wrap, used/wrap)."""
        if not is_packed(self.acked_features):
            return str(base)
        avail, avail_wrap, used, used_wrap = decode_base(base)
        return f"{avail}/{avail_wrap} (used {used}/{used_wrap})"

    @staticmethod
    def _cannot_start(vring: Vring, exc: Exception) -> Refused:
        """Mark ``vring`` broken, tell the driver through its err eventfd; the refusal to raise."""
        vring.broken = True
        vring.err.signal()
        return Refused(f"queue {vring.index} cannot start: {exc}")

    def _stop(self, vring: Vring) -> bool:
        """Stop ``vring``'s worker; True if it was marking the dirty log."""
        worker = vring.worker
        if worker is None:
            return False
        if not worker.stop():
            log.error("queue %d: in-flight requests did not finish", vring.index)
        vq = worker.vq
        vring.base = vq.vring_base()
        if vq.broken:
            vring.broken = True
        logging_ = self.dirty_logging.queue_stopped(vring)  # (keeps the log if it still runs)
        if worker.alive:  # its thread may still use its ring, its engine and guest memory
            self.memory.pin(f"queue {vring.index}'s worker thread did not stop")
        else:
            vq.release()
            if vring.queue_handler is not None and not vring.queue_handler.close():
                self.memory.pin(f"queue {vring.index} has disk IO that did not finish")
        vring.queue_handler = None
        vring.worker = None
        if self.processes is not None:
            self.processes.stopped(vring.index)
        log.info("queue %d stopped at avail %s (%d kicks, %d batches, %d completions, %d calls)",
                 vring.index, self._base_text(vring.base), worker.kicks, worker.batches,
                 worker.completed, vring.call.count)
        return logging_

    def _stop_and_flush_if_last_logged(self, vring: Vring) -> None:
        """Stop ``vring`` (GET_VRING_BASE, or SET_VRING_ENABLE 0: QEMU 7.2's vhost_dev_stop
        disables the rings before it asks for their bases); if it was the last queue marking
        the dirty log, the source VM stopped: the end of a migration."""
        if self._stop(vring) and not any(v.running for v in self.vrings):
            self.dirty_logging.make_durable_at_stop(self.device)

    def stop_all(self) -> None:
        for vring in self.vrings:
            self._stop(vring)

    def _close_vrings(self) -> None:
        self.stop_all()
        for vring in self.vrings:
            vring.close_fds()

    def close(self) -> None:
        """End of the connection: stop the queues, close every fd, unmap guest memory."""
        self._close_vrings()
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        if self.processes is not None:
            self.processes.close()
        self.dirty_logging.close(self.vrings)
        self.memory.close()
        self.device.reset()

    def _reset_vrings(self) -> None:
        self._close_vrings()
        self.vrings = [Vring(i) for i in range(self.device.num_queues)]

    # ------------------------------------------------------------------ features
    def _on_get_features(self, message: Message, fds: list[int]) -> bytes:
        return u64(self.offered_features)

    def _on_set_features(self, message: Message, fds: list[int]) -> None:
        features = message.fields.value
        unknown = features & ~self.offered_features
        if unknown:
            raise Refused(f"features {unknown:#x} were never offered")
        if (features ^ self.acked_features) & VirtioFeature.RING_PACKED and any(
                v.running for v in self.vrings):
            # The running queues' rings are laid out as negotiated when they started.
            raise Refused("VIRTIO_F_RING_PACKED changed while queues run")
        self.acked_features = features
        self.device.set_features(features & ~int(VirtioFeature.PROTOCOL_FEATURES))
        if self.processes is not None:
            self.processes.device_changed()
            self.processes.set_features(self.acked_features)  # VHOST_F_LOG_ALL, say
        if not self._protocol_features_on():
            # Without protocol features a ring is enabled as soon as it starts.
            for vring in self.vrings:
                vring.enabled = True
        # QEMU toggles VHOST_F_LOG_ALL with the queues running (migration start, end, cancel)
        # and waits for this message to be processed before it copies memory.
        self.dirty_logging.update(self.vrings, self.acked_features)

    def _on_get_protocol_features(self, message: Message, fds: list[int]) -> bytes:
        return u64(int(self.offered_protocol))

    def _on_set_protocol_features(self, message: Message, fds: list[int]) -> None:
        features = message.fields.value
        unknown = features & ~int(self.offered_protocol)
        if unknown:
            raise Refused(f"protocol features {unknown:#x} were never offered")
        self.acked_protocol = ProtocolFeature(features)

    def _on_set_owner(self, message: Message, fds: list[int]) -> None:
        self.owner = True

    def _on_reset_owner(self, message: Message, fds: list[int]) -> None:
        # Deprecated; the spec recommends treating it as "disable all rings".
        self.stop_all()
        for vring in self.vrings:
            vring.enabled = False

    def _on_get_queue_num(self, message: Message, fds: list[int]) -> bytes:
        return u64(len(self.vrings))

    def _on_set_status(self, message: Message, fds: list[int]) -> None:
        # QEMU 7.2 writes 0 before it stops the rings with GET_VRING_BASE, so status is only
        # recorded: the rings follow their own messages.
        self.status = message.fields.value & 0xFF

    def _on_get_status(self, message: Message, fds: list[int]) -> bytes:
        return u64(self.status)

    def _on_reset_device(self, message: Message, fds: list[int]) -> None:
        self._reset_vrings()
        self.acked_features = 0
        self.status = 0
        self.dirty_logging.drop(self.vrings)
        if self.processes is not None:
            self.processes.drop_log()
        self.device.reset()

    def _on_set_backend_req_fd(self, message: Message, fds: list[int]) -> None:
        # Kept (closed with the connection) for config-change messages; a new one replaces it.
        try:
            channel = BackendChannel(
                fds[0], reply_ack=bool(self.acked_protocol & ProtocolFeature.REPLY_ACK))
        except OSError as exc:
            raise Refused(f"backend request fd: {exc}") from exc
        fds.pop()
        old, self.backend_channel = self.backend_channel, channel
        if old is not None:
            old.close()

    @property
    def backend_req_fd(self) -> int | None:
        channel = self.backend_channel
        return None if channel is None else channel.fileno()

    def notify_config_change(self) -> bool:
        """Tell the frontend the config space changed; False if it cannot be told.

        Safe from any thread (the channel has its own socket and lock); never blocks longer
        than the channel's ack timeout.
        """
        channel = self.backend_channel
        if channel is None:
            log.warning("config changed, but the frontend gave no backend request channel")
            return False
        try:
            channel.config_changed()
        except BackendChannelError as exc:
            log.warning("config change not delivered: %s", exc)
            return False
        return True

    # ------------------------------------------------------------------ memory
    def _on_set_mem_table(self, message: Message, fds: list[int]) -> None:
        self.memory.set_table(message.fields.regions, fds)
        if self.processes is not None:  # every queue process has it before the reply
            self.processes.set_mem_table(list(message.fields.regions), fds)

    def _on_get_max_mem_slots(self, message: Message, fds: list[int]) -> bytes:
        return u64(self.memory.max_slots)

    def _on_add_mem_reg(self, message: Message, fds: list[int]) -> None:
        self.memory.add(message.fields.region, fds[0])
        if self.processes is not None:
            self.processes.add_region(message.fields.region, fds[0])

    def _on_rem_mem_reg(self, message: Message, fds: list[int]) -> None:
        self.memory.remove(message.fields.region)
        if self.processes is not None:
            self.processes.remove_region(message.fields.region)

    # ------------------------------------------------------------------ vrings
    def _on_set_vring_num(self, message: Message, fds: list[int]) -> None:
        vring = self._vring(message.fields.index)
        size = message.fields.num
        validate_size(size)
        if size > self.device.max_queue_size:
            raise Refused(f"queue size {size} > the device's maximum {self.device.max_queue_size}")
        if vring.running:
            raise Refused(f"queue {vring.index} is running")
        vring.size = size

    def _on_set_vring_addr(self, message: Message, fds: list[int]) -> None:
        f = message.fields
        vring = self._vring(f.index)
        uaddrs = (f.desc_user_addr, f.avail_user_addr, f.used_user_addr)
        if f.flags & ~VRING_ADDR_F_LOG:
            raise Refused(f"unknown vring address flags {f.flags:#x}")
        log_addr = f.log_guest_addr if f.flags & VRING_ADDR_F_LOG else None
        if vring.running:
            if uaddrs == vring.ring_uaddrs:
                # QEMU resends the addresses of a running ring to switch used-ring logging.
                self.dirty_logging.set_log_addr(vring, log_addr)
                if self.processes is not None:
                    self.processes.set_log_addr(vring.index, log_addr)
                return
            raise Refused(f"queue {vring.index} is running")
        if vring.size:
            # Alignment is a rule on guest physical addresses (virtio 2.7): a region whose mmap
            # offset is not 16-byte aligned puts an aligned ring at an unaligned frontend
            # address, so translate first and check the result.
            packed = is_packed(self.acked_features)
            check_alignment(RingAddresses(*(
                self.memory.uva_to_gpa(addr, length)
                for addr, length in zip(uaddrs, ring_sizes(vring.size, packed), strict=True)
            )), packed)
        vring.ring_uaddrs = uaddrs
        vring.log_addr = log_addr
        vring.broken = False

    def _on_set_vring_base(self, message: Message, fds: list[int]) -> None:
        vring = self._vring(message.fields.index)
        if vring.running:
            raise Refused(f"queue {vring.index} is running")
        # (a packed ring's base carries both positions and wrap counters in 32 bits; they are
        # checked against the ring when it starts)
        if message.fields.num > 0xFFFF and not is_packed(self.acked_features):
            raise Refused(f"split ring base {message.fields.num} > 65535")
        vring.base = message.fields.num

    def _on_get_vring_base(self, message: Message, fds: list[int]) -> bytes:
        vring = self._vring(message.fields.index)
        self._stop_and_flush_if_last_logged(vring)
        # The ring is stopped; a later start comes with a fresh kick fd.
        if vring.kick_fd is not None:
            os.close(vring.kick_fd)
            vring.kick_fd = None
        return vring_state(vring.index, vring.base)

    def _on_set_vring_kick(self, message: Message, fds: list[int]) -> None:
        vring, fd = self._vring_fd(message, fds)
        if fd is None:
            raise Refused(f"queue {vring.index}: polling without a kick fd is not supported")
        if vring.running:
            self._stop(vring)
        if vring.kick_fd is not None:
            os.close(vring.kick_fd)
        vring.kick_fd = fd
        if not self._protocol_features_on():
            vring.enabled = True
        self._start_if_ready(vring)

    def _on_set_vring_call(self, message: Message, fds: list[int]) -> None:
        vring, fd = self._vring_fd(message, fds)
        vring.call.replace(fd)
        if self.processes is not None:
            self.processes.notifier_changed(vring.index, "call", fd)

    def _on_set_vring_err(self, message: Message, fds: list[int]) -> None:
        vring, fd = self._vring_fd(message, fds)
        vring.err.replace(fd)
        if self.processes is not None:
            self.processes.notifier_changed(vring.index, "err", fd)

    def _on_set_vring_enable(self, message: Message, fds: list[int]) -> None:
        vring = self._vring(message.fields.index)
        if message.fields.num not in (0, 1):
            raise Refused(f"enable value {message.fields.num}")
        if not self._protocol_features_on():
            raise Refused("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        vring.enabled = bool(message.fields.num)
        if vring.enabled:
            self._start_if_ready(vring)
        else:
            self._stop_and_flush_if_last_logged(vring)

    # ------------------------------------------------------------------ config
    def _on_get_config(self, message: Message, fds: list[int]) -> bytes:
        cfg = message.fields
        space = self.device.config().ljust(MAX_CONFIG_SIZE, b"\0")
        return message.payload[:12] + space[cfg.offset : cfg.offset + cfg.size]

    def _on_set_config(self, message: Message, fds: list[int]) -> None:
        cfg = message.fields
        try:
            self.device.write_config(cfg.offset, cfg.payload, cfg.flags)
        except ValueError as exc:
            raise Refused(str(exc)) from exc
        if self.processes is not None:
            self.processes.device_changed()

    # ------------------------------------------------------------------ inflight tracking
    def _check_inflight(self, message: Message) -> None:
        if not self.acked_protocol & ProtocolFeature.INFLIGHT_SHMFD:
            raise Refused("INFLIGHT_SHMFD was not negotiated")
        f = message.fields
        if not 1 <= f.num_queues <= len(self.vrings):
            raise Refused(f"inflight area for {f.num_queues} queues; the device has "
                          f"{len(self.vrings)}")
        try:
            validate_size(f.queue_size)
        except QueueError as exc:
            raise Refused(str(exc)) from exc
        if f.queue_size > self.device.max_queue_size:
            # No ring of that size can start (SET_VRING_NUM refuses it): an area for one is
            # only memory the frontend made us allocate.
            raise Refused(f"inflight area for queues of {f.queue_size}; the device's maximum "
                          f"is {self.device.max_queue_size}")

    def _on_get_inflight_fd(self, message: Message, fds: list[int]) -> HandlerResult:
        # QEMU insists on a reply of this request's own shape with one fd (the spec says
        # "N/A"); a zero mmap_size would switch tracking off.
        self._check_inflight(message)
        f = message.fields
        fd, size = create_area(f.num_queues, f.queue_size, is_packed(self.acked_features))
        payload = inflight_payload(size, 0, f.num_queues, f.queue_size)
        return HandlerResult(reply=encode_reply(message.request, payload), reply_fds=[fd])

    def _on_set_inflight_fd(self, message: Message, fds: list[int]) -> None:
        # Never cleared here: it holds what a previous backend process left in flight.
        self._check_inflight(message)
        f = message.fields
        try:
            area = InflightArea.map(fds[0], f.mmap_size, f.mmap_offset, f.num_queues,
                                    f.queue_size, is_packed(self.acked_features))
        except InflightError as exc:
            raise Refused(str(exc)) from exc
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = area
        if self.processes is not None:
            self.processes.set_inflight(fds[0], f.mmap_size, f.mmap_offset, f.num_queues,
                                        f.queue_size, area.packed)

    # ------------------------------------------------------------------ dirty log (migration)
    @property
    def logging(self) -> bool:
        """Whether the queues mark the dirty log now."""
        return self.dirty_logging.logging(self.vrings)

    @property
    def pages_marked(self) -> int:
        """Pages the queues marked in dirty logs over this connection."""
        return self.dirty_logging.pages_marked(self.vrings)

    def _on_set_log_base(self, message: Message, fds: list[int]) -> bytes:
        if not self.acked_protocol & ProtocolFeature.LOG_SHMFD:
            raise Refused("LOG_SHMFD was not negotiated")
        f = message.fields
        check_mappable(fds[0], f.mmap_offset, f.mmap_size, "dirty log")
        try:
            new = DirtyLog(fds[0], f.mmap_size, f.mmap_offset)  # the mapping outlives the fd
        except DirtyLogError as exc:
            raise Refused(str(exc)) from exc
        self.dirty_logging.set_base(new, self.vrings, self.acked_features)
        if self.processes is not None:  # every queue process has it before the reply
            try:
                self.processes.set_log_base(fds[0], f.mmap_size, f.mmap_offset)
            except QueueProcessError as exc:
                raise Refused(str(exc)) from exc
        return u64(0)

    def _on_set_log_fd(self, message: Message, fds: list[int]) -> None:
        if not self.acked_protocol & ProtocolFeature.LOG_SHMFD:
            raise Refused("LOG_SHMFD was not negotiated")
        take_eventfd(fds[0], "dirty log call")
        fd = fds.pop()
        self.dirty_logging.call.replace(fd)
        if self.processes is not None:
            self.processes.set_log_fd(fd)
