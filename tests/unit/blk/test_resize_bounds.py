"""Sizes a resize may ask for, bounded before any storage call, for every kind of storage; and
C calls that cannot be handed an integer their argument type would truncate (issue 19, item 2).

RBD and NBD storage are built around fakes of their library handles (no cluster needed: what is
checked is that the bad size never reaches ``rbd_resize``); the real libraries' declarations are
checked by loading them.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from blockdev import cint
from blockdev.backends import open_storage
from blockdev.disk import MAX_IMAGE_SIZE, Disk, DiskError, check_growth
from blockdev.engine import IoOp
from blockdev.nbd import libnbd
from blockdev.nbd.storage import NbdEngine, NbdStorage, _Wire
from blockdev.nbd.storage import _Pending as NbdPending
from blockdev.ops import OpKind
from blockdev.rbd import librbd
from blockdev.rbd.storage import RbdEngine, RbdStorage, _Pending
from blockdev.storage import Capabilities, StorageError, remote_info
from remote_testbed.ceph import CephCluster
from virtio_blk.request import Segment

MiB = 1 << 20
#: Sizes no storage may be asked to grow to (from 1 MiB, 512-byte blocks).
BAD_SIZES: list[Any] = [2**64, 2**63, 2**73, 2**64 + MiB, -1, -(2**63), 0, 2 * MiB + 0.0,
                        True, "2097152", None]


@pytest.mark.parametrize("size", BAD_SIZES)
def test_the_shared_rule_refuses_sizes_no_storage_takes(size: Any) -> None:
    info = remote_info(MiB, False)
    with pytest.raises(DiskError):
        check_growth(info, size)


def test_the_shared_rule_takes_the_largest_whole_block_size() -> None:
    info = remote_info(MiB, False)
    largest = MAX_IMAGE_SIZE - MAX_IMAGE_SIZE % 512
    assert check_growth(info, largest) is True
    assert check_growth(info, MiB) is False
    # Capacity in sectors stays far inside virtio's u64 field.
    assert largest >> 9 < 2**64


class FakeRbd:
    """The librbd calls RbdStorage.grow and .aio make, recorded."""

    def __init__(self) -> None:
        self.resized: list[int] = []
        self.released = 0

    def rbd_resize(self, image: Any, size: int) -> int:
        self.resized.append(size)
        return 0

    def rbd_aio_create_completion(self, arg: Any, cb: Any, out: Any) -> int:
        return 0

    def rbd_aio_release(self, comp: Any) -> None:
        self.released += 1


def fake_rbd_storage() -> tuple[RbdStorage, FakeRbd]:
    st = RbdStorage.__new__(RbdStorage)  # no cluster: only what grow and aio use
    rbd = FakeRbd()
    st.rbd = rbd  # type: ignore[assignment]
    st.name = "rbd:pool/image"
    st.image = ctypes.c_void_p(1)
    st.info = remote_info(MiB, False)
    st._tokens = {}
    st._next = iter(range(1, 100))  # type: ignore[assignment]
    return st, rbd


@pytest.mark.parametrize("size", BAD_SIZES)
def test_rbd_never_passes_a_bad_size_to_rbd_resize(size: Any) -> None:
    st, rbd = fake_rbd_storage()
    with pytest.raises(StorageError):
        st.grow(size)
    assert rbd.resized == [] and st.info.size == MiB


def test_rbd_grows_by_a_good_size() -> None:
    st, rbd = fake_rbd_storage()
    st.grow(4 * MiB)
    assert rbd.resized == [4 * MiB] and st.info.size == 4 * MiB


def test_rbd_call_refused_for_its_argument_types_fails_the_op_only() -> None:
    st, rbd = fake_rbd_storage()

    def rbd_aio_discard(image: Any, offset: int, length: int, comp: Any) -> int:
        raise ctypes.ArgumentError("argument 2: OverflowError: out of range")

    op = IoOp(OpKind.DISCARD, 0)
    p = _Pending(RbdEngine.__new__(RbdEngine), op, False)
    st.aio(p, rbd_aio_discard, 2**64, 512)
    assert isinstance(p.error, OSError) and p.error.errno == errno.EINVAL
    assert p.left == 0 and st._tokens == {} and rbd.released == 1


@pytest.mark.parametrize("size", BAD_SIZES)
def test_nbd_names_a_bad_size_as_such(size: Any) -> None:
    st = NbdStorage.__new__(NbdStorage)  # no server: grow is refused before any call
    st.name = "nbd://x/y"
    st.info = remote_info(MiB, False)
    with pytest.raises(StorageError) as info:
        st.grow(size)
    assert "cannot be resized" not in str(info.value)


@pytest.mark.parametrize("size", [2**64, 2**63, 2**73])
def test_raw_file_refuses_huge_sizes_without_touching_the_file(tmp_path: Path,
                                                               size: int) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\0" * MiB)
    disk = Disk(path)
    try:
        with pytest.raises(DiskError):
            disk.grow(size)
    finally:
        disk.close()
    assert os.path.getsize(path) == MiB


# ---------------------------------------------------------------------------- ctypes


def test_checked_types_refuse_what_the_c_type_cannot_hold() -> None:
    labs = ctypes.CDLL(None).labs  # a libc function that echoes a 64-bit argument
    labs.restype = ctypes.c_int64
    labs.argtypes = (cint.INT64,)
    assert labs(-(2**63) + 1) == 2**63 - 1 and labs(5) == 5
    for bad in (2**63, -(2**63) - 1, 1.0, True, "1", None):
        with pytest.raises(ctypes.ArgumentError):
            labs(bad)
    assert cint.UINT64.checked_range == (0, 2**64 - 1)
    assert cint.SIZE_T.checked_range == (0, 2**64 - 1)
    assert cint.INT.checked_range == (-(2**31), 2**31 - 1)
    assert cint.UINT32.checked_range == (0, 2**32 - 1)


_INTEGER_CODES = set("bBhHiIlLqQ")


def _integer_argtypes(so: ctypes.CDLL) -> list[tuple[str, Any]]:
    """(function name, argtype) for every integer argument of every declared function."""
    out = []
    for name, fn in vars(so).items():
        if not isinstance(fn, ctypes._CFuncPtr):  # type: ignore[attr-defined]
            continue
        for t in fn.argtypes or ():
            if getattr(t, "_type_", None) in _INTEGER_CODES:
                out.append((name, t))
    return out


def test_every_integer_argument_of_librbd_and_libnbd_is_checked() -> None:
    try:
        rados, rbd = librbd.libs()
        nbd = libnbd.lib()
    except StorageError as exc:
        pytest.skip(str(exc))
    declared = _integer_argtypes(rados) + _integer_argtypes(rbd) + _integer_argtypes(nbd)
    assert {name for name, _ in declared} >= {"rbd_resize", "rbd_aio_readv", "rbd_aio_discard",
                                              "rbd_aio_write_zeroes", "nbd_aio_flush",
                                              "nbd_aio_command_completed"}
    # (NBD's data commands are packed by blockdev.nbd.wire, not passed to libnbd: the engine
    # checks their ranges against the export, see test_nbd_engine.py and the test below.)
    unchecked = [(name, t.__name__) for name, t in declared if not hasattr(t, "checked_range")]
    assert unchecked == []
    # So rbd_resize(image, 2**64) never reaches librbd as rbd_resize(image, 0).
    with pytest.raises(ctypes.ArgumentError):
        rbd.rbd_resize(None, 2**64)
    with pytest.raises(ctypes.ArgumentError):
        nbd.nbd_aio_command_completed(None, 2**64)


def test_a_real_rbd_image_keeps_its_size_and_data_after_hostile_sizes(
        ceph_cluster: CephCluster, rbd_image: str) -> None:
    """What issue 19 saw: 2**64 reached rbd_resize as 0 and emptied the volume."""
    storage = open_storage(ceph_cluster.spec(rbd_image))
    try:
        for size in BAD_SIZES:
            with pytest.raises(StorageError):
                storage.grow(size)
        info = json.loads(ceph_cluster.rbd("info", "--format", "json", f"rbd/{rbd_image}"))
        assert info["size"] == 64 * MiB and storage.info.size == 64 * MiB
        storage.grow(96 * MiB)  # and a good size still works
    finally:
        storage.close()
    info = json.loads(ceph_cluster.rbd("info", "--format", "json", f"rbd/{rbd_image}"))
    assert info["size"] == 96 * MiB


@pytest.mark.parametrize("kind", [OpKind.DISCARD, OpKind.WRITE_ZEROES])
@pytest.mark.parametrize("offset,length", [(2**64, 512), (-512, 512), (MiB - 512, 1024),
                                           (0, -512)])
def test_nbd_range_outside_the_export_fails_the_op_only(kind: OpKind, offset: int,
                                                        length: int) -> None:
    """Every segment is checked before any command is queued: one bad segment among good ones
    queues nothing (a partly sent request would be half done)."""
    st = NbdStorage.__new__(NbdStorage)
    st.uri = st.name = "nbd://x/y"
    st.caps = Capabilities(flush=True, discard=True, write_zeroes=True)
    st.can_fua = False
    st.info = remote_info(MiB, False, 512)
    engine = NbdEngine.__new__(NbdEngine)
    engine.storage = st
    engine._cmds = {}
    wire = _Wire.__new__(_Wire)
    wire.out, wire.queued, wire.cookie = [], 0, 0
    op = IoOp(kind, 0)
    op.segments = [Segment(0, 512, False), Segment(offset, length, False)]
    p = NbdPending(op, False)
    assert engine._issue(wire, p) is True  # complete at once
    assert isinstance(p.error, OSError) and p.error.errno == errno.EINVAL
    assert p.left == 0 and engine._cmds == {} and wire.out == []
