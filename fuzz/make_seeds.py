"""Write the seed corpora (``fuzz/corpus/<harness>/``): small, valid inputs in each format.

Run ``python fuzz/make_seeds.py`` after changing a harness's input format; the qcow2 seeds
need ``qemu-img`` and ``qemu-io``.  The seeds are deterministic, so re-running it rewrites the
same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import FD_KINDS, encode_number  # noqa: E402

KINDS = (*FD_KINDS, "inflight")


def save(harness: str, data: bytes) -> None:
    out = HERE / "corpus" / harness
    out.mkdir(parents=True, exist_ok=True)
    (out / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)


# ---------------------------------------------------------------------------- vhost


def vhost_seeds() -> None:
    from _vhost import (
        AVAIL_GPA,
        DESC_GPA,
        EXTRA,
        FEATURES,
        INFLIGHT_SIZE,
        PROTOCOL,
        RAM_SIZE,
        SIZES,
        UADDR,
        USED_GPA,
    )

    def num(v: int, extra: tuple[int, ...] = EXTRA) -> bytes:
        return encode_number(v, extra)

    def msg(request: int, *fields: int, fds: tuple[str, ...] = (), table: bool = False) -> bytes:
        out = bytes([0, request, 1])
        if table:  # SET_MEM_TABLE: n, padding, regions
            out += bytes([len(fields) // 4]) + num(0)
        out += b"".join(num(f) for f in fields)
        return out + bytes([len(fds)]) + bytes(KINDS.index(k) for k in fds)

    def ram(gpa: int, data: bytes) -> bytes:
        return bytes([6]) + struct.pack("<I", gpa) + bytes([len(data)]) + data

    def area(offset: int, data: bytes) -> bytes:
        return bytes([5]) + struct.pack("<I", offset) + bytes([len(data)]) + data

    desc = struct.pack("<QIHH", 0x6000, 16, 1, 1) + struct.pack("<QIHH", 0x8000, 512, 3, 2) \
        + struct.pack("<QIHH", 0x6200, 1, 2, 0)
    header = struct.pack("<IIQ", 0, 0, 0)
    ring = ram(DESC_GPA, desc) + ram(0x6000, header) + ram(AVAIL_GPA, struct.pack("<HHH", 0, 1, 0))
    setup = (msg(1) + msg(2, FEATURES) + msg(15) + msg(16, PROTOCOL) + msg(3) + msg(17)
             + msg(5, 0, RAM_SIZE, UADDR, 0, fds=("memfd",), table=True)
             + msg(8, 0, 16) + msg(9, 0, 0, UADDR + DESC_GPA, UADDR + USED_GPA,
                                   UADDR + AVAIL_GPA, 0)
             + msg(10, 0, 0) + msg(13, 0, fds=("eventfd",)) + msg(14, 0, fds=("eventfd",)))
    start = msg(12, 0, fds=("eventfd",)) + msg(18, 0, 1)
    save("vhost_messages", setup + ring + start + bytes([7]) + msg(11, 0, 0))
    save("vhost_messages", setup + msg(31, 0, 0, 1, 16) + msg(32, INFLIGHT_SIZE, 0, 1, 16,
                                                             fds=("inflight",))
         + ring + start + bytes([7]) + msg(24, 0, 12, 0) + msg(11, 0, 0))
    save("vhost_messages", msg(1) + msg(2, FEATURES) + msg(16, PROTOCOL) + msg(36)
         + msg(37, 0, 0, RAM_SIZE, UADDR, 0, fds=("memfd",))
         + msg(38, 0, 0, RAM_SIZE, UADDR, 0) + msg(40) + msg(39, 15) + msg(34))

    # vhost_inflight: start_session's fields, a script, the restart's kick fd kind.
    def session(area_writes: bytes, n_area: int, ring_writes: list[tuple[int, bytes]],
                script: bytes, mmap_size: int = INFLIGHT_SIZE, area_fd: str = "inflight") -> bytes:
        out = bytes([0, SIZES.index(16), n_area]) + area_writes
        out += num(mmap_size, (0, INFLIGHT_SIZE, 4096, 1 << 63)) + num(0, (0, 4096))
        out += num(1, (1,)) + num(16, (16,)) + bytes([KINDS.index(area_fd)])
        out += bytes([len(ring_writes)])
        for gpa, data in ring_writes:
            out += struct.pack("<I", gpa) + bytes([len(data)]) + data
        out += num(0, (0,)) + bytes([KINDS.index("eventfd")] * 4)  # call, err, kick, restart
        return out + script

    rw = [(DESC_GPA, desc), (0x6000, header), (AVAIL_GPA, struct.pack("<HHH", 0, 1, 0))]
    save("vhost_inflight", session(b"", 0, rw, bytes([7])))
    # A previous backend left head 0 in flight (version 1, 16 entries, no batch, used_idx 0).
    left = struct.pack("<QHHHH", 0, 1, 16, 0xFFFF, 0) + struct.pack("<B5xHQ", 1, 0, 0)
    save("vhost_inflight", session(struct.pack("<HH", 0, len(left)) + left, 1, rw[:2],
                                   bytes([7]) + area(0, left)))
    # Known attack shapes: an area whose counter is at its limit (recovery resubmits head 0, the
    # next pop must not overflow the u64), and an eventfd "area" of 2**63 bytes.
    worn = struct.pack("<QHHHH", 0, 1, 16, 0xFFFF, 0) + struct.pack("<B5xHQ", 1, 0, (1 << 64) - 1)
    save("vhost_inflight", session(struct.pack("<HH", 0, len(worn)) + worn, 1, rw[:2], b""))
    save("vhost_inflight", session(b"", 0, rw, bytes([7]), mmap_size=1 << 63, area_fd="eventfd"))
    del area


# ---------------------------------------------------------------------------- rings


def ring_seeds() -> None:
    import split_ring as s

    def addr(base: int, off: int = 0) -> bytes:
        return bytes([s.BASES.index(base), off])

    def length(n: int) -> bytes:
        if n in s.LENGTHS:
            return bytes([s.LENGTHS.index(n)])
        return bytes([0xF0]) + struct.pack("<I", n)

    def desc(base: int, n: int, flags: int, nxt: int, off: int = 0) -> bytes:
        return addr(base, off) + length(n) + bytes([flags, nxt])

    def headers(*hs: tuple[int, int]) -> bytes:
        out = b""
        for i in range(8):
            t, sector = hs[i] if i < len(hs) else (0, 0)
            out += bytes([list(s.TYPES).index(t), s.SECTORS.index(sector)])
        return out

    hdr, st = s.HDR_GPA, s.STATUS_GPA
    table = [desc(hdr[1], 16, 1, 1), desc(s.B_GPA, 4096, 1, 2), desc(st, 1, 2, 0, 0x81)]
    descs = [desc(hdr[0], 16, 1, 1), desc(0x8000, 4096, 3, 2), desc(st, 1, 2, 0),
             desc(s.TABLE_GPA[0], 48, 4, 0), desc(hdr[2], 16, 1, 5), desc(0xA000, 512, 1, 6),
             desc(0xA000, 512, 1, 7, 1), desc(st, 1, 2, 0, 0x82)]
    descs += [desc(0x8000, 0, 0, 0)] * (16 - len(descs))
    body = b"".join(descs) + bytes([3]) + b"".join(table) + bytes([0])
    body += headers((s.ReqType.IN, 0), (s.ReqType.OUT, 8), (s.ReqType.OUT, 16))
    save("split_ring", bytes([0, 3]) + body + bytes([3, 0, 3, 4, 1, 0, 0]) + b"\0\0")
    save("split_ring", bytes([0, 1]) + body + bytes([3, 0, 4, 3, 2, 0, 0]) + b"\0\0")
    # One bad chain among good ones (next out of range): the queue stops at it on both paths.
    bad = list(descs)
    bad[4] = desc(hdr[2], 16, 1, 40)
    save("split_ring", bytes([0, 3]) + b"".join(bad) + bytes([3]) + b"".join(table)
         + bytes([0]) + headers((s.ReqType.IN, 0), (s.ReqType.OUT, 8), (s.ReqType.OUT, 16))
         + bytes([3, 0, 3, 4, 2, 0, 0]) + b"\0\0")


def packed_seeds() -> None:
    import packed_ring as p

    def desc(base: int, n: int, buf_id: int, flags: int, off: int = 0,
             mark: int | None = 0) -> bytes:
        """A descriptor as :func:`packed_ring.descriptor` reads it; ``mark`` 0: available in
        its lap, 4: in the other lap (not available yet), None: a table's (no marks)."""
        out = bytes([p.BASES.index(base), off, p.LENGTHS.index(n), buf_id, flags])
        return out if mark is None else out + bytes([mark])

    def headers(*hs: tuple[int, int]) -> bytes:
        out = b""
        for i in range(8):
            t, sector = hs[i] if i < len(hs) else (0, 0)
            out += bytes([list(p.TYPES).index(t), p.SECTORS.index(sector)])
        return out

    hdr, st, nxt, wr = p.HDR_GPA, p.STATUS_GPA, 1, 2
    table = [desc(hdr[1], 16, 0, nxt, mark=None), desc(p.B_GPA, 4096, 0, nxt, mark=None),
             desc(st, 1, 0, wr, 0x81, mark=None)]
    tables = bytes([3]) + b"".join(table) + bytes([0])
    hs = headers((p.ReqType.IN, 0), (p.ReqType.OUT, 8), (p.ReqType.OUT, 16), (p.ReqType.IN, 1))
    events = bytes(8)  # driver: notifications enabled; device area zero
    # 16 slots from 0: an IN chain of three, an indirect OUT, an OUT of four; then a chain the
    # driver makes available in the second batch (its head's flags flipped last).
    ring = [desc(hdr[0], 16, 0, nxt), desc(0x8000, 4096, 0, nxt | wr), desc(st, 1, 0, wr),
            desc(p.TABLE_GPA[0], 48, 1, 4), desc(hdr[2], 16, 2, nxt),
            desc(0xA000, 512, 2, nxt), desc(0xA000, 512, 2, nxt, 1),
            desc(st, 1, 2, wr, 0x82), desc(hdr[3], 16, 3, nxt, mark=4),
            desc(0x8000, 512, 3, nxt | wr, 16, mark=4), desc(st, 1, 3, wr, 0x83, mark=4)]
    ring += [desc(0x8000, 0, 0, 0, mark=4)] * (16 - len(ring))
    flips = b"".join(bytes([slot, 0, 0, 0]) for slot in (10, 9, 8))
    save("packed_ring", bytes([0, 1, 0]) + b"".join(ring) + tables + hs + events + bytes([0, 3])
         + flips)
    # The same with EVENT_IDX and the driver asking for an event at slot 8 (off_wrap 8 | 1<<15).
    save("packed_ring", bytes([0, 3, 0]) + b"".join(ring) + tables + hs
         + bytes([8, 0x80, 2, 0, 0, 0, 0, 0]) + bytes([0, 3]) + flips)
    # A ring of 4 from slot 2 in lap 0: a chain across the end (slots 2, 3, 0), then an
    # indirect one in lap 1 at slot 1.
    ring4 = [desc(st, 1, 1, wr), desc(p.TABLE_GPA[0], 48, 2, 4), desc(hdr[0], 16, 1, nxt),
             desc(0x8000, 4096, 1, nxt | wr)]
    save("packed_ring", bytes([3, 1, 2]) + b"".join(ring4) + tables + hs + events + bytes([0, 0]))
    # A ring of 4 whose in-flight area holds one chain (entries 0 -> 1 -> 2, resubmitted at the
    # start), free list 3; the ring continues at slot 3 (lap 1) with an indirect chain.
    area = bytes([0x84, 3, 3, 0, 0, 1, 1])
    area += bytes([0x81, 1, 2, 3, 0]) + desc(hdr[0], 16, 0, nxt, mark=None)
    area += bytes([0x80, 2, 0, 0, 0]) + desc(0x8000, 512, 0, nxt | wr, mark=None)
    area += bytes([0x80, 0xC5, 0, 0, 0]) + desc(st, 1, 0, wr, mark=None)
    area += bytes([0])
    ring4 = [desc(0x8000, 0, 0, 0, mark=4)] * 3 + [desc(p.TABLE_GPA[0], 48, 1, 4)]
    save("packed_ring", bytes([3, 5, 3]) + b"".join(ring4) + tables + hs + events + area
         + bytes([0]))
    # An area with nothing in flight and entry 3 on no list (free list 0 -> 1 -> 2): refused at
    # the start.  (Accepted once: the second chain ran the free list dry and the fast path's
    # claim raised QueueError out of the worker pass.)
    leaky = bytes([0x84, 0, 0, 0, 0, 1, 1, 0, 0])
    leaky += (bytes([0x80, 0xC5, 0, 0, 0]) + desc(0x8000, 0, 0, 0, mark=None)) * 2
    ring4 = [desc(hdr[0], 16, 1, nxt), desc(0x8000, 4096, 1, nxt | wr), desc(st, 1, 1, wr),
             desc(p.TABLE_GPA[0], 48, 2, 4)]
    save("packed_ring", bytes([3, 5, 0]) + b"".join(ring4) + tables + hs + events + leaky
         + bytes([0]))
    # A ring of 3 (no in-flight area), an id out of range in the second chain.
    ring3 = [desc(hdr[0], 16, 0, nxt), desc(st, 1, 0, wr), desc(p.TABLE_GPA[0], 48, 7, 4)]
    save("packed_ring", bytes([6, 1, 0]) + b"".join(ring3) + tables + hs + events + bytes([0]))


