"""One thread per started virtqueue: wait for kicks and completions, feed the device, signal.

Why a thread per queue and not one event loop for all: the device's IO (preadv/pwritev, io_uring
waits) releases the GIL, so queues overlap their IO; a queue whose device blocks (a slow disk,
a full bounce budget) never delays another queue or the control socket, which has a thread of its
own.  Within a queue everything is single-threaded, so ring state needs no lock.

The loop, per wake-up: reap finished requests, drain the avail ring with kicks suppressed, publish
the used ring once, and write the call eventfd at most once -- and only when the driver asked for
it (EVENT_IDX).  Stopping (GET_VRING_BASE, disable, disconnect) stops popping, waits for in-flight
requests, publishes and signals them, and leaves ``next_avail`` for the reply.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable

from vhost.device import QueueHandler
from vhost.queue.base import (
    NO_LIMIT,
    PASS_AGAIN,
    PASS_CALL,
    PASS_LIMIT,
    Queue,
    QueueError,
    pass_ender,
)
from vhost.runner.base import Notifier, RemoteLog

__all__ = ["Notifier", "QueueWorker"]

log = logging.getLogger(__name__)

#: Events one wait returns at most: a queue thread watches three fds (kick, wake, completion).
_MAX_EVENTS = 3


class QueueWorker:
    """Runs one virtqueue on its own thread until :meth:`stop`."""

    #: How long stop() waits for in-flight requests before giving up on them.
    drain_timeout = 30.0
    #: A thread marks the dirty log in this process (vhost.runner.base.RunningQueue).
    remote_log: RemoteLog | None = None

    def __init__(
        self,
        vq: Queue,
        handler: QueueHandler,
        kick_fd: int,
        call: Notifier,
        err: Notifier | None = None,
        name: str | None = None,
    ) -> None:
        self._submit_from_ring: Callable[[int], list[tuple[int, int]]] | None = None
        #: The last pass finished requests in it: the next takes at most PASS_LIMIT chains.
        self._capping = False
        self.vq = vq
        self.handler = handler
        self.kick_fd = kick_fd
        self.call = call
        self.err = err
        self._stop = threading.Event()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(
            target=self._run, name=name or f"vq{vq.index}", daemon=True
        )
        self.kicks = 0
        self.batches = 0
        self.completed = 0
        #: Worker passes finished (see :meth:`quiesce`).
        self.passes = 0

    def start(self) -> None:
        self._thread.start()

    # The queue and the handler (a fuzzer's rig may swap both between inputs): what a pass
    # calls of them is bound once per pair -- the end of a pass, as one call (compiled for a
    # split ring: at one request per kick the calls around a request cost as much as it), and
    # the device's fast path (QueueHandler.ring_submitter), asked for in the first pass (a
    # failure to make it is then the worker's, reported as any other).
    @property
    def vq(self) -> Queue:
        return self._vq

    @vq.setter
    def vq(self, vq: Queue) -> None:
        self._vq = vq
        self._end_pass = pass_ender(vq)
        self._submit_from_ring = None

    @property
    def handler(self) -> QueueHandler:
        return self._handler

    @handler.setter
    def handler(self, handler: QueueHandler) -> None:
        self._handler = handler
        self._submit_from_ring = None

    def ring_state(self, timeout: float = 1.0) -> dict[str, int]:
        """The queue's :meth:`~vhost.queue.base.Queue.ring_state` (a thread's: no waiting;
        ``timeout`` is for a queue process's look-alike)."""
        return self.vq.ring_state()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop popping, finish in-flight requests, return True if all finished in time."""
        self._stop.set()
        os.eventfd_write(self._wake_fd, 1)
        self._thread.join(self.drain_timeout + 5 if timeout is None else timeout)
        drained = not self._thread.is_alive() and self.vq.in_flight_count == 0
        if not self._thread.is_alive():
            os.close(self._wake_fd)
            self._wake_fd = -1
        return drained

    def quiesce(self, timeout: float = 5.0) -> bool:
        """Wait until the worker has finished the pass it is in (waking it if idle).

        A pass holds references (a dirty-log marker, say) only while it runs; once the next
        pass boundary has gone by, every reference the caller replaced before calling is
        unused for good.  False if the worker did not get there within ``timeout``.
        """
        if not self._thread.is_alive():
            return True
        start = self.passes
        os.eventfd_write(self._wake_fd, 1)
        deadline = time.monotonic() + timeout
        while self.passes == start and self._thread.is_alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0002)
        return True

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        vq = self.vq
        ep = select.epoll()
        try:
            # Edge-triggered: a kick or a completion wakes us once, and nothing needs to be
            # read back from the kick eventfd or the completion fd (a syscall each per wake-up
            # saved).  Every wake-up reaps everything and drains the whole ring, so no edge is
            # ever left unserved; the counters cannot overflow in practice (2**64).
            edge = select.EPOLLIN | select.EPOLLET
            try:
                ep.register(self.kick_fd, edge)
            except OSError as exc:
                # The handler accepts only eventfds as kick fds; this is the last line of
                # defence (a regular file is EPERM): the queue cannot run, say so once.
                self._cannot_watch_kick(exc)
                return
            ep.register(self._wake_fd, edge)  # never read either: each write is an edge
            cfd = self.handler.completion_fd
            if cfd is not None:
                ep.register(cfd, edge)
            # Kicks sent before we started listening are lost: look at the ring once now.  So
            # may be a call: a backend killed between publishing used entries and writing the
            # call eventfd leaves the driver waiting for an interrupt that never comes.  A ring
            # that already has used entries (a restarted or resumed queue) gets one call; a
            # spurious one is harmless (the driver finds nothing new).
            if vq.ring_state()["used_idx"]:
                self.call.signal()
            self._service(kick=True)
            self.passes += 1
            poll = ep.poll
            stop = self._stop
            while True:
                # One wait per pass, however many of the fds fired: the pass serves them all.
                # (A bounded maxevents: the default sizes a 1023-entry buffer per call.)
                poll(-1, _MAX_EVENTS)
                if stop.is_set():
                    break
                self._service(kick=True)
                self.passes += 1
            self._finish(ep)
        except Exception:
            log.exception("queue %d: worker failed; the queue is stopped", vq.index)
            vq.broken = True
            if self.err is not None:
                self.err.signal()
            # Chains popped but never accepted by the failed device will not complete: waiting
            # drain_timeout for them would only stall GET_VRING_BASE and disconnects.
            with contextlib.suppress(Exception):
                self._finish(ep, timeout=0.0)
        finally:
            ep.close()

    def _cannot_watch_kick(self, exc: OSError) -> None:
        """The kick fd cannot be watched: stop the queue (nothing was popped), tell the driver."""
        vq = self.vq
        vq.broken = True
        vq.error = QueueError(f"kick fd {self.kick_fd} cannot be watched: {exc.strerror}")
        log.error("queue %d stopped: %s", vq.index, vq.error)
        if self.err is not None:
            self.err.signal()

    def _service(self, kick: bool) -> None:
        """Reap, drain the ring (if ``kick``), publish and signal once.

        Draining without a kick costs one read of avail.idx, so every wake-up drains.
        """
        vq = self._vq
        handler = self._handler
        if vq.in_flight_count:  # (requests a device holds back are in flight too)
            done = handler.reap()
            if done:
                vq.add_used_many(done)
                self.completed += len(done)
        if kick and not vq.broken:
            self.kicks += 1
            suppress = not vq.event_idx  # with EVENT_IDX, avail_event does this for free
            while True:
                if suppress:
                    vq.disable_notifications()
                # The device's fast path, if any, takes what it can; the generic pop takes the
                # rest.  Heads it finished are returned only after that pop, so a head the
                # driver made available twice is still in flight there, as it would be had the
                # generic path popped both.
                submit = self._submit_from_ring
                if submit is None:
                    submit = self._submit_from_ring = handler.ring_submitter(vq)
                # At most PASS_LIMIT chains a pass that follows one that finished requests,
                # whoever takes them (every chain taken is counted in flight until the end of
                # the pass adds its completion); chains to resubmit after a reconnect all go at
                # once (no kick would come for the rest).
                if self._capping and not vq.replay_pending:
                    before = vq.in_flight_count
                    finished = submit(PASS_LIMIT)
                    room = PASS_LIMIT - (vq.in_flight_count - before)
                    chains = vq.pop_batch(room) if room > 0 else []
                else:
                    finished = submit(NO_LIMIT)
                    chains = vq.pop_batch()
                if chains:
                    self.batches += 1
                    finished += handler.submit_batch(chains)
                if vq.broken:
                    if finished:
                        vq.add_used_many(finished)
                        self.completed += len(finished)
                    self._report_broken()
                    break
                # add the completions, enable notifications, re-check, publish: one call
                self._capping = bool(finished)
                ended = self._end_pass(finished)
                self.completed += len(finished)
                if ended != PASS_AGAIN:
                    if ended == PASS_CALL:
                        self.call.signal()
                    return
                # More chains wait (the pass's limit, or the driver added some): what this pass
                # finished is the driver's now, before the next pass starts (PASS_LIMIT).
                if vq.publish_used():
                    self.call.signal()
        if vq.publish_used():
            self.call.signal()

    def _report_broken(self) -> None:
        err = self.vq.error or QueueError("queue stopped")
        log.error("queue %d stopped: %s", self.vq.index, err)
        if self.err is not None:
            self.err.signal()

    def _finish(self, ep: select.epoll, timeout: float | None = None) -> None:
        """Wait for in-flight requests (``timeout``, default drain_timeout), publish them,
        signal the driver."""
        vq = self.vq
        for fd in (self.kick_fd, self._wake_fd):  # only completions matter now
            with contextlib.suppress(OSError):
                ep.unregister(fd)
        timeout = self.drain_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while vq.in_flight_count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error("queue %d: %d requests still in flight after %.0f s; abandoning them",
                          vq.index, vq.in_flight_count, timeout)
                break
            vq.add_used_many(self.handler.reap())
            if vq.in_flight_count:
                ep.poll(min(remaining, 0.1))
        if vq.publish_used():
            self.call.signal()
