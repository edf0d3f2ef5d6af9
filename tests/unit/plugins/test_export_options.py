"""QSD's --export option as this server reads it."""

from __future__ import annotations

import pytest

from storage_daemon.qsd_options import ExportOptions, UsageError, declare, parse_export


def test_unix_and_fd_addresses_and_defaults():
    assert parse_export("type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/s",
                        16) == ExportOptions("e", "n", "/s", None, False, 1, 512)
    assert parse_export('{"type": "vhost-user-blk", "id": "e", "node-name": "n", "addr": '
                        '{"type": "fd", "str": "3"}, "writable": true, "num-queues": 4, '
                        '"logical-block-size": 4096}', 16) == ExportOptions(
                            "e", "n", None, 3, True, 4, 4096)
    # QEMU's implied key for --export is 'type'
    assert parse_export("vhost-user-blk,id=e,node-name=n,addr.type=fd,addr.str=7,writable=on",
                        16).fd == 7


@pytest.mark.parametrize(("text", "message"), [
    ("type=vhost-user-blk,id=e,node-name=n", "Parameter 'addr.type' is missing"),
    ("type=vhost-user-blk,id=e,node-name=n,addr.type=unix", "Parameter 'addr.path' is missing"),
    ("type=vhost-user-blk,id=e,node-name=n,addr.type=inet,addr.host=h",
     "Parameter 'addr.type' does not accept value 'inet'"),
    ("type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/s,num-queues=17",
     "Parameter 'num-queues' expects a value from 1 to 16"),
    ("type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/s,logical-block-size=1024",
     "must be 512 or 4096"),
    ("type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/s,iothread=t",
     "Parameter 'iothread' is unexpected"),
    ("type=vhost-user-blk,node-name=n,addr.type=unix,addr.path=/s", "Parameter 'id' is missing"),
    ("type=vhost-user-blk,id=9e,node-name=n,addr.type=unix,addr.path=/s", "Invalid id: '9e'"),
])
def test_export_errors(text, message):
    with pytest.raises(UsageError) as info:
        parse_export(text, 16)
    assert message in str(info.value) and str(info.value).startswith("--export ")


def test_declare_checks_blockdevs_before_opening_anything(tmp_path):
    graph, (export,) = declare([f"driver=file,node-name=f,filename={tmp_path}/none"],
                            ["type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/s"],
                            16)
    assert export.node_name == "f" and "f" in graph.nodes  # the missing file: found at open
    with pytest.raises(UsageError, match=r"^--blockdev driver=nope,node-name=x: Parameter "):
        declare(["driver=nope,node-name=x"], ["x"], 16)
