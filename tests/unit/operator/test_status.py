"""The policy status: conditions with reasons users can act on, the report aggregate, events."""

from __future__ import annotations

import datetime as dt
from typing import Any

from halfclose.api import PolicyStatus, encode, find_condition, parse_policy
from halfclose.operator.assignment import assign
from halfclose.operator.status import aggregate, compute_status, events_for
from halfclose.operator.view import PodInfo, PolicyEntry, ReportSummary, policy_entry_from

T0 = dt.datetime(2025, 5, 1, tzinfo=dt.UTC)
NAMESPACES = {"shop": {"mesh": "istio"}, "web": {"mesh": "istio"}, "kube-system": {}}
PODS = [
    PodInfo("shop", "cart", {"app": "cart"}),
    PodInfo("shop", "pay", {"app": "pay"}),
    PodInfo("web", "front", {"app": "front"}),
]


def _entry(
    name: str, spec: dict[str, Any], created: str = "2025-01-01T00:00:00Z", generation: int = 1
) -> PolicyEntry:
    return policy_entry_from(
        {
            "metadata": {"name": name, "creationTimestamp": created, "generation": generation},
            "spec": spec,
        }
    )


def _status(
    entry: PolicyEntry,
    others: list[PolicyEntry] = (),  # type: ignore[assignment]
    reports: list[ReportSummary] = (),  # type: ignore[assignment]
    previous: PolicyStatus | None = None,
    now: dt.datetime = T0,
) -> PolicyStatus:
    policies = [e.policy for e in [entry, *others] if e.policy is not None]
    match = assign(policies, NAMESPACES, PODS).of(entry.name)
    return compute_status(entry, match, aggregate(reports), previous or PolicyStatus(), now)


def _cond(status: PolicyStatus, type_: str) -> tuple[str, str, str]:
    cond = find_condition(status.conditions, type_)
    assert cond is not None, type_
    return cond.status, cond.reason, cond.message


def _report(
    pod: str, leaked: int, *, killed: int = 0, at_risk: int = 0, node: str = "n1", policy: str = "p"
) -> ReportSummary:
    return ReportSummary(
        namespace="shop",
        name=pod,
        pod=pod,
        node=node,
        policy=policy,
        leaked=leaked,
        at_risk=at_risk,
        killed_total=killed,
        extended_total=0,
    )


def test_applied_policy() -> None:
    status = _status(_entry("p", {"namespaceSelector": {"matchLabels": {"mesh": "istio"}}}))
    assert [c.type for c in status.conditions] == ["Accepted", "Ready", "Overlapping"]
    assert _cond(status, "Accepted")[:2] == ("True", "Valid")
    assert _cond(status, "Ready") == ("True", "Applied", "applies to 3 pods in 2 namespaces")
    assert _cond(status, "Overlapping")[:2] == ("False", "NoOverlap")
    assert (status.matched_namespaces, status.matched_pods, status.observed_generation) == (2, 3, 1)
    assert all(c.observed_generation == 1 for c in status.conditions)


def test_invalid_policy() -> None:
    # What the schema cannot check: a label key.
    entry = _entry("p", {"namespaces": ["shop"], "podSelector": {"matchLabels": {"bad key": "x"}}})
    assert entry.policy is None
    status = _status(entry)
    accepted = _cond(status, "Accepted")
    assert accepted[:2] == ("False", "InvalidSpec")
    assert "label key 'bad key'" in accepted[2]
    assert _cond(status, "Ready")[:2] == ("False", "InvalidSpec")
    assert find_condition(status.conditions, "Overlapping") is None
    assert status.matched_pods == 0


