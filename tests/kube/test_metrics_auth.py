"""``metrics.auth``: /metrics of the agent and the operator behind TokenReview +
SubjectAccessReview on a real 1.37 API server (issue 13 §5).

The chart is installed as its own release (``metrics.auth.enabled``) in its own
namespace: its agent and operator ServiceAccounts get the chart's
``-metrics-auth`` role and send the reviews with their own tokens, so the RBAC
that the chart grants for it is what is exercised.  Scrapers: a ServiceAccount
bound to the chart's ``-metrics-reader`` ClusterRole (200), one without it (403),
no token or a forged one (401).  The health endpoints stay open for the kubelet.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from halfclose.agent.daemon.http import HealthServer
from halfclose.agent.daemon.main import client_post
from halfclose.agent.kube.client import RawClient, load_api_client
from halfclose.metricsauth import MetricsAuth, api_client_post
from halfclose.operator.http import ProbeServer
from halfclose.operator.metrics import OperatorMetrics
from support.chart import CHART
from support.controlplane import ControlPlane

pytestmark = pytest.mark.kube

RELEASE = "hscm"
NAMESPACE = "hsc-metrics"
FULLNAME = f"{RELEASE}-halfclose"
APPLIED = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}


def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart:
        texts = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [doc for t, text in sorted(texts.items()) if not t.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]  # fmt: skip


def _binding(name: str, role: str, sa: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}],
    }


class Tokens:
    def __init__(self, kube: ControlPlane) -> None:
        self.scraper = kube.token_for("scraper", NAMESPACE)
        self.stranger = kube.token_for("stranger", NAMESPACE)


@pytest.fixture
def installed(kube: ControlPlane) -> Iterator[Tokens]:
    objs = [o for o in _render({"metrics": {"auth": {"enabled": True}}}) if o["kind"] in APPLIED]
    assert f"{FULLNAME}-metrics-auth" in {o["metadata"]["name"] for o in objs}
    kube.ensure_namespace(NAMESPACE)
    for sa in ("scraper", "stranger"):
        objs.append({"apiVersion": "v1", "kind": "ServiceAccount",
                     "metadata": {"name": sa, "namespace": NAMESPACE}})  # fmt: skip
    objs.append(_binding("hsc-scraper", f"{FULLNAME}-metrics-reader", "scraper"))
    kube.kubectl("apply", "--server-side", "-n", NAMESPACE, "-f", "-",
                 input=yaml.safe_dump_all(objs))  # fmt: skip
    try:
        yield Tokens(kube)
    finally:
        for o in objs:
            if o["kind"] in {"ClusterRole", "ClusterRoleBinding"}:
                kube.kubectl("delete", o["kind"].lower(), o["metadata"]["name"],
                             "--ignore-not-found", check=False)  # fmt: skip


def _auth(kube: ControlPlane, component: str, ttl: float = 60.0) -> MetricsAuth:
    """The component's reviewer, acting as its chart ServiceAccount."""
    kubeconfig = kube.kubeconfig_for(f"{FULLNAME}-{component}", NAMESPACE)
    if component == "agent":  # each program's own client: the agent's, the operator's kubernetes
        return MetricsAuth(client_post(RawClient(load_api_client(kubeconfig))), ttl)
    return MetricsAuth(api_client_post(kube.client(kubeconfig)), ttl)


def _get(port: int, path: str, token: str | None = None) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as rsp:
            return int(rsp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _check_port(port: int, tokens: Tokens, health: str) -> None:
    assert _get(port, "/metrics") == 401
    assert _get(port, "/metrics", "not-a-token") == 401
    assert _get(port, "/metrics", tokens.stranger) == 403
    assert _get(port, "/metrics", tokens.scraper) == 200
    assert _get(port, health) == 200  # the kubelet's probes carry no token


def test_agent_metrics_need_a_token_allowed_to_get_metrics(
    kube: ControlPlane, installed: Tokens
) -> None:
    auth = _auth(kube, "agent")
    registry = CollectorRegistry()
    server = HealthServer("127.0.0.1", 0, registry, lambda: True, lambda: True, auth=auth)
    server.start()
    try:
        _check_port(server.port, installed, "/healthz")
        reviews = auth.reviews
        for _ in range(5):  # cached: Prometheus scraping every 15 s costs no reviews
            assert _get(server.port, "/metrics", installed.scraper) == 200
        assert auth.reviews == reviews
    finally:
        server.stop()


def test_operator_metrics_need_a_token_allowed_to_get_metrics(
    kube: ControlPlane, installed: Tokens
) -> None:
    auth = _auth(kube, "operator")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    probe = ProbeServer(OperatorMetrics(CollectorRegistry()), "127.0.0.1", 0, auth=auth)
    try:
        asyncio.run_coroutine_threadsafe(probe.start(), loop).result(10)
        probe.ready = True
        assert probe.port is not None
        _check_port(probe.port, installed, "/readyz")
    finally:
        asyncio.run_coroutine_threadsafe(probe.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_a_denied_answer_is_cached_and_expires(kube: ControlPlane, installed: Tokens) -> None:
    now = [0.0]
    auth = _auth(kube, "agent", ttl=30)
    auth.clock = lambda: now[0]
    header = f"Bearer {installed.stranger}"
    assert auth.check(header).status == 403
    assert auth.check(header).status == 403 and auth.reviews == 1
    now[0] = 31.0
    assert auth.check(header).status == 403 and auth.reviews == 2


def test_without_the_chart_role_the_reviews_are_refused(
    kube: ControlPlane, installed: Tokens
) -> None:
    """The metrics-auth binding is what lets the agent review: a scraper's token
    cannot be checked by an account without it (503, never a 200)."""
    kubeconfig = kube.kubeconfig_for("stranger", NAMESPACE)
    auth = MetricsAuth(client_post(RawClient(load_api_client(kubeconfig))))
    verdict = auth.check(f"Bearer {installed.scraper}")
    assert verdict.status == 503 and not verdict.allowed