# ---------------------------------------------------------------------------- QMP, specs


def qmp_seeds() -> None:
    lines = [
        {"execute": "qmp_capabilities"},
        {"execute": "query-version", "id": 1},
        {"execute": "query-block-exports"},
        {"execute": "query-blockstats", "arguments": {"query-nodes": True}},
        {"execute": "block_resize", "arguments": {"node-name": "disk0", "size": 2 << 20},
         "id": "r"},
        {"execute": "query-commands"},
        {"execute": "quit"},
    ]
    text = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    save("qmp", b"\x01" + struct.pack("<H", len(text)) + text + bytes([7, 1, 63, 0] * 20))
    # A size of 2**63 (known attack shape: it once overflowed ftruncate's C long).
    text = b'{"execute": "qmp_capabilities"}\n{"execute": "block_resize", "arguments": ' \
        b'{"node-name": "disk0", "size": 9223372036854775808}, "id": 2}\n'
    save("qmp", b"\x01" + struct.pack("<H", len(text)) + text + bytes([60] * 8))
    text = b'{"execute": "qmp_capabilities"}\n{"execute": "block_resize", "arguments": ' \
        b'{"device": "x", "size": -1}}\n[1, 2] "x" nope {"a": [}\n'
    save("qmp", b"\x01" + struct.pack("<H", len(text)) + text + bytes([5, 9, 1, 30] * 20))
    save("qmp", bytes([0, 3, 2, 0, 34, 4, 2, 1, 44, 1, 5, 0, 12]))


