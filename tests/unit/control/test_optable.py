"""The operation table drives everything: a kind in the table is counted, timed, scraped and
reported, and a kind added to it without a handler, a counter or a request fails here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from blockdev.disk import Disk
from blockdev.ops import DISK_OPS, Capabilities, OpKind, by_kind
from blockdev.storage import FileStorage
from tests.unit.blk.conftest import make_image
from tests.unit.control.conftest import MakeOperated
from tests.unit.control.test_metrics import blockstats, scrape
from vhost_frontend.blk import BlkDriver, BlkResult
from virtio_blk.device import BlkDevice, BlkQueueHandler, BlkStats
from virtio_blk.ops import DEVICE_OPS, OPS, DeviceOp
from virtio_blk.request import BlkFeature, ReqType, Status

#: One well-formed request of each type the table lists (a type without one fails the tests
#: below with a KeyError: add it here).
REQUESTS: dict[ReqType, Callable[[BlkDriver], BlkResult]] = {
    ReqType.IN: lambda d: d.read(0, 4096),
    ReqType.OUT: lambda d: d.write(8, b"w" * 4096),
    ReqType.FLUSH: lambda d: d.flush(),
    ReqType.GET_ID: lambda d: d.get_id(),
    ReqType.DISCARD: lambda d: d.discard((16, 8)),
    ReqType.WRITE_ZEROES: lambda d: d.write_zeroes((24, 8)),
}

#: The BlockDeviceStats fields QEMU reports per family; bytes and merged only for families
#: that move bytes.
QMP_PER_FAMILY = ("{}_operations", "failed_{}_operations", "{}_total_time_ns")
QMP_PER_BYTE_FAMILY = ("{}_bytes", "{}_merged")


def test_every_kind_has_its_row() -> None:
    assert [row.index for row in DISK_OPS] == list(OpKind)
    assert OPS[: len(DISK_OPS)] == DISK_OPS
    assert [row.index for row in OPS] == list(range(len(OPS)))
    assert len({row.name for row in OPS}) == len(OPS)
    assert len({row.counter for row in OPS}) == len(OPS)
    fields = {f.name for f in dataclasses.fields(Capabilities)}
    for row in OPS:
        assert row.capability is None or row.capability in fields, row
    # Every row is served by exactly one request type, whose start method exists.
    assert sorted(op.row.index for op in DEVICE_OPS) == [row.index for row in OPS]
    for op in DEVICE_OPS:
        assert callable(getattr(BlkQueueHandler, op.start)), op


def test_a_dispatch_missing_a_kind_is_refused() -> None:
    with pytest.raises(TypeError, match="FLUSH"):
        by_kind({k: k.name for k in OpKind if k != OpKind.FLUSH}, "test")
    assert by_kind({k: k.name for k in OpKind}) == tuple(k.name for k in OpKind)


def test_stats_hold_every_kind_of_the_table() -> None:
    st = BlkStats()
    for row in OPS:
        assert getattr(st, row.counter) == 0
        if row.bytes_counter is not None:
            assert getattr(st, row.bytes_counter) == 0
    assert len(st.failed) == len(st.total_ns) == len(st.latency) == len(OPS)
    st.set_values(st.values())  # the flat form queue processes publish round-trips


@pytest.mark.parametrize("op", DEVICE_OPS, ids=lambda op: op.row.name)
def test_one_request_is_counted_timed_scraped_and_reported(make_operated: MakeOperated,
                                                           op: DeviceOp) -> None:
    """Each type, alone: its counter, its histogram (GET_ID's too), its metrics and its
    query-blockstats family see exactly one operation, and no other kind's do."""
    o = make_operated()
    res = REQUESTS[op.req_type](o.env.drv)
    assert res.status == Status.OK
    row = op.row
    stats = o.env.device.stats
    for other in OPS:
        assert getattr(stats, other.counter) == (other is row), other.name
    t = o.env.device.totals()
    assert [sum(h) for h in t.latency] == [int(other is row) for other in OPS]
    assert t.total_ns[row.index] > 0

    m = scrape(o)
    for other in OPS:
        n = int(other is row)
        assert m[("vhost_user_blk_requests_total", (("op", other.name), ("queue", "0")))] == n
        assert m[("vhost_user_blk_request_seconds_count", (("op", other.name),))] == n

    st = blockstats(o)
    for family in {other.qmp for other in OPS if other.qmp is not None}:
        assert st[f"{family}_operations"] == int(family == row.qmp), family


def test_metrics_and_blockstats_expose_exactly_the_tables_kinds(
        make_operated: MakeOperated) -> None:
    o = make_operated()
    m = scrape(o)
    names = {row.name for row in OPS}
    for metric in ("vhost_user_blk_requests_total", "vhost_user_blk_request_seconds_count"):
        assert {dict(labels)["op"] for name, labels in m if name == metric} == names
    families = {row.qmp for row in OPS if row.qmp is not None}
    byte_families = {row.qmp for row in OPS if row.qmp is not None and row.bytes_counter}
    expected = {f.format(fam) for fam in families for f in QMP_PER_FAMILY}
    expected |= {f.format(fam) for fam in byte_families for f in QMP_PER_BYTE_FAMILY}
    expected |= {"account_invalid", "account_failed", "timed_stats"}
    assert set(blockstats(o)) == expected


@pytest.mark.parametrize("capability", [f.name for f in dataclasses.fields(Capabilities)])
@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_offered_features_follow_the_table(tmp_path: Path, capability: str,
                                           read_only: bool) -> None:
    """A request type's feature bits are offered exactly when its row says the storage can
    carry it out (its capability, and writability where it needs it)."""
    make_image(tmp_path / "d.img", 1 << 20)
    disk = Disk(tmp_path / "d.img", read_only=read_only)
    try:
        storage = FileStorage(disk)
        storage.caps = Capabilities(**{capability: False})
        features = BlkDevice(storage).features()
        for op in DEVICE_OPS:
            if not op.features:
                continue
            offered = not (op.row.capability == capability
                           or (op.row.needs_writable and read_only))
            assert bool(features & op.features) == offered, op.row.name
        assert bool(features & BlkFeature.RO) == read_only
    finally:
        disk.close()
