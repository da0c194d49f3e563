"""Node-bound writes (issue 13): the chart's ValidatingAdmissionPolicy on a real 1.37
API server.  Two Node objects, a workload pod and an agent pod on each; the agents'
tokens are TokenRequests bound to their agent pod, so the server adds the pod's node
as the user extra ``authentication.kubernetes.io/node-name``.  Node A's agent may
write its own pods' reports and events and nothing of node B's; with the policy off
(the chart value) it may, which is what RBAC alone allows.

The objects are built by the agent's own code (``report_manifest``, ``creatable``,
``event_object``): the policy checks fields the agent must set.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from halfclose.agent.kube.events import PodEvent, event_object
from halfclose.agent.kube.reports import PodRef, creatable
from halfclose.api import GROUP, REPORT_PLURAL, VERSION
from halfclose.api.names import NODE_LABEL
from halfclose.api.report import report_manifest
from support.chart import CHART
from support.controlplane import APIError, ControlPlane

pytestmark = pytest.mark.kube

NODE_A, NODE_B = "hsc-node-a", "hsc-node-b"
# The chart installed as its own release in its own namespace: the refusals this
# test provokes are not the session's chart ServiceAccounts' (test_rbac.py asserts
# those were never refused), and no cluster-scoped name collides with theirs.
RELEASE = "hsc"
NAMESPACE = "hsc-admission"
AGENT_SA = f"{RELEASE}-halfclose-agent"
APPLIED = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
POLICY_KINDS = {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
REPORTS = f"/apis/{GROUP}/{VERSION}/namespaces/shop/{REPORT_PLURAL}"
EVENTS = "/api/v1/namespaces/shop/events"
MERGE = "application/merge-patch+json"
JSON = "application/json"


def _render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart:
        texts = chart.render(dict(values or {}), name=RELEASE, namespace=NAMESPACE,
                             is_install=True)  # fmt: skip
    return [doc for t, text in sorted(texts.items()) if not t.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]  # fmt: skip


def _policy_objects(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [o for o in _render(values) if o["kind"] in POLICY_KINDS]


def _apply(kube: ControlPlane, objs: list[dict[str, Any]]) -> None:
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-n", NAMESPACE, "-f", "-",
                 input=yaml.safe_dump_all(objs))  # fmt: skip


def _delete(kube: ControlPlane, objs: list[dict[str, Any]]) -> None:
    for obj in objs:
        kube.kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"],
                     "--ignore-not-found", "--wait=true")  # fmt: skip


@dataclass
class Node:
    name: str
    pod: dict[str, Any]  # a workload pod on this node (namespace shop)
    token: str  # the agent's token, bound to the agent pod on this node

    @property
    def ref(self) -> PodRef:
        meta = self.pod["metadata"]
        return PodRef("shop", meta["name"], meta["uid"])


def _pod(kube: ControlPlane, ns: str, name: str, node: str, sa: str | None = None) -> Any:
    spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": "c", "image": "app:1"}]}
    if sa:
        spec["serviceAccountName"] = sa
    obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": ns, "name": name}}
    return kube.put_object("", "v1", "pods", {**obj, "spec": spec})


def _bound_token(kube: ControlPlane, agent_pod: dict[str, Any]) -> str:
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "expirationSeconds": 3600,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": agent_pod["metadata"]["name"],
                "uid": agent_pod["metadata"]["uid"],
            },
        },
    }
    out = kube.request(
        "POST", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{AGENT_SA}/token", body
    )
    return str(out["status"]["token"])


@pytest.fixture
def nodes(kube: ControlPlane) -> Iterator[tuple[Node, Node]]:
    rbac = [o for o in _render() if o["kind"] in APPLIED]
    kube.ensure_namespace(NAMESPACE)
    _apply(kube, rbac)
    made: list[Node] = []
    try:
        for name in (NODE_A, NODE_B):
            kube.put_object("", "v1", "nodes", {"apiVersion": "v1", "kind": "Node",
                                                "metadata": {"name": name}})  # fmt: skip
            workload = _pod(kube, "shop", f"app-{name}", name)
            agent = _pod(kube, NAMESPACE, f"agent-{name}", name, sa=AGENT_SA)
            made.append(Node(name, workload, _bound_token(kube, agent)))
        yield made[0], made[1]
    finally:
        for name in (NODE_A, NODE_B):
            kube.kubectl("delete", "node", name, "--ignore-not-found", check=False)
        _delete(kube, [o for o in rbac if o["kind"] != "ServiceAccount"])


@pytest.fixture
def node_policy(kube: ControlPlane) -> Iterator[list[dict[str, Any]]]:
    objs = _policy_objects()
    assert {o["kind"] for o in objs} == {
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    _apply(kube, objs)
    try:
        yield objs
    finally:
        _delete(kube, objs)


def _report(node: Node, claimed_node: str) -> dict[str, Any]:
    meta = node.pod["metadata"]
    manifest = report_manifest(
        namespace="shop",
        pod_name=meta["name"],
        pod_uid=meta["uid"],
        node_name=claimed_node,
        policy="kill",
    )
    return dict(creatable(manifest))


def _event(about: Node, writer: str) -> dict[str, Any]:
    event = PodEvent(about.ref, "HalfCloseKilled", "Killed 1 leaked socket on :15001")
    return dict(event_object(event, writer))


def _status(
    kube: ControlPlane,
    token: str,
    method: str,
    path: str,
    body: object = None,
    *,
    patch: bool = False,
) -> int:
    """HTTP status of one call as the bearer of ``token`` (2xx -> 200)."""
    try:
        kube.request(method, path, body, token=token, content_type=MERGE if patch else JSON)
    except APIError as exc:
        return exc.code
    return 200


def _denied_by_policy(
    kube: ControlPlane,
    token: str,
    method: str,
    path: str,
    body: object = None,
    *,
    patch: bool = False,
) -> str:
    try:
        kube.request(method, path, body, token=token, content_type=MERGE if patch else JSON)
    except APIError as exc:
        assert exc.code == 403, exc
        text = str(exc)
        assert "ValidatingAdmissionPolicy" in text, text
        return text
    raise AssertionError(f"{method} {path} was allowed")


def _wait_enforced(kube: ControlPlane, node: Node) -> None:
    """The policy is enforced once the API server's policy cache has it (asynchronous)."""
    probe = _report(node, NODE_B if node.name == NODE_A else NODE_A)

    def denied() -> bool:
        return _status(kube, node.token, "POST", REPORTS + "?dryRun=All", probe) == 403

    kube.wait_for(denied, 20, "the node-bound policy to be enforced")


