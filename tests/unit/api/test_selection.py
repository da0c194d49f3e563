"""Policy-to-pod matching (label selector semantics, kube-system rule) and overlap resolution."""

from __future__ import annotations

from typing import Any

import pytest

from halfclose.api import Policy, parse_policy, policy_matches, select_policy


def _policy(
    name: str, spec: dict[str, Any], created: str | None = "2025-01-01T00:00:00Z"
) -> Policy:
    meta: dict[str, Any] = {"name": name}
    if created:
        meta["creationTimestamp"] = created
    return parse_policy({"metadata": meta, "spec": spec})


NS = {"kubernetes.io/metadata.name": "shop", "mesh": "istio", "tier": "gold"}


@pytest.mark.parametrize(
    ("spec", "namespace", "ns_labels", "pod_labels", "expected"),
    [
        ({"namespaces": ["shop"]}, "shop", NS, {}, True),
        ({"namespaces": ["shop"]}, "other", NS, {}, False),
        # Names work even when the namespace's labels are unknown.
        ({"namespaces": ["shop"]}, "shop", None, {}, True),
        ({"namespaceSelector": {}}, "shop", NS, {}, True),
        ({"namespaceSelector": {}}, "shop", None, {}, False),
        ({"namespaceSelector": {"matchLabels": {"mesh": "istio"}}}, "shop", NS, {}, True),
        ({"namespaceSelector": {"matchLabels": {"mesh": "linkerd"}}}, "shop", NS, {}, False),
        # kube-system: never through a selector, always by name.
        ({"namespaceSelector": {}}, "kube-system", {}, {}, False),
        ({"namespaceSelector": {"matchLabels": {"mesh": "istio"}}}, "kube-system", NS, {}, False),
        ({"namespaces": ["kube-system"]}, "kube-system", {}, {}, True),
        ({"namespaces": ["kube-system"], "namespaceSelector": {}}, "shop", NS, {}, True),
        # Pod selector: matchLabels AND matchExpressions.
        (
            {"namespaces": ["shop"], "podSelector": {"matchLabels": {"app": "web"}}},
            "shop",
            NS,
            {"app": "web", "x": "y"},
            True,
        ),
        (
            {"namespaces": ["shop"], "podSelector": {"matchLabels": {"app": "web"}}},
            "shop",
            NS,
            {"app": "api"},
            False,
        ),
        ({"namespaces": ["shop"], "podSelector": {}}, "shop", NS, {"anything": "1"}, True),
        (
            {
                "namespaces": ["shop"],
                "podSelector": {
                    "matchLabels": {"app": "web"},
                    "matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}],
                },
            },
            "shop",
            NS,
            {"app": "web", "canary": "1"},
            False,
        ),
    ],
)
def test_policy_matches(
    spec: dict[str, Any],
    namespace: str,
    ns_labels: dict[str, str] | None,
    pod_labels: dict[str, str],
    expected: bool,
) -> None:
    assert policy_matches(_policy("p", spec), ns_labels, namespace, pod_labels) is expected


@pytest.mark.parametrize(
    ("operator", "values", "labels", "expected"),
    [
        ("In", ["a", "b"], {"k": "b"}, True),
        ("In", ["a", "b"], {"k": "c"}, False),
        ("In", ["a"], {}, False),
        ("NotIn", ["a"], {"k": "b"}, True),
        ("NotIn", ["a"], {"k": "a"}, False),
        ("NotIn", ["a"], {}, True),  # missing key satisfies NotIn, as in Kubernetes
        ("Exists", [], {"k": ""}, True),
        ("Exists", [], {}, False),
        ("DoesNotExist", [], {}, True),
        ("DoesNotExist", [], {"k": "x"}, False),
    ],
)
def test_match_expression_semantics(
    operator: str, values: list[str], labels: dict[str, str], expected: bool
) -> None:
    requirement: dict[str, Any] = {"key": "k", "operator": operator}
    if values:
        requirement["values"] = values
    policy = _policy("p", {"namespaces": ["a"], "podSelector": {"matchExpressions": [requirement]}})
    assert policy_matches(policy, {}, "a", labels) is expected


def test_oldest_policy_wins_an_overlap() -> None:
    old = _policy("zeta", {"namespaces": ["shop"]}, created="2025-01-01T00:00:00Z")
    new = _policy("alpha", {"namespaceSelector": {}}, created="2025-02-01T00:00:00Z")
    for order in ([old, new], [new, old]):
        assert select_policy(order, NS, "shop", {}) is old
    # Where only the newer one matches, it applies.
    assert select_policy([old, new], NS, "other", {}) is new


def test_name_breaks_a_timestamp_tie() -> None:
    b = _policy("b", {"namespaces": ["shop"]})
    a = _policy("a", {"namespaces": ["shop"]})
    assert select_policy([b, a], NS, "shop", {}) is a


def test_policies_without_a_timestamp_lose() -> None:
    from_file = _policy("a", {"namespaces": ["shop"]}, created=None)
    stored = _policy("z", {"namespaces": ["shop"]})
    assert select_policy([from_file, stored], NS, "shop", {}) is stored


def test_no_match() -> None:
    assert select_policy([_policy("a", {"namespaces": ["x"]})], NS, "shop", {}) is None
    assert select_policy([], NS, "shop", {}) is None
