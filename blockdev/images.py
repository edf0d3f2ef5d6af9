"""Opening and creating images by format: the one place the CLI (and tests) turn
``--format``/``--create``/``--backing`` into a disk object.

The format is never guessed from the image's bytes: a raw image whose guest wrote a qcow2
header is still served as raw (probing is how backing-file tricks read host files).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from blockdev.disk import BlockDisk, Disk, DiskError, create_image
from blockdev.qcow2 import Qcow2Disk
from blockdev.qcow2 import create as create_qcow2
from blockdev.qcow2.backing_policy import BackingPolicy

FORMATS = ("raw", "qcow2")


def create(path: str, size: int, fmt: str = "raw", backing: str | None = None,
           backing_format: str | None = None, backing_dirs: Sequence[str] = ()) -> bool:
    """Create ``path`` as an empty ``fmt`` image of ``size`` bytes if it does not exist;
    True if created.  ``backing`` (qcow2 only) is recorded as given -- a relative name is
    resolved against the image's directory, as QEMU does -- and must pass the backing-file
    policy the served chain will meet (:mod:`.qcow2.backing_policy`; ``backing_dirs`` are the
    ``--backing-dir`` directories), so no image is made that could not be served."""
    if fmt not in FORMATS:
        raise DiskError(f"unknown format {fmt!r} (raw or qcow2)")
    if backing is not None and fmt != "qcow2":
        raise DiskError("--backing needs --format qcow2")
    if os.path.exists(path):
        return False
    if fmt == "raw":
        return create_image(path, size)
    if backing is not None:
        if backing_format not in FORMATS:
            raise DiskError("--backing needs --backing-format raw or qcow2")
        BackingPolicy.for_image(path, backing_dirs).check(backing, os.path.abspath(path))
    create_qcow2(path, size, backing=backing, backing_format=backing_format)
    return True


def open_image(path: str, fmt: str = "raw", *, read_only: bool = False, direct: bool = False,
               logical_block_size: int = 512, backing_dirs: Sequence[str] = ()) -> BlockDisk:
    """A :class:`Disk` for raw images and block devices, a :class:`Qcow2Disk` for qcow2
    (whose backing files may come from its directory and ``backing_dirs``)."""
    if fmt == "raw":
        return Disk(path, read_only=read_only, direct=direct,
                    logical_block_size=logical_block_size)
    if fmt == "qcow2":
        if direct:
            raise DiskError("--direct is not supported with --format qcow2")
        if logical_block_size not in (512, 4096):
            raise DiskError(f"logical block size {logical_block_size}: want 512 or 4096")
        return Qcow2Disk(path, read_only=read_only, logical_block_size=logical_block_size,
                         backing_dirs=backing_dirs)
    raise DiskError(f"unknown format {fmt!r} (raw or qcow2)")
