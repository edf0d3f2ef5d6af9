"""Point 6: the wire format table -- encode/decode round trips for every request and layout, and
the size / fd-count / header checks that guard the handler."""

from __future__ import annotations

import pytest

from vhost import messages as m
from vhost.messages import MESSAGE_TABLE, Message, ProtocolError, Request

REGION = m.memory_region(0x1_0000_0000, 0x20_0000, 0x7F00_DEAD_0000, 0x3039)


def _table(n: int, declared: int | None = None) -> bytes:
    regions = [m.memory_region(i << 30, 1 << 20, 0x7F00_0000_0000 + (i << 30), i * 4097)
               for i in range(n)]
    return m.MemoryTable.build({"num_regions": n if declared is None else declared,
                                "padding": 0, "regions": regions})


def sample(request: Request) -> tuple[bytes, int]:
    """A valid payload for ``request`` and the fd count that goes with it."""
    spec = MESSAGE_TABLE[request]
    layout = spec.layout
    if layout is None:
        return b"", spec.fds[0]
    if layout is m.U64:
        return m.u64(0x0123_4567_89AB_CDEF if request != Request.SET_VRING_KICK else 1), \
            spec.fds[1]
    if layout is m.VringState:
        return m.vring_state(3, 256), 0
    if layout is m.VringAddr:
        return m.VringAddr.build({"index": 1, "flags": 1, "desc_user_addr": 0x1000,
                                  "used_user_addr": 0x3000, "avail_user_addr": 0x2000,
                                  "log_guest_addr": 0x4000}), 0
    if layout is m.MemoryTable:
        return _table(3), 3
    if layout is m.SingleMemoryRegion:
        return m.SingleMemoryRegion.build({"padding": 0, "region": REGION}), spec.fds[0]
    if layout is m.ConfigSpace:
        return m.config_space(4, b"abcd", 1), 0
    if layout is m.Inflight:
        return m.inflight(0x10000, 0x200, 2, 256), spec.fds[0]
    if layout is m.Log:
        return m.log_base(0x2000, 0x1000), spec.fds[0]
    raise AssertionError(f"no sample for {request.name}")  # pragma: no cover


@pytest.mark.parametrize("request_", list(MESSAGE_TABLE), ids=lambda r: r.name)
def test_round_trip(request_) -> None:
    payload, nfds = sample(request_)
    wire = m.encode(request_, payload, m.VERSION | m.FLAG_NEED_REPLY)
    code, flags, size = m.parse_header(wire[: m.HEADER_SIZE])
    assert (code, size) == (request_, len(payload))
    message = Message(code, flags, wire[m.HEADER_SIZE :])
    assert message.need_reply and message.name == request_.name
    spec = m.decode(message, nfds)
    assert spec is MESSAGE_TABLE[request_]
    if spec.layout is None:
        assert message.parsed is None
    else:
        assert spec.layout.build(message.parsed) == payload


def test_decoded_fields() -> None:
    message = Message(Request.SET_MEM_TABLE, m.VERSION, _table(2) + bytes(32))
    m.decode(message, 2)
    assert message.fields.num_regions == 2
    assert len(message.fields.regions) == 2, "regions past num_regions are dropped"
    assert message.fields.regions[1].mmap_offset == 4097
    message = Message(Request.SET_VRING_ADDR, m.VERSION, sample(Request.SET_VRING_ADDR)[0])
    m.decode(message, 0)
    f = message.fields
    assert (f.index, f.desc_user_addr, f.avail_user_addr, f.used_user_addr) == (
        1, 0x1000, 0x2000, 0x3000)
    message = Message(Request.SET_CONFIG, m.VERSION, m.config_space(8, b"xyz", 2))
    m.decode(message, 0)
    assert (message.fields.offset, message.fields.size, message.fields.flags,
            message.fields.payload) == (8, 3, 2, b"xyz")


def test_layout_sizes_match_the_spec() -> None:
    assert m.HEADER_SIZE == 12
    assert m.VringState.sizeof() == 8
    assert m.VringAddr.sizeof() == 40
    assert m.MEMORY_REGION_SIZE == 32
    assert m.SingleMemoryRegion.sizeof() == 40
    assert m.INFLIGHT_SIZE == 24
    assert m.Log.sizeof() == 16
    assert len(_table(8)) == 8 + 8 * 32
    log = m.Log.build({"mmap_size": 1 << 20, "mmap_offset": 4096})
    assert m.Log.parse(log).mmap_offset == 4096


