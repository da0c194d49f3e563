"""The operator's own asynchronous Kubernetes API client (aiohttp).

kopf only runs the peering (leader election), the probes and the operator's
life cycle; the operator lists, watches and writes with this client, so it
decides itself what it watches and decodes every object once (issue 10: a
kopf per-object worker for every pod and report made start-up quadratic).

Built from the ``kubernetes.client.Configuration`` that kopf's login uses
too, so both talk to the same server as the same identity.  A rotated
service-account token is picked up: the configuration's refresh hook runs
before every request.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import kubernetes

USER_AGENT = "halfclose-operator"
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
# Only metadata of pods and namespaces: labels are all the selectors need.
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
METADATA_ONLY_WATCH = (
    "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"
)


class ApiError(Exception):
    """A non-2xx answer (or a watch ERROR event) from the API server."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message


def _ssl_context(config: kubernetes.client.Configuration) -> ssl.SSLContext | bool:
    if not config.host.startswith("https"):
        return False
    ctx = ssl.create_default_context(cafile=config.ssl_ca_cert or None)
    if not config.verify_ssl:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if config.cert_file:
        ctx.load_cert_chain(config.cert_file, config.key_file or None)
    return ctx


class KubeClient:
    """A few verbs over one aiohttp session; JSON in, JSON out."""

    def __init__(
        self, config: kubernetes.client.Configuration, *, request_timeout: float = 30.0
    ) -> None:
        self._config = config
        self._host = config.host.rstrip("/")
        self._ssl = _ssl_context(config)
        self._timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None
        self.writes = 0  # POST/PATCH/DELETE requests sent (the benchmark reads it)

    def _headers(self, accept: str, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": accept, "User-Agent": USER_AGENT}
        if content_type:
            headers["Content-Type"] = content_type
        auth = self._config.get_api_key_with_prefix(
            "authorization"
        ) or self._config.get_api_key_with_prefix("BearerToken")
        if auth:
            headers["Authorization"] = auth if " " in auth else f"Bearer {auth}"
        elif self._config.username:
            headers["Authorization"] = aiohttp.BasicAuth(
                self._config.username, self._config.password or ""
            ).encode()
        return headers

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=32)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
        accept: str = JSON,
    ) -> Any:
        if method != "GET":
            self.writes += 1
        data = None if body is None else json.dumps(body)
        async with self._http().request(
            method,
            self._host + path,
            params=params,
            data=data,
            headers=self._headers(accept, content_type or (JSON if data else None)),
            timeout=aiohttp.ClientTimeout(total=self._timeout),
        ) as rsp:
            text = await rsp.text()
            if rsp.status >= 400:
                raise _error(rsp.status, text)
            return json.loads(text) if text else None

    async def watch(
        self,
        path: str,
        params: Mapping[str, str],
        *,
        accept: str = JSON,
        read_timeout: float,
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events as decoded dicts until the server ends the stream.

        Lines are split here, not by aiohttp's ``readline``: an object may be
        larger than its line limit.
        """
        async with self._http().get(
            self._host + path,
            params={**params, "watch": "true"},
            headers=self._headers(accept, None),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self._timeout, sock_read=read_timeout
            ),
        ) as rsp:
            if rsp.status >= 400:
                raise _error(rsp.status, await rsp.text())
            buffer = b""
            async for chunk in rsp.content.iter_any():
                buffer += chunk
                while (end := buffer.find(b"\n")) >= 0:
                    line, buffer = buffer[:end], buffer[end + 1 :]
                    if line.strip():
                        yield json.loads(line)
                await asyncio.sleep(0)  # let others run between big chunks


def _error(status: int, text: str) -> ApiError:
    try:
        body = json.loads(text)
    except ValueError:
        return ApiError(status, text.strip()[:500])
    if not isinstance(body, dict):
        return ApiError(status, text.strip()[:500])
    return ApiError(status, str(body.get("message", "")), str(body.get("reason", "")))
