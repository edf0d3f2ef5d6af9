"""The vhost-user wire format: request codes, feature bits and payload layouts, in one place.

Every message is a 12-byte header (``u32 request, u32 flags, u32 size``) and ``size`` bytes of
payload, native byte order (little-endian on every host QEMU runs vhost-user on).  The payload
layouts are declared once here with ``construct``; :data:`MESSAGE_TABLE` says, per request, which
layout it carries, how many file descriptors come with it and whether it has a reply of its own.
This is the control path (a few hundred messages per connection), so construct's declarative
layouts cost nothing that matters; the data path never comes here.

Source: ``docs/interop/vhost-user.rst`` in qemu/qemu.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import construct as cs

# ---------------------------------------------------------------------------- header

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
#: The largest payload any request we know can carry (SET_MEM_TABLE: 8 + 8*32; config: 12 + 256).
#: A frontend that announces more is broken or hostile: we disconnect rather than buffer it.
MAX_PAYLOAD = 4096
#: SCM_RIGHTS fds accepted with one message (SET_MEM_TABLE sends one per region, at most 8).
MAX_FDS = 8
#: Regions in SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_TABLE_REGIONS = 8
#: Memory slots offered with CONFIGURE_MEM_SLOTS (libvhost-user and QEMU's x86 limit).
MAX_MEM_SLOTS = 509
#: Virtio config space size the protocol allows in one GET/SET_CONFIG.
MAX_CONFIG_SIZE = 256
#: Bit 8 of SET_VRING_KICK/CALL/ERR's u64: no fd attached (polling).
VRING_NOFD_MASK = 1 << 8
VRING_IDX_MASK = 0xFF
#: SET_VRING_ADDR flag VHOST_VRING_F_LOG: log the used ring's writes at ``log_guest_addr``.
VRING_ADDR_F_LOG = 1 << 0


class Request(enum.IntEnum):
    """Front-end request codes."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntFlag):
    """VHOST_USER_PROTOCOL_F_* bits."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


class VirtioFeature(enum.IntFlag):
    """Device-independent virtio feature bits (and vhost-user's bit 30)."""

    NOTIFY_ON_EMPTY = 1 << 24
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35


VHOST_F_LOG_ALL = 1 << 26


# ---------------------------------------------------------------------------- payload layouts

U64 = cs.Struct("value" / cs.Int64ul)
VringState = cs.Struct("index" / cs.Int32ul, "num" / cs.Int32ul)
VringAddr = cs.Struct(
    "index" / cs.Int32ul,
    "flags" / cs.Int32ul,
    "desc_user_addr" / cs.Int64ul,
    "used_user_addr" / cs.Int64ul,
    "avail_user_addr" / cs.Int64ul,
    "log_guest_addr" / cs.Int64ul,
)
MemoryRegion = cs.Struct(
    "guest_phys_addr" / cs.Int64ul,
    "memory_size" / cs.Int64ul,
    "userspace_addr" / cs.Int64ul,
    "mmap_offset" / cs.Int64ul,
)
MemoryTable = cs.Struct(
    "num_regions" / cs.Int32ul,
    "padding" / cs.Int32ul,
    "regions" / cs.GreedyRange(MemoryRegion),
)
SingleMemoryRegion = cs.Struct("padding" / cs.Int64ul, "region" / MemoryRegion)
ConfigSpace = cs.Struct(
    "offset" / cs.Int32ul,
    "size" / cs.Int32ul,
    "flags" / cs.Int32ul,
    "payload" / cs.GreedyBytes,
)
Inflight = cs.Struct(
    "mmap_size" / cs.Int64ul,
    "mmap_offset" / cs.Int64ul,
    "num_queues" / cs.Int16ul,
    "queue_size" / cs.Int16ul,
    cs.Padding(4),
)
Log = cs.Struct("mmap_size" / cs.Int64ul, "mmap_offset" / cs.Int64ul)

CONFIG_HEADER_SIZE = 12
MEMORY_REGION_SIZE = MemoryRegion.sizeof()
INFLIGHT_SIZE = Inflight.sizeof()


class RegionFields(Protocol):
    """One decoded memory region (``MemoryRegion``)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


class Fields(Protocol):
    """A decoded payload, as ``decode`` fills :attr:`Message.fields`.

    Which of these a message has depends on its request: ``decode`` has checked the payload
    against that request's layout in :data:`MESSAGE_TABLE`, and each handler reads only the
    fields of its own request.  Declaring them here (with their real types) keeps every use
    checked without a cast at each one.
    """

    value: int  # U64
    index: int  # VringState, VringAddr
    num: int  # VringState
    flags: int  # VringAddr, ConfigSpace
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int
    num_regions: int  # MemoryTable
    regions: Sequence[RegionFields]
    region: RegionFields  # SingleMemoryRegion
    offset: int  # ConfigSpace
    size: int
    payload: bytes
    mmap_size: int  # Inflight, Log
    mmap_offset: int
    num_queues: int  # Inflight
    queue_size: int


class ProtocolError(Exception):
    """A message that breaks the protocol (bad size, fd count, value); refused with a log line."""


@dataclass(frozen=True)
class MessageSpec:
    """What one request carries.

    ``layout``: the payload's construct layout (None: no payload).  ``size``: exact payload size, or
    None when it varies (then ``min_size``/``check_size`` apply).  ``fds``: (min, max) fds.
    ``reply``: the request has a reply of its own (so REPLY_ACK adds nothing).
    """

    layout: cs.Construct | None
    size: int | None
    fds: tuple[int, int] = (0, 0)
    reply: bool = False
    min_size: int = 0


def _fixed(
    layout: cs.Construct | None, fds: tuple[int, int] = (0, 0), reply: bool = False
) -> MessageSpec:
    return MessageSpec(layout, 0 if layout is None else layout.sizeof(), fds, reply)


#: Per request: the layout of its payload, its fds and whether it has its own reply.
MESSAGE_TABLE: dict[Request, MessageSpec] = {
    Request.GET_FEATURES: _fixed(None, reply=True),
    Request.SET_FEATURES: _fixed(U64),
    Request.SET_OWNER: _fixed(None),
    Request.RESET_OWNER: _fixed(None),
    Request.SET_MEM_TABLE: MessageSpec(MemoryTable, None, (1, MAX_TABLE_REGIONS), min_size=8),
    # With LOG_SHMFD QEMU waits for a reply to SET_LOG_BASE (hw/virtio/vhost-user.c,
    # vhost_user_set_log_base); without it there is no fd and nothing we could log into.
    Request.SET_LOG_BASE: _fixed(Log, (1, 1), reply=True),
    Request.SET_LOG_FD: _fixed(None, (1, 1)),
    Request.SET_VRING_NUM: _fixed(VringState),
    Request.SET_VRING_ADDR: _fixed(VringAddr),
    Request.SET_VRING_BASE: _fixed(VringState),
    Request.GET_VRING_BASE: _fixed(VringState, reply=True),
    Request.SET_VRING_KICK: _fixed(U64, (0, 1)),
    Request.SET_VRING_CALL: _fixed(U64, (0, 1)),
    Request.SET_VRING_ERR: _fixed(U64, (0, 1)),
    Request.GET_PROTOCOL_FEATURES: _fixed(None, reply=True),
    Request.SET_PROTOCOL_FEATURES: _fixed(U64),
    Request.GET_QUEUE_NUM: _fixed(None, reply=True),
    Request.SET_VRING_ENABLE: _fixed(VringState),
    Request.SET_BACKEND_REQ_FD: _fixed(None, (1, 1)),
    Request.GET_CONFIG: MessageSpec(ConfigSpace, None, reply=True, min_size=CONFIG_HEADER_SIZE),
    Request.SET_CONFIG: MessageSpec(ConfigSpace, None, min_size=CONFIG_HEADER_SIZE),
    Request.GET_INFLIGHT_FD: _fixed(Inflight, reply=True),
    Request.SET_INFLIGHT_FD: _fixed(Inflight, (1, 1)),
    Request.RESET_DEVICE: _fixed(None),
    Request.GET_MAX_MEM_SLOTS: _fixed(None, reply=True),
    Request.ADD_MEM_REG: _fixed(SingleMemoryRegion, (1, 1)),
    # The spec lets a broken frontend pass one fd with REM_MEM_REG; it is closed unused.
    Request.REM_MEM_REG: _fixed(SingleMemoryRegion, (0, 1)),
    Request.SET_STATUS: _fixed(U64),
    Request.GET_STATUS: _fixed(None, reply=True),
}


@dataclass
class Message:
    """One decoded message: header fields, the raw payload and, once validated, its fields."""

    request: int
    flags: int
    payload: bytes
    #: What :func:`decode` parsed (None until then, and for a request without a payload).
    parsed: object = None

    @property
    def fields(self) -> Fields:
        """The decoded payload; ProtocolError before :func:`decode` or without a payload."""
        if self.parsed is None:
            raise ProtocolError(f"{self.name} has no decoded payload")
        return cast(Fields, self.parsed)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"


def spec_of(request: int) -> MessageSpec | None:
    """The table entry of a request code, or None for one we do not serve."""
    try:
        return MESSAGE_TABLE.get(Request(request))
    except ValueError:
        return None


def parse_header(data: bytes) -> tuple[int, int, int]:
    """(request, flags, size) of a 12-byte header; ProtocolError for a bad version or size."""
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise ProtocolError(f"header version {flags & VERSION_MASK} (flags {flags:#x}), want 1")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {size} bytes announced, at most {MAX_PAYLOAD} allowed")
    return request, flags, size


def decode(message: Message, nfds: int) -> MessageSpec:
    """Validate ``message`` against its table entry and fill ``message.fields``.

    Raises ProtocolError for an unknown request, a payload size the layout does not allow, or an fd
    count out of range.  Semantic checks (index ranges, addresses) belong to the handler.
    """
    try:
        spec = MESSAGE_TABLE[Request(message.request)]
    except (ValueError, KeyError):
        raise ProtocolError(f"unsupported {message.name}") from None
    size = len(message.payload)
    if spec.size is not None and size != spec.size:
        # QEMU sends GET_VRING_BASE etc. with their exact layout size; tolerate nothing else.
        raise ProtocolError(f"{message.name}: payload of {size} bytes, want {spec.size}")
    if spec.size is None and size < spec.min_size:
        raise ProtocolError(
            f"{message.name}: payload of {size} bytes, want at least {spec.min_size}"
        )
    lo, hi = spec.fds
    if not lo <= nfds <= hi:
        want = str(lo) if lo == hi else f"{lo}..{hi}"
        raise ProtocolError(f"{message.name}: {nfds} fds attached, want {want}")
    if spec.layout is not None:
        try:
            message.parsed = spec.layout.parse(message.payload)
        except cs.ConstructError as exc:  # pragma: no cover - sizes are checked above
            raise ProtocolError(f"{message.name}: {exc}") from exc
    if message.request == Request.SET_MEM_TABLE:
        _check_mem_table(message)
    elif message.request in (Request.GET_CONFIG, Request.SET_CONFIG):
        _check_config(message)
    return spec


def _check_mem_table(message: Message) -> None:
    table = message.fields
    n = table.num_regions
    if not 1 <= n <= MAX_TABLE_REGIONS:
        raise ProtocolError(f"SET_MEM_TABLE with {n} regions, want 1..{MAX_TABLE_REGIONS}")
    if len(message.payload) < 8 + n * MEMORY_REGION_SIZE:
        raise ProtocolError(f"SET_MEM_TABLE: {n} regions do not fit {len(message.payload)} bytes")
    table.regions = table.regions[:n]


def _check_config(message: Message) -> None:
    cfg = message.fields
    if cfg.size == 0 or cfg.offset + cfg.size > MAX_CONFIG_SIZE:
        raise ProtocolError(
            f"{message.name}: offset {cfg.offset} size {cfg.size} outside the "
            f"{MAX_CONFIG_SIZE}-byte config space"
        )
    if len(cfg.payload) != cfg.size:
        raise ProtocolError(
            f"{message.name}: {len(cfg.payload)} payload bytes for a size of {cfg.size}"
        )


# ---------------------------------------------------------------------------- encoding


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    """Header + payload as one byte string."""
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes = b"") -> bytes:
    """A backend reply to ``request``."""
    return encode(request, payload, VERSION | FLAG_REPLY)


def u64(value: int) -> bytes:
    return U64.build({"value": value})


def vring_state(index: int, num: int) -> bytes:
    return VringState.build({"index": index, "num": num})


def config_space(offset: int, data: bytes, flags: int = 0) -> bytes:
    return ConfigSpace.build({"offset": offset, "size": len(data), "flags": flags, "payload": data})


def inflight(mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int) -> bytes:
    return Inflight.build(
        {
            "mmap_size": mmap_size,
            "mmap_offset": mmap_offset,
            "num_queues": num_queues,
            "queue_size": queue_size,
        }
    )


def log_base(mmap_size: int, mmap_offset: int) -> bytes:
    return Log.build({"mmap_size": mmap_size, "mmap_offset": mmap_offset})


def memory_region(gpa: int, size: int, uaddr: int, mmap_offset: int) -> dict[str, int]:
    return {
        "guest_phys_addr": gpa,
        "memory_size": size,
        "userspace_addr": uaddr,
        "mmap_offset": mmap_offset,
    }
