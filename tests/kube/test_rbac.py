"""The chart's RBAC against the real API server: every API call the agent and the
operator make is granted to their ServiceAccounts, and nothing else is.

``support.rbac.USES`` maps each call to the permission it needs (``kubectl auth can-i`` terms) and
the code that makes it.  Three checks keep it honest:

- the rendered ClusterRoles grant exactly ``USES`` (nothing unused, no wildcards);
- each permission is allowed for the ServiceAccount's own token
  (SelfSubjectAccessReview), and a few it must not have are denied;
- the calls the programs really made as those ServiceAccounts — the agent's API layer
  here, plus every kube test of the session (the audit log, collected by the ``kube``
  fixture) — are all in ``USES`` and none was refused.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from halfclose.agent.kube.client import RawClient, load_api_client
from halfclose.agent.kube.events import PodEvent
from halfclose.agent.kube.reports import PodRef, ReportUpdate
from halfclose.agent.kube.world import KubeWorld
from halfclose.agent.kube.writer import ReportWriter
from halfclose.api.report import report_manifest
from support.chart import NAMESPACE, RELEASE, render
from support.controlplane import CHART_SA_PREFIX, SERVICE_ACCOUNT_CALLS, ControlPlane, LoggedRequest
from support.rbac import EVERYONE, HC, USES, Permission

pytestmark = pytest.mark.kube

# Things neither may do, to show the access review can say no.
NEVER: list[Permission] = [
    ("", "secrets", "get"),
    ("", "secrets", "list"),
    ("", "pods", "delete"),
    ("", "pods/exec", "create"),
    (HC, "halfclosepolicies", "delete"),
]


def granted(component: str) -> set[Permission]:
    """(group, resource, verb) the rendered chart grants the component's ServiceAccount."""
    out: set[Permission] = set()
    for m in render():
        if m.kind != "ClusterRole" or m.name != f"{RELEASE}-{component}":
            continue
        for rule in m.obj["rules"]:
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    for verb in rule["verbs"]:
                        assert "*" not in (group, resource, verb), rule
                        out.add((group, resource, verb))
    return out


def used(requests: Iterable[LoggedRequest]) -> set[Permission]:
    return {
        (r.group, r.resource, r.verb)
        for r in requests
        if r.resource and (r.group, r.resource, r.verb) not in EVERYONE
    }


def review(kube: ControlPlane, token: str, perm: Permission, namespace: str = "shop") -> bool:
    group, resource, verb = perm
    name, _, sub = resource.partition("/")
    attrs: dict[str, Any] = {"group": group, "resource": name, "verb": verb}
    if sub:
        attrs["subresource"] = sub
    if resource not in {"namespaces", "halfclosepolicies"}:
        attrs["namespace"] = namespace
    out = kube.request(
        "POST",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attrs},
        },
        token=token,
    )
    return bool(out["status"].get("allowed"))


@pytest.mark.parametrize("component", sorted(USES))
def test_the_chart_grants_exactly_what_is_used(component: str) -> None:
    grants = granted(component)
    declared = set(USES[component])
    assert declared - grants == set(), "used but not granted"
    assert grants - declared == set(), "granted but never used"


@pytest.mark.parametrize("component", sorted(USES))
def test_each_permission_is_allowed_for_the_service_account_token(
    kube: ControlPlane, component: str
) -> None:
    kube.install_chart_rbac()
    token = kube.token_for(f"{RELEASE}-{component}", NAMESPACE)
    denied = [p for p in USES[component] if not review(kube, token, p)]
    assert denied == []
    allowed = [p for p in NEVER if review(kube, token, p)]
    assert allowed == []