def test_pod_bound_tokens_carry_their_node(kube: ControlPlane, nodes: tuple[Node, Node]) -> None:
    for node in nodes:
        review = kube.request(
            "POST",
            "/apis/authentication.k8s.io/v1/selfsubjectreviews",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
            token=node.token,
        )
        user = review["status"]["userInfo"]
        assert user["username"] == f"system:serviceaccount:{NAMESPACE}:{AGENT_SA}"
        assert user["extra"][NODE_NAME_EXTRA] == [node.name]


def test_an_agent_writes_only_its_own_nodes_reports_and_events(
    kube: ControlPlane, nodes: tuple[Node, Node], node_policy: list[dict[str, Any]]
) -> None:
    a, b = nodes
    _wait_enforced(kube, a)
    # Its own: create, patch the status, delete; events created and patched.
    assert _status(kube, a.token, "POST", REPORTS, _report(a, a.name)) == 200
    name_a = a.pod["metadata"]["name"]
    leaked = {"status": {"leaked": 2}}
    assert _status(kube, a.token, "PATCH", f"{REPORTS}/{name_a}/status", leaked, patch=True) == 200
    event = _event(a, a.name)
    assert _status(kube, a.token, "POST", EVENTS, event) == 200
    bump = {"count": 2}
    path = f"{EVENTS}/{event['metadata']['name']}"
    assert _status(kube, a.token, "PATCH", path, bump, patch=True) == 200
    assert _status(kube, a.token, "DELETE", f"{REPORTS}/{name_a}") == 200

    # Node B's: its agent writes them; node A's agent can neither write as B...
    name_b = b.pod["metadata"]["name"]
    text = _denied_by_policy(kube, a.token, "POST", REPORTS, _report(b, b.name))
    assert f"agent of node {NODE_A} may only write reports" in text
    assert _status(kube, b.token, "POST", REPORTS, _report(b, b.name)) == 200
    # ... nor change or delete what B wrote, ...
    text = _denied_by_policy(
        kube, a.token, "PATCH", f"{REPORTS}/{name_b}/status", leaked, patch=True
    )
    assert f"may not change or delete the report of node {NODE_B}" in text
    _denied_by_policy(kube, a.token, "DELETE", f"{REPORTS}/{name_b}")
    # ... nor label its own report as node B's.
    forged = _report(a, a.name)
    forged["metadata"]["labels"][NODE_LABEL] = NODE_B
    _denied_by_policy(kube, a.token, "POST", REPORTS, forged)
    # Events: none in B's name, and B's own events stay B's.
    _denied_by_policy(kube, a.token, "POST", EVENTS, _event(b, b.name))
    spoofed = _event(a, a.name)
    spoofed["source"]["host"] = NODE_B
    _denied_by_policy(kube, a.token, "POST", EVENTS, spoofed)
    event_b = _event(b, b.name)
    assert _status(kube, b.token, "POST", EVENTS, event_b) == 200
    path_b = f"{EVENTS}/{event_b['metadata']['name']}"
    _denied_by_policy(kube, a.token, "PATCH", path_b, {"message": "all fine"}, patch=True)
    assert _status(kube, a.token, "DELETE", path_b) == 403  # RBAC grants no delete anyway
    # B's report and event are untouched.
    kept = kube.get_object(GROUP, VERSION, REPORT_PLURAL, name_b, "shop")
    assert kept is not None and kept["spec"]["nodeName"] == NODE_B
    assert kube.request("GET", path_b)["message"] == event_b["message"]
    # The admin (not the agent) is not judged by the policy.
    kube.request("PATCH", f"{REPORTS}/{name_b}/status", leaked, content_type=MERGE)


