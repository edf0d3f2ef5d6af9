"""A flood of second frontends while one is served: each is refused (closed) and the first
keeps working, but the log gets a line for the 1st, 2nd, 4th, 8th... refusal only (issue 19,
item 6: one client flood must not flood the journal)."""

from __future__ import annotations

import logging
import socket

from tests.unit.vhost.helpers import WAIT, session, wait_for
from tests.vhost_devices import EchoDevice


def test_a_flood_of_second_frontends_logs_a_few_lines(serve, caplog) -> None:
    running = serve(EchoDevice())
    with session(running.path) as first, caplog.at_level(logging.WARNING):
        first.start()
        q = first.queue(0, 16)
        for _ in range(200):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(WAIT)
                s.connect(str(running.path))
                assert s.recv(1) == b""  # refused: closed by the daemon
        wait_for(lambda: running.daemon.rejected == 200, "200 refusals")
        first.echo(q, b"still the owner")
    refusals = [r for r in caplog.records if "second frontend" in r.getMessage()]
    assert 1 <= len(refusals) <= 9, len(refusals)  # 1, 2, 4, ... 128
    assert "(128 refused so far)" in refusals[-1].getMessage()
