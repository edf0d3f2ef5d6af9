"""The compatibility script (benchmarks.qsd_compat): its scenario, run against
qemu-storage-daemon, must go to its end and see what QSD does -- else a diff against the server
would compare two broken runs -- and the comparison must turn any difference outside the
allow-list into a diff and a non-zero exit status."""

from __future__ import annotations

import pytest

from benchmarks import qsd_compat
from benchmarks.qsd_compat import compare, mask_allowed, normalise


@pytest.fixture(scope="module")
def qsd_transcript() -> list[str]:
    return qsd_compat.run_daemon("qsd")


def test_the_scenario_runs_to_its_end_against_qsd(qsd_transcript: list[str]) -> None:
    text = "\n".join(qsd_transcript)
    assert "scenario stopped" not in text and ": failed:" not in text, text
    # Every request on every queue of every export completed OK and read back what it wrote.
    io = [line for line in qsd_transcript if line.startswith("  queue ")]
    assert len(io) == 14, text  # exp0 (+host check), exp1: 2 queues, twice; exp2: 1 (+host)
    assert all("write=0 read=0 match=True flush=0" in line or "host sees the bytes=True" in line
               for line in io), text
    assert "event BLOCK_EXPORT_DELETED {\"id\": \"exp2\"}" in qsd_transcript
    # QSD's block-export-del (mode "safe") hangs up on a frontend still connected.
    assert "frontend of exp2 after block-export-del: disconnected" in qsd_transcript
    assert qsd_transcript[-2:] == ["exit status 0", "qemu-img check disk.qcow2 -> rc=0"]


def test_the_error_cases_are_errors_against_qsd(qsd_transcript: list[str]) -> None:
    errors = [line.split(" -> error ", 1)[1] for line in qsd_transcript if " -> error " in line]
    assert errors == [
        "GenericError: Duplicate nodes with node-name='hot0'",
        "GenericError: Node hot0 is in use",
        "GenericError: Parameter 'driver' does not accept value 'no-such-driver'",
        "GenericError: Parameter 'type' does not accept value 'no-such-type'",
        "GenericError: Block export id 'exp2' is already in use",
        "GenericError: Export 'no-such-export' is not found",
        "GenericError: Failed to find node with node-name='no-such-node'",
        "GenericError: bps/iops/max values must be within [0, 1000000000000000]",
        "DeviceNotFound: Device 'no-such-object' not found",
        "GenericError: attempt to add duplicate property 'tg1' to object (type 'container')",
        "GenericError: object 'tg0' is in use, can not be deleted",
        "GenericError: object 'no-such-object' not found",
        "GenericError: Cannot find device='' nor node-name='no-such-node'",
    ]


def test_qom_set_changes_the_group_limits_in_qsd(qsd_transcript: list[str]) -> None:
    limits = [line for line in qsd_transcript if line.startswith("qom-get {\"path\": \"tg")]
    assert len(limits) == 3
    assert f'"iops-total": {qsd_compat.THROTTLE_IOPS},' in limits[0]
    assert f'"iops-total": {qsd_compat.NEW_IOPS},' in limits[1]
    assert '"iops-total": 300,' in limits[2] and '"tg1"' in limits[2]
    # A resize by node name shows in the node list (the capacity line is allow-listed).
    assert any('"node-name": "hot0", "ro": false, "virtual-size": 134217728' in line
               for line in qsd_transcript if line.startswith("query-named-block-nodes"))


def test_paths_and_versions_are_normalised(qsd_transcript: list[str]) -> None:
    text = "\n".join(qsd_transcript)
    assert "/tmp/" not in text and "$WORK/exp2.sock" in text
    assert qsd_transcript[0] == 'query-version -> {"package": "<version>", "qemu": "<version>"}'


def test_a_difference_is_a_diff_and_an_allowed_one_is_not() -> None:
    qsd = ["quit -> {}", "  config exp0: seg_max=126 size_max=0", "exit status 0"]
    assert compare(qsd, list(qsd)) == []
    assert compare(qsd, ["quit -> {}", "  config exp0: seg_max=254 size_max=65536",
                         "exit status 0"]) == []
    diff = compare(qsd, ["quit -> {}", "  config exp0: seg_max=126 size_max=0",
                         "exit status 1"])
    assert "-exit status 0" in diff and "+exit status 1" in diff
    assert mask_allowed(["io exp0: capacity=1 blk_size=512 num_queues=2"]) == \
        ["io exp0: capacity=1 blk_size=512 num_queues=2"]


