"""``/metrics``, ``/healthz`` and ``/readyz`` on one port (docs/metrics.md: 9479).

A ThreadingHTTPServer on its own thread: a slow scraper never stalls a scan.
``/healthz`` fails when the agent loop has not made a pass for a while (a
wedged loop should be restarted by the kubelet); ``/readyz`` succeeds once the
policies have been listed at least once.  With ``auth`` (chart value
``metrics.auth.enabled``) ``/metrics`` answers only a bearer token that the API
server says may ``get /metrics`` (``halfclose.metricsauth``); the probes stay
open for the kubelet.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from halfclose.metricsauth import MetricsAuth


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
    ) -> None:
        def handler_factory(*args: object) -> BaseHTTPRequestHandler:
            return _Handler(registry, healthy, ready, auth, *args)

        self.server = ThreadingHTTPServer((host, port), handler_factory)
        self.server.daemon_threads = True
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
        *args: object,
    ) -> None:
        self.registry = registry
        self.healthy = healthy
        self.ready = ready
        self.auth = auth
        super().__init__(*args)  # type: ignore[arg-type]

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