def test_selectors_matching_nothing_say_why() -> None:
    missing = _status(_entry("p", {"namespaces": ["nope"]}))
    assert _cond(missing, "Ready")[:2] == ("False", "NoMatchingNamespaces")
    assert "namespaces ['nope'] do not exist" in _cond(missing, "Ready")[2]

    by_label = _status(_entry("p", {"namespaceSelector": {"matchLabels": {"mesh": "linkerd"}}}))
    ready = _cond(by_label, "Ready")
    assert ready[:2] == ("False", "NoMatchingNamespaces")
    assert "namespaceSelector mesh=linkerd matches no namespace" in ready[2]

    no_pods = _status(
        _entry("p", {"namespaces": ["shop"], "podSelector": {"matchLabels": {"app": "web"}}})
    )
    ready = _cond(no_pods, "Ready")
    assert ready[:2] == ("False", "NoMatchingPods")
    assert "podSelector app=web in the 1 namespace in scope (2 pods there)" in ready[2]


def test_overlap_reported_on_both_policies() -> None:
    old = _entry("old", {"namespaces": ["shop"]}, created="2025-01-01T00:00:00Z")
    new = _entry("new", {"namespaceSelector": {}}, created="2025-03-01T00:00:00Z")
    loser = _status(new, [old])
    assert _cond(loser, "Overlapping") == (
        "True",
        "OverlapLost",
        "pods also selected by older policies, which apply to them: 'old' (2 pods)",
    )
    assert _cond(loser, "Ready")[:2] == ("True", "Applied")  # still has web/front
    assert loser.matched_pods == 1
    winner = _status(old, [new])
    assert _cond(winner, "Overlapping")[:2] == ("True", "OverlapWon")
    assert "'new' (2 pods)" in _cond(winner, "Overlapping")[2]

    only_shop = _entry("later", {"namespaces": ["shop"]}, created="2025-04-01T00:00:00Z")
    shadowed = _status(only_shop, [old])
    assert _cond(shadowed, "Ready") == (
        "False",
        "AllPodsClaimed",
        "every pod it selects is claimed by an older policy: 'old' (2 pods)",
    )


def test_aggregate_of_reports() -> None:
    reports = [
        _report("a", leaked=5, killed=1, node="n1"),
        _report("b", leaked=0, killed=9),
        _report("c", leaked=5, killed=2, node="n2"),
        _report("d", 0, at_risk=3),
        _report("e", 0),
    ]
    agg = aggregate(reports, top=3)
    assert (agg.leaked_now, agg.at_risk_now, agg.killed_total) == (10, 3, 12)
    assert agg.pods_with_findings == 3  # a, c, d (b has only history, e nothing)
    assert agg.nodes_reporting == 2
    assert [p.pod for p in agg.top_pods] == ["c", "a", "b"]  # leaked, then killed


def test_recomputing_is_idempotent_and_keeps_transition_times() -> None:
    entry = _entry("p", {"namespaces": ["shop"]})
    first = _status(entry, reports=[_report("cart", 2)])
    again = _status(
        entry, reports=[_report("cart", 2)], previous=first, now=T0 + dt.timedelta(hours=1)
    )
    assert encode(again) == encode(first)
    assert events_for(first.conditions, again.conditions) == []


def test_events_on_transitions_only() -> None:
    entry = _entry("p", {"namespaces": ["shop"]})
    first = _status(entry)
    events = events_for((), first.conditions)
    assert [(e.type, e.reason) for e in events] == [("Normal", "Valid"), ("Normal", "Applied")]
    broken = _entry("p", {"namespaces": ["gone"]}, generation=2)
    second = _status(broken, previous=first, now=T0 + dt.timedelta(minutes=1))
    events = events_for(first.conditions, second.conditions)
    assert [(e.type, e.reason) for e in events] == [("Warning", "NoMatchingNamespaces")]
    assert events[0].message.startswith("Ready=False: namespaces ['gone']")


def test_parse_and_entry_agree() -> None:
    obj = {"metadata": {"name": "p", "generation": 3}, "spec": {"namespaces": ["a"]}}
    entry = policy_entry_from(obj)
    assert entry.policy == parse_policy(obj)
    assert entry.generation == 3
