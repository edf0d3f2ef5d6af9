"""Fixtures for the vhost tests (the daemon fixture ``serve`` lives in tests/conftest.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.unit.vhost.helpers import Session
from vhost.runner import pool as procpool


@pytest.fixture
def open_session(serve: Callable[..., Any]) -> Iterator[Callable[..., Session]]:
    """open_session(running, **kw): a Session closed after the test, before the daemon stops."""
    opened: list[Session] = []

    def open_(running: Any, **kw: Any) -> Session:
        s = Session(running.path, **kw)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[bytes]]:
    """Every queue process vhost.runner.pool starts during the test, to check how each exited."""
    procs: list[subprocess.Popen[bytes]] = []
    real = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real(*args, **kwargs)
        procs.append(proc)
        return proc

    monkeypatch.setattr(procpool.subprocess, "Popen", popen)
    return procs
