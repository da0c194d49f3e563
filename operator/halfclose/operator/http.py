"""/metrics and /readyz on the metrics port (kopf serves /healthz on its own port).

Ready means: startup finished (the peering object exists, the API answered)
and the server is up.  A standby replica is ready too -- it serves metrics
and takes over when the leader goes; readiness is not leadership.  With
``auth`` (``metrics.auth.enabled``) ``/metrics`` answers only a bearer token the
API server says may ``get /metrics`` (``halfclose.metricsauth``; the review's
blocking HTTP call runs in a thread, off the event loop); /readyz stays open.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from halfclose.metricsauth import MetricsAuth
from halfclose.operator.metrics import OperatorMetrics


class ProbeServer:
    def __init__(
        self, metrics: OperatorMetrics, host: str, port: int, auth: MetricsAuth | None = None
    ) -> None:
        self._metrics = metrics
        self._auth = auth
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.ready = False
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve_metrics)
        app.router.add_get("/readyz", self._serve_ready)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve_metrics(self, request: web.Request) -> web.Response:
        if self._auth is not None:
            header = request.headers.get("Authorization")
            verdict = await asyncio.to_thread(self._auth.check, header)
            if not verdict.allowed:
                headers = {"WWW-Authenticate": 'Bearer realm="halfclose-metrics"'}
                return web.Response(
                    status=verdict.status,
                    text=f"{verdict.reason}\n",
                    headers=headers if verdict.status == 401 else None,
                )
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _serve_ready(self, _: web.Request) -> web.Response:
        if self.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="starting\n")
