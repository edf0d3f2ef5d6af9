"""Opening and creating images by format: the one place the CLI (and tests) turn
``--format``/``--create``/``--backing`` into a disk object.

The format is never guessed from the image's bytes: a raw image whose guest wrote a qcow2
header is still served as raw (probing is how backing-file tricks read host files).
"""

from __future__ import annotations

import os

from .disk import BlockDisk, Disk, DiskError, create_image
from .qcow2 import Qcow2Disk
from .qcow2 import create as create_qcow2

FORMATS = ("raw", "qcow2")


def create(path: str, size: int, fmt: str = "raw", backing: str | None = None,
           backing_format: str | None = None) -> bool:
    """Create ``path`` as an empty ``fmt`` image of ``size`` bytes if it does not exist;
    True if created.  ``backing`` (qcow2 only) is recorded as given -- a relative name is
    resolved against the image's directory, as QEMU does -- and must exist."""
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
        where = backing if os.path.isabs(backing) else os.path.join(
            os.path.dirname(os.path.abspath(path)), backing)
        if not os.path.isfile(where):
            raise DiskError(f"backing file {where} does not exist")
    create_qcow2(path, size, backing=backing, backing_format=backing_format)
    return True


def open_image(path: str, fmt: str = "raw", *, read_only: bool = False, direct: bool = False,
               logical_block_size: int = 512) -> BlockDisk:
    """A :class:`Disk` for raw images and block devices, a :class:`Qcow2Disk` for qcow2."""
    if fmt == "raw":
        return Disk(path, read_only=read_only, direct=direct,
                    logical_block_size=logical_block_size)
    if fmt == "qcow2":
        if direct:
            raise DiskError("--direct is not supported with --format qcow2")
        if logical_block_size not in (512, 4096):
            raise DiskError(f"logical block size {logical_block_size}: want 512 or 4096")
        return Qcow2Disk(path, read_only=read_only, logical_block_size=logical_block_size)
    raise DiskError(f"unknown format {fmt!r} (raw or qcow2)")
