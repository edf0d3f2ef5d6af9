"""The benchmarks measure what they claim: Linux's request shapes, real data, both qsd engines,
alternating order, the faster qsd engine as the reference -- and the scripts run (a smoke run of
a fraction of a second per server; no figure is checked, these machines are too noisy)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from benchmarks import hotpath, inprocess, nbd_engine
from benchmarks.common import (
    Measurement,
    lay_out_request,
    make_image,
    print_table,
    qsd_servers,
    reference,
    round_order,
    server_command,
    summarize,
)
from guestmem import GuestMemory
from tests.remote.fixtures import MakeNbd
from vhost.messages import VirtioFeature
from vhost.queue.base import RingAddresses
from vhost.queue.split import DESC, VIRTQ_DESC_F_INDIRECT, SplitQueue
from vhost_frontend import DriverQueue, DriverRing, FrontendMemory
from virtio_blk.device import BlkQueueHandler

HAVE_QSD = shutil.which("qemu-storage-daemon") is not None


def test_rounds_alternate_the_server_order() -> None:
    servers = ["python", "qsd-threads", "qsd-io_uring"]
    assert round_order(servers, 0) == servers
    assert round_order(servers, 1) == ["qsd-io_uring", "qsd-threads", "python"]
    assert round_order(servers, 2) == servers


def test_qsd_runs_with_both_engines_of_the_cache_mode(tmp_path: Path) -> None:
    assert qsd_servers(direct=False) == ["qsd-threads", "qsd-io_uring"]
    assert qsd_servers(direct=True) == ["qsd-native", "qsd-io_uring"]
    with pytest.raises(ValueError, match="O_DIRECT"):
        qsd_servers(direct=False, engines=["native"])
    if HAVE_QSD:
        cmd = " ".join(server_command("qsd-io_uring", tmp_path / "i", tmp_path / "s", 1, False))
        assert "cache.direct=off,aio=io_uring" in cmd
        cmd = " ".join(server_command("qsd", tmp_path / "i", tmp_path / "s", 1, True))
        assert "cache.direct=on,aio=native" in cmd


def test_qsd_can_serve_the_same_node_as_ours(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """--nbd: both servers get one driver=nbd node, so qsd's NBD client is the reference (not
    qsd on a file), in one 'qsd' row."""
    uri = f"nbd+unix:///disk?socket={tmp_path}/n.sock"
    node = f"driver=nbd,node-name=f0,server.type=unix,server.path={tmp_path}/n.sock,export=disk"
    ours = server_command("python", tmp_path / "i", tmp_path / "s", 1, False, blockdev=[node])
    if HAVE_QSD:
        qsd = server_command("qsd", tmp_path / "i", tmp_path / "s", 1, False,
                             qsd_blockdev=[node])
        assert qsd[1:3] == ["--blockdev", node] and "filename=" not in " ".join(qsd)
        assert qsd[3] == "--export" and "node-name=f0," in qsd[4]
    assert ours[3:5] == ["--blockdev", node]
    seen: list[tuple[str, list[str] | None, list[str] | None]] = []

    def fake_measure(server: str, *args: object) -> Measurement:
        seen.append((server, args[-2], args[-1]))  # type: ignore[arg-type]
        return _row(server, 1e3, 1.0)

    def no_image(*args: object) -> None:
        raise AssertionError("no server serves the image: none is made")

    monkeypatch.setattr(inprocess, "measure", fake_measure)
    monkeypatch.setattr(inprocess, "make_image", no_image)
    assert inprocess.main(["--queues", "1", "--workloads", "randwrite", "--rounds", "1",
                           "--nbd", uri, "--dir", str(tmp_path)]) == 0
    assert seen == [("python", [node], [node]), ("qsd", [node], [node])]
    with pytest.raises(SystemExit):
        inprocess.main(["--nbd", uri, "--qsd-aio", "threads"])


def _row(server: str, ops: float, cpu: float) -> Measurement:
    return Measurement(server, "randread", 1, False, ops, ops * 4096, 0.0, cpu)


def test_the_reference_is_the_faster_qsd_engine(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [_row("python", 60e3, 13.0), _row("python", 66e3, 12.0), _row("python", 50e3, 14.0),
            _row("qsd-threads", 100e3, 9.0), _row("qsd-threads", 110e3, 8.0),
            _row("qsd-threads", 90e3, 10.0),
            _row("qsd-io_uring", 300e3, 3.0), _row("qsd-io_uring", 310e3, 3.2),
            _row("qsd-io_uring", 280e3, 3.1)]
    summaries = summarize(rows)[("randread", 1, False)]
    ref = reference(summaries)
    assert ref is not None and ref.server == "qsd-io_uring" and ref.ops == 300e3
    ours = summaries[0]
    assert (ours.server, ours.ops, ours.cpu_us_per_op) == ("python", 60e3, 13.0)
    assert ours.ops_spread == pytest.approx(16e3 / 60e3)
    print_table(rows, "t")
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    assert ["python", "/", "qsd-io_uring", "(reference)", "IOPS", "0.20", "CPU/req", "4.19"] \
        in lines
    assert ["python", "/", "qsd-threads", "IOPS", "0.60", "CPU/req", "1.44"] in lines


def test_ratios_within_each_round_show_the_noise(capsys: pytest.CaptureFixture[str]) -> None:
    """Round 2 ran under load for both servers: the paired ratio hardly moves."""
    rows = []
    for rnd, (py, qs) in enumerate([((60e3, 12.0), (300e3, 3.0)), ((20e3, 24.0), (100e3, 6.0)),
                                    ((66e3, 13.0), (290e3, 2.6))], start=1):
        for server, (ops, cpu) in (("python", py), ("qsd-io_uring", qs)):
            row = _row(server, ops, cpu)
            row.extra["round"] = rnd
            rows.append(row)
    print_table(rows, "t")
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["python", "/", "qsd-io_uring", "(reference)", "IOPS", "0.21", "[0.20..0.23]",
            "CPU/req", "4.33", "[4.00..5.00]"] in lines


def test_the_reference_follows_the_figures_not_the_names() -> None:
    """Where threads beat io_uring (it can, with O_DIRECT or on another kernel), threads lead."""
    rows = [_row("python", 60e3, 13.0), _row("qsd-io_uring", 90e3, 8.0),
            _row("qsd-threads", 120e3, 9.0)]
    ref = reference(summarize(rows)[("randread", 1, False)])
    assert ref is not None and ref.server == "qsd-threads"


@pytest.mark.parametrize("shape", ["indirect", "direct"])
def test_requests_have_the_shape_asked_for(shape: str) -> None:
    """The device pops header, data, status either way; indirect is one ring descriptor."""
    mem = GuestMemory.anonymous(1 << 20)
    addresses = RingAddresses(0x1000, 0x3000, 0x4000)
    ring = DriverRing(mem, 16, addresses, event_idx=False)
    vq = SplitQueue(mem, 16, addresses, int(VirtioFeature.RING_INDIRECT_DESC))
    try:
        pieces = [(0x10000, 16, False), (0x11000, 4096, True), (0x12000, 1, True)]
        head = lay_out_request(ring, 2, pieces, 0x20000 if shape == "indirect" else None)
        ring.publish(head)
        chain = vq.pop()
        assert chain is not None and chain.head == head and chain.pieces == pieces
        flags = DESC.unpack(mem.read(0x1000 + 16 * head, 16))[2]
        assert bool(flags & VIRTQ_DESC_F_INDIRECT) == (shape == "indirect")
        assert head == (2 if shape == "indirect" else 6)
    finally:
        ring.release()
        vq.release()
        mem.close()


def test_inprocess_load_is_linux_shaped_by_default() -> None:
    mem = FrontendMemory([(0, 4 << 20, 0)])
    q = DriverQueue(mem, 0, 64, event_idx=True)
    try:
        load = inprocess.QueueLoad(mem, q, 4, 4096, 1 << 20, write=False)
        for slot in range(4):
            addr, length, flags, _ = DESC.unpack(mem.read(q.desc + 16 * slot, 16))
            assert flags == VIRTQ_DESC_F_INDIRECT and length == 48
            table = [DESC.unpack(mem.read(addr + 16 * i, 16)) for i in range(3)]
            assert [d[1] for d in table] == [16, 4096, 1]
        load.release()
        with pytest.raises(ValueError, match="descriptors"):
            inprocess.QueueLoad(mem, q, 32, 4096, 1 << 20, write=False, shape="direct")
    finally:
        q.close()
        mem.close()


def test_hotpath_reads_real_data_with_indirect_requests(tmp_path: Path) -> None:
    image = tmp_path / "img"
    make_image(image, 32 << 20, fill=True)
    rig = hotpath.Rig("inline", str(image), slots=8)
    try:
        hotpath.measure(rig, 8, 16)
        content = image.read_bytes()
        for slot in range(8):
            sector = int.from_bytes(rig.mem.read(0x100000 + 16 * slot + 8, 8), "little")
            data = rig.mem.read(rig.data[slot], 4096)
            assert data == content[sector * 512:sector * 512 + 4096] and any(data)
        flags = DESC.unpack(rig.mem.read(hotpath.DESC_GPA, 16))[2]
        assert flags & VIRTQ_DESC_F_INDIRECT
    finally:
        rig.close()


def test_hotpath_runs_on_a_filled_image(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[bytes] = []

    class Spy(hotpath.Rig):
        def __init__(self, engine: str, image: str, **kw: object) -> None:
            seen.append(Path(image).read_bytes()[:1 << 20])
            super().__init__(engine, image, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(hotpath, "Rig", Spy)
    hotpath.main(["--engine", "inline", "--requests", "64", "--repeat", "1", "--batches", "32",
                  "1"])
    assert seen and all(any(s) for s in seen)
    out = capsys.readouterr().out
    assert "inline    indirect filled batch  32" in out and "batch   1" in out


def test_hotpath_compares_shapes_and_data_in_one_process(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    made: list[tuple[str, bool]] = []

    class Spy(hotpath.Rig):
        def __init__(self, engine: str, image: str, **kw: object) -> None:
            made.append((str(kw["shape"]), any(Path(image).read_bytes()[:1 << 20])))
            super().__init__(engine, image, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(hotpath, "Rig", Spy)
    hotpath.main(["--engine", "inline", "--requests", "64", "--repeat", "1", "--batches", "32",
                  "--fast-path", "on", "--shape", "both", "--data", "both"])
    assert sorted(made) == [("direct", False), ("direct", True), ("indirect", False),
                            ("indirect", True)]
    out = capsys.readouterr().out
    assert "filled indirect/direct" in out and "indirect filled/sparse" in out
    assert "inline    direct   sparse batch  32" in out


def test_hotpath_compares_split_and_packed_rings(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``--layout both``: a split and a packed rig, each serving real reads, and the ratio."""
    made: list[hotpath.Rig] = []

    class Spy(hotpath.Rig):
        def __init__(self, engine: str, image: str, **kw: object) -> None:
            super().__init__(engine, image, **kw)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr(hotpath, "Rig", Spy)
    hotpath.main(["--engine", "inline", "--requests", "64", "--repeat", "1", "--batches", "32",
                  "--fast-path", "on", "--layout", "both"])
    assert sorted(type(rig.vq).__name__ for rig in made) == ["PackedQueue", "SplitQueue"]
    for rig in made:
        assert isinstance(rig.handler, BlkQueueHandler)
        assert rig.handler._fast is not None and rig.handler._fast.taken, type(rig.vq)
    out = capsys.readouterr().out
    assert "inline    packed indirect filled batch  32" in out
    assert "packed/split: indirect filled" in out


