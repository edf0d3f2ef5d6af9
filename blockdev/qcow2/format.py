"""The qcow2 on-disk format: header parsing and validation, entry bits, and image creation.

Everything here is sans-IO except :func:`read_header` (one ``pread`` of the first cluster) and
:func:`create` (writes a fresh image).  Each header field is checked against the file size and
sane limits before anything else uses it: a hostile image is refused at open with a one-line
message (:class:`Qcow2OpenError`), never followed into a read outside the file.

Layout (docs/interop/qcow2.txt in QEMU): big-endian header; L1 table of 64-bit entries pointing
at L2 tables; L2 entries pointing at data clusters (or compressed data, or flagged zero);
a refcount table pointing at refcount blocks that count the references to every host cluster.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from blockdev.disk import DiskError

MAGIC = b"QFI\xfb"

# Header fields (version 2 part, then the version 3 additions).
_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # 28 bytes at offset 72
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
# Compatible: lazy refcounts (we keep refcounts exact anyway, so it needs nothing from us).
COMPAT_LAZY_REFCOUNTS = 1 << 0

# Header extensions.
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# Table entries.
OFLAG_COPIED = 1 << 63  # refcount is exactly 1: the cluster may be written in place
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0  # v3 L2: the cluster reads as zeroes
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9..55
L1_RESERVED = 0x7F00_0000_0000_01FF
L2_RESERVED = 0x3F00_0000_0000_01FE  # standard clusters (bit 0 is the zero flag)
REFTABLE_RESERVED = 0x1FF

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 << 20  # QEMU's limit too
MAX_REFTABLE_BYTES = 8 << 20
MAX_VIRTUAL_SIZE = 1 << 61
MAX_BACKING_NAME = 1023
MAX_SNAPSHOTS = 65536


class Qcow2OpenError(DiskError):
    """The file cannot be served as qcow2; the message is one line for the user."""


@dataclass
class Header:
    """The header fields we use, validated."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    extensions: dict[int, bytes] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8


def _fail(path: str, why: str) -> Qcow2OpenError:
    return Qcow2OpenError(f"{path}: {why}")


