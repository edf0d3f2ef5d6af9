"""Point 4: a frontend that goes away (cleanly or mid-request) leaves nothing behind, the next one
is served, and a second frontend while one is connected is refused without disturbing it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from tests.unit.vhost.helpers import (
    SOCKET_TIMEOUT,
    WAIT,
    Session,
    assert_closed_by_peer,
    assert_fresh_frontend_works,
    fd_count,
    memfd_mappings,
    session,
    wait_disconnected,
    wait_for,
    worker_threads,
)
from tests.vhost_devices import EchoDevice
from vhost_frontend import Frontend


def _assert_clean(running, fds_before: int) -> None:
    """After a frontend is gone: no worker, no fd, no mapping of its memory left."""
    wait_disconnected(running)
    assert not worker_threads(), f"worker threads left: {worker_threads()}"
    wait_for(lambda: fd_count() == fds_before,
             f"the fd count to return to {fds_before} (now {fd_count()})")
    assert memfd_mappings() == 0, "guest memory still mapped"


def test_clean_close_releases_everything_and_the_next_frontend_works(serve) -> None:
    device = EchoDevice(num_queues=2, asynchronous=True, delay=0.005)
    running = serve(device)
    before = fd_count()
    for round_ in range(3):
        with session(running.path) as s:
            s.start()
            queues = [s.queue(0, 16), s.queue(1, 16)]
            assert len(worker_threads()) == 2
            assert memfd_mappings() == 2  # the frontend's mapping and the backend's
            for q in queues:
                s.echo(q, b"round %d" % round_)
        _assert_clean(running, before)
        assert device.resets == round_ + 1
    assert running.daemon.connections == 3


def test_frontend_dies_mid_request(serve) -> None:
    """The socket goes while a request is in flight: the backend still finishes it into guest
    memory (which it has mapped), then drops everything."""
    device = EchoDevice(asynchronous=True, delay=0.1)
    running = serve(device)
    before = fd_count()
    s = Session(running.path)
    try:
        s.start()
        q = s.queue(0, 16)
        src, dst = s.mem.alloc(7), s.mem.alloc(7)
        s.mem.write(src, b"orphans")
        s.fe.submit(q, [(src, 7, False), (dst, 7, True)])
        wait_for(lambda: device.seen, "the request to be in flight")
        s.fe.sock.close()  # no GET_VRING_BASE, no goodbye
        wait_disconnected(running)
        # The in-flight request was completed and published before the queue stopped.
        assert q.used_idx() == 1
        assert s.mem.read(dst, 7) == b"ORPHANS"
    finally:
        s.close()
    _assert_clean(running, before)
    assert_fresh_frontend_works(running)


_KILLED_FRONTEND = textwrap.dedent("""
    import sys
    from vhost_frontend import Frontend, FrontendMemory
    fe = Frontend(sys.argv[1], timeout=5)
    fe.negotiate()
    mem = FrontendMemory(((0, 1 << 20, 0), (1 << 20, 1 << 20, 777)))
    fe.set_mem_table(mem)
    q = fe.setup_queue(0, 16)
    src, dst = mem.alloc(4), mem.alloc(4)
    fe.submit(q, [(src, 4, False), (dst, 4, True)])
    print("submitted", flush=True)
    sys.stdin.read()  # until killed
""")


def test_frontend_process_killed_mid_request(serve) -> None:
    device = EchoDevice(asynchronous=True, delay=0.2)
    running = serve(device)
    before = fd_count()
    child = subprocess.Popen([sys.executable, "-c", _KILLED_FRONTEND, str(running.path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None  # both asked for as pipes
    try:
        line = child.stdout.readline()
        assert line.strip() == "submitted", f"child said {line!r}"
        wait_for(lambda: device.seen, "the request to reach the device")
        child.send_signal(signal.SIGKILL)
        assert child.wait(WAIT) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(WAIT)
        child.stdin.close()
        child.stdout.close()
    _assert_clean(running, before)
    assert_fresh_frontend_works(running)


def test_second_frontend_is_refused_without_disturbing_the_first(serve, caplog) -> None:
    device = EchoDevice(asynchronous=True, delay=0.01)
    running = serve(device)
    with session(running.path) as first:
        first.start()
        q = first.queue(0, 16)
        first.echo(q)
        # A request in flight while the intruder knocks.
        src, dst = first.mem.alloc(5), first.mem.alloc(5)
        first.mem.write(src, b"first")
        head = first.fe.submit(q, [(src, 5, False), (dst, 5, True)])
        second = Frontend(running.path, timeout=SOCKET_TIMEOUT)
        try:
            assert_closed_by_peer(second)
        finally:
            second.close()
        assert running.daemon.rejected == 1
        assert any("second frontend" in r.getMessage() for r in caplog.records)
        assert q.wait_used(1, WAIT) == [(head, 5)]
        assert first.mem.read(dst, 5) == b"FIRST"
        first.echo(q, b"still the owner")
        assert running.daemon.connections == 1
    assert_fresh_frontend_works(running)


def test_daemon_shutdown_with_a_frontend_connected(serve, sock_path) -> None:
    """Stopping the daemon drops the frontend like a disconnect and removes the socket file."""
    running = serve(EchoDevice(asynchronous=True, delay=0.01))
    before = fd_count()
    with session(running.path) as s:
        s.start()
        s.echo(s.queue(0, 8))
        running.stop()
        assert_closed_by_peer(s.fe)
        assert not sock_path.exists()
    assert not worker_threads()
    # The daemon's own listening socket and stop pipe are gone too.
    wait_for(lambda: fd_count() == before - 3, "the daemon's fds to be closed")
    assert memfd_mappings() == 0


def test_idle_connection_with_no_setup_disconnects_cleanly(serve) -> None:
    running = serve(EchoDevice())
    before = fd_count()
    for i in range(3):
        fe = Frontend(running.path, timeout=SOCKET_TIMEOUT)
        fe.close()

        def accepted(i: int = i) -> bool:
            return running.daemon.connections == i + 1

        wait_for(accepted, "the connection's accept")
        wait_disconnected(running)
    assert fd_count() == before
    assert os.path.exists(running.path)
    assert_fresh_frontend_works(running)