@pytest.mark.parametrize("direct", [False, True])
def test_inprocess_smoke(tmp_path: Path, direct: bool,
                        capsys: pytest.CaptureFixture[str]) -> None:
    """Two rounds, every server for a fraction of a second; the JSON says who ran when."""
    out = tmp_path / "out.json"
    argv = ["--queues", "1", "--workloads", "randread", "--rounds", "2", "--seconds", "0.2",
            "--warmup", "0.1", "--size", "8M", "--dir", str(tmp_path), "--json", str(out)]
    if direct:
        argv.append("--direct")
    if not HAVE_QSD:
        argv += ["--servers", "python"]
    assert inprocess.main(argv) == 0
    rows = json.loads(out.read_text())
    order = [r["server"] for r in rows]
    if HAVE_QSD:
        first = ["python", *qsd_servers(direct)]
        assert order == first + first[::-1]
    assert all(r["ops"] > 0 and r["extra"]["shape"] == "indirect" for r in rows)
    assert [r["extra"]["round"] for r in rows] == sorted(r["extra"]["round"] for r in rows)
    capsys.readouterr()
    assert inprocess.main(["--table", str(out)]) == 0
    table = capsys.readouterr().out
    assert "randread" in table and ("python / qsd-" in table or not HAVE_QSD)