def l1_entries_needed(size: int, cluster_bits: int) -> int:
    """L1 entries needed to map ``size`` bytes."""
    per_l2 = 1 << (cluster_bits + cluster_bits - 3)
    return -(-size // per_l2)


def parse_header(buf: bytes, file_size: int, path: str = "image") -> Header:
    """Parse and validate the header in ``buf`` (the file's first bytes, at least one cluster
    when the file is that long).  Raises :class:`Qcow2OpenError` with the reason."""
    if len(buf) < V2_HEADER_LENGTH or buf[:4] != MAGIC:
        raise _fail(path, "not a qcow2 image (no QFI\\xfb magic); use --format raw for raw images")
    f = _V2.unpack_from(buf, 0)
    h = Header(version=f[1], backing_file_offset=f[2], backing_file_size=f[3], cluster_bits=f[4],
               size=f[5], crypt_method=f[6], l1_size=f[7], l1_table_offset=f[8],
               refcount_table_offset=f[9], refcount_table_clusters=f[10], nb_snapshots=f[11],
               snapshots_offset=f[12])
    if h.version not in (2, 3):
        raise _fail(path, f"qcow2 version {h.version} is not supported (only 2 and 3)")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise _fail(path, f"cluster_bits {h.cluster_bits} outside {MIN_CLUSTER_BITS}.."
                          f"{MAX_CLUSTER_BITS}")
    cs = h.cluster_size
    if h.version == 3:
        if len(buf) < V3_HEADER_LENGTH:
            raise _fail(path, "truncated version 3 header")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
         h.header_length) = _V3.unpack_from(buf, 72)
        if h.header_length < V3_HEADER_LENGTH:
            raise _fail(path, f"bad header_length {h.header_length}")
        if h.header_length > cs or h.header_length > len(buf):
            raise _fail(path, f"header_length {h.header_length} beyond the first cluster")
        if h.header_length > 104:
            h.compression_type = buf[104]
    _check_features(h, path)
    if h.crypt_method:
        raise _fail(path, "encrypted qcow2 images are not supported (crypt_method "
                          f"{h.crypt_method}); decrypt with qemu-img convert")
    if not 0 <= h.refcount_order <= 6:
        raise _fail(path, f"refcount_order {h.refcount_order} outside 0..6")
    if h.size > MAX_VIRTUAL_SIZE:
        raise _fail(path, f"virtual size {h.size} is too large")
    # L1 table: large enough for the virtual size, aligned, inside the file.
    needed = l1_entries_needed(h.size, h.cluster_bits)
    if h.l1_size < needed:
        raise _fail(path, f"L1 table of {h.l1_size} entries cannot map {h.size} bytes")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise _fail(path, f"L1 table of {h.l1_size} entries is too large")
    _check_area(path, "L1 table", h.l1_table_offset, h.l1_size * 8, cs, file_size,
                allow_empty=True)
    # Refcount table.
    if h.refcount_table_clusters == 0:
        raise _fail(path, "refcount table is empty")
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise _fail(path, f"refcount table of {h.refcount_table_clusters} clusters is too large")
    _check_area(path, "refcount table", h.refcount_table_offset,
                h.refcount_table_clusters * cs, cs, file_size)
    # Snapshot table (we leave snapshots alone, but refuse one that points outside the file).
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise _fail(path, f"{h.nb_snapshots} snapshots is too many")
    if h.nb_snapshots:
        _check_area(path, "snapshot table", h.snapshots_offset, 40 * h.nb_snapshots, cs,
                    file_size)
    _parse_extensions(h, buf, path)
    if h.backing_file_offset or h.backing_file_size:
        end = h.backing_file_offset + h.backing_file_size
        if h.backing_file_size > MAX_BACKING_NAME or h.backing_file_size == 0:
            raise _fail(path, f"backing file name of {h.backing_file_size} bytes")
        if h.backing_file_offset < V2_HEADER_LENGTH or end > min(cs, len(buf)):
            raise _fail(path, "backing file name outside the first cluster")
        try:
            h.backing_file = buf[h.backing_file_offset:end].decode()
        except UnicodeDecodeError:
            raise _fail(path, "backing file name is not UTF-8") from None
        if "\0" in h.backing_file:
            raise _fail(path, "backing file name contains a NUL byte")
        if h.backing_file.startswith(("json:", "nbd:", "http:", "https:", "ssh:")):
            raise _fail(path, f"backing file {h.backing_file!r}: only plain file names are "
                              "supported")
    return h


def _check_features(h: Header, path: str) -> None:
    inc = h.incompatible
    known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION \
        | INCOMPAT_EXTL2
    if inc & ~known:
        raise _fail(path, f"unknown incompatible feature bits {inc & ~known:#x}")
    if inc & INCOMPAT_DATA_FILE:
        raise _fail(path, "qcow2 images with an external data file are not supported")
    if inc & INCOMPAT_EXTL2:
        raise _fail(path, "qcow2 extended L2 entries (subclusters) are not supported")
    if inc & INCOMPAT_CORRUPT:
        raise _fail(path, "image is marked corrupt; repair it with: qemu-img check -r all IMG")
    if inc & INCOMPAT_DIRTY:
        # Lazy refcounts left stale by an unclean shutdown: QEMU rebuilds them on open; we
        # would rather not serve (and allocate from) refcounts we know to be wrong.
        raise _fail(path, "image is marked dirty (lazy refcounts after an unclean shutdown); "
                          "repair it with: qemu-img check -r all IMG")
    if h.compression_type not in (0,) or (inc & INCOMPAT_COMPRESSION and h.compression_type):
        name = {1: "zstd"}.get(h.compression_type, str(h.compression_type))
        raise _fail(path, f"compression type {name} is not supported (only zlib); "
                          "convert with: qemu-img convert -O qcow2 -o compression_type=zlib")