def test_encode_reply_sets_the_reply_flag() -> None:
    wire = m.encode_reply(Request.GET_FEATURES, m.u64(5))
    code, flags, size = m.parse_header(wire[:12])
    assert (code, size) == (Request.GET_FEATURES, 8)
    assert flags == m.VERSION | m.FLAG_REPLY


WRONG_SIZES = [
    (request, delta)
    for request, spec in MESSAGE_TABLE.items()
    if spec.size is not None
    for delta in (-1, 1, 8)
    if spec.size + delta >= 0
]


@pytest.mark.parametrize(("request_", "delta"), WRONG_SIZES,
                         ids=[f"{r.name}{d:+d}" for r, d in WRONG_SIZES])
def test_wrong_payload_size(request_, delta) -> None:
    payload, nfds = sample(request_)
    bad = (payload + bytes(8))[: len(payload) + delta]
    with pytest.raises(ProtocolError, match="payload of"):
        m.decode(Message(request_, m.VERSION, bad), nfds)


@pytest.mark.parametrize("request_", list(MESSAGE_TABLE), ids=lambda r: r.name)
def test_fd_count_out_of_range(request_) -> None:
    payload, _ = sample(request_)
    lo, hi = MESSAGE_TABLE[request_].fds
    for nfds in {lo - 1, hi + 1} - {-1}:
        with pytest.raises(ProtocolError, match="fds attached"):
            m.decode(Message(request_, m.VERSION, payload), nfds)


@pytest.mark.parametrize("code", [0, 19, 20, 22, 23, 26, 33, 35, 41, 1 << 31])
def test_unsupported_requests(code) -> None:
    assert m.spec_of(code) is None
    message = Message(code, m.VERSION, b"")
    with pytest.raises(ProtocolError, match="unsupported"):
        m.decode(message, 0)
    assert message.name in {Request(code).name if code in Request._value2member_map_ else "",
                            f"request {code}"}


@pytest.mark.parametrize(("n", "declared", "why"), [
    (0, 0, "0 regions"),
    (9, 9, "9 regions"),
    (1, 2, "2 regions do not fit"),
])
def test_mem_table_region_count(n, declared, why) -> None:
    with pytest.raises(ProtocolError, match=why):
        m.decode(Message(Request.SET_MEM_TABLE, m.VERSION, _table(n, declared)), 1)


def test_mem_table_shorter_than_its_header() -> None:
    with pytest.raises(ProtocolError, match="at least 8"):
        m.decode(Message(Request.SET_MEM_TABLE, m.VERSION, bytes(7)), 1)


@pytest.mark.parametrize(("offset", "size", "data"), [
    (0, 0, b""), (250, 7, bytes(7)), (256, 1, b"x"), (0, 257, bytes(257)), (0, 4, b"ab"),
    ((1 << 32) - 1, 1, b"x"),
])
@pytest.mark.parametrize("request_", [Request.GET_CONFIG, Request.SET_CONFIG],
                         ids=lambda r: r.name)
def test_config_bounds(request_, offset, size, data) -> None:
    payload = m.ConfigSpace.build({"offset": offset, "size": size, "flags": 0, "payload": data})
    with pytest.raises(ProtocolError):
        m.decode(Message(request_, m.VERSION, payload), 0)


def test_config_at_the_limit() -> None:
    for offset, size in ((0, 256), (255, 1)):
        m.decode(Message(Request.GET_CONFIG, m.VERSION, m.config_space(offset, bytes(size))), 0)


@pytest.mark.parametrize("flags", [0, 2, 3, 0xFFFF_FFFC])
def test_header_version(flags) -> None:
    with pytest.raises(ProtocolError, match="version"):
        m.parse_header(m.HEADER.pack(1, flags, 0))


def test_header_size_limit() -> None:
    assert m.parse_header(m.HEADER.pack(5, 1, m.MAX_PAYLOAD))[2] == m.MAX_PAYLOAD
    with pytest.raises(ProtocolError, match="4097 bytes"):
        m.parse_header(m.HEADER.pack(5, 1, m.MAX_PAYLOAD + 1))
