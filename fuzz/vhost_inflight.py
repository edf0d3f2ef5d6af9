"""Fuzz hostile in-flight areas and fd kinds: SET_INFLIGHT_FD, queue start, recovery, restart.

Input: queue size and features, the in-flight area's contents, SET_INFLIGHT_FD's fields and fd
kind, the ring's contents, the kinds of the call/err/kick fds (memfd, eventfd, pipe, regular
file, /dev/null, socket, directory, epoll) and of the restart's kick fd, then a free script of
messages and kicks (``_vhost.py``), then a stop (GET_VRING_BASE) and a restart that recovers
from what the first run left in the area.  Asserts what ``vhost_messages`` asserts: no
exception escapes the handler or a queue pass, well-formed replies, no fd leaked.
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(
    include=["vhost", "guestmem", "blockdev", "virtio_blk", "scsi_buffers"]
):
    from _common import Reader, run
    from _vhost import VhostRig, check_no_leak, open_fds, play, restart, start_session

RIG: VhostRig | None = None


def test_one_input(data: bytes) -> None:
    global RIG
    if RIG is None:
        RIG = VhostRig()
    rig = RIG
    rig.reset()
    before = open_fds()
    handler = rig.new_handler()
    r = Reader(data)
    try:
        start_session(rig, handler, r)
        kick = rig.fd(r)  # the restart's kick fd (of the input's kind)
        play(rig, handler, r, max_ops=16)
        restart(rig, handler, kick)
        play(rig, handler, r, max_ops=4)
    finally:
        handler.close()
    check_no_leak(before)


if __name__ == "__main__":
    run("vhost_inflight", test_one_input)
