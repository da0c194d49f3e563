"""The agent's metrics/health server holds a bounded number of threads, and
closes connections that say nothing (issue 12 §5: 400 idle connections made
400 threads before)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request

from prometheus_client import CollectorRegistry

from halfclose.agent.daemon.http import HealthServer


def server(**kw: float) -> HealthServer:
    s = HealthServer("127.0.0.1", 0, CollectorRegistry(), lambda: True, lambda: True, **kw)  # type: ignore[arg-type]
    s.start()
    return s


def test_400_idle_connections_do_not_make_400_threads() -> None:
    s = server(max_connections=8, idle_timeout=30.0)
    before = threading.active_count()
    conns: list[socket.socket] = []
    try:
        for _ in range(400):
            conns.append(socket.create_connection(("127.0.0.1", s.port), timeout=5))
        deadline = time.monotonic() + 20
        while s.server.refused < 400 - 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.server.refused == 400 - 8
        assert threading.active_count() - before <= 8
    finally:
        for c in conns:
            c.close()
        s.stop()


def test_an_idle_connection_is_closed_after_the_timeout() -> None:
    s = server(idle_timeout=0.5)
    try:
        c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        started = time.monotonic()
        assert c.recv(1) == b""  # the server closed it: EOF
        assert 0.4 <= time.monotonic() - started < 3.0
        c.close()
    finally:
        s.stop()


def test_the_bound_frees_up_and_scrapes_still_work() -> None:
    s = server(max_connections=2, idle_timeout=0.3)
    try:
        idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(2)]
        time.sleep(0.8)  # both timed out: their slots are free again
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/healthz", timeout=5) as r:
            assert r.status == 200
        for c in idle:
            with contextlib.suppress(OSError):
                c.close()
    finally:
        s.stop()
