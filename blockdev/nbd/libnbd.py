"""libnbd's C API through ctypes: connecting, the handshake, and what the server offers.

Why ctypes and not Debian's ``python3-libnbd``: that binding is a C extension built for
Debian's own python3, while this project is pip-installed into any Python 3.11 (a venv, pyenv);
the C library ``libnbd.so.0`` (package ``libnbd0``) loads into all of them.

The queues' transmission phase is not libnbd's (:mod:`.wire`, :class:`.storage.NbdEngine`):
libnbd is asked for simple replies only and plain sockets only, and its aio command calls are
used only on a connection no queue has taken (flushed and shut down by the storage).  No Python
callbacks: such a command is issued with a null completion callback and retired with
``nbd_aio_command_completed`` from the thread that owns the handle.  Every call releases the GIL.
"""

from __future__ import annotations

import ctypes
import os
import select
import time

from blockdev import cint
from blockdev.storage import StorageError

DEBIAN_PACKAGE = "libnbd0"

AIO_DIRECTION_READ = 1
AIO_DIRECTION_WRITE = 2
CMD_FLAG_FUA = 0x01
CMD_FLAG_NO_HOLE = 0x02
SIZE_MINIMUM = 0
SIZE_MAXIMUM = 2
URI_TLS_DISABLE = 0  # LIBNBD_TLS_DISABLE: an nbds:// URI fails to connect


class CompletionCallback(ctypes.Structure):
    """``nbd_completion_callback``, passed by value; all-null means "no callback"."""

    _fields_ = [("callback", ctypes.c_void_p), ("user_data", ctypes.c_void_p),
                ("free", ctypes.c_void_p)]


NO_CALLBACK = CompletionCallback()

_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """libnbd, loaded (and its prototypes declared) on first use; StorageError naming the
    Debian package if it is missing."""
    global _lib
    if _lib is not None:
        return _lib
    try:
        so = ctypes.CDLL("libnbd.so.0")
    except OSError:
        raise StorageError("NBD needs libnbd: apt-get install " + DEBIAN_PACKAGE) from None
    h = ctypes.c_void_p
    i64 = ctypes.c_int64
    # Integer arguments are range-checked (:mod:`.cint`): plain ctypes would silently truncate
    # an out-of-range count or offset.  Return types stay plain.
    u64, u32 = cint.UINT64, cint.UINT32
    cb = CompletionCallback
    protos = {
        "nbd_create": (h, ()),
        "nbd_close": (None, (h,)),
        "nbd_get_error": (ctypes.c_char_p, ()),
        "nbd_get_errno": (ctypes.c_int, ()),
        "nbd_set_debug": (ctypes.c_int, (h, ctypes.c_bool)),
        "nbd_set_pread_initialize": (ctypes.c_int, (h, ctypes.c_bool)),
        "nbd_set_request_structured_replies": (ctypes.c_int, (h, ctypes.c_bool)),
        "nbd_set_uri_allow_tls": (ctypes.c_int, (h, cint.INT)),
        "nbd_aio_connect_uri": (ctypes.c_int, (h, ctypes.c_char_p)),
        "nbd_aio_get_fd": (ctypes.c_int, (h,)),
        "nbd_aio_get_direction": (ctypes.c_uint, (h,)),
        "nbd_aio_notify_read": (ctypes.c_int, (h,)),
        "nbd_aio_notify_write": (ctypes.c_int, (h,)),
        "nbd_aio_is_connecting": (ctypes.c_int, (h,)),
        "nbd_aio_is_ready": (ctypes.c_int, (h,)),
        "nbd_aio_is_processing": (ctypes.c_int, (h,)),
        "nbd_aio_is_dead": (ctypes.c_int, (h,)),
        "nbd_aio_is_closed": (ctypes.c_int, (h,)),
        "nbd_aio_in_flight": (ctypes.c_int, (h,)),
        "nbd_get_size": (i64, (h,)),
        "nbd_get_block_size": (i64, (h, cint.INT)),
        "nbd_is_read_only": (ctypes.c_int, (h,)),
        "nbd_can_flush": (ctypes.c_int, (h,)),
        "nbd_can_fua": (ctypes.c_int, (h,)),
        "nbd_can_trim": (ctypes.c_int, (h,)),
        "nbd_can_zero": (ctypes.c_int, (h,)),
        "nbd_get_structured_replies_negotiated": (ctypes.c_int, (h,)),
        "nbd_aio_flush": (i64, (h, cb, u32)),
        "nbd_aio_command_completed": (ctypes.c_int, (h, u64)),
        "nbd_shutdown": (ctypes.c_int, (h, u32)),
    }
    for name, (restype, argtypes) in protos.items():
        fn = getattr(so, name)
        fn.restype = restype
        fn.argtypes = argtypes
    _lib = so
    return so


