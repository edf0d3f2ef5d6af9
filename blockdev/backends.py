"""Open the storage an ``--image`` spec names (:mod:`.spec`): a file, an RBD image or an NBD
export.  The client libraries of the remote kinds are loaded only when such a spec is used."""

from __future__ import annotations

from collections.abc import Sequence

from blockdev.disk import DiskError
from blockdev.images import open_image
from blockdev.spec import FileSpec, NbdSpec, RbdSpec, SpecError, parse_image
from blockdev.storage import FileStorage, Storage, StorageError


def open_storage(image: str, *, fmt: str = "raw", read_only: bool = False,
                 direct: bool = False, logical_block_size: int = 512, engine: str = "threads",
                 io_threads: int = 16, reconnect_delay: float = 30.0,
                 backing_dirs: Sequence[str] = ()) -> Storage:
    """The opened storage; StorageError (one line for the user) if it cannot be served.

    ``fmt`` is the image format of a file (raw or qcow2; never probed from its bytes).
    """
    try:
        spec = parse_image(image)
    except SpecError as exc:
        raise StorageError(str(exc)) from None
    if isinstance(spec, FileSpec):
        try:
            disk = open_image(spec.path, fmt, read_only=read_only, direct=direct,
                              logical_block_size=logical_block_size, backing_dirs=backing_dirs)
        except DiskError as exc:
            raise StorageError(str(exc)) from None
        return FileStorage(disk, engine, io_threads)
    if fmt != "raw":
        raise StorageError(f"{image}: --format {fmt} applies to image files only")
    if direct:
        raise StorageError(f"{image}: --direct applies to image files and block devices only")
    if isinstance(spec, RbdSpec):
        from blockdev.rbd.storage import RbdStorage

        return RbdStorage(spec, read_only=read_only, logical_block_size=logical_block_size,
                          reconnect_delay=reconnect_delay)
    assert isinstance(spec, NbdSpec)
    from blockdev.nbd.storage import NbdStorage

    return NbdStorage(spec.uri, read_only=read_only, logical_block_size=logical_block_size,
                      reconnect_delay=reconnect_delay)
