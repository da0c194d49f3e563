"""The cluster-wide assignment agrees with the agent's per-pod select_policy."""

from __future__ import annotations

import random
from typing import Any

from halfclose.api import Policy, parse_policy, select_policy
from halfclose.operator.assignment import assign
from halfclose.operator.view import PodInfo


def _policy(name: str, created: str, spec: dict[str, Any]) -> Policy:
    return parse_policy({"metadata": {"name": name, "creationTimestamp": created}, "spec": spec})


def test_matches_select_policy_on_random_clusters() -> None:
    rng = random.Random(4)  # fixed seed: a reproducible sample of shapes
    label_values = ["a", "b", "c"]
    for _ in range(40):
        namespaces = {
            f"ns{i}": {"team": rng.choice(label_values)} for i in range(rng.randint(1, 5))
        }
        namespaces["kube-system"] = {"team": "a"}
        pods = [
            PodInfo(ns, f"{ns}-p{j}", {"app": rng.choice(label_values)})
            for ns in namespaces
            for j in range(rng.randint(0, 4))
        ]
        policies = []
        for k in range(rng.randint(1, 4)):
            spec: dict[str, Any] = {}
            if rng.random() < 0.5:
                spec["namespaces"] = rng.sample([*namespaces, "missing"], 2)
            if rng.random() < 0.6 or not spec:
                spec["namespaceSelector"] = (
                    {}
                    if rng.random() < 0.3
                    else {"matchLabels": {"team": rng.choice(label_values)}}
                )
            if rng.random() < 0.5:
                spec["podSelector"] = {
                    "matchExpressions": [
                        {"key": "app", "operator": "In", "values": rng.sample(label_values, 2)}
                    ]
                }
            created = f"2025-01-0{rng.randint(1, 3)}T00:00:00Z"
            policies.append(_policy(f"p{k}", created, spec))

        result = assign(policies, namespaces, pods)
        applied = {p.name: 0 for p in policies}
        for pod in pods:
            winner = select_policy(policies, namespaces[pod.namespace], pod.namespace, pod.labels)
            if winner is not None:
                applied[winner.name] += 1
        assert {name: result.of(name).applied for name in applied} == applied


def test_overlap_bookkeeping() -> None:
    old = _policy("old", "2025-01-01T00:00:00Z", {"namespaces": ["shop"]})
    new = _policy("new", "2025-02-01T00:00:00Z", {"namespaceSelector": {}})
    namespaces = {"shop": {}, "web": {}, "kube-system": {}}
    pods = [
        PodInfo("shop", "a", {}),
        PodInfo("shop", "b", {}),
        PodInfo("web", "c", {}),
        PodInfo("kube-system", "dns", {}),
    ]
    result = assign([new, old], namespaces, pods)
    assert result.of("old").applied == 2
    assert result.of("old").shares_with == {"new": 2}
    assert result.of("new").applied == 1
    assert result.of("new").selected == 3
    assert result.of("new").claimed_by == {"old": 2}
    assert result.of("new").namespaces_in_scope == 2  # not kube-system


def test_missing_namespaces_and_pods_outside_known_namespaces() -> None:
    policy = _policy("p", "2025-01-01T00:00:00Z", {"namespaces": ["shop", "gone"]})
    result = assign([policy], {"shop": {}}, [PodInfo("shop", "a", {}), PodInfo("other", "b", {})])
    assert result.of("p").missing_namespaces == ("gone",)
    assert result.of("p").namespaces_in_scope == 1
    assert result.of("p").applied == 1
    assert result.of("unknown").applied == 0