def last_error(what: str = "") -> OSError:
    """The error libnbd recorded for this thread's last failed call, as an OSError."""
    so = lib()
    msg = (so.nbd_get_error() or b"").decode(errors="replace").strip()
    err = so.nbd_get_errno() or 5  # EIO when libnbd did not say
    if what and not msg:
        msg = what
    return OSError(err, msg or os.strerror(err))


class Handle:
    """One libnbd handle (one connection), owned by one thread at a time."""

    def __init__(self, uri: str) -> None:
        """Start connecting to ``uri`` (without waiting: drive it with :meth:`notify`)."""
        so = self.lib = lib()
        self.h = so.nbd_create()
        if not self.h:
            raise last_error("nbd_create")
        so.nbd_set_debug(self.h, False)  # LIBNBD_DEBUG would otherwise write to stderr
        # libnbd zeroes every read buffer before reading into it, so that a failed read cannot
        # show a C program its own stale heap.  Ours are guest pages the guest handed over: a
        # failed read reports an error status and leaves nothing that is not the guest's own
        # or the export's -- the memset per read (4 KiB and up) buys nothing here.
        so.nbd_set_pread_initialize(self.h, False)
        # The transmission phase is spoken by :mod:`.wire` on this handle's socket once the
        # handshake is done: it knows simple replies only, and plain sockets only -- a TLS
        # session (nbds://) lives inside libnbd's gnutls state, so such URIs are refused here
        # (the spec layer refuses them first, this keeps any other caller honest).
        so.nbd_set_request_structured_replies(self.h, False)
        so.nbd_set_uri_allow_tls(self.h, URI_TLS_DISABLE)
        if so.nbd_aio_connect_uri(self.h, uri.encode()) == -1:
            err = last_error("connect")
            self.close()
            raise err

    @classmethod
    def connect(cls, uri: str, timeout: float) -> Handle:
        """Connect and finish the handshake within ``timeout`` seconds (libnbd's own blocking
        connect has no time limit: a TCP peer that drops packets would hang it)."""
        handle = cls(uri)
        try:
            deadline = time.monotonic() + timeout
            while handle.connecting:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OSError(110, f"no NBD handshake within {timeout:.0f} s")
                handle.wait(left)
            if not handle.ready:
                raise last_error("handshake")
        except BaseException:
            handle.close()
            raise
        return handle

    @property
    def connecting(self) -> bool:
        return bool(self.lib.nbd_aio_is_connecting(self.h))

    @property
    def ready(self) -> bool:
        """Connected and able to take commands."""
        return bool(self.lib.nbd_aio_is_ready(self.h) or self.lib.nbd_aio_is_processing(self.h))

    @property
    def fd(self) -> int:
        return int(self.lib.nbd_aio_get_fd(self.h))

    def poll_events(self) -> int:
        """The poll events the state machine waits for now."""
        d = self.lib.nbd_aio_get_direction(self.h)
        ev = 0
        if d & AIO_DIRECTION_READ:
            ev |= select.POLLIN
        if d & AIO_DIRECTION_WRITE:
            ev |= select.POLLOUT
        return ev

    def notify(self, revents: int) -> None:
        """Move the state machine on after poll reported ``revents`` on :attr:`fd`."""
        so = self.lib
        if revents & (select.POLLIN | select.POLLHUP | select.POLLERR):
            so.nbd_aio_notify_read(self.h)
        if revents & select.POLLOUT:
            so.nbd_aio_notify_write(self.h)

    def wait(self, timeout: float) -> None:
        """One poll of the connection (used while connecting)."""
        fd = self.fd
        if fd < 0:
            return
        p = select.poll()
        p.register(fd, self.poll_events())
        for _, rev in p.poll(max(1, int(timeout * 1000))):
            self.notify(rev)

    @property
    def dead(self) -> bool:
        so = self.lib
        return bool(so.nbd_aio_is_dead(self.h) or so.nbd_aio_is_closed(self.h))

    def flag(self, name: str) -> bool:
        return getattr(self.lib, name)(self.h) == 1

    def close(self) -> None:
        if self.h:
            self.lib.nbd_close(self.h)
            self.h = None
