"""A raw JSON client for the API server over ``http.client`` and ``ssl``.

The agent only needs dicts: going through the typed models would cost a
deserialisation per pod per event on every node of the cluster, and the
``kubernetes`` package it used as a transport cost 46 MiB of RSS to import
(issue 11).  What this keeps of that transport:

- keep-alive connections in a small pool: a thread takes an idle one (or
  opens one), uses it for one request and gives it back.  An idle connection
  the server closed meanwhile is seen (readable at EOF) and dropped before use.
- per-request timeouts (connect, then each read); a request that gets no
  answer is ``ApiError(0)``: ``unreachable``, retried later by the caller.
- urllib3's retries, which the outage tests rely on: a failed connect, or a
  request whose sending failed on a reused connection, is retried for every
  method (the server saw nothing); a read that failed or timed out only for
  idempotent methods, up to ``retries`` more attempts.
- watches as a streamed chunked response on a connection of their own, one
  JSON event per line; ``shutdown()`` on the handle unblocks the reading thread.
- a 401 re-reads a rotated token file at once and tries again once.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import socket
import threading
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlencode

from halfclose.agent.kube.config import ClusterConfig, TokenFile, from_kubeconfig, in_cluster

JSON = dict[str, Any]

# Methods a server may see twice without harm (RFC 9110 §9.2.2): their reads are retried.
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
USER_AGENT = "halfclose-agent/0.1.0"


class ApiError(Exception):
    """A request the API server answered with an error status (or never answered)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status  # 0 = no answer (connection refused, timeout, ...)

    @property
    def unreachable(self) -> bool:
        """Worth retrying later: no answer, throttled, or a server-side failure."""
        return self.status in {0, 429} or self.status >= 500


class ConnectError(OSError):
    """No connection (refused, unreachable, TLS handshake): the request was never sent."""


class ReadTimeoutError(TimeoutError):
    """Sent, but no (complete) answer within the read timeout."""


def load_api_client(
    kubeconfig: str | None, environ: Mapping[str, str] | None = None
) -> ClusterConfig:
    """From a kubeconfig file when given, else the pod's service account
    (``environ``: the process environment unless given)."""
    if kubeconfig:
        return from_kubeconfig(kubeconfig)
    return in_cluster(os.environ if environ is None else environ)


class _Connection(http.client.HTTPConnection):
    """HTTP or HTTPS to one server; TLS with our context and server name."""

    def __init__(self, config: ClusterConfig, connect_timeout: float) -> None:
        super().__init__(config.host, config.port, timeout=connect_timeout)
        self.config = config

    def connect(self) -> None:
        try:
            super().connect()  # TCP, with the connect timeout; sets TCP_NODELAY
            context = self.config.ssl_context
            if context is not None:
                self.sock = context.wrap_socket(
                    self.sock, server_hostname=self.config.server_hostname or self.config.host
                )
        except OSError as exc:
            self.close()
            raise ConnectError(f"{type(exc).__name__}: {exc}") from None

    def dropped(self) -> bool:
        """An idle keep-alive connection is readable only at EOF (or on junk): drop it."""
        if self.sock is None:
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)


class WatchStream:
    """The handle of an open watch: ``shutdown`` ends it from any thread."""

    def __init__(self, connection: _Connection, response: http.client.HTTPResponse) -> None:
        self.connection = connection
        self.response = response

    def shutdown(self) -> None:
        sock = self.connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv

    def close(self) -> None:
        self.connection.close()

    def events(self) -> Iterator[JSON]:
        """One JSON object per line until the server ends the stream (a broken
        stream raises: ``IncompleteRead``, a reset, or a read timeout).

        The API server ends every event with a newline; bytes left without one
        when a stream ends cleanly are an event a proxy cut off (it ended the
        body between two of its reads).  They are dropped, not decoded: the
        caller resumes from the last event it got, which brings that one again.
        """
        # read1, not readline: on a chunked body readline goes through peek(),
        # which turns a broken stream into a quiet end (and a cut line).
        buffer = b""
        try:
            while True:
                data = self.response.read1(65536)
                if not data:
                    break
                buffer += data
                if b"\n" not in data:
                    continue
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        finally:
            self.connection.close()