def spec_seeds() -> None:
    for text in ("rbd:pool/image", "rbd:pool/image@snap:conf=/etc/ceph/c.conf:id=admin",
                 r"rbd:p/i:conf=/odd\:dir/c.conf", "nbd://127.0.0.1:10809/disk",
                 "nbd://[::1]:10809/x", "nbd+unix:///disk?socket=/run/nbd.sock",
                 "/var/lib/images/disk.img", "./rbd:x", "nbds://host/x"):
        save("image_spec", b"\0" + text.encode())


# ---------------------------------------------------------------------------- qcow2


def qcow2_seeds() -> None:
    def run(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True)

    scripts = [
        bytes([0, 0, 0, 0, 0, 6, 0, 1, 0, 0, 1, 1, 0, 1, 0, 4, 0, 0, 0, 0]),  # read, write, flush
        bytes([0, 1, 1, 0, 3, 0, 2, 0, 0, 4, 0, 3, 2, 0, 4, 0, 5, 0, 2, 0, 0]),  # write, discard
        bytes([1, 0, 0, 0, 0, 0, 4, 2, 0, 0, 1]),  # read-only reads
    ]
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        run("qemu-img", "create", "-q", "-f", "raw", "base.raw", "64k")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "base.qcow2",
            "64k")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "a.qcow2", "1M")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 1k", "-c", "write -P 0xcd 512k 512",
            "-c", "write -z 4k 4k", "-c", "write -P 1 8k 4k", "-c", "discard 8k 4k", "a.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,compat=0.10",
            "b.qcow2", "256k")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b",
            "base.raw", "-F", "raw", "c.qcow2", "64k")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 4k 1k", "c.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b",
            "base.qcow2", "-F", "qcow2", "d.qcow2", "64k")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 8k", "base.raw")
        run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096",
            "base.raw", "e.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,refcount_bits=1",
            "f.qcow2", "1M")
        for name, script in zip("abcdefa", [*scripts, *scripts, scripts[2]], strict=False):
            image = Path(f"{name}.qcow2").read_bytes()
            save("qcow2_image", script.ljust(32, b"\0") + image)
        # A backing file outside the image's directory (same length as "base.raw"): opening it
        # must be refused, never done.
        outside = Path("c.qcow2").read_bytes().replace(b"base.raw", b"../a.raw", 1)
        save("qcow2_image", scripts[0].ljust(32, b"\0") + outside)


if __name__ == "__main__":
    which = sys.argv[1:] or ["vhost", "ring", "packed", "qmp", "spec", "qcow2"]
    for w in which:
        globals()[f"{w}_seeds"]()
