"""The NBD engine alone: CPU per 4k command of :class:`blockdev.nbd.storage.NbdEngine` (its own
transmission phase on the socket libnbd connected, driven as a queue's worker drives it),
against a bare client on the wire -- every reply in the socket taken with one ``recv``, every
command they free sent with one ``sendmsg`` -- the floor for a Python client.

No vhost, no guest, no driver: what is measured is the NBD client's work per command and what
``nbdkit``/``qemu-nbd`` needs of it.  The direct client is a measuring stick, not a client to
serve with: no reconnect, no checks on what the server sends, any error stops the run, and a
read's data stays in its receive buffer.  NbdEngine does what a queue needs on top: a
completion per request, the server's replies parsed as hostile (magic, cookie, the request's
bytes all sent), a read's data copied on to its buffer, write-through and reconnect state.
Both clients see simple replies only (libnbd is asked for no structured replies).

    nbdkit -U /tmp/nbd.sock memory 1G &
    python -m benchmarks.nbd_engine --socket /tmp/nbd.sock              # write and read, 3 rounds
    python -m benchmarks.nbd_engine --socket /tmp/nbd.sock --workloads write --seconds 5

Both clients alternate, in reversed order every other round; the table gives medians.  On the
development machine (2 shared cores, load ~2-3): NbdEngine 5.6 us CPU per 4k write and 6.9 per
read, the direct client 3.1 and 4.8 (with libnbd's transmission phase NbdEngine took 18.4 and
19.4).
"""

from __future__ import annotations

import argparse
import ctypes
import random
import select
import socket
import statistics
import struct
import time
import urllib.parse

from benchmarks.common import round_order
from blockdev.nbd import wire

BS = 4096
NBD_MAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
NBD_OPT_EXPORT_NAME = 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise RuntimeError("the NBD server closed the connection in the handshake")
        got += chunk
    return got


