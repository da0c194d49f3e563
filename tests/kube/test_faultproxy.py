"""The fault proxy does what the outage tests rely on, against the real server."""

from __future__ import annotations

import time

import pytest

from halfclose.agent.kube.client import ApiError, RawClient, load_api_client
from support.controlplane import ControlPlane
from support.faultproxy import FaultProxy

pytestmark = pytest.mark.kube

NAMESPACES = "/api/v1/namespaces"


def _client(kube: ControlPlane, proxy: FaultProxy, timeout: float = 10.0) -> RawClient:
    return RawClient(load_api_client(kube.chart_kubeconfig("agent", server=proxy.url)), timeout)


def _wait_watches(proxy: FaultProxy, n: int) -> None:
    deadline = time.monotonic() + 5
    while proxy.open_watches != n:
        assert time.monotonic() < deadline, f"{proxy.open_watches} open watches, not {n}"
        time.sleep(0.02)


def test_requests_pass_through_as_the_token_and_fail_when_told(
    kube: ControlPlane, fault_proxy: FaultProxy
) -> None:
    client = _client(kube, fault_proxy)
    names = {n["metadata"]["name"] for n in client.get(NAMESPACES)["items"]}
    assert "kube-system" in names
    users = {r.user for r in kube.requests if r.path == NAMESPACES and r.verb == "list"}
    assert "system:serviceaccount:halfclose-system:halfclose-agent" in users
    fault_proxy.fail(2, 503, path_regex=f"^{NAMESPACES}$")
    for _ in range(2):
        with pytest.raises(ApiError) as err:
            client.get(NAMESPACES)
        assert err.value.status == 503 and err.value.unreachable
    assert client.get(NAMESPACES)["items"]  # the third one passes
    injected = [r for r in fault_proxy.requests if r.injected]
    assert [(r.method, r.path, r.status) for r in injected] == [("GET", NAMESPACES, 503)] * 2


def test_a_delay_makes_the_client_time_out(kube: ControlPlane, fault_proxy: FaultProxy) -> None:
    client = _client(kube, fault_proxy, timeout=0.5)
    # The kubernetes client retries a timed-out GET by itself (urllib3, 3 retries).
    fault_proxy.delay(1.5, 1, path_regex=NAMESPACES)
    assert client.get(NAMESPACES)["items"]
    fault_proxy.delay(1.5, 4, path_regex=NAMESPACES)
    started = time.monotonic()
    with pytest.raises(ApiError) as err:
        client.get(NAMESPACES)
    assert err.value.status == 0 and "ReadTimeoutError" in str(err.value)
    assert 1.8 < time.monotonic() - started < 4
    time.sleep(1.2)  # the last delayed request finds its client gone
    assert client.get(NAMESPACES)["items"]


@pytest.mark.parametrize("graceful", [False, True], ids=["aborted", "clean-end"])
def test_dropped_watches_end(kube: ControlPlane, fault_proxy: FaultProxy, graceful: bool) -> None:
    client = _client(kube, fault_proxy)
    _response, events = client.watch(NAMESPACES, {}, read_timeout=30)
    assert next(events)["type"] == "ADDED"
    _wait_watches(fault_proxy, 1)
    assert fault_proxy.drop_watches(graceful=graceful) == 1
    started = time.monotonic()
    if graceful:
        rest = list(events)  # ends, no error
        assert all(e["type"] == "ADDED" for e in rest)
    else:
        with pytest.raises(Exception):  # noqa: B017 - urllib3's broken-stream error
            list(events)
    assert time.monotonic() - started < 5
    _wait_watches(fault_proxy, 0)


def test_the_api_server_can_be_stopped_and_restarted(kube: ControlPlane) -> None:
    client = RawClient(load_api_client(kube.chart_kubeconfig("agent")), 2.0)
    kube.ensure_namespace("shop", mesh="on")
    with kube.apiserver_down():
        with pytest.raises(ApiError) as err:
            client.get(NAMESPACES)
        assert err.value.status == 0  # connection refused: "no answer"
    # Same port, same etcd: the data and the token survive.
    names = {n["metadata"]["name"] for n in client.get(NAMESPACES)["items"]}
    assert "shop" in names
    started = time.monotonic()
    kube.restart_apiserver()
    print(f"\nAPI server restarted in {time.monotonic() - started:.1f}s")
    (shop,) = client.get(NAMESPACES, {"fieldSelector": "metadata.name=shop"})["items"]
    assert shop["metadata"]["labels"]["mesh"] == "on"
