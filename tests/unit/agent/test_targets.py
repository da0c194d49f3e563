"""Which pods of this node get which policy (pure glue over halfclose.api)."""

from __future__ import annotations

from typing import Any

from halfclose.agent.daemon.targets import parse_policies, pod_targets

NODE = "node-a"
CID = "c" * 64


def policy(name: str, created: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "halfclose.io/v1alpha1",
        "kind": "HalfClosePolicy",
        "metadata": {"name": name, "creationTimestamp": created, "uid": f"uid-{name}"},
        "spec": spec,
    }


def pod(
    ns: str,
    name: str,
    node: str = NODE,
    labels: dict[str, str] | None = None,
    cid: str | None = CID,
    **spec: Any,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running"}
    if cid:
        status["containerStatuses"] = [{"name": "app", "containerID": f"containerd://{cid}"}]
    return {
        "metadata": {"namespace": ns, "name": name, "uid": f"uid-{name}", "labels": labels or {}},
        "spec": {"nodeName": node, **spec},
        "status": status,
    }


def test_matching_overlap_and_filters() -> None:
    policies = parse_policies(
        [
            policy("old", "2026-01-01T00:00:00Z", namespaces=["shop"], action="Report"),
            policy(
                "new",
                "2026-02-01T00:00:00Z",
                namespaceSelector={"matchLabels": {"mesh": "on"}},
                action="KillSockets",
            ),
        ]
    )
    pods = [
        pod("shop", "web"),  # both match: the older policy wins
        pod("pay", "api"),  # only "new" (namespace label)
        pod("pay", "elsewhere", node="node-b"),  # another node: never
        pod("pay", "host", hostNetwork=True),  # host netns: never
        pod("pay", "starting", cid=None),  # no container yet
        pod("other", "x"),  # no policy
        pod("kube-system", "dns"),  # selectors never reach kube-system
    ]
    done = pod("pay", "job")
    done["status"]["phase"] = "Succeeded"
    pods.append(done)
    labels = {"shop": {"mesh": "on"}, "pay": {"mesh": "on"}, "kube-system": {"mesh": "on"}}
    targets = pod_targets(policies, pods, labels, NODE)
    assert {k: t.policy.name for k, t in targets.items()} == {
        ("shop", "web"): "old",
        ("pay", "api"): "new",
    }
    assert targets[("pay", "api")].container_ids == {CID}
    assert targets[("pay", "api")].uid == "uid-api"


def test_invalid_policy_is_skipped_not_fatal() -> None:
    good = policy("good", "2026-01-01T00:00:00Z", namespaces=["a"])
    bad = policy("bad", "2026-01-01T00:00:00Z", namespaces=["a"], action="Explode")
    assert [p.name for p in parse_policies([bad, good])] == ["good"]


def test_no_policies_no_targets() -> None:
    assert pod_targets([], [pod("shop", "web")], {}, NODE) == {}