def test_hotpath_refuses_a_figure_of_failed_requests(tmp_path: Path) -> None:
    """Reads past the end of a 1 MiB image fail fast; that is no per-request cost."""
    image = tmp_path / "img"
    make_image(image, 1 << 20, fill=True)
    rig = hotpath.Rig("inline", str(image), slots=8)
    try:
        with pytest.raises(RuntimeError, match="status"):
            hotpath.measure(rig, 8, 16)
    finally:
        rig.close()


def test_inprocess_refuses_a_figure_of_failed_requests(tmp_path: Path) -> None:
    """Writes to a read-only export all fail, fast: no IOPS figure may come of them."""
    argv = ["--servers", "python", "--queues", "1", "--workloads", "randwrite", "--rounds", "1",
            "--seconds", "0.2", "--warmup", "0.1", "--size", "8M", "--dir", str(tmp_path),
            "--server-args=--read-only"]
    with pytest.raises(RuntimeError, match="error status"):
        inprocess.main(argv)


def test_hotpath_counts_one_configuration_inside_any(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """--instructions runs exactly --requests requests inside the one any() callgrind counts
    (every round: any() must not stop early), and refuses two configurations at once (their
    counts would be summed)."""
    rounds: list[int] = []

    class Spy(hotpath.Rig):
        def round(self, batch: int) -> None:
            rounds.append(batch)
            super().round(batch)

    monkeypatch.setattr(hotpath, "Rig", Spy)
    calls: list[int] = []
    real_any = any

    def counting_any(it: Iterable[object]) -> bool:
        before = len(rounds)
        result = real_any(it)
        calls.append(len(rounds) - before)
        return result

    monkeypatch.setattr(hotpath, "any", counting_any, raising=False)
    assert hotpath.main(["--engine", "inline", "--instructions", "--fast-path", "on",
                         "--batches", "8", "--requests", "64"]) == 0
    assert calls == [8] and "64 requests of batch 8 counted" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        hotpath.main(["--engine", "inline", "--instructions", "--fast-path", "both",
                      "--batches", "8", "--requests", "64"])


def test_nbd_engine_smoke(make_nbd: MakeNbd, capsys: pytest.CaptureFixture[str]) -> None:
    """Both NBD clients run against one nbdkit, in alternating order, and the table has a
    median for each (no figure is checked)."""
    server = make_nbd("nbdkit", "unix")
    argv = ["--socket", str(server.sock), "--export", "disk", "--rounds", "2",
            "--seconds", "0.2", "--depth", "8"]
    assert nbd_engine.main(argv) == 0
    out = capsys.readouterr().out
    runs = [line.split()[2] for line in out.splitlines() if line.startswith("round")]
    assert runs == ["NbdEngine", "direct", "NbdEngine", "direct",
                    "direct", "NbdEngine", "direct", "NbdEngine"]
    table = [line.split() for line in out.splitlines()[-4:]]
    assert [row[:2] for row in table] == [["write", "NbdEngine"], ["write", "direct"],
                                          ["read", "NbdEngine"], ["read", "direct"]]
    assert all(float(row[2]) > 0 for row in table)


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_hotpath_counts_the_server_alone_inside_operator_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """``--toggle-collect=_operator_call`` counts what runs inside ``operator.call``: every
    worker pass of the counted rounds, and nothing of the driver or of the warm-up rounds."""
    image = tmp_path / "img"
    make_image(image, 32 << 20, fill=True)
    rig = hotpath.Rig("inline", str(image), slots=8, layout=layout)
    inside = [False]
    seen = {"passes in": 0, "passes out": 0, "driver in": 0, "calls": 0}
    real_call, real_service = hotpath.call, rig.worker._service

    def counted_call(fn: Callable[[], None]) -> None:
        seen["calls"] += 1
        inside[0] = True
        try:
            real_call(fn)
        finally:
            inside[0] = False

    def service(kick: bool) -> None:
        seen["passes in" if inside[0] else "passes out"] += 1
        real_service(kick=kick)

    driver = rig.driver
    post = "add_raw" if layout == "packed" else "publish"
    real_post, real_take = getattr(driver, post), driver.take_used

    def spy(real: Callable[..., object]) -> Callable[..., object]:
        def wrapped(*args: object, **kwargs: object) -> object:
            seen["driver in"] += inside[0]
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(hotpath, "call", counted_call)
    monkeypatch.setattr(rig.worker, "_service", service)
    monkeypatch.setattr(driver, post, spy(real_post))
    monkeypatch.setattr(driver, "take_used", spy(real_take))
    try:
        hotpath.count_instructions(rig, 8, 64)
    finally:
        rig.close()
    assert seen["calls"] == 64 // 8  # the counted rounds, not the warm-up ones
    assert seen["passes in"] >= seen["calls"] and seen["passes out"] > 0  # warm-up: outside
    assert seen["driver in"] == 0
