"""Fixtures for the vhost tests (the daemon fixture ``serve`` lives in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .helpers import Session


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
