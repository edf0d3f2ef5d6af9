"""librados/librbd's C API through ctypes: connecting to a cluster and asynchronous image IO.

Why ctypes and not Debian's ``python3-rbd``/``python3-rados``: those are Cython extensions built
for Debian's own python3 (there are no PyPI wheels), while this project is pip-installed into
any Python 3.11; ``librbd.so.1``/``librados.so.2`` (packages ``librbd1``, ``librados2``) load into
all of them.  And the binding's ``Image.aio_read`` returns a new ``bytes`` object and
``aio_write`` takes one, copying every request, where ``rbd_aio_readv``/``rbd_aio_writev`` take
guest memory as an iovec array.

No Python callbacks either: the image's completions are delivered through librbd's event
notification (``rbd_set_image_notification`` with an eventfd, ``rbd_poll_io_events``), so
librbd's own threads never wait for the GIL.  Every call releases the GIL.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from blockdev import cint
from blockdev.storage import StorageError

EVENT_TYPE_EVENTFD = 2

_libs: tuple[ctypes.CDLL, ctypes.CDLL] | None = None


def libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(librados, librbd), loaded and declared on first use; StorageError naming the Debian
    package if one is missing."""
    global _libs
    if _libs is not None:
        return _libs
    loaded = []
    for soname, package in (("librados.so.2", "librados2"), ("librbd.so.1", "librbd1")):
        try:
            loaded.append(ctypes.CDLL(soname))
        except OSError:
            raise StorageError(f"RBD needs {soname}: apt-get install {package}") from None
    rados, rbd = loaded
    p = ctypes.c_void_p
    pp = ctypes.POINTER(ctypes.c_void_p)
    i, s = ctypes.c_int, ctypes.c_char_p
    # Integer arguments are range-checked (:mod:`.cint`): plain ctypes would truncate a size of
    # 2**64 to 0 on its way into rbd_resize.  Return types stay plain ctypes types.
    ci, u64, sz = cint.INT, cint.UINT64, cint.SIZE_T
    protos: dict[ctypes.CDLL, dict[str, tuple[Any, tuple[Any, ...]]]] = {
        rados: {
            "rados_create": (i, (pp, s)),
            "rados_conf_read_file": (i, (p, s)),
            "rados_conf_parse_env": (i, (p, s)),
            "rados_conf_set": (i, (p, s, s)),
            "rados_connect": (i, (p,)),
            "rados_shutdown": (None, (p,)),
            "rados_ioctx_create": (i, (p, s, pp)),
            "rados_ioctx_destroy": (None, (p,)),
        },
        rbd: {
            "rbd_open": (i, (p, s, pp, s)),
            "rbd_open_read_only": (i, (p, s, pp, s)),
            "rbd_close": (i, (p,)),
            "rbd_get_size": (i, (p, ctypes.POINTER(ctypes.c_uint64))),
            "rbd_resize": (i, (p, u64)),
            "rbd_flush": (i, (p,)),
            "rbd_set_image_notification": (i, (p, ci, ci)),
            "rbd_poll_io_events": (i, (p, pp, ci)),
            "rbd_aio_create_completion": (i, (p, p, pp)),
            "rbd_aio_release": (None, (p,)),
            "rbd_aio_get_return_value": (ctypes.c_ssize_t, (p,)),
            "rbd_aio_get_arg": (p, (p,)),
            "rbd_aio_readv": (i, (p, p, ci, u64, p)),
            "rbd_aio_writev": (i, (p, p, ci, u64, p)),
            "rbd_aio_discard": (i, (p, u64, u64, p)),
            "rbd_aio_write_zeroes": (i, (p, u64, sz, p, ci, ci)),
            "rbd_aio_flush": (i, (p, p)),
        },
    }
    for so, table in protos.items():
        for name, (restype, argtypes) in table.items():
            fn = getattr(so, name)
            fn.restype = restype
            fn.argtypes = argtypes
    _libs = (rados, rbd)
    return _libs


def check(ret: int, what: str) -> int:
    """librados/librbd return -errno: raise it as an OSError naming ``what``."""
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret
