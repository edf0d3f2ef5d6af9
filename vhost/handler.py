"""The backend's side of the vhost-user protocol, without sockets: (message, fds) -> reply.

:class:`BackendHandler` holds one connection's state (features, memory table, per-queue vring
state) and turns each decoded message into a reply.  It never reads or writes a socket, so every
transition is a unit test; :mod:`vhost.connection` frames bytes and fds around it.  The only side
effects it has are the ones the protocol is about: mapping memory, and starting, stopping and
updating queues through its one :class:`~vhost.runner.base.QueueRunner` -- threads here or a
process per queue, called the same way (no branch here asks which); tests can watch the thread
runner's workers through an injectable factory.

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
from dataclasses import dataclass, field

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
from vhost.queue.base import QueueError
from vhost.queue.factory import base_text, is_packed
from vhost.queue.inflight import InflightArea, InflightError, create_area
from vhost.queue.split import validate_size
from vhost.runner.assembly import WorkerFactory, ring_addresses
from vhost.runner.base import (
    Notifier,
    QueueKey,
    QueueRunner,
    QueueSpec,
    RunnerError,
    RunningQueue,
)
from vhost.runner.pool import ProcessRunner
from vhost.runner.thread import QueueWorker
from vhost.runner.thread_runner import ThreadRunner

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

__all__ = ["BackendHandler", "HandlerResult", "Refused", "Vring", "WorkerFactory"]


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
    #: The queue while it runs (on a thread here or in a queue process: see self.runner).
    worker: RunningQueue | None = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    @property
    def queue_handler(self) -> QueueHandler | None:
        """The device's handler of this queue, if it runs on a thread of this process."""
        worker = self.worker
        return worker.handler if isinstance(worker, QueueWorker) else None

    def close_fds(self) -> None:
        if self.kick_fd is not None:
            os.close(self.kick_fd)
            self.kick_fd = None
        self.call.close()
        self.err.close()


class BackendHandler:
    """Protocol state of one frontend connection."""

    def __init__(self, device: Device, worker_factory: WorkerFactory = QueueWorker,
                 conn: int = 0) -> None:
        """``worker_factory`` makes the workers of queues run on threads; ``conn`` names this
        connection's queues to the runner (:class:`vhost.runner.base.QueueKey`)."""
        self.device = device
        self.conn = conn
        self.memory = MemoryTable(MAX_MEM_SLOTS)
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.offered_features = int(device.features()) | int(RING_FEATURES) | int(
            VirtioFeature.PROTOCOL_FEATURES
        )
        self.offered_protocol = LIBRARY_PROTOCOL_FEATURES | device.protocol_features()
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
        #: What runs the started queues: threads here, or a process each (vhost.runner.base).
        self.runner: QueueRunner
        wanted = device.queue_processes
        if device.queue_pool is not None and wanted is not False:
            # A pool shared by every device of the daemon names the connection itself.
            pooled = device.queue_pool.connection(device, self)
            self.runner, self.conn = pooled, pooled.conn
        elif wanted or (wanted is None and device.num_queues > 1):
            self.runner = ProcessRunner(device, self, conn)
        else:
            self.runner = ThreadRunner(device, self, self.dirty_logging, conn, worker_factory)

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
        spec = QueueSpec(self._key(vring), vring.size, vring.ring_uaddrs, self.acked_features,
                         vring.base, vring.kick_fd, vring.call, vring.err, vring.log_addr)
        try:
            vring.worker = self.runner.start(spec)
        except (QueueError, MemoryTableError, InflightError, RunnerError, OSError) as exc:
            raise self._cannot_start(vring, exc) from exc

    def _key(self, vring: Vring) -> QueueKey:
        return QueueKey(self.conn, vring.index)

    @staticmethod
    def _cannot_start(vring: Vring, exc: Exception) -> Refused:
        """Mark ``vring`` broken, tell the driver through its err eventfd; the refusal to raise."""
        vring.broken = True
        vring.err.signal()
        return Refused(f"queue {vring.index} cannot start: {exc}")

    def _stop(self, vring: Vring) -> bool:
        """Stop ``vring``'s queue; True if it was marking the dirty log."""
        if vring.worker is None:
            return False
        stopped = self.runner.stop(self._key(vring))
        if stopped is not None:
            if not stopped.drained:
                log.error("queue %d: in-flight requests did not finish", vring.index)
            vring.base = stopped.base
            if stopped.broken:
                vring.broken = True
        logging_ = self.dirty_logging.queue_stopped(vring)  # (keeps the log if it still runs)
        vring.worker = None
        if stopped is not None:
            log.info("queue %d stopped at avail %s (%d kicks, %d batches, %d completions, "
                     "%d calls)", vring.index, base_text(vring.base, self.acked_features),
                     stopped.kicks, stopped.batches, stopped.completed, vring.call.count)
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
        self.runner.close()
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
        self.runner.device_changed(self.conn)
        self.runner.set_features(self.conn, self.acked_features)  # VHOST_F_LOG_ALL, say
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
        self.runner.drop_log(self.conn)
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
        # (every queue process has it before the reply)
        self.runner.set_mem_table(self.conn, list(message.fields.regions), fds)

    def _on_get_max_mem_slots(self, message: Message, fds: list[int]) -> bytes:
        return u64(self.memory.max_slots)

    def _on_add_mem_reg(self, message: Message, fds: list[int]) -> None:
        self.memory.add(message.fields.region, fds[0])
        self.runner.add_region(self.conn, message.fields.region, fds[0])

    def _on_rem_mem_reg(self, message: Message, fds: list[int]) -> None:
        self.memory.remove(message.fields.region)
        self.runner.remove_region(self.conn, message.fields.region)

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
                self.runner.set_log_addr(self._key(vring), log_addr)
                return
            raise Refused(f"queue {vring.index} is running")
        if vring.size:
            # Alignment is a rule on guest physical addresses (virtio 2.7): a region whose mmap
            # offset is not 16-byte aligned puts an aligned ring at an unaligned frontend
            # address, so translate first and check the result.
            ring_addresses(self.memory, uaddrs, vring.size, self.acked_features)
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
        self.runner.notifier_changed(self._key(vring), "call", fd)

    def _on_set_vring_err(self, message: Message, fds: list[int]) -> None:
        vring, fd = self._vring_fd(message, fds)
        vring.err.replace(fd)
        self.runner.notifier_changed(self._key(vring), "err", fd)

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
        self.runner.device_changed(self.conn)

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
        self.runner.set_inflight(self.conn, fds[0], f.mmap_size, f.mmap_offset, f.num_queues,
                                 f.queue_size)

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
        try:  # every queue process has it before the reply
            self.runner.set_log_base(self.conn, fds[0], f.mmap_size, f.mmap_offset)
        except RunnerError as exc:
            raise Refused(str(exc)) from exc
        return u64(0)

    def _on_set_log_fd(self, message: Message, fds: list[int]) -> None:
        if not self.acked_protocol & ProtocolFeature.LOG_SHMFD:
            raise Refused("LOG_SHMFD was not negotiated")
        take_eventfd(fds[0], "dirty log call")
        fd = fds.pop()
        self.dirty_logging.call.replace(fd)
        self.runner.set_log_fd(self.conn, fd)
