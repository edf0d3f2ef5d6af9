"""A minimal io_uring in Python (ctypes and mmap only): submission and completion rings.

Why in-tree: the PyPI bindings are either unmaintained or do not build here, and the part we need
is small -- set up a ring, put READ/WRITE/READV/WRITEV/FSYNC entries in the submission queue,
submit a whole batch with one ``io_uring_enter``, read completions straight from the shared
completion ring.  Page-cached IO completes during ``io_uring_enter`` itself and is reaped right
after it; for the rest (O_DIRECT) the ring fd polls readable while completions are waiting.

The image is not registered as a fixed file (IORING_REGISTER_FILES), though it would spare a
descriptor lookup per entry: the kernel drops a registered file only in the ring's asynchronous
teardown, so after a ``kill -9`` the image's lock outlived the process and a restarted server,
or ``qemu-img check``, found the image locked (seen in the e2e crash test).

Ring indices are 32-bit values shared with the kernel; each is read and written with one aligned
32-bit access through a ``cast('I')`` memoryview (x86 keeps these ordered; the kernel side uses
acquire/release).  Layouts: include/uapi/linux/io_uring.h.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Callable

from blockdev.libc import syscall as _syscall
from guestmem import buffer_address

SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426

IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_ENTER_GETEVENTS = 1 << 0
IORING_FSYNC_DATASYNC = 1

OP_READV = 1
OP_WRITEV = 2
OP_FSYNC = 3
OP_ASYNC_CANCEL = 14
OP_READ = 22
OP_WRITE = 23

# struct io_uring_params: 10 u32, then io_sqring_offsets and io_cqring_offsets (40 bytes each).
_PARAMS = struct.Struct("<IIIIII I 3I" + "IIIIIIIIQ" + "IIIIIIIIQ")
SQE = struct.Struct("<BBHiQQIIQHHiQQ")  # 64 bytes
CQE = struct.Struct("<QiI")  # 16 bytes
#: A CQE as (user_data, res), its flags skipped: what :meth:`Uring.reap` hands back.
_CQE_UD_RES = struct.Struct("<Qi4x")
#: Marks the user data of entries a compiled caller (:mod:`virtio_blk._fastpath_core`) puts in
#: the ring itself; :meth:`Uring.reap` keeps their completions for it.
EXTERNAL_TAG = 1 << 62


class UringError(OSError):
    """io_uring is unavailable or a ring call failed."""


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise UringError(err, f"{what}: {os.strerror(err)}")
    return ret


class Uring:
    """One io_uring instance: fill submissions with :meth:`prep`, :meth:`submit`, :meth:`reap`."""

    def __init__(self, entries: int = 256) -> None:
        params = ctypes.create_string_buffer(_PARAMS.size)
        self.fd = _check(_syscall(SYS_IO_URING_SETUP, ctypes.c_uint(entries), params),
                         "io_uring_setup")
        try:
            p = _PARAMS.unpack(params.raw)
            sq_entries, cq_entries, _flags, _cpu, _idle, features = p[0:6]
            sq_off = p[10:19]  # head, tail, ring_mask, ring_entries, flags, dropped, array, ...
            cq_off = p[19:28]  # head, tail, ring_mask, ring_entries, overflow, cqes, flags, ...
            sq_size = sq_off[6] + sq_entries * 4
            cq_size = cq_off[5] + cq_entries * CQE.size
            if features & IORING_FEAT_SINGLE_MMAP:
                sq_size = cq_size = max(sq_size, cq_size)
            self._sq_map = mmap.mmap(self.fd, sq_size, offset=IORING_OFF_SQ_RING)
            self._cq_map = (self._sq_map if features & IORING_FEAT_SINGLE_MMAP
                            else mmap.mmap(self.fd, cq_size, offset=IORING_OFF_CQ_RING))
            self._sqe_map = mmap.mmap(self.fd, sq_entries * SQE.size, offset=IORING_OFF_SQES)
        except BaseException:
            os.close(self.fd)
            raise
        sq32 = memoryview(self._sq_map).cast("I")
        cq32 = memoryview(self._cq_map).cast("I")
        self._sq32 = sq32
        self._cq32 = cq32
        self._sq_head = sq_off[0] // 4
        self._sq_tail = sq_off[1] // 4
        self._sq_mask = sq32[sq_off[2] // 4]
        self._sq_array = sq_off[6] // 4
        self._cq_head = cq_off[0] // 4
        self._cq_tail = cq_off[1] // 4
        self._cq_mask = cq32[cq_off[2] // 4]
        self._cqes = memoryview(self._cq_map)[cq_off[5]:]
        self._sqes = memoryview(self._sqe_map)
        self.sq_entries = sq_entries
        self.cq_entries = cq_entries
        self._tail = sq32[self._sq_tail]
        self._pending = 0  # prepared but not yet submitted
        #: Sharing the ring with a compiled caller that fills entries and reaps completions
        #: itself (see :meth:`raw_layout`): the completions of ours it met, handed back by the
        #: next :meth:`reap`; the completions of its own :meth:`reap` met; how many of its
        #: entries are in the kernel.
        self.stash: list[tuple[int, int]] = []
        self.external_stash: list[tuple[int, int]] = []
        self.external_in_flight = 0
        #: Called with how many of the compiled caller's completions were just taken from the
        #: completion ring -- by :meth:`reap` (which stashes them) or by the compiled caller
        #: itself: the moment its IO is over in the kernel, whoever sees it first.  A format
        #: engine counts that IO out of its image's in-flight IO here.
        self.external_reaped: Callable[[int], None] | None = None
        self._layout = {
            "fd": self.fd, "sq_entries": sq_entries, "sq_mask": self._sq_mask,
            "sq_head": sq_off[0], "sq_tail": sq_off[1], "cq_head": cq_off[0],
            "cq_tail": cq_off[1], "cq_mask": self._cq_mask, "cqes": cq_off[5],
        }
        # The SQ array maps ring slots to SQE indices; identity, set once.
        for i in range(sq_entries):
            sq32[self._sq_array + i] = i

    def raw_layout(self) -> dict[str, int]:
        """The ring's addresses in this process, for a compiled caller that fills submission
        entries and reaps completions itself, in the same ring: ``fd``; ``sq_head``, ``sq_tail``,
        ``cq_head``, ``cq_tail`` (addresses of the 32-bit indices); ``sq_mask``, ``sq_entries``,
        ``cq_mask``; ``sqes`` and ``cqes`` (addresses of the entry arrays).  The submission array
        maps slot i to entry i (set once here).

        Such a caller takes over :attr:`_tail` and :attr:`_pending` while it submits (it submits
        ours with its own), marks its entries' user data with :data:`EXTERNAL_TAG`, counts them
        in :attr:`external_in_flight` and appends ours it reaps to :attr:`stash`.  The addresses
        are valid until :meth:`close` (``fd`` is then -1).
        """
        layout = dict(self._layout)
        for keys, mapping in ((("sq_head", "sq_tail"), self._sq_map),
                              (("cq_head", "cq_tail", "cqes"), self._cq_map),
                              (("sqes",), self._sqe_map)):
            with memoryview(mapping) as view:
                base = buffer_address(view)
            for key in keys:
                layout[key] = layout.get(key, 0) + base
        return layout

    # ------------------------------------------------------------------ submission
    def space(self) -> int:
        """Free submission slots."""
        return self.sq_entries - ((self._tail - self._sq32[self._sq_head]) & 0xFFFFFFFF)

    def prep(self, opcode: int, fd: int, addr: int, length: int, offset: int,
             user_data: int, rw_flags: int = 0) -> None:
        """Fill the next submission entry (submitted by the next :meth:`submit`)."""
        self.prep_many([(opcode, fd, addr, length, offset, user_data, rw_flags)])

    def prep_many(self, entries: list[tuple[int, int, int, int, int, int, int]]) -> None:
        """Fill the next submission entries, one per ``(opcode, fd, addr, length, offset,
        user_data, rw_flags)``, in one call (one free-space check, not one per entry); a batch
        larger than the free space is submitted in parts."""
        sqes = self._sqes
        pack = SQE.pack_into
        mask = self._sq_mask
        tail = self._tail
        free = self.space()
        for opcode, fd, addr, length, offset, user_data, rw_flags in entries:
            if not free:
                self._tail = tail
                self.submit()
                free = self.space()
                if not free:
                    raise UringError(0, "submission queue full")
            pack(sqes, (tail & mask) * 64, opcode, 0, 0, fd, offset, addr, length, rw_flags,
                 user_data, 0, 0, 0, 0, 0)
            tail = (tail + 1) & 0xFFFFFFFF
            free -= 1
            self._pending += 1
        self._tail = tail

    def submit(self, wait: int = 0) -> int:
        """Publish prepared entries and enter the kernel once; entries consumed."""
        n = self._pending
        if not n and not wait:
            return 0
        self._sq32[self._sq_tail] = self._tail  # one 32-bit store, after the SQEs
        self._pending = 0
        flags = IORING_ENTER_GETEVENTS if wait else 0
        while True:
            ret = _syscall(SYS_IO_URING_ENTER, self.fd, n, wait, flags, None, 0)
            if ret >= 0:
                return ret
            err = ctypes.get_errno()
            if err != 4:  # EINTR: try again
                raise UringError(err, f"io_uring_enter: {os.strerror(err)}")

    # ------------------------------------------------------------------ completion
    def reap(self) -> list[tuple[int, int]]:
        """Completions so far, as (user_data, result) -- result < 0 is -errno.

        The waiting CQEs are unpacked with one ``iter_unpack`` over their slice of the ring (two
        when they wrap), then the head is advanced with one store.
        """
        cq32 = self._cq32
        head = cq32[self._cq_head]
        tail = cq32[self._cq_tail]
        if head == tail:
            return self._stashed([])
        start = head & self._cq_mask
        end = start + ((tail - head) & 0xFFFFFFFF)
        cqes = self._cqes
        entries = self.cq_entries
        if end <= entries:
            out = list(_CQE_UD_RES.iter_unpack(cqes[start * 16 : end * 16]))
        else:  # wrapped: the end of the ring, then its start
            out = list(_CQE_UD_RES.iter_unpack(cqes[start * 16 : entries * 16]))
            out += _CQE_UD_RES.iter_unpack(cqes[: (end - entries) * 16])
        cq32[self._cq_head] = tail  # copied out above: the kernel may reuse the slots now
        if self.external_in_flight:  # a compiled caller's among them: kept for it
            ours: list[tuple[int, int]] = []
            external = self.external_stash
            before = len(external)
            for cqe in out:
                (external if cqe[0] & EXTERNAL_TAG else ours).append(cqe)
            out = ours
            if self.external_reaped is not None and len(external) > before:
                self.external_reaped(len(external) - before)
        return self._stashed(out)

    def _stashed(self, out: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """``out`` after the completions of ours a compiled caller reaped (:attr:`stash`)."""
        if not self.stash:
            return out
        stash, self.stash = self.stash, []
        return stash + out

    def close(self) -> None:
        if self.fd < 0:
            return
        for view in (self._sq32, self._cq32, self._cqes, self._sqes):
            view.release()
        self._sqe_map.close()
        if self._cq_map is not self._sq_map:
            self._cq_map.close()
        self._sq_map.close()
        os.close(self.fd)
        self.fd = -1


def available() -> bool:
    """Whether this kernel lets us make a ring (it may be disabled by sysctl or seccomp)."""
    try:
        Uring(2).close()
    except (UringError, OSError):
        return False
    return True
