"""The throw-away test guest: build it, boot it in QEMU against a vhost-user-blk socket, run a
workload script in it and collect the results from its serial console.

Used by the end-to-end tests and by ``benchmarks.guest``; see :mod:`.guest` for how it works.
"""

from qemu_guest.guest import (
    FEATURES_PATH,
    VIRTIO_F_RING_PACKED,
    FioJob,
    FioResult,
    Guest,
    GuestError,
    GuestResult,
    GuestTimeout,
    accepts_connections,
    ensure_guest,
    features_command,
    guest_dir,
    make_initrd,
    newc_archive,
    parse_features,
    parse_fio_json,
    parse_results,
    run_guest,
    shell_quote,
)

__all__ = [
    "FEATURES_PATH",
    "VIRTIO_F_RING_PACKED",
    "FioJob",
    "FioResult",
    "Guest",
    "GuestError",
    "GuestResult",
    "GuestTimeout",
    "accepts_connections",
    "ensure_guest",
    "features_command",
    "guest_dir",
    "make_initrd",
    "newc_archive",
    "parse_features",
    "parse_fio_json",
    "parse_results",
    "run_guest",
    "shell_quote",
]