class RawClient:
    def __init__(
        self,
        config: ClusterConfig,
        request_timeout: float = 10.0,
        *,
        retries: int = 3,
        max_idle: int = 4,
    ) -> None:
        self.config = config
        self.request_timeout = request_timeout
        self.retries = retries
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self.connections_opened = 0  # TCP (+TLS) connections made: keep-alive works (tests)

    # -- connections ---------------------------------------------------------------

    def _take(self, connect_timeout: float) -> tuple[_Connection, bool]:
        """An idle connection (reused=True) or a new, unconnected one."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return _Connection(self.config, connect_timeout), False
            if conn.dropped():
                conn.close()
                continue
            return conn, True

    def _give_back(self, conn: _Connection, response: http.client.HTTPResponse) -> None:
        if response.will_close or conn.sock is None:
            conn.close()
            return
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- requests ------------------------------------------------------------------

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if content_type:
            headers["Content-Type"] = content_type
        token = self.config.token() if self.config.token is not None else ""
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _url(self, path: str, query: Mapping[str, str] | None) -> str:
        url = self.config.base_path + path
        return f"{url}?{urlencode(query)}" if query else url

    def _send(
        self,
        method: str,
        url: str,
        data: bytes | None,
        headers: Mapping[str, str],
        *,
        connect_timeout: float,
        read_timeout: float,
        pooled: bool,
    ) -> tuple[_Connection, http.client.HTTPResponse]:
        """Send one request and read its status line and headers, with retries;
        raises ``ApiError(0)`` when no answer came."""
        attempts = self.retries + 1 if pooled else 1
        last: Exception | None = None
        for _ in range(attempts):
            if pooled:
                conn, reused = self._take(connect_timeout)
            else:
                conn, reused = _Connection(self.config, connect_timeout), False
            try:
                if conn.sock is None:
                    with self._lock:
                        self.connections_opened += 1
                    conn.connect()
                assert conn.sock is not None
                conn.sock.settimeout(read_timeout)
            except ConnectError as exc:
                last = exc
                continue
            try:
                conn.request(method, url, body=data, headers=dict(headers))
            except OSError as exc:
                # Not (completely) sent: the server saw no request; any method may go again.
                conn.close()
                last = exc
                continue
            try:
                return conn, conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if isinstance(exc, TimeoutError):
                    exc = ReadTimeoutError(f"no answer within {read_timeout:g}s")
                last = exc
                # A reused connection the server closed as we sent: nothing was read.
                stale = reused and isinstance(exc, http.client.RemoteDisconnected)
                if method not in IDEMPOTENT and not stale:
                    break
        assert last is not None
        raise ApiError(0, f"{type(last).__name__}: {method} {url}: {last}")

    def _call(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: object,
        content_type: str,
    ) -> bytes:
        url = self._url(path, query)
        data = None if body is None else json.dumps(body).encode()
        for second_try in (False, True):
            headers = self._headers(content_type if data is not None else None)
            timeout = self.request_timeout
            conn, response = self._send(
                method,
                url,
                data,
                headers,
                connect_timeout=timeout,
                read_timeout=timeout,
                pooled=True,
            )
            try:
                payload = response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise ApiError(0, f"{type(exc).__name__}: {method} {url}: {exc}") from None
            self._give_back(conn, response)
            if 200 <= response.status <= 299:
                return payload
            if response.status == 401 and not second_try and self._token_rotated(headers):
                continue
            raise ApiError(response.status, _reason(payload) or str(response.reason))
        raise AssertionError("unreachable")

    def _token_rotated(self, sent: Mapping[str, str]) -> bool:
        """After a 401: whether the token file now holds another token than was sent."""
        if not isinstance(self.config.token, TokenFile):
            return False
        return self._headers(None).get("Authorization") != sent.get("Authorization")

    def request(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        body: object = None,
        content_type: str = "application/json",
    ) -> JSON:
        data = self._call(method, path, query, body, content_type)
        return json.loads(data) if data else {}

    def get(self, path: str, query: Mapping[str, str] | None = None) -> JSON:
        return self.request("GET", path, query)

    def watch(
        self, path: str, query: Mapping[str, str], read_timeout: float
    ) -> tuple[WatchStream, Iterator[JSON]]:
        """Open a watch; returns (handle, iterator of events).

        ``read_timeout`` bounds the wait for each read, so a silent half-dead
        connection is noticed.  ``handle.shutdown()`` ends the iterator (used
        for shutdown).  The watch has a connection of its own, closed when the
        iterator ends.
        """
        q = dict(query)
        q["watch"] = "true"
        url = self._url(path, q)
        conn, response = self._send(
            "GET",
            url,
            None,
            self._headers(None),
            connect_timeout=5.0,
            read_timeout=read_timeout,
            pooled=False,
        )
        if not 200 <= response.status <= 299:
            try:
                payload = response.read()
            except (OSError, http.client.HTTPException):
                payload = b""
            finally:
                conn.close()
            raise ApiError(response.status, _reason(payload) or str(response.reason))
        stream = WatchStream(conn, response)
        return stream, stream.events()


def _reason(body: bytes) -> str | None:
    if not body:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:500]
    if isinstance(data, dict):
        return str(data.get("message") or data.get("reason") or "")
    return None
