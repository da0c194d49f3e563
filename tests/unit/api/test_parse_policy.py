"""parse_policy: defaults applied, every invalid input named by its field path."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import yaml

from halfclose.api import (
    PolicyError,
    Thresholds,
    parse_policy,
)
from halfclose.errors import UserError


def _policy(spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "halfclose.io/v1alpha1",
        "kind": "HalfClosePolicy",
        "metadata": {"name": "p", **meta},
        "spec": spec,
    }


def test_defaults_applied() -> None:
    policy = parse_policy(_policy({"namespaces": ["shop"]}))
    spec = policy.spec
    assert spec.action == "Report"
    assert spec.thresholds == Thresholds(
        min_idle_seconds=60, max_kills_per_minute=600, leaked_per_pod_alert=10
    )
    assert spec.conntrack.strategy == "PerEntry"
    assert spec.conntrack.close_wait_timeout_seconds == 3600
    assert spec.capture_ports == ()
    assert spec.scan_interval_seconds == 15
    assert spec.dry_run is False
    assert spec.namespace_selector is None
    assert spec.pod_selector is None


def test_partial_thresholds_keep_other_defaults() -> None:
    spec = parse_policy(_policy({"namespaces": ["a"], "thresholds": {"minIdleSeconds": 5}})).spec
    assert spec.thresholds.min_idle_seconds == 5
    assert spec.thresholds.max_kills_per_minute == 600


def test_full_policy_round_trips_every_field() -> None:
    policy = parse_policy(
        _policy(
            {
                "namespaces": ["kube-system"],
                "namespaceSelector": {"matchLabels": {"mesh": "istio"}},
                "podSelector": {
                    "matchLabels": {"app": "web"},
                    "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}],
                },
                "capturePorts": [15001, 15006],
                "thresholds": {"minIdleSeconds": 0, "maxKillsPerMinute": 5, "leakedPerPodAlert": 3},
                "action": "PatchConntrack",
                "conntrack": {"strategy": "Sysctl", "closeWaitTimeoutSeconds": 600},
                "scanIntervalSeconds": 30,
                "dryRun": True,
            },
            uid="u-1",
            generation=4,
            creationTimestamp="2025-03-01T10:00:00Z",
        )
    )
    spec = policy.spec
    assert (policy.uid, policy.generation) == ("u-1", 4)
    assert policy.creation_timestamp == dt.datetime(2025, 3, 1, 10, tzinfo=dt.UTC)
    assert spec.namespaces == ("kube-system",)
    assert spec.namespace_selector is not None
    assert spec.namespace_selector.match_labels == {"mesh": "istio"}
    assert spec.pod_selector is not None
    assert spec.pod_selector.match_expressions[0].values == ("a", "b")
    assert spec.capture_ports == (15001, 15006)
    assert spec.thresholds.max_kills_per_minute == 5
    assert spec.action == "PatchConntrack"
    assert spec.conntrack.strategy == "Sysctl"
    assert spec.conntrack.close_wait_timeout_seconds == 600
    assert spec.scan_interval_seconds == 30
    assert spec.dry_run is True


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "spec: set namespaces, namespaceSelector or both"),
        ({"namespaces": []}, "spec: set namespaces, namespaceSelector or both"),
        ({"namespaces": ["Shop"]}, "spec.namespaces[0]: 'Shop' does not match"),
        ({"namespaces": ["a", "a"]}, "spec.namespaces[1]: duplicate value 'a'"),
        ({"namespaces": ["a"], "action": "Kill"}, "spec.action: unsupported value 'Kill'"),
        ({"namespaces": ["a"], "capturePorts": [0]}, "spec.capturePorts[0]: must be at least 1"),
        (
            {"namespaces": ["a"], "capturePorts": [70000]},
            "spec.capturePorts[0]: must be at most 65535",
        ),
        ({"namespaces": ["a"], "capturePorts": "15001"}, "spec.capturePorts: must be a list"),
        (
            {"namespaces": ["a"], "thresholds": {"minIdleSeconds": -1}},
            "spec.thresholds.minIdleSeconds: must be at least 0",
        ),
        (
            {"namespaces": ["a"], "thresholds": {"maxKillsPerMinute": 0}},
            "spec.thresholds.maxKillsPerMinute: must be at least 1",
        ),
        (
            {"namespaces": ["a"], "scanIntervalSeconds": True},
            "spec.scanIntervalSeconds: must be an integer, got boolean",
        ),
        (
            {"namespaces": ["a"], "scanIntervalSeconds": "15"},
            "spec.scanIntervalSeconds: must be an integer, got string",
        ),
        (
            {"namespaces": ["a"], "conntrack": {"strategy": "PerEntry"}},
            "spec.conntrack: conntrack settings apply only to action PatchConntrack",
        ),
        (
            {
                "namespaces": ["a"],
                "action": "PatchConntrack",
                "conntrack": {"strategy": "Sysctl", "closeWaitTimeoutSeconds": 7200},
            },
            "spec.conntrack.closeWaitTimeoutSeconds: with strategy Sysctl",
        ),
        (
            {
                "namespaces": ["a"],
                "action": "PatchConntrack",
                "conntrack": {"closeWaitTimeoutSeconds": 60},
            },
            "spec.conntrack.closeWaitTimeoutSeconds: must be at least 120",
        ),
        (
            {
                "namespaces": ["a"],
                "podSelector": {"matchExpressions": [{"key": "k", "operator": "In"}]},
            },
            "spec.podSelector.matchExpressions[0].values: values must be non-empty",
        ),
        (
            {"namespaces": ["a"], "podSelector": {"matchExpressions": [{"operator": "Exists"}]}},
            "spec.podSelector.matchExpressions[0].key: required value",
        ),
        (
            {"namespaces": ["a"], "podSelector": {"matchLabels": {"app": "a b"}}},
            "spec.podSelector.matchLabels.app: 'a b' does not match",
        ),
        # Beyond the schema: label keys (a structural schema cannot check map keys).
        (
            {"namespaces": ["a"], "podSelector": {"matchLabels": {"bad key": "x"}}},
            "spec.podSelector: label key 'bad key'",
        ),
        (
            {"namespaceSelector": {"matchExpressions": [{"key": "-x/y", "operator": "Exists"}]}},
            "spec.namespaceSelector: label key '-x/y': the prefix must be a DNS subdomain",
        ),
    ],
)
def test_invalid_specs_name_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(_policy(spec))
    assert str(info.value).startswith(f"HalfClosePolicy 'p': {message}"), str(info.value)


def test_policy_error_is_a_user_error() -> None:
    # The CLI turns a UserError into one line and exit 2.
    assert issubclass(PolicyError, UserError)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"kind": "Pod", "metadata": {"name": "p"}, "spec": {}}, "expected apiVersion"),
        ({"spec": {"namespaces": ["a"]}}, "metadata.name: required value"),
        ({"metadata": {"name": "p"}}, "spec: required value"),
        (
            {
                "metadata": {"name": "p", "creationTimestamp": "yesterday"},
                "spec": {"namespaces": ["a"]},
            },
            "metadata.creationTimestamp",
        ),
    ],
)
def test_invalid_objects(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(obj)


def test_unknown_fields_ignored_unless_strict() -> None:
    obj = _policy({"namespaces": ["a"], "acton": "KillSockets"})
    assert parse_policy(obj).spec.action == "Report"  # pruned, as the API server does
    with pytest.raises(PolicyError, match=r"spec.acton: unknown field"):
        parse_policy(obj, strict=True)


def test_unreadable_status_does_not_void_a_valid_spec() -> None:
    obj = _policy({"namespaces": ["a"]})
    obj["status"] = {"matchedPods": "many"}
    assert parse_policy(obj).status.matched_pods == 0


def test_status_is_read() -> None:
    obj = _policy({"namespaces": ["a"]})
    obj["status"] = {
        "observedGeneration": 3,
        "leakedNow": 7,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Applied",
                "message": "",
                "lastTransitionTime": "2025-01-01T00:00:00Z",
            }
        ],
    }
    status = parse_policy(obj).status
    assert (status.observed_generation, status.leaked_now) == (3, 7)
    assert status.conditions[0].type == "Ready"


def test_yaml_timestamps_accepted() -> None:
    # An unquoted timestamp in a YAML file loads as a datetime, not a string.
    obj = yaml.safe_load(
        "metadata: {name: p, creationTimestamp: 2025-03-01T10:00:00Z}\nspec: {namespaces: [a]}"
    )
    assert parse_policy(obj).creation_timestamp == dt.datetime(2025, 3, 1, 10, tzinfo=dt.UTC)