def test_the_agents_api_layer_makes_only_declared_calls(kube: ControlPlane) -> None:
    """The agent's whole API surface (KubeWorld, ReportWriter) as the chart's agent."""
    pod = kube.put_object(
        "",
        "v1",
        "pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"namespace": "shop", "name": "cart"},
            "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "app:1"}]},
        },
    )
    client = RawClient(load_api_client(kube.chart_kubeconfig("agent")))
    world = KubeWorld(client, "node-a", lambda: None)
    writer = ReportWriter(client, "node-a")
    world.start()
    writer.start()
    try:
        kube.wait_for(world.pods, 10, "the agent's pod list")
        ref = PodRef("shop", "cart", pod["metadata"]["uid"])
        manifest = report_manifest(
            namespace="shop", pod_name="cart", pod_uid=ref.uid, node_name="node-a", policy="p"
        )
        assert world.previous_report("shop", "cart") is None
        writer.submit(ReportUpdate(ref, manifest, {"leaked": 1}))  # create + status
        assert writer.wait_idle(10)
        writer.submit(ReportUpdate(ref, manifest, {"leaked": 2}))  # status only
        writer.event(PodEvent(ref, "LeakedSocketsKilled", "Killed 1", at=time.time()))
        writer.event(PodEvent(ref, "LeakedSocketsKilled", "Killed 1", at=time.time() + 1))
        assert writer.wait_idle(10)
        writer.submit(ReportUpdate(ref, None, None))  # delete
        assert writer.wait_idle(10)
    finally:
        writer.stop()
        world.stop()
    calls = [r for r in kube.requests if r.user == f"{CHART_SA_PREFIX}{RELEASE}-agent"]
    assert [r for r in calls if r.code >= 400 and r.code != 404] == []
    assert used(calls) == set(USES["agent"])


def test_the_operator_as_the_chart_runs_it_makes_only_declared_calls(kube: ControlPlane) -> None:
    """``halfclose-operator`` as the chart's operator ServiceAccount through a policy's
    life: matched pods, a report, status, Events, the policy deleted (its reports go)."""
    ns = "rbac-operator"
    pod = kube.put_object(
        "",
        "v1",
        "pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"namespace": ns, "name": "cart", "labels": {"app": "cart"}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"phase": "Running"},
        },
    )
    kube.put_object(
        HC,
        "v1alpha1",
        "halfclosereports",
        report_manifest(
            namespace=ns,
            pod_name="cart",
            pod_uid=pod["metadata"]["uid"],
            node_name="node-a",
            policy="p",
        ),
    )
    env = dict(
        os.environ,
        KUBECONFIG=kube.chart_kubeconfig("operator"),
        HALFCLOSE_OPERATOR_METRICS_PORT=str(free_port()),
        HALFCLOSE_OPERATOR_LIVENESS_PORT=str(free_port()),
        HALFCLOSE_OPERATOR_DEBOUNCE_SECONDS="0.2",
        HALFCLOSE_OPERATOR_LOG_LEVEL="WARNING",
    )
    script = Path(sys.executable).with_name("halfclose-operator")
    proc = subprocess.Popen(
        [str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        kube.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps(
                {
                    "apiVersion": f"{HC}/v1alpha1",
                    "kind": "HalfClosePolicy",
                    "metadata": {"name": "p"},
                    "spec": {"namespaces": [ns]},
                }
            ),
        )

        def status() -> dict[str, Any]:
            assert proc.poll() is None, proc.communicate()[0]
            obj = kube.get_object(HC, "v1alpha1", "halfclosepolicies", "p") or {}
            return dict(obj.get("status") or {})

        kube.wait_for(lambda: status().get("matchedPods") == 1, 30, "the policy's status")
        kube.wait_for(
            lambda: kube.objects("", "v1", "events", "default"),
            10,
            "the operator's Events",
        )
        kube.kubectl("delete", "hcp", "p", "--wait=false")
        kube.wait_for(
            lambda: kube.get_object(HC, "v1alpha1", "halfclosereports", "cart", ns) is None,
            20,
            "the operator to delete the deleted policy's report",
        )
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    calls = [r for r in kube.requests if r.user == f"{CHART_SA_PREFIX}{RELEASE}-operator"]
    assert [r for r in calls if r.code in {401, 403}] == []
    legacy = {(HC, "halfclosepolicies", "patch")}  # only for an older version's finalizer
    assert used(calls) <= set(USES["operator"])
    assert set(USES["operator"]) - legacy - used(calls) == set(), "declared but not exercised"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_every_call_of_the_session_was_declared_and_allowed() -> None:
    """Runs last in this file: by then every kube test before it (the agent daemon in
    test_agent.py, the operator in test_operator*.py) has left its calls here."""
    by_sa: dict[str, list[tuple[str, LoggedRequest]]] = {}
    for test, r in SERVICE_ACCOUNT_CALLS:
        by_sa.setdefault(r.user.removeprefix(CHART_SA_PREFIX + RELEASE + "-"), []).append((test, r))
    for component, calls in by_sa.items():
        refused = [(t, r) for t, r in calls if r.code == 403]
        assert refused == [], f"{component}: refused by RBAC"
        if component in USES:
            undeclared = {p: t for t, r in calls for p in used([r]) if p not in USES[component]}
            assert undeclared == {}, f"{component}: calls missing from USES"
