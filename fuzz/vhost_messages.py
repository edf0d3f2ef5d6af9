"""Fuzz vhost-user messages through :meth:`vhost.handler.BackendHandler.handle`.

Input: a script of messages (request, flags, payload, fds of any kind), guest-RAM writes and
kicks (``_vhost.py`` has the format).  Asserts: no exception escapes ``handle`` or a queue
worker's pass, replies are well formed, no fd leaks once the connection is closed.
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(
    include=["vhost", "guestmem", "blockdev", "virtio_blk", "scsi_buffers"]
):
    from _common import run
    from _vhost import VhostRig, run_one

RIG: VhostRig | None = None


def test_one_input(data: bytes) -> None:
    global RIG
    if RIG is None:
        RIG = VhostRig()
    run_one(RIG, data)


if __name__ == "__main__":
    run("vhost_messages", test_one_input)
