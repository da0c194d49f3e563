"""Every Kubernetes API call the agent and the operator make, mapped to the permission
it needs and the code that makes it: the one record the chart's RBAC is checked
against (tests/chart/test_chart_security.py statically, tests/kube/test_rbac.py on a
real API server, where the audit log shows what the programs really called)."""

from __future__ import annotations

Permission = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)
HC = "halfclose.io"

USES: dict[str, dict[Permission, str]] = {
    "agent": {
        ("", "pods", "list"): "KubeWorld: this node's pods (fieldSelector spec.nodeName)",
        ("", "pods", "watch"): "KubeWorld: this node's pods",
        ("", "namespaces", "list"): "KubeWorld: namespace labels for namespaceSelector",
        ("", "namespaces", "watch"): "KubeWorld: namespace labels",
        (HC, "halfclosepolicies", "list"): "KubeWorld: the policies",
        (HC, "halfclosepolicies", "watch"): "KubeWorld: the policies",
        (HC, "halfclosereports", "list"): "KubeWorld.previous_report: totals across restarts",
        (HC, "halfclosereports", "create"): "ReportWriter: a pod's first findings",
        (HC, "halfclosereports", "delete"): "ReportWriter: the pod is clean again",
        (HC, "halfclosereports/status", "patch"): "ReportWriter: findings and totals",
        ("", "events", "create"): "ReportWriter: an Event on the pod",
        ("", "events", "patch"): "ReportWriter: a repeated Event counted on the existing one",
    },
    "operator": {
        (HC, "halfclosepolicies", "list"): "informer (operator/informer.py)",
        (HC, "halfclosepolicies", "watch"): "informer",
        (HC, "halfclosepolicies", "patch"): "reconcile: drop an older version's kopf finalizer",
        (HC, "halfclosepolicies/status", "patch"): "reconcile: status (merge patch)",
        (HC, "halfclosereports", "list"): "informer",
        (HC, "halfclosereports", "watch"): "informer",
        (HC, "halfclosereports", "delete"): "reconcile: reports of a deleted policy",
        ("", "namespaces", "list"): "informer (metadata only)",
        ("", "namespaces", "watch"): "informer (metadata only)",
        ("", "pods", "list"): "informer (metadata only, running pods)",
        ("", "pods", "watch"): "informer (metadata only, running pods)",
        ("", "events", "create"): "reconcile: Events on policies (namespace default)",
        ("kopf.dev", "clusterkopfpeerings", "create"): "handlers.ensure_peering at start",
        ("kopf.dev", "clusterkopfpeerings", "list"): "kopf peering + leader informer",
        ("kopf.dev", "clusterkopfpeerings", "watch"): "kopf peering + leader informer",
        ("kopf.dev", "clusterkopfpeerings", "patch"): "kopf peering keep-alive",
    },
}

# Every authenticated user may do these (system:basic-user), so no chart grants them.
EVERYONE = {
    ("authorization.k8s.io", "selfsubjectaccessreviews", "create"),
    ("authorization.k8s.io", "selfsubjectrulesreviews", "create"),
    ("authentication.k8s.io", "selfsubjectreviews", "create"),
}


def rules(component: str) -> dict[tuple[str, str], set[str]]:
    """USES as (apiGroup, resource) -> verbs, the shape of a ClusterRole's rules."""
    out: dict[tuple[str, str], set[str]] = {}
    for group, resource, verb in USES[component]:
        out.setdefault((group, resource), set()).add(verb)
    return out
