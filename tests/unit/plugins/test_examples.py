"""The shipped example plugins through the Storage interface, as the device drives them: written
through queue 0's engine, read through queue 1's, discards read back as zeros, capabilities and
read-only state following the methods each defines."""

from __future__ import annotations

import os

from blockdev.ops import OpKind
from blockdev.python.storage import PluginStorage, load_class, open_plugin
from examples.chunkdir import ChunkDir
from examples.ramdisk import RamDisk
from tests.unit.plugins.helpers import engines, flush, ranged, read, write

KiB = 1024


def test_ramdisk_across_queues():
    st = open_plugin(load_class("examples.ramdisk", "RamDisk"), {"size": "1M"}, "ram")
    assert st.info.size == 1 << 20 and not st.info.read_only
    assert (st.caps.flush, st.caps.discard, st.caps.write_zeroes) == (False, True, True)
    assert st.thread_model == "parallel"
    q0, q1 = engines(st)
    data = os.urandom(64 * KiB)
    assert write(q0, 512 * KiB, data, pieces=3) == len(data)
    assert read(q1, 512 * KiB, len(data)) == data
    assert ranged(q1, OpKind.DISCARD, 512 * KiB, 4 * KiB) == 0
    assert read(q0, 512 * KiB, 8 * KiB) == bytes(4 * KiB) + data[4 * KiB:8 * KiB]
    assert ranged(q0, OpKind.WRITE_ZEROES, 520 * KiB, 4 * KiB) == 0
    assert read(q1, 520 * KiB, 4 * KiB) == bytes(4 * KiB)
    for q in (q0, q1):
        q.close()
    st.close()


def test_a_ramdisk_without_pwrite_is_read_only():
    class Frozen(RamDisk):
        pwrite = None  # type: ignore[assignment]
        zero = None  # type: ignore[assignment]
        trim = None  # type: ignore[assignment]

    st = PluginStorage(Frozen("64K"), "frozen")
    assert st.info.read_only
    assert (st.caps.discard, st.caps.write_zeroes) == (False, False)


def test_chunkdir_sparse_across_queues(tmp_path):
    d = tmp_path / "chunks"
    st = open_plugin(ChunkDir, {"path": str(d), "size": str(1 << 20), "chunk": str(64 * KiB)},
                     "chunks")
    assert (st.caps.flush, st.caps.discard, st.caps.write_zeroes) == (True, True, True)
    assert st.thread_model == "serialized" and not st.info.read_only
    q0, q1 = engines(st)
    assert read(q1, 0, 128 * KiB) == bytes(128 * KiB)  # nothing stored: zeros
    assert os.listdir(d) == []
    data = os.urandom(96 * KiB)
    assert write(q0, 3 * 64 * KiB + 32 * KiB, data) == len(data)  # chunks 3 and 4
    assert sorted(os.listdir(d)) == ["3", "4"]
    assert read(q1, 3 * 64 * KiB, 128 * KiB) == bytes(32 * KiB) + data
    assert flush(q0) == 0
    assert ranged(q1, OpKind.DISCARD, 4 * 64 * KiB, 64 * KiB) == 0  # a whole chunk: deleted
    assert sorted(os.listdir(d)) == ["3"]
    assert ranged(q1, OpKind.DISCARD, 3 * 64 * KiB + 32 * KiB, 4 * KiB) == 0  # part: zeroed
    assert read(q0, 3 * 64 * KiB + 32 * KiB, 64 * KiB) == (
        bytes(4 * KiB) + data[4 * KiB:32 * KiB] + bytes(32 * KiB))
    for q in (q0, q1):
        q.close()
    st.close()
    # reopened: the data is in the directory
    again = open_plugin(ChunkDir, {"path": str(d), "size": str(1 << 20), "chunk": str(64 * KiB)},
                        "chunks")
    (q,) = engines(again, 1)
    assert read(q, 3 * 64 * KiB + 36 * KiB, 28 * KiB) == data[4 * KiB:32 * KiB]
    q.close()
