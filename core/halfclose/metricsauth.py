"""Authentication and authorization of ``/metrics`` scrapes against the API server.

The way controller-runtime's secure metrics and kube-rbac-proxy do it: the
scraper's bearer token goes to a TokenReview (who is this?), the user it names
to a SubjectAccessReview (may they ``get`` the non-resource URL ``/metrics``?).
No token: 401. A token the API server does not accept: 401. Accepted but not
allowed: 403. Both the agent's threaded HTTP server and the operator's aiohttp
server call ``MetricsAuth.check`` (the operator from an executor thread).

Answers are cached per token (a SHA-256 of it, never the token itself) for
``ttl_seconds``, allowed and denied alike, so a scrape every 15 s costs two API
calls per TTL, not per scrape; the cache is bounded (least recently used
first out). A review the API server could not answer is not cached and
answers 503: the scrape fails visibly, and the next one asks again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# POST <path> with a JSON body, return the decoded JSON answer; raise on failure.
Post = Callable[[str, Mapping[str, Any]], Mapping[str, Any]]

TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"  # noqa: S105 - a path
ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"


@dataclass(frozen=True, slots=True)
class Verdict:
    status: int  # 200 allowed, 401 unauthenticated, 403 forbidden, 503 review failed
    reason: str
    user: str = ""

    @property
    def allowed(self) -> bool:
        return self.status == 200


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class MetricsAuth:
    def __init__(
        self,
        post: Post,
        ttl_seconds: float = 60.0,
        *,
        path: str = "/metrics",
        verb: str = "get",
        capacity: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.post = post
        self.ttl_seconds = ttl_seconds
        self.path = path
        self.verb = verb
        self.capacity = capacity
        self.clock = clock
        self._cache: OrderedDict[str, tuple[float, Verdict]] = OrderedDict()
        self._lock = threading.Lock()
        self.reviews = 0  # TokenReviews sent: for tests (the cache works)

    def check(self, authorization: str | None) -> Verdict:
        token = bearer_token(authorization)
        if token is None:
            return Verdict(401, "no bearer token")
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self.clock()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0] > now:
                self._cache.move_to_end(key)
                return cached[1]
        verdict = self._review(token)
        if verdict.status != 503:
            with self._lock:
                self._cache[key] = (now + self.ttl_seconds, verdict)
                self._cache.move_to_end(key)
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        return verdict

    def _review(self, token: str) -> Verdict:
        self.reviews += 1
        try:
            review = self.post(
                TOKEN_REVIEWS,
                {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenReview",
                    "spec": {"token": token},
                },
            )
            status = review.get("status") or {}
            if not status.get("authenticated"):
                return Verdict(401, str(status.get("error") or "token not authenticated"))
            user = status.get("user") or {}
            name = str(user.get("username") or "")
            access = self.post(
                ACCESS_REVIEWS,
                {
                    "apiVersion": "authorization.k8s.io/v1",
                    "kind": "SubjectAccessReview",
                    "spec": {
                        "user": name,
                        "uid": user.get("uid") or "",
                        "groups": list(user.get("groups") or ()),
                        "extra": dict(user.get("extra") or {}),
                        "nonResourceAttributes": {"path": self.path, "verb": self.verb},
                    },
                },
            )
        except Exception as exc:  # any failure to review is a 503, logged
            log.warning("cannot review a metrics client's token: %s", exc)
            return Verdict(503, "authentication unavailable")
        allowed = bool((access.get("status") or {}).get("allowed"))
        if not allowed:
            return Verdict(403, f"{name} may not {self.verb} {self.path}", name)
        return Verdict(200, "allowed", name)


def api_client_post(api: Any, timeout: float = 10.0) -> Post:
    """A ``Post`` over a ``kubernetes.client.ApiClient``: its server, TLS and
    credentials (a rotated service-account token is re-read by its refresh hook)."""

    def post(path: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        _m, url, headers, data, _p = api.param_serialize(
            "POST", path, header_params=headers, body=dict(body), auth_settings=["BearerToken"]
        )
        result = api.rest_client.request(
            "POST", url, headers=headers, body=data, _request_timeout=timeout
        )
        response = result.response
        try:
            raw = response.data
        finally:
            response.release_conn()
        if not 200 <= response.status <= 299:
            raise OSError(f"POST {path}: HTTP {response.status}")
        answer: Mapping[str, Any] = json.loads(raw)
        return answer

    return post