def test_a_token_without_a_node_writes_nothing(
    kube: ControlPlane, nodes: tuple[Node, Node], node_policy: list[dict[str, Any]]
) -> None:
    a, _ = nodes
    _wait_enforced(kube, a)
    unbound = kube.token_for(AGENT_SA, NAMESPACE)  # a TokenRequest bound to no pod
    text = _denied_by_policy(kube, unbound, "POST", REPORTS, _report(a, a.name))
    assert "not bound to a node" in text
    _denied_by_policy(kube, unbound, "POST", EVENTS, _event(a, a.name))


def test_without_the_policy_rbac_lets_one_node_write_anothers(
    kube: ControlPlane, nodes: tuple[Node, Node]
) -> None:
    """What the policy prevents: the chart with admission.nodeBoundWrites=false."""
    a, b = nodes
    assert _policy_objects({"admission": {"nodeBoundWrites": {"enabled": False}}}) == []
    name_b = b.pod["metadata"]["name"]
    assert _status(kube, b.token, "POST", REPORTS, _report(b, b.name)) == 200
    leaked = {"status": {"leaked": 99}}
    assert _status(kube, a.token, "PATCH", f"{REPORTS}/{name_b}/status", leaked, patch=True) == 200
    assert _status(kube, a.token, "POST", EVENTS, _event(b, b.name)) == 200
    assert _status(kube, a.token, "DELETE", f"{REPORTS}/{name_b}") == 200