def direct(path: str, export: str, write: bool, seconds: float,
           depth: int) -> tuple[float, float]:
    """(commands/s, CPU us per command) of the direct client on ``export`` of the server at
    Unix socket ``path``."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    try:
        magic, _opt, _flags = struct.unpack(">QQH", _recv_exactly(sock, 18))
        if magic != NBD_MAGIC:
            raise RuntimeError(f"not an NBD server (magic {magic:#x})")
        sock.sendall(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE))
        name = export.encode()
        sock.sendall(struct.pack(">QII", IHAVEOPT, NBD_OPT_EXPORT_NAME, len(name)) + name)
        size, _tflags = struct.unpack(">QH", _recv_exactly(sock, 10))
        _recv_exactly(sock, 124)  # the zero padding (NO_ZEROES was not asked for)
        sock.setblocking(False)
        rng = random.Random(1)
        blocks = size // BS
        payload = random.Random(2).randbytes(BS)
        per_reply = wire.REPLY.size + (0 if write else BS)

        def command(cookie: int) -> list[bytes]:
            head = wire.request(wire.CMD_WRITE if write else wire.CMD_READ, 0, cookie,
                                rng.randrange(blocks) * BS, BS)
            return [head, payload] if write else [head]

        buf = bytearray(per_reply * depth)
        view = memoryview(buf)
        have = done = 0
        poller = select.epoll()
        poller.register(sock.fileno(), select.EPOLLIN)
        sock.sendmsg([piece for c in range(depth) for piece in command(c)])
        outstanding = depth
        t0, c0 = time.monotonic(), time.process_time()
        end = t0 + seconds
        t = cpu = 0.0
        # Measure until ``end``; then collect the replies still owed and say goodbye with
        # NBD_CMD_DISC (a client that hangs up on commands in flight can crash nbdkit 1.32).
        while outstanding:
            now = time.monotonic()
            if now >= end and not t:
                t, cpu = now - t0, time.process_time() - c0
            if now > end + 10:
                raise RuntimeError(f"{outstanding} replies never came")
            poller.poll(1.0)
            try:
                have += sock.recv_into(view[have:])
            except BlockingIOError:
                continue
            whole = have // per_reply
            out: list[bytes] = []
            for i in range(whole):
                magic, error, cookie = wire.REPLY.unpack_from(buf, i * per_reply)
                if magic != wire.SIMPLE_REPLY_MAGIC or error:
                    raise RuntimeError(f"reply magic {magic:#x}, error {error}")
                if t:
                    outstanding -= 1
                else:
                    out += command(cookie)
            if not t:
                done += whole
            rest = have - whole * per_reply
            buf[:rest] = buf[whole * per_reply:have]
            have = rest
            if out:
                sock.sendmsg(out)  # (a short send would stop the run: a ~256 KiB batch fits)
        sock.setblocking(True)
        sock.sendall(wire.request(wire.CMD_DISC, 0, 0, 0, 0))
        poller.close()
        return done / t, cpu / max(done, 1) * 1e6
    finally:
        sock.close()


def engine(path: str, export: str, write: bool, seconds: float,
           depth: int) -> tuple[float, float]:
    """(commands/s, CPU us per command) of NbdEngine, driven like a queue worker: submit,
    submit_batch, reap until nothing more finished, sleep on the completion fd."""
    from blockdev.engine import IoOp
    from blockdev.nbd.storage import NbdStorage
    from blockdev.ops import OpKind
    from guestmem import IoBuffer

    st = NbdStorage(f"nbd+unix:///{urllib.parse.quote(export)}"
                    f"?socket={urllib.parse.quote(path)}")
    eng = st.open_engine(0)
    raw = (ctypes.c_char * (depth * BS))()
    view = memoryview(raw).cast("B")
    base = ctypes.addressof(raw)
    rng = random.Random(1)
    blocks = st.info.size // BS
    kind = OpKind.WRITE if write else OpKind.READ

    def op(slot: int) -> IoOp:
        return IoOp(kind, rng.randrange(blocks) * BS,
                    [IoBuffer(view[slot * BS:(slot + 1) * BS], base + slot * BS)], BS, ctx=slot)

    poller = select.epoll()
    assert eng.completion_fd is not None
    poller.register(eng.completion_fd, select.EPOLLIN | select.EPOLLET)
    done = 0
    try:
        for slot in range(depth):
            eng.submit(op(slot))
        eng.submit_batch()
        t0, c0 = time.monotonic(), time.process_time()
        end = t0 + seconds
        while time.monotonic() < end:
            poller.poll(1.0)
            finished = eng.reap()
            while finished:
                for o in finished:
                    if o.result != BS:
                        raise RuntimeError(f"{kind.name.lower()} failed: {o.result}")
                    eng.submit(op(o.ctx))
                done += len(finished)
                eng.submit_batch()
                finished = eng.reap()
        t, cpu = time.monotonic() - t0, time.process_time() - c0
    finally:
        poller.close()
        eng.close()
        st.close()
        view.release()
    return done / t, cpu / max(done, 1) * 1e6


CLIENTS = {"NbdEngine": engine, "direct": direct}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.nbd_engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", required=True, help="the NBD server's Unix socket")
    p.add_argument("--export", default="", help="the export's name (default: the default one)")
    p.add_argument("--workloads", nargs="+", choices=("write", "read"),
                   default=["write", "read"])
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for rnd in range(args.rounds):
        for wl in args.workloads:
            for name in round_order(list(CLIENTS), rnd):
                ops, cpu = CLIENTS[name](args.socket, args.export, wl == "write",
                                         args.seconds, args.depth)
                print(f"round {rnd + 1} {name:<10} 4k {wl:<5}: {ops:8.0f} commands/s "
                      f"{cpu:6.1f} us CPU/command", flush=True)
                results.setdefault((wl, name), []).append((ops, cpu))
    print(f"\nNBD client alone, 4k QD{args.depth}, medians of {args.rounds} rounds")
    print(f"{'workload':<9}{'client':<11}{'commands/s':>11}{'CPU us/cmd':>12}")
    for (wl, name), rows in results.items():
        print(f"{wl:<9}{name:<11}{statistics.median(r[0] for r in rows):>11.0f}"
              f"{statistics.median(r[1] for r in rows):>12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
