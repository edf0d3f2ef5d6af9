"""Ceph RBD images as storage, through librbd's asynchronous C API (:mod:`.librbd`).

One cluster connection and one open image per device, shared by every queue: opening the image
once per queue would make the queues' handles fight over the image's exclusive lock.  librbd
signals completions on one eventfd per image (``rbd_set_image_notification``); every queue's
engine uses that eventfd as its completion fd, so each worker's epoll sees each signal.  Whoever
reaps first drains all of the image's completions and sorts them to their queues; if some
belonged to another queue it writes the eventfd once more, so that queue's worker wakes to a
fresh edge and finds them (with one queue, the common case, nothing is ever re-signalled).

Requests: READ/WRITE → ``rbd_aio_readv``/``rbd_aio_writev`` on guest memory (zero-copy), a
write-through write is followed by ``rbd_aio_flush``; FLUSH → ``rbd_aio_flush``; DISCARD →
``rbd_aio_discard`` (librbd ignores the parts of a discard that do not cover whole objects while
``rbd_skip_partial_discard`` is on, its default: allowed, a discard is advisory); WRITE_ZEROES →
``rbd_aio_write_zeroes``, thick-provisioned unless the guest allowed unmapping (QEMU does the
same).  ``@SNAP`` opens the snapshot read-only.

Waits are bounded: the monitors must answer within ``client_mount_timeout`` and opening the
image must finish within :data:`OPEN_TIMEOUT`.  Once serving, librados reconnects to monitors
and OSDs by itself while requests wait; ``rados_osd_op_timeout`` = the reconnect delay makes a
request that waited that long fail (IOERR) -- QEMU's ``reconnect-delay`` for RBD.  A dead
server's exclusive lock is broken by librbd itself once the dead client's watch expires; writes
wait meanwhile.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import itertools
import logging
import os
import select
import threading
import time
from dataclasses import replace
from typing import Any

from blockdev.disk import DiskError, check_growth
from blockdev.engine import UNFINISHED, Engine, IoOp
from blockdev.ops import DATA_KINDS, WRITE_THROUGH_KINDS, OpKind, by_kind
from blockdev.rbd.librbd import EVENT_TYPE_EVENTFD, check, libs
from blockdev.spec import RbdSpec
from blockdev.storage import Capabilities, Storage, StorageError, remote_info
from guestmem import iovec_array

log = logging.getLogger(__name__)

#: How long connecting to the monitors may take (librados ignores connect timeouts otherwise).
MOUNT_TIMEOUT = 10
#: How long connecting and opening the image may take in all.
OPEN_TIMEOUT = 20.0
RBD_WRITE_ZEROES_FLAG_THICK_PROVISION = 1
_POLL_BATCH = 64
#: Stands for the completion in :meth:`RbdStorage.aio` arguments.
COMP = object()


class _Pending:
    """An op in librbd: completions outstanding, the first error, a flush still owed."""

    __slots__ = ("engine", "error", "flush_after", "left", "op")

    def __init__(self, engine: RbdEngine, op: IoOp, flush_after: bool) -> None:
        self.engine = engine
        self.op = op
        self.left = 0
        self.error: OSError | None = None
        self.flush_after = flush_after


class RbdStorage(Storage):
    """An RBD image (or a snapshot of one, read-only)."""

    def __init__(self, spec: RbdSpec, *, read_only: bool = False, logical_block_size: int = 512,
                 reconnect_delay: float = 30.0) -> None:
        self.spec = spec
        self.name = str(spec)
        self.rados, self.rbd = libs()
        #: How long librbd lets an op wait for an OSD before failing it.
        self.op_timeout = float(max(1, round(reconnect_delay)))
        read_only = read_only or spec.snapshot is not None
        self.cluster = ctypes.c_void_p()
        self.ioctx = ctypes.c_void_p()
        self.image = ctypes.c_void_p()
        self.event_fd = -1
        self._tokens: dict[int, _Pending] = {}
        self._next = itertools.count(1)
        self._poll_lock = threading.Lock()
        self._comps = (ctypes.c_void_p * _POLL_BATCH)()
        failure: list[BaseException] = []
        # librados/librbd calls cannot be interrupted: open on a thread and stop waiting for it
        # after OPEN_TIMEOUT (the process exits on that error, taking the thread along).
        opener = threading.Thread(target=self._open_guarded,
                                  args=(read_only, reconnect_delay, failure),
                                  name="rbd-open", daemon=True)
        opener.start()
        opener.join(OPEN_TIMEOUT)
        if opener.is_alive():
            raise StorageError(f"{self.name}: the cluster did not answer within "
                               f"{OPEN_TIMEOUT:.0f} s")
        if failure:
            self._release()
            exc = failure[0]
            if isinstance(exc, StorageError):
                raise exc
            raise StorageError(f"{self.name}: {exc}")
        size = ctypes.c_uint64()
        check(self.rbd.rbd_get_size(self.image, ctypes.byref(size)), "size")
        try:
            self.info = remote_info(size.value, read_only, logical_block_size)
        except StorageError as exc:
            self._release()
            raise StorageError(f"{self.name}: {exc}") from None
        self.caps = Capabilities(flush=True, discard=True, write_zeroes=True)
        self.event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        check(self.rbd.rbd_set_image_notification(self.image, self.event_fd,
                                                  EVENT_TYPE_EVENTFD), "notification")

    def _open_guarded(self, read_only: bool, reconnect_delay: float,
                      failure: list[BaseException]) -> None:
        try:
            self._open(read_only, reconnect_delay)
        except BaseException as exc:
            failure.append(exc)

    def _open(self, read_only: bool, reconnect_delay: float) -> None:
        rados, rbd, spec = self.rados, self.rbd, self.spec
        check(rados.rados_create(ctypes.byref(self.cluster),
                                 spec.user.encode() if spec.user else None), "rados_create")
        cl = self.cluster
        conf = spec.conf.encode() if spec.conf else None
        ret = rados.rados_conf_read_file(cl, conf)
        if ret < 0:
            where = spec.conf or "the default ceph.conf (/etc/ceph/ceph.conf; give :conf=PATH)"
            raise StorageError(f"{self.name}: cannot read {where}: {os.strerror(-ret)}")
        rados.rados_conf_parse_env(cl, None)
        for key, value in (
            ("log_to_stderr", "false"), ("err_to_stderr", "false"),
            ("log_file", ""), ("admin_socket", ""),
            ("client_mount_timeout", str(MOUNT_TIMEOUT)),
            ("rados_mon_op_timeout", str(MOUNT_TIMEOUT)),
            ("rados_osd_op_timeout", str(max(1, round(reconnect_delay)))),
        ):
            check(rados.rados_conf_set(cl, key.encode(), value.encode()), f"config {key}")
        ret = rados.rados_connect(cl)
        if ret < 0:
            raise StorageError(f"{self.name}: cannot connect to the cluster: "
                               f"{os.strerror(-ret)}")
        ret = rados.rados_ioctx_create(cl, spec.pool.encode(), ctypes.byref(self.ioctx))
        if ret < 0:
            why = "no such pool" if ret == -errno.ENOENT else os.strerror(-ret)
            raise StorageError(f"{self.name}: pool {spec.pool}: {why}")
        snap = spec.snapshot.encode() if spec.snapshot else None
        opener = rbd.rbd_open_read_only if read_only else rbd.rbd_open
        ret = opener(self.ioctx, spec.image.encode(), ctypes.byref(self.image), snap)
        if ret < 0:
            if ret == -errno.ENOENT:
                what = (f"no image {spec.image!r} with snapshot {spec.snapshot!r}"
                        if spec.snapshot else f"no image {spec.image!r}")
                raise StorageError(f"{self.name}: {what} in pool {spec.pool}")
            raise StorageError(f"{self.name}: cannot open: {os.strerror(-ret)}")

    # ------------------------------------------------------------------ Storage
    def open_engine(self, queue_index: int) -> Engine:
        return RbdEngine(self, queue_index)

    def make_durable(self) -> None:
        if not self.info.read_only:
            check(self.rbd.rbd_flush(self.image), "flush")

    def grow(self, size: int) -> None:
        """``rbd resize`` of the served image (we hold its exclusive lock)."""
        try:
            if not check_growth(self.info, size):
                return
        except DiskError as exc:
            raise StorageError(f"{self.name}: {exc}") from None
        ret = self.rbd.rbd_resize(self.image, size)
        if ret < 0:
            raise StorageError(f"{self.name}: resize to {size} bytes: {os.strerror(-ret)}")
        self.info = replace(self.info, size=size)

    def close(self) -> None:
        self._release()

    def _release(self) -> None:
        if self.image:
            ret = self.rbd.rbd_close(self.image)  # flushes the cache, releases the lock
            if ret < 0:
                log.error("%s: close: %s", self.name, os.strerror(-ret))
            self.image = ctypes.c_void_p()
        if self.ioctx:
            self.rados.rados_ioctx_destroy(self.ioctx)
            self.ioctx = ctypes.c_void_p()
        if self.cluster:
            self.rados.rados_shutdown(self.cluster)
            self.cluster = ctypes.c_void_p()
        if self.event_fd >= 0:
            os.close(self.event_fd)
            self.event_fd = -1

    # ------------------------------------------------------------------ completions
    def aio(self, pending: _Pending, call: Any, *args: Any) -> None:
        """Start one librbd aio call for ``pending`` (its completion goes last, or where
        :data:`COMP` stands); a call refused at once becomes the op's error.  Called with
        ``_poll_lock`` held."""
        token = next(self._next)
        comp = ctypes.c_void_p()
        self.rbd.rbd_aio_create_completion(ctypes.c_void_p(token), None, ctypes.byref(comp))
        self._tokens[token] = pending
        pending.left += 1
        try:
            if COMP in args:
                ret = call(self.image, *[comp if a is COMP else a for a in args])
            else:
                ret = call(self.image, *args, comp)
        except ctypes.ArgumentError as exc:  # a value out of the C type's range: not sent
            log.error("%s: %s refused: %s", self.name, call.__name__, exc)
            ret = -errno.EINVAL
        if ret < 0:
            del self._tokens[token]
            pending.left -= 1
            self.rbd.rbd_aio_release(comp)
            if pending.error is None:
                pending.error = OSError(-ret, os.strerror(-ret))

    def poll(self, caller: RbdEngine) -> None:
        """Drain the image's finished completions into their queues' done lists (``caller``'s
        worker is the one reaping now)."""
        rbd = self.rbd
        comps = self._comps
        others = False
        with self._poll_lock:
            while True:
                n = rbd.rbd_poll_io_events(self.image, comps, _POLL_BATCH)
                for i in range(max(n, 0)):
                    comp = comps[i]
                    token = rbd.rbd_aio_get_arg(comp)
                    ret = rbd.rbd_aio_get_return_value(comp)
                    rbd.rbd_aio_release(comp)
                    p = self._tokens.pop(token, None)
                    if p is None:
                        continue
                    if ret < 0 and p.error is None:
                        p.error = OSError(-ret, os.strerror(-ret))
                    p.left -= 1
                    if p.left:
                        continue
                    if p.flush_after and p.error is None:
                        p.flush_after = False
                        self.aio(p, rbd.rbd_aio_flush)
                        if p.left:
                            continue
                    p.engine.finish(p)
                    others = others or p.engine is not caller
                if n < _POLL_BATCH:
                    break
        if others:
            os.eventfd_write(self.event_fd, 1)  # a fresh edge for the other queues' workers


class RbdEngine(Engine):
    """One queue's view of the shared image: submit, and reap what :meth:`RbdStorage.poll`
    sorted to this queue."""

    name = "rbd"

    def __init__(self, storage: RbdStorage, queue_index: int) -> None:
        self.storage = storage
        self.index = queue_index
        self.completion_fd = storage.event_fd
        self._done: collections.deque[IoOp] = collections.deque()
        self._in_flight = 0

    def submit(self, op: IoOp) -> bool:
        st = self.storage
        # Under the poll lock: another queue's worker may be draining the image's completions,
        # and must not see this op's first completion before all of its calls are issued (it
        # would finish the op while submit reports it finished too).
        with st._poll_lock:
            return self._submit_locked(op)

    def _submit_locked(self, op: IoOp) -> bool:
        p = _Pending(self, op, op.sync and op.kind in WRITE_THROUGH_KINDS)
        self._ISSUE[op.kind](self, p)
        if p.left == 0:  # every call refused at once
            self._set_result(p)
            return True
        self._in_flight += 1
        return False

    def _issue_read(self, p: _Pending) -> None:
        self._issue_rw(p, self.storage.rbd.rbd_aio_readv)

    def _issue_write(self, p: _Pending) -> None:
        self._issue_rw(p, self.storage.rbd.rbd_aio_writev)

    def _issue_rw(self, p: _Pending, call: Any) -> None:
        op = p.op
        bufs = op.buffers or []
        op.iov = iov = iovec_array(bufs)
        self.storage.aio(p, call, ctypes.addressof(iov), len(bufs), op.offset)

    def _issue_flush(self, p: _Pending) -> None:
        p.flush_after = False
        self.storage.aio(p, self.storage.rbd.rbd_aio_flush)

    def _issue_discard(self, p: _Pending) -> None:
        st = self.storage
        for seg in p.op.segments:
            st.aio(p, st.rbd.rbd_aio_discard, seg.offset, seg.length)

    def _issue_write_zeroes(self, p: _Pending) -> None:
        st = self.storage
        for seg in p.op.segments:
            flags = 0 if seg.unmap else RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
            st.aio(p, st.rbd.rbd_aio_write_zeroes, seg.offset, seg.length, COMP, flags, 0)

    #: How each kind of op is issued (a kind without an entry fails at import).
    _ISSUE = by_kind({
        OpKind.READ: _issue_read,
        OpKind.WRITE: _issue_write,
        OpKind.FLUSH: _issue_flush,
        OpKind.DISCARD: _issue_discard,
        OpKind.WRITE_ZEROES: _issue_write_zeroes,
    }, "RbdEngine")

    def _set_result(self, p: _Pending) -> None:
        op = p.op
        op.iov = None
        if p.error is not None:
            op.result = p.error
        elif op.kind in DATA_KINDS:
            op.result = op.length
        else:
            op.result = 0

    def finish(self, p: _Pending) -> None:
        """Called (under the storage's poll lock) when ``p`` is complete."""
        self._set_result(p)
        self._done.append(p.op)

    def reap(self) -> list[IoOp]:
        self.storage.poll(self)
        done = self._done
        out = []
        while done:
            out.append(done.popleft())
        self._in_flight -= len(out)
        return out

    def close(self, timeout: float | None = None) -> bool:
        """Wait for this queue's ops still in librbd: librbd's threads write a read's data
        into guest memory until its completion is posted, and there is no cancelling an aio
        op.  The wait is bounded by the OSD op timeout (the reconnect delay), after which
        librbd fails them; ``timeout`` defaults to a little more than that."""
        self.completion_fd = None
        if not self._in_flight:
            return True
        limit = self.storage.op_timeout + 5 if timeout is None else timeout
        log.warning("queue %d: closing with %d RBD requests in flight; waiting up to %.0f s",
                    self.index, self._in_flight, limit)
        deadline = time.monotonic() + limit
        while self._in_flight:
            self.reap()  # what finished (and the other queues' share, sorted to them)
            left = deadline - time.monotonic()
            if not self._in_flight or left <= 0:
                break
            select.select([self.storage.event_fd], [], [], min(left, 0.1))
        if self._in_flight:
            # Their _Pending records (and the ops' buffers) stay in the storage's table:
            # guest memory stays mapped while librbd may still write it.
            log.error("queue %d: %d RBD requests still in flight at close; guest memory stays "
                      "mapped", self.index, self._in_flight)
            UNFINISHED.append(self)
            return False
        return True