def test_node_lists_keep_only_the_documented_fields_in_a_stable_order() -> None:
    nodes = [{"node-name": "b", "drv": "raw", "ro": False, "cache": {"direct": True},
              "image": {"virtual-size": 4096, "filename": "x"}},
             {"node-name": "a", "drv": "file", "ro": True, "image": {"virtual-size": 1}},
             {"node-name": "file1", "drv": "file", "ro": False, "image": {"virtual-size": 7}}]
    assert normalise("query-named-block-nodes", nodes) == [
        {"node-name": "a", "drv": "file", "ro": True, "virtual-size": 1},
        {"node-name": "b", "drv": "raw", "ro": False, "virtual-size": 4096},
        {"node-name": "file1", "drv": "file", "ro": False, "virtual-size": "<file length>"},
    ]
    assert normalise("qom-get", {"iops-total": 5, "bps-total": 0}) == {"iops-total": 5}


def test_main_exits_non_zero_on_a_diff(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    runs = {"qsd": ["quit -> {}", "exit status 0"], "server": ["quit -> {}", "exit status 1"]}
    monkeypatch.setattr(qsd_compat, "run_daemon", lambda daemon, *_, **__: runs[daemon])
    assert qsd_compat.main([]) == 1
    assert "+exit status 1" in capsys.readouterr().out
    runs["server"] = list(runs["qsd"])
    assert qsd_compat.main([]) == 0


#: The one behaviour in which this server knowingly differs: ``block-export-del`` in mode
#: "safe" of an export whose frontend is still connected.  QEMU's own rule (the check in
#: block/export/export.c, and QAPI's BlockExportRemoveMode: "safe: remove export if there are
#: no existing connections, fail otherwise") refuses it with "export 'ID' still in use";
#: qemu-storage-daemon 7.2's vhost-user-blk export takes no reference per connection, so it
#: deletes the export and hangs up on the frontend.  This server follows the documented rule:
#: the export keeps serving, its node stays in use; the rest of the scenario is QSD's.
EXPORT_DEL = 'block-export-del {"id": "exp2"} -> '
SERVER_AFTER = [
    EXPORT_DEL + "error GenericError: export 'exp2' still in use",
    "event BLOCK_EXPORT_DELETED: not seen within 5 s",
    "frontend of exp2 after block-export-del: still connected",
    'blockdev-del {"node-name": "hot0"} -> error GenericError: Node hot0 is in use',
]


def test_the_server_behaves_as_qsd(qsd_transcript: list[str]) -> None:
    """Line for line QSD's transcript, but for the documented difference above: up to that
    step the same, at it the refusal, and after it the same but for the export still there."""
    qsd = qsd_compat.mask_allowed(qsd_transcript)
    server = qsd_compat.mask_allowed(qsd_compat.run_daemon("server"))
    diff = "\n".join(compare(qsd_transcript, server))
    qi = next(i for i, line in enumerate(qsd) if line.startswith(EXPORT_DEL))
    si = next(i for i, line in enumerate(server) if line.startswith(EXPORT_DEL))
    assert server[:si] == qsd[:qi], diff
    assert qsd[qi:qi + 4] == [
        EXPORT_DEL + "{}", 'event BLOCK_EXPORT_DELETED {"id": "exp2"}',
        "frontend of exp2 after block-export-del: disconnected",
        'blockdev-del {"node-name": "hot0"} -> {}'], diff
    assert server[si:si + 4] == SERVER_AFTER, diff
    # The two listings after it differ by exactly the export and node still there.
    nodes_q, exports_q = qsd[qi + 4:qi + 6]
    nodes_s, exports_s = server[si + 4:si + 6]
    assert nodes_s == nodes_q.replace(
        ', {"drv": "qcow2"', ', {"drv": "file", "node-name": "hot0", "ro": false, '
        '"virtual-size": 134217728}, {"drv": "qcow2"'), diff
    assert exports_s == exports_q.replace(
        "]", ', {"id": "exp2", "node-name": "hot0", "shutting-down": false, '
        '"type": "vhost-user-blk"}]'), diff
    assert server[si + 6:] == qsd[qi + 6:], diff


def test_the_server_command_can_be_another(capsys: pytest.CaptureFixture[str]) -> None:
    """--server-command starts what it says (here ``false``: a daemon that exits at once, status
    1), and a daemon that does not start is a transcript line, not a crash of the script."""
    assert qsd_compat.main(["--daemon", "server", "--server-command", "false"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "scenario stopped: the daemon exited with status 1", out