def _check_area(path: str, what: str, offset: int, length: int, cs: int, file_size: int,
                allow_empty: bool = False) -> None:
    if allow_empty and length == 0:
        return
    if offset % cs or offset == 0:
        raise _fail(path, f"{what} offset {offset:#x} is not a cluster boundary after the header")
    if offset + length > file_size:
        raise _fail(path, f"{what} at {offset:#x}+{length:#x} extends beyond the end of the "
                          f"file ({file_size:#x})")


def _parse_extensions(h: Header, buf: bytes, path: str) -> None:
    pos = h.header_length
    limit = min(h.cluster_size, len(buf))
    if h.backing_file_offset:
        limit = min(limit, h.backing_file_offset)
    while pos + 8 <= limit:
        kind, length = struct.unpack_from(">II", buf, pos)
        pos += 8
        if kind == EXT_END:
            break
        if pos + length > limit:
            raise _fail(path, f"header extension {kind:#x} runs past the header cluster")
        data = bytes(buf[pos:pos + length])
        pos += (length + 7) & ~7
        if kind == EXT_CRYPTO:
            raise _fail(path, "encrypted qcow2 images (LUKS) are not supported")
        if kind == EXT_DATA_FILE:
            raise _fail(path, "qcow2 images with an external data file are not supported")
        if kind == EXT_BACKING_FORMAT:
            try:
                h.backing_format = data.decode()
            except UnicodeDecodeError:
                raise _fail(path, "backing format is not UTF-8") from None
        h.extensions[kind] = data


def read_header(fd: int, path: str) -> Header:
    """Read and validate the header of the open image ``fd``."""
    file_size = os.fstat(fd).st_size
    buf = os.pread(fd, 1 << MAX_CLUSTER_BITS, 0)
    h = parse_header(buf, file_size, path)
    return h


# ---------------------------------------------------------------------- creation
CREATE_CLUSTER_BITS = 16


def create(path: str, size: int, backing: str | None = None,
           backing_format: str | None = None, cluster_bits: int = CREATE_CLUSTER_BITS) -> None:
    """Write a new, empty qcow2 v3 image (refcount_order 4) at ``path`` (which must not exist).

    Layout: header cluster (header, backing-format extension, backing file name), refcount
    table (1 cluster), one refcount block, the L1 table.  Everything is written, then synced,
    before the function returns: a created image is complete or absent of meaning.
    """
    cs = 1 << cluster_bits
    if size <= 0 or size > MAX_VIRTUAL_SIZE:
        raise DiskError(f"bad qcow2 size {size}")
    l1_size = l1_entries_needed(size, cluster_bits)
    l1_clusters = max(1, -(-l1_size * 8 // cs))
    n_meta = 3 + l1_clusters
    per_block = cs * 8 // 16
    if n_meta > per_block:
        raise DiskError(f"virtual size {size} too large to create")
    reftable_off, refblock_off, l1_off = cs, 2 * cs, 3 * cs
    ext = b""
    if backing is not None:
        fmt = (backing_format or "raw").encode()
        ext += struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt + bytes(-len(fmt) % 8)
    ext += struct.pack(">II", EXT_END, 0)
    header_length = 112
    name = backing.encode() if backing is not None else b""
    if len(name) > MAX_BACKING_NAME:
        raise DiskError("backing file name is too long")
    name_off = header_length + len(ext) if name else 0
    head = _V2.pack(MAGIC, 3, name_off, len(name), cluster_bits, size, 0, l1_size, l1_off,
                    reftable_off, 1, 0, 0)
    head += _V3.pack(0, 0, 0, 4, header_length) + bytes(8)  # compression type zlib + padding
    cluster0 = head + ext + name
    if len(cluster0) > cs:
        raise DiskError("backing file name does not fit in the header cluster")
    reftable = struct.pack(">Q", refblock_off)
    refblock = struct.pack(f">{n_meta}H", *([1] * n_meta))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise DiskError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.ftruncate(fd, (3 + l1_clusters) * cs)
        os.pwrite(fd, reftable, reftable_off)
        os.pwrite(fd, refblock, refblock_off)
        os.pwrite(fd, cluster0, 0)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        raise DiskError(f"cannot create {path}: {exc.strerror}") from None
    os.close(fd)
