"""The inventory: one decode per change, report sums kept incrementally, leadership, Events."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import pytest

from halfclose.operator.events import event_body
from halfclose.operator.inventory import Inventory, ReportTally
from halfclose.operator.leader import leads
from halfclose.operator.status import PolicyEvent, aggregate
from halfclose.operator.view import ReportError, ReportSummary, report_from

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def _report_obj(ns: str, pod: str, policy: str, node: str = "n1", **status: int) -> dict[str, Any]:
    return {
        "metadata": {"namespace": ns, "name": pod, "resourceVersion": "1"},
        "spec": {"podName": pod, "podUID": "u-" + pod, "nodeName": node, "policy": policy},
        "status": {"findings": [{"kind": "leaked"}], **status},  # findings are not decoded
    }


def _policy_obj(name: str, generation: int = 1, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "uid": "uid-" + name,
            "generation": generation,
            "resourceVersion": str(10 + generation),
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"namespaces": ["shop"]},
        "status": status,
    }


def test_report_counters_are_read_and_checked() -> None:
    r = report_from(_report_obj("shop", "cart", "p", leaked=3, atRisk=1, killedTotal=7))
    assert (r.pod, r.node, r.policy, r.leaked, r.at_risk, r.killed_total) == (
        "cart",
        "n1",
        "p",
        3,
        1,
        7,
    )
    with pytest.raises(ReportError, match=r"shop/cart: status\.leaked: must be an integer >= 0"):
        report_from(_report_obj("shop", "cart", "p", leaked=-1))
    with pytest.raises(ReportError, match=r"status\.atRisk"):
        report_from(_report_obj("shop", "cart", "p", atRisk=True))  # type: ignore[arg-type]
    with pytest.raises(ReportError, match="spec"):
        report_from({"metadata": {"namespace": "a", "name": "b"}, "spec": {}})


def test_incremental_sums_equal_a_recount() -> None:
    """Random adds, updates, moves between policies and deletes: the running sums
    of every policy always equal ``aggregate`` over its current reports."""
    rng = random.Random(7)
    inv = Inventory()
    pods = [f"pod{i}" for i in range(40)]
    for _ in range(2000):
        pod = rng.choice(pods)
        key = ("shop", pod)
        if rng.random() < 0.2:
            inv.on_report(key, None)
        else:
            inv.on_report(
                key,
                _report_obj(
                    "shop",
                    pod,
                    rng.choice(["a", "b", "c"]),
                    node=rng.choice(["n1", "n2", "n3"]),
                    leaked=rng.randint(0, 3),
                    atRisk=rng.randint(0, 2),
                    killedTotal=rng.randint(0, 5),
                    extendedTotal=rng.randint(0, 2),
                ),
            )
    for policy in "abc":
        mine = [r for r in inv.reports.values() if r.policy == policy]
        assert inv.tally(policy).aggregate() == aggregate(mine), policy
    assert len(inv.reports) == sum(len(inv.tally(p).reports) for p in "abc")


def test_an_unreadable_report_counts_as_none() -> None:
    inv = Inventory()
    assert inv.on_report(("shop", "cart"), _report_obj("shop", "cart", "p", leaked=2))
    assert inv.tally("p").leaked == 2
    assert not inv.on_report(("shop", "cart"), _report_obj("shop", "cart", "p", leaked=-2))
    assert inv.tally("p").aggregate() == aggregate([])
    assert inv.reports == {}


def test_only_selector_inputs_move_the_assignment() -> None:
    inv = Inventory()
    inv.on_namespace(("", "shop"), {"metadata": {"name": "shop", "labels": {"a": "b"}}})
    inv.on_pod(("shop", "cart"), {"metadata": {"namespace": "shop", "name": "cart"}})
    inv.on_policy(("", "p"), _policy_obj("p"))
    assert inv.assignment().of("p").applied == 1
    selection = inv.selection_revision
    # The same labels again (a pod's status changed): nothing moves.
    inv.on_pod(("shop", "cart"), {"metadata": {"namespace": "shop", "name": "cart"}})
    inv.on_namespace(("", "shop"), {"metadata": {"name": "shop", "labels": {"a": "b"}}})
    # A status write on the policy: a pass, but the same assignment.
    revision = inv.revision
    inv.on_policy(("", "p"), _policy_obj("p", observedGeneration=1))
    assert inv.selection_revision == selection and inv.revision == revision + 1
    inv.on_pod(("shop", "cart"), None)
    assert inv.selection_revision == selection + 1
    assert inv.assignment().of("p").applied == 0


def test_a_deleted_policy_is_queued_for_cleanup_unless_recreated() -> None:
    inv = Inventory()
    inv.on_policy(("", "p"), _policy_obj("p"))
    inv.on_report(("shop", "cart"), _report_obj("shop", "cart", "p"))
    inv.on_policy(("", "p"), None)
    assert inv.deleted_policies == {"p"}
    assert list(inv.tally("p").reports) == [("shop", "cart")]
    inv.on_policy(("", "p"), _policy_obj("p"))
    assert inv.deleted_policies == set()


def test_a_status_answer_older_than_the_watch_is_ignored() -> None:
    inv = Inventory()
    inv.on_policy(("", "p"), _policy_obj("p", generation=5, observedGeneration=5))
    stale = _policy_obj("p", generation=1, observedGeneration=1)  # resourceVersion 11 < 15
    inv.status_written("p", stale)
    assert inv.policies["p"].status == {"observedGeneration": 5}
    newer = _policy_obj("p", generation=9, observedGeneration=9)
    inv.status_written("p", newer)
    assert inv.policies["p"].status == {"observedGeneration": 9}


def _peer(priority: int, seen: dt.datetime, lifetime: int = 60) -> dict[str, Any]:
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


def test_leadership_follows_kopf_peering_rule() -> None:
    fresh, stale = NOW - dt.timedelta(seconds=5), NOW - dt.timedelta(seconds=61)
    assert leads({"me": _peer(10, fresh)}, "me", 10, NOW)
    assert not leads({}, "me", 10, NOW)  # not announced yet
    assert not leads({"me": _peer(10, fresh), "other": _peer(20, fresh)}, "me", 10, NOW)
    assert leads({"me": _peer(20, fresh), "other": _peer(10, fresh)}, "me", 20, NOW)
    # kopf pauses every replica that shares a priority.
    assert not leads({"me": _peer(10, fresh), "twin": _peer(10, fresh)}, "me", 10, NOW)
    # A dead higher peer (no keep-alive within its lifetime) no longer counts.
    assert leads({"me": _peer(10, fresh), "other": _peer(20, stale)}, "me", 10, NOW)


def test_event_is_found_by_kubectl_describe() -> None:
    involved = {
        "apiVersion": "halfclose.io/v1alpha1",
        "kind": "HalfClosePolicy",
        "name": "p",
        "uid": "u",
    }
    body = event_body(involved, PolicyEvent("Warning", "NoMatchingPods", "x" * 2000), "me", NOW)
    # Namespace default, and no namespace in the reference: describe searches namespace "".
    assert body["metadata"]["namespace"] == "default"
    assert "namespace" not in body["involvedObject"]
    assert body["source"] == {"component": "halfclose-operator"}
    assert body["reportingComponent"] == "halfclose-operator"
    assert len(body["message"]) == 1024
    assert body["firstTimestamp"] == "2026-01-01T12:00:00Z"


def test_tally_ranks_top_pods_like_aggregate() -> None:
    tally = ReportTally()
    reports = [
        ReportSummary("shop", p, p, "n", "x", leaked, 0, killed, 0)
        for p, leaked, killed in [("a", 5, 1), ("b", 0, 9), ("c", 5, 2), ("d", 0, 0)]
    ]
    for r in reports:
        tally.add(("shop", r.name), r)
    assert [p.pod for p in tally.aggregate(top=3).top_pods] == ["c", "a", "b"]
