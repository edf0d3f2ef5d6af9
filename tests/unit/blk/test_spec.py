"""``--image`` specs: the kind of storage comes from the syntax, never from file contents."""

from __future__ import annotations

import pytest

from blockdev.spec import FileSpec, NbdSpec, RbdSpec, SpecError, parse_image


@pytest.mark.parametrize(("text", "want"), [
    ("rbd:rbd/img1", RbdSpec("rbd", "img1")),
    ("rbd:pool/img@snap", RbdSpec("pool", "img", "snap")),
    ("rbd:p/i:conf=/etc/ceph/x.conf:id=admin", RbdSpec("p", "i", None, "/etc/ceph/x.conf",
                                                       "admin")),
    ("rbd:p/i@s:id=u", RbdSpec("p", "i", "s", None, "u")),
    (r"rbd:p/i:conf=/odd\:dir/c.conf", RbdSpec("p", "i", None, "/odd:dir/c.conf")),
    ("nbd://127.0.0.1:10809/disk", NbdSpec("nbd://127.0.0.1:10809/disk")),
    ("nbd://host/", NbdSpec("nbd://host/")),
    ("nbd+unix:///disk?socket=/run/nbd.sock", NbdSpec("nbd+unix:///disk?socket=/run/nbd.sock")),
    ("disk.img", FileSpec("disk.img")),
    ("/dev/vdb", FileSpec("/dev/vdb")),
    ("./rbd:x", FileSpec("./rbd:x")),  # a file that happens to be called rbd:x
    ("nbd.img", FileSpec("nbd.img")),
])
def test_specs(text: str, want: object) -> None:
    assert parse_image(text) == want


@pytest.mark.parametrize(("text", "why"), [
    ("rbd:", "POOL/IMAGE"),
    ("rbd:pool", "POOL/IMAGE"),
    ("rbd:/img", "POOL/IMAGE"),
    ("rbd:pool/", "POOL/IMAGE"),
    ("rbd:pool/img@", "empty"),
    ("rbd:pool/ns/img", "namespaces"),
    ("rbd:p/i:mon_host=1.2.3.4", "unknown rbd option"),
    ("rbd:p/i:conf=", "unknown rbd option"),
    ("nbd:///disk", "HOST"),
    ("nbd://host:99999/x", "port"),
    ("nbd+unix:///disk", "socket=PATH"),
    ("nbd+unix://host/disk?socket=/x", "no host"),
    ("nbd://h/x?tls=on", "tls"),
    ("nbds://h/x", "TLS"),
])
def test_bad_specs_are_one_line_errors(text: str, why: str) -> None:
    with pytest.raises(SpecError, match=why) as info:
        parse_image(text)
    assert "\n" not in str(info.value)


# Found by fuzz/image_spec.py: urlsplit's own ValueError (an unbalanced IPv6 bracket) escaped
# parse_image, so open_storage -- which catches SpecError -- let a traceback end the CLI.
@pytest.mark.parametrize("text", [
    "NBD://]#\udc82",  # the fuzzer's input, as os.fsdecode gives its bytes
    "nbd://[::1/disk",
    "nbd://]/disk",
    "nbd+unix://[/disk?socket=/run/nbd.sock",
])
def test_malformed_uri_is_a_spec_error(text: str) -> None:
    with pytest.raises(SpecError, match="IPv6") as info:
        parse_image(text)
    assert "\n" not in str(info.value)


def test_malformed_uri_is_a_storage_error_for_the_cli() -> None:
    from blockdev.backends import open_storage
    from blockdev.storage import StorageError

    with pytest.raises(StorageError, match="IPv6"):
        open_storage("nbd://[::1/disk")
