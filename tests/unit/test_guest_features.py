"""The guest launcher's packed option and the negotiated-features check, without QEMU.

QEMU 7.2 lets a ``packed=on`` guest fall back to split rings when the backend does not offer
VIRTIO_F_RING_PACKED, so the packed e2e tests are only as good as these two pieces: the device
must really get ``packed=on``, and the features string the guest reports must be read right
(bit 34 = character 34) and never guessed from something that is not one.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from qemu_guest import (
    FEATURES_PATH,
    VIRTIO_F_RING_PACKED,
    Guest,
    GuestError,
    GuestResult,
    features_command,
    parse_features,
    parse_results,
)
from tests.e2e.workloads import check_packed, crash_script

#: What the test guest (Linux 6.1) negotiated with this server, one queue, split rings
#: (``011000100111011000000000000011001`` and zeroes): SIZE_MAX (1), SEG_MAX (2), BLK_SIZE (6),
#: FLUSH (9), TOPOLOGY (10), CONFIG_WCE (11), DISCARD (13), WRITE_ZEROES (14), INDIRECT_DESC (28),
#: EVENT_IDX (29), VERSION_1 (32); RING_PACKED (34) is added when the packed ring is negotiated.
SPLIT_BITS = {1, 2, 6, 9, 10, 11, 13, 14, 28, 29, 32}


def features_string(bits: set[int], width: int = 64) -> str:
    return "".join("1" if i in bits else "0" for i in range(width))


def result_of(name: str, text: str, rc: int = 0) -> GuestResult:
    """A guest run whose console carries result ``name`` with ``text``, as the guest prints it."""
    payload = base64.b64encode(text.encode()).decode()
    console = f"@@RESULT-BEGIN {name}\n{payload}\n@@RESULT-END {name} rc={rc}\n@@GUEST-DONE rc=0"
    return GuestResult(returncode=0, console=console, results=parse_results(console), done=True,
                       workload_rc=0, elapsed=1.0, boot_time=1.0)


def test_character_34_is_the_packed_ring() -> None:
    packed = parse_features(features_string(SPLIT_BITS | {34}) + "\n")
    assert packed == SPLIT_BITS | {34}
    assert VIRTIO_F_RING_PACKED in packed
    assert VIRTIO_F_RING_PACKED not in parse_features(features_string(SPLIT_BITS))
    # One bit off either way is another feature (33: ACCESS_PLATFORM, 35: IN_ORDER).
    assert VIRTIO_F_RING_PACKED not in parse_features(features_string(SPLIT_BITS | {33, 35}))


@pytest.mark.parametrize("text", ["", "\n", "cat: can't open '/sys/block/vda/device/features'",
                                  "0110 0001", "01x1", "1" * 20 + "2"])
def test_anything_but_a_features_string_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match="not a virtio features string"):
        parse_features(text)


def test_the_guest_reports_the_features_file() -> None:
    assert features_command() == f"result features cat {FEATURES_PATH}"
    assert features_command("f2").startswith("result f2 ")
    assert FEATURES_PATH == "/sys/block/vda/device/features"
    # The kill drill's script reads them before it starts writing.
    assert crash_script().splitlines()[0] == features_command()


def test_a_result_gives_its_features_and_a_failed_read_is_an_error() -> None:
    assert result_of("features", features_string({34})).features() == {34}
    failed = result_of("features", "cat: can't open", rc=1)
    with pytest.raises(GuestError, match="rc=1"):
        failed.features()


def device_arg(g: Guest) -> str:
    cmd = g.command(Path("/initrd"), Path("/guest"))
    return cmd[cmd.index("-device") + 1]


def test_packed_adds_packed_on_to_the_device(tmp_path: Path) -> None:
    sock = tmp_path / "s"
    packed = device_arg(Guest(sock, "true", num_queues=2, packed=True))
    assert packed.split(",") == ["vhost-user-blk-pci", "chardev=vub0", "num-queues=2",
                                 "packed=on"]
    assert "packed" not in device_arg(Guest(sock, "true"))


def test_the_ring_layout_check_fails_a_split_fallback() -> None:
    """The check every packed e2e test ends with: a guest that fell back to split rings fails
    it, with the features string in the message; a split run with the bit set fails too."""
    split = result_of("features", features_string(SPLIT_BITS))
    packed = result_of("features", features_string(SPLIT_BITS | {34}))
    check_packed(packed)
    check_packed(split, packed=False)
    with pytest.raises(AssertionError, match=r"does not drive the packed ring .*bit 34.*"
                                             + features_string(SPLIT_BITS).rstrip("0")):
        check_packed(split)
    with pytest.raises(AssertionError, match="drives the packed ring"):
        check_packed(packed, packed=False)
