"""A fault-injecting HTTPS proxy in front of the real API server (design.md §6).

It terminates TLS with the API server's own certificate (same CA, SAN 127.0.0.1) and
re-originates every request to the real server, passing the client's
``Authorization`` header through: clients must authenticate with a token (a
ServiceAccount's, from ``ControlPlane.kubeconfig_for(..., server=proxy.url)``);
client certificates cannot cross a terminating proxy.  Responses, watches included,
are streamed through chunk by chunk.

Faults, all thread-safe, for the requests whose method and path match:

- ``fail(n, status)``: the next ``n`` answer ``status`` with a proper ``Status`` body
  (watches too); ``clear()`` ends every fault;
- ``delay(seconds, n)``: held that long before being forwarded (client timeouts);
- ``drop_watches(graceful=False)``: every open watch ends now (connection aborted, or
  a clean end of stream like a server-side timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

_HOP = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "accept-encoding",
    "content-encoding",
    "upgrade",
}


class ProxiedRequest(NamedTuple):
    method: str
    path: str
    query: dict[str, str]
    status: int  # what the client got (0: a watch still open or dropped)
    injected: bool  # answered by a fault, never reached the server


@dataclass
class _Rule:
    remaining: int
    status: int | None  # None: delay only
    delay: float
    method: str | None
    path: re.Pattern[str] | None

    def matches(self, method: str, path_qs: str) -> bool:
        if self.remaining <= 0:
            return False
        if self.method and self.method.upper() != method:
            return False
        return not (self.path and not self.path.search(path_qs))


def _status_body(code: int) -> bytes:
    reason = {
        429: "TooManyRequests",
        500: "InternalError",
        503: "ServiceUnavailable",
        504: "Timeout",
    }.get(code, "InternalError")
    return json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f"injected by the test's fault proxy ({code})",
            "reason": reason,
            "code": code,
        }
    ).encode()


class FaultProxy:
    def __init__(self, upstream: str, ca_file: Path, cert_file: Path, key_file: Path) -> None:
        self.upstream = upstream.rstrip("/")
        self._server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_ssl.load_cert_chain(str(cert_file), str(key_file))
        self._client_ssl = ssl.create_default_context(cafile=str(ca_file))
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._log: list[ProxiedRequest] = []
        self._watches: dict[int, tuple[asyncio.Event, Any, list[bool]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: Any = None
        self.url = ""

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> FaultProxy:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10) or errors:
            raise RuntimeError(f"the fault proxy did not start: {errors}")
        return self

    def stop(self) -> None:
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

        self._session = ClientSession(
            connector=TCPConnector(ssl=self._client_ssl, limit=0),
            timeout=ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._server_ssl)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"https://127.0.0.1:{port}"

    async def _shutdown(self) -> None:
        for stop, _transport, _graceful in list(self._watches.values()):
            stop.set()
        await self._runner.cleanup()
        await self._session.close()

    # --- faults --------------------------------------------------------------

    def fail(
        self,
        n: int = 1,
        status: int = 500,
        *,
        method: str | None = None,
        path_regex: str | None = None,
    ) -> None:
        with self._lock:
            self._rules.append(
                _Rule(n, status, 0.0, method, re.compile(path_regex) if path_regex else None)
            )

    def delay(
        self,
        seconds: float,
        n: int = 1,
        *,
        method: str | None = None,
        path_regex: str | None = None,
    ) -> None:
        with self._lock:
            self._rules.append(
                _Rule(n, None, seconds, method, re.compile(path_regex) if path_regex else None)
            )

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    @contextlib.contextmanager
    def outage(self, status: int = 503, *, path_regex: str | None = None) -> Iterator[None]:
        """Every matching request fails while inside, and open watches drop on entry."""
        self.fail(1_000_000, status, path_regex=path_regex)
        self.drop_watches()
        try:
            yield
        finally:
            self.clear()

    def drop_watches(self, graceful: bool = False) -> int:
        """End every open watch; returns how many there were."""
        assert self._loop is not None

        def drop() -> int:
            for stop, _transport, flag in self._watches.values():
                flag[0] = graceful
                stop.set()
            return len(self._watches)

        future = asyncio.run_coroutine_threadsafe(_call(drop), self._loop)
        return int(future.result(5))

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    @property
    def requests(self) -> list[ProxiedRequest]:
        with self._lock:
            return list(self._log)

    # --- the proxy -----------------------------------------------------------

    def _match(self, method: str, path_qs: str) -> tuple[int | None, float]:
        status: int | None = None
        delay = 0.0
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, path_qs):
                    rule.remaining -= 1
                    if rule.status is None:
                        delay = max(delay, rule.delay)
                    elif status is None:
                        status = rule.status
            self._rules = [r for r in self._rules if r.remaining > 0]
        return status, delay

    def _record(self, request: Any, status: int, injected: bool) -> None:
        with self._lock:
            self._log.append(
                ProxiedRequest(request.method, request.path, dict(request.query), status, injected)
            )

    async def _handle(self, request: Any) -> Any:
        try:
            return await self._forward(request)
        except ConnectionError:
            # The client went away (gave up during a delay, or mid-stream): nobody to answer.
            from aiohttp import web

            return web.Response(status=499)

    async def _forward(self, request: Any) -> Any:
        from aiohttp import web

        path_qs = request.path_qs
        status, delay = self._match(request.method, path_qs)
        if delay:
            await asyncio.sleep(delay)
            if request.transport is None or request.transport.is_closing():
                self._record(request, 0, True)
                raise ConnectionResetError("the client gave up during the delay")
        if status is not None:
            self._record(request, status, True)
            headers = {"Content-Type": "application/json"}
            if status == 429:
                headers["Retry-After"] = "1"
            return web.Response(status=status, body=_status_body(status), headers=headers)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        body = await request.read()
        watch = request.query.get("watch") in {"true", "1"} or "/watch/" in request.path
        async with self._session.request(
            request.method, self.upstream + path_qs, headers=headers, data=body or None
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in _HOP},
            )
            await response.prepare(request)
            if not watch:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                self._record(request, upstream.status, False)
                return response
            stop = asyncio.Event()
            flag = [False]
            key = id(response)
            self._watches[key] = (stop, request.transport, flag)
            try:
                await self._pump(upstream, response, stop)
            finally:
                self._watches.pop(key, None)
            self._record(request, 0 if stop.is_set() else upstream.status, False)
            if stop.is_set() and not flag[0]:
                if request.transport is not None:
                    request.transport.abort()  # the connection just breaks
                return response
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return response

    @staticmethod
    async def _pump(upstream: Any, response: Any, stop: asyncio.Event) -> None:
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while True:
                read = asyncio.ensure_future(upstream.content.readany())
                done, _ = await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if stopped in done:
                    read.cancel()
                    return
                chunk = read.result()
                if not chunk:
                    return
                await response.write(chunk)
        finally:
            stopped.cancel()


async def _call(fn: Any) -> Any:
    return fn()
