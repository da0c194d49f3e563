"""A raw JSON client over the kubernetes package's ApiClient.

The agent only needs dicts: going through the typed models would cost a
deserialisation per pod per event on every node of the cluster.  ``ApiClient``
still brings what matters — kubeconfig and in-cluster auth, TLS, a pooled
connection — and ``call_api(..., _preload_content=False)`` hands back the raw
response.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

JSON = dict[str, Any]


class ApiError(Exception):
    """A request the API server answered with an error status (or never answered)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status  # 0 = no answer (connection refused, timeout, ...)

    @property
    def unreachable(self) -> bool:
        """Worth retrying later: no answer, throttled, or a server-side failure."""
        return self.status in {0, 429} or self.status >= 500


def load_api_client(kubeconfig: str | None) -> k8s.ApiClient:
    """From a kubeconfig file when given, else the pod's service account."""
    configuration = k8s.Configuration()
    if kubeconfig:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=configuration
        )
    else:
        k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    return k8s.ApiClient(configuration)


class RawClient:
    def __init__(self, api: k8s.ApiClient, request_timeout: float = 10.0) -> None:
        self.api = api
        self.request_timeout = request_timeout

    def _call(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        body: object = None,
        *,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] | None = None,
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            _m, url, headers, body, _p = self.api.param_serialize(
                method,
                path,
                query_params=list((query or {}).items()),
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            result = self.api.rest_client.request(  # type: ignore[no-untyped-call]
                method,
                url,
                headers=headers,
                body=body,
                _request_timeout=timeout if timeout is not None else self.request_timeout,
            )
        except Exception as exc:  # connection refused, timeouts, TLS: "no answer"
            raise ApiError(0, f"{type(exc).__name__}: {exc}") from None
        response = result.response  # the urllib3 response, body not read yet
        if not 200 <= response.status <= 299:
            try:
                message = _reason(response.data) or str(response.reason)
            finally:
                response.release_conn()
            raise ApiError(response.status, message)
        return response

    def request(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        body: object = None,
        content_type: str = "application/json",
    ) -> JSON:
        response = self._call(method, path, query, body, content_type=content_type)
        try:
            data = response.data
        finally:
            response.release_conn()
        return json.loads(data) if data else {}

    def get(self, path: str, query: Mapping[str, str] | None = None) -> JSON:
        return self.request("GET", path, query)

    def watch(
        self, path: str, query: Mapping[str, str], read_timeout: float
    ) -> tuple[Any, Iterator[JSON]]:
        """Open a watch; returns (response, iterator of events).

        ``read_timeout`` bounds the wait for each chunk, so a silent half-dead
        connection is noticed.  Closing the response ends the iterator (used
        for shutdown).
        """
        q = dict(query)
        q["watch"] = "true"
        response = self._call("GET", path, q, timeout=(5.0, read_timeout))

        def events() -> Iterator[JSON]:
            buffer = b""
            try:
                for chunk in response.stream(4096, decode_content=True):
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if line.strip():
                            yield json.loads(line)
                if buffer.strip():
                    yield json.loads(buffer)
            finally:
                response.release_conn()

        return response, events()


def _reason(body: object) -> str | None:
    if isinstance(body, bytes | str):
        try:
            data = json.loads(body)
        except ValueError:
            return body.decode() if isinstance(body, bytes) else body
        if isinstance(data, dict):
            return str(data.get("message") or data.get("reason") or "")
    return None
