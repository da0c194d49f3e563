"""``/metrics``, ``/healthz`` and ``/readyz`` on one port (docs/metrics.md: 9479).

A ThreadingHTTPServer on its own thread: a slow scraper never stalls a scan.
``/healthz`` fails when the agent loop has not made a pass for a while (a
wedged loop should be restarted by the kubelet); ``/readyz`` succeeds once the
policies have been listed at least once.  With ``auth`` (chart value
``metrics.auth.enabled``) ``/metrics`` answers only a bearer token that the API
server says may ``get /metrics`` (``halfclose.metricsauth``); the probes stay
open for the kubelet.

Bounded: at most ``max_connections`` requests are served at once (one thread
each); a connection beyond that is closed at once rather than given a thread,
and a connection that sends nothing for ``idle_timeout`` seconds is closed
(the handler's socket timeout), so idle or slow clients cannot pile up threads.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from halfclose.metricsauth import MetricsAuth

# Scrapers, probes and a person with curl: a handful at once.  More are refused.
MAX_CONNECTIONS = 16
# A scrape sends its request at once; a connection silent this long is closed.
IDLE_TIMEOUT_SECONDS = 10.0


class BoundedHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that never runs more than ``max_connections`` threads."""

    daemon_threads = True
    # The listen backlog: a burst of connects is accepted (and refused) at
    # once instead of waiting in SYN retries.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: Any, max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            # Over the bound: no thread for it.  The client sees a closed connection.
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown_request(self, request: Any) -> None:
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_RDWR)
        super().shutdown_request(request)


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
        *,
        auth: MetricsAuth | None = None,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT_SECONDS,
    ) -> None:
        def handler_factory(*args: object) -> BaseHTTPRequestHandler:
            return _Handler(registry, healthy, ready, auth, idle_timeout, *args)

        self.server = BoundedHTTPServer((host, port), handler_factory, max_connections)
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            name="http",
            kwargs={"poll_interval": 0.2},
            daemon=True,
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5.0)


class _Handler(BaseHTTPRequestHandler):
    def __init__(
        self,
        registry: CollectorRegistry,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
        auth: MetricsAuth | None,
        idle_timeout: float,
        *args: object,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.registry = registry
        self.healthy = healthy
        self.ready = ready
        self.auth = auth
        super().__init__(*args)  # type: ignore[arg-type]

    def setup(self) -> None:
        super().setup()
        # A client silent this long gets its connection closed (and its thread back).
        self.connection.settimeout(self.idle_timeout)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            verdict = self.auth.check(self.headers.get("Authorization")) if self.auth else None
            if verdict is not None and not verdict.allowed:
                self._reply(verdict.status, f"{verdict.reason}\n".encode())
                return
            self._reply(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok = self.healthy()
            self._reply(200 if ok else 503, b"ok\n" if ok else b"agent loop stalled\n")
        elif path == "/readyz":
            ok = self.ready()
            self._reply(200 if ok else 503, b"ok\n" if ok else b"policies not synced yet\n")
        else:
            self._reply(404, b"not found\n")

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="halfclose-metrics"')
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes every 15 s would drown the agent's own log
