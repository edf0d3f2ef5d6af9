"""The NBD reply parser (blockdev.nbd.wire): any split of a reply stream parses the same, and a
hostile server's stream is a protocol error, never an exception of another kind or a write
outside a command's destination."""

from __future__ import annotations

import errno
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockdev.nbd import wire
from blockdev.nbd.wire import ProtocolError, ReplyParser


def reply(cookie: int, error: int = 0, data: bytes = b"",
          magic: int = wire.SIMPLE_REPLY_MAGIC) -> bytes:
    return wire.REPLY.pack(magic, error, cookie) + data


def feed_in_pieces(parser: ReplyParser, stream: bytes, cuts: list[int],
                   direct_at: int | None = None) -> list[tuple[int, int]]:
    """Feed ``stream`` cut at ``cuts``; with ``direct_at``, a read's data of at least that many
    bytes still due goes through direct_target/advance, as the engine's recv_into does."""
    done: list[tuple[int, int]] = []
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for a, b in itertools.pairwise(bounds):
        piece = memoryview(stream)[a:b]
        while len(piece):
            target = parser.direct_target(direct_at) if direct_at is not None else None
            if target is not None:
                n = min(len(target), len(piece))
                target[:n] = piece[:n]
                done += parser.advance(n)
            else:
                n = len(piece)
                done += parser.feed(piece)
            piece = piece[n:]
    return done


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[list[tuple[int, int, bytes, int]], list[int], int]:
    """Commands (cookie, kind, read data or b"", error), the order the server answers them in,
    and the stream's length."""
    n = draw(st.integers(1, 12))
    cmds = []
    for cookie in range(1, n + 1):
        kind = draw(st.sampled_from([wire.CMD_READ, wire.CMD_WRITE, wire.CMD_FLUSH]))
        data = draw(st.binary(min_size=1, max_size=80)) if kind == wire.CMD_READ else b""
        error = draw(st.sampled_from([0, 0, 0, 5, 28, 99]))
        cmds.append((cookie, kind, data, error))
    order = draw(st.permutations(list(range(n))))
    return cmds, order, n


@settings(max_examples=300, deadline=None)
@given(exchanges(), st.lists(st.integers(0, 2000), max_size=40),
       st.one_of(st.none(), st.integers(1, 40)))
def test_any_split_of_a_reply_stream_gives_the_same_completions_and_bytes(
        exchange: tuple[list[tuple[int, int, bytes, int]], list[int], int], cuts: list[int],
        direct_at: int | None) -> None:
    cmds, order, _n = exchange
    parser = ReplyParser()
    dests: dict[int, bytearray] = {}
    for cookie, kind, data, _error in cmds:
        dest = bytearray(b"\xee" * len(data)) if kind == wire.CMD_READ else None
        if dest is not None:
            dests[cookie] = dest
        parser.expect(cookie, memoryview(dest) if dest is not None else None, len(data), 0)
    stream = b"".join(reply(cmds[i][0], cmds[i][3], b"" if cmds[i][3] else cmds[i][2])
                      for i in order)
    done = feed_in_pieces(parser, stream, [c % (len(stream) + 1) for c in cuts], direct_at)
    assert done == [(cmds[i][0], wire.errno_of(cmds[i][3]) if cmds[i][3] else 0)
                    for i in order]
    for cookie, _kind, data, error in cmds:
        if cookie in dests:  # a failed read's destination is left alone
            assert bytes(dests[cookie]) == (b"\xee" * len(data) if error else data)
    assert parser.in_flight == 0 and not parser.mid_reply


def test_error_values_map_to_the_spec_errnos_and_anything_else_to_eio() -> None:
    parser = ReplyParser()
    values = {1: errno.EPERM, 5: errno.EIO, 12: errno.ENOMEM, 22: errno.EINVAL,
              28: errno.ENOSPC, 75: errno.EOVERFLOW, 95: errno.ENOTSUP, 108: errno.ESHUTDOWN,
              2: errno.EIO, 0xFFFFFFFF: errno.EIO}
    dest = bytearray(8)
    for cookie in range(1, len(values) + 1):
        parser.expect(cookie, memoryview(dest), 8, 0)  # reads: no data after an error
    stream = b"".join(reply(c, v) for c, v in enumerate(values, 1))
    assert parser.feed(memoryview(stream)) == [(c, values[v]) for c, v in enumerate(values, 1)]
    assert dest == bytearray(8)


@pytest.mark.parametrize("magic", [wire.STRUCTURED_REPLY_MAGIC, 0, wire.REQUEST_MAGIC,
                                   0x67446699])
def test_a_wrong_magic_is_a_protocol_error(magic: int) -> None:
    parser = ReplyParser()
    parser.expect(1, None, 0, 0)
    with pytest.raises(ProtocolError):
        parser.feed(memoryview(reply(1, magic=magic)))


def test_a_cookie_not_in_flight_or_answered_twice_is_a_protocol_error() -> None:
    parser = ReplyParser()
    parser.expect(1, None, 0, 0)
    with pytest.raises(ProtocolError, match="not in flight"):
        parser.feed(memoryview(reply(2)))
    parser = ReplyParser()
    parser.expect(1, None, 0, 0)
    with pytest.raises(ProtocolError, match="not in flight"):  # the second answer to 1
        parser.feed(memoryview(reply(1) + reply(1)))


def test_a_reply_before_its_request_was_sent_is_a_protocol_error() -> None:
    """A write's payload (guest memory) must not be still on its way after the write completed:
    a server answering early is refused."""
    parser = ReplyParser()
    parser.expect(1, None, 0, 28 + 4096)
    parser.sent = 28 + 100
    with pytest.raises(ProtocolError, match="before its request was sent"):
        parser.feed(memoryview(reply(1)))
    parser = ReplyParser()
    parser.expect(1, None, 0, 28 + 4096)
    parser.sent = 28 + 4096
    assert parser.feed(memoryview(reply(1))) == [(1, 0)]


def test_a_reads_data_cut_short_by_the_connection_completes_nothing() -> None:
    """The stream ends inside a read's data: no completion, and the parser says it is mid-reply
    (the engine sees EOF and reissues the read on a new connection)."""
    parser = ReplyParser()
    dest = bytearray(16)
    parser.expect(7, memoryview(dest), 16, 0)
    parser.expect(8, None, 0, 0)
    assert parser.feed(memoryview(reply(8) + reply(7, data=b"x" * 10))) == [(8, 0)]
    assert parser.mid_reply and parser.in_flight == 1
    # ...and a header cut short likewise
    parser = ReplyParser()
    parser.expect(1, None, 0, 0)
    assert parser.feed(memoryview(reply(1)[:9])) == []
    assert parser.mid_reply


def test_data_after_forget_destinations_is_discarded() -> None:
    parser = ReplyParser()
    dest = bytearray(8)
    parser.expect(1, memoryview(dest), 8, 0)
    stream = reply(1, data=b"abcdefgh")
    assert parser.feed(memoryview(stream[:20])) == []
    parser.forget_destinations()
    assert parser.feed(memoryview(stream[20:])) == [(1, 0)]
    assert dest[4:] == bytearray(4)  # what came after is not written


def test_request_header_layout() -> None:
    head = wire.request(wire.CMD_WRITE, wire.CMD_FLAG_FUA, 0x1122, 4096, 512)
    assert head == struct.pack(">IHHQQI", 0x25609513, 1, 1, 0x1122, 4096, 512)
    with pytest.raises(struct.error):  # never wrapped round
        wire.request(wire.CMD_READ, 0, 1, 2**64, 512)
