"""A HalfClosePolicy's status, computed from scratch from what the operator knows.

Level-based on purpose: the same inputs give the same status (condition
transition times are carried over from the previous status), so a restarted
operator recomputes what is already there and writes nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, replace

from halfclose.api import (
    ACCEPTED,
    OVERLAPPING,
    READY,
    Condition,
    PolicyStatus,
    TopPod,
    condition_changes,
    set_condition,
)
from halfclose.api.policy import TOP_PODS
from halfclose.operator.assignment import PolicyMatch
from halfclose.operator.view import PolicyEntry, ReportSummary

# Condition reasons (documented in docs/api.md).
VALID = "Valid"
INVALID_SPEC = "InvalidSpec"
APPLIED = "Applied"
NO_MATCHING_NAMESPACES = "NoMatchingNamespaces"
NO_MATCHING_PODS = "NoMatchingPods"
ALL_PODS_CLAIMED = "AllPodsClaimed"
OVERLAP_LOST = "OverlapLost"
OVERLAP_WON = "OverlapWon"
NO_OVERLAP = "NoOverlap"


@dataclass(frozen=True, slots=True)
class Aggregate:
    pods_with_findings: int = 0
    leaked_now: int = 0
    at_risk_now: int = 0
    killed_total: int = 0
    extended_total: int = 0
    nodes_reporting: int = 0
    top_pods: tuple[TopPod, ...] = ()


def top_pod_rank(r: ReportSummary) -> tuple[int, int, int, str, str]:
    """The order of a policy's top pods: most leaked, then killed, then at risk, then name."""
    return (-r.leaked, -r.killed_total, -r.at_risk, r.namespace, r.pod)


def top_pods(ranked: Iterable[ReportSummary]) -> tuple[TopPod, ...]:
    return tuple(
        TopPod(
            namespace=r.namespace,
            pod=r.pod,
            node=r.node,
            leaked=r.leaked,
            at_risk=r.at_risk,
            killed_total=r.killed_total,
        )
        for r in ranked
    )


def aggregate(reports: Iterable[ReportSummary], top: int = TOP_PODS) -> Aggregate:
    """Sum a policy's reports; top pods by leaked, then killed, then name.

    The reference for ``inventory.ReportTally``, which keeps the same sums
    incrementally (the unit tests compare the two).
    """
    items = list(reports)
    ranked = sorted((r for r in items if r.has_findings or r.killed_total), key=top_pod_rank)
    return Aggregate(
        pods_with_findings=sum(1 for r in items if r.has_findings),
        leaked_now=sum(r.leaked for r in items),
        at_risk_now=sum(r.at_risk for r in items),
        killed_total=sum(r.killed_total for r in items),
        extended_total=sum(r.extended_total for r in items),
        nodes_reporting=len({r.node for r in items if r.node}),
        top_pods=top_pods(ranked[:top]),
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _names(counter_items: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{name!r} ({_plural(n, 'pod')})" for name, n in sorted(counter_items))


def _not_ready_reason(entry: PolicyEntry, match: PolicyMatch) -> tuple[str, str]:
    assert entry.policy is not None
    spec = entry.policy.spec
    if match.namespaces_in_scope == 0:
        parts = []
        if match.missing_namespaces:
            parts.append(f"namespaces {list(match.missing_namespaces)} do not exist")
        if spec.namespace_selector is not None:
            parts.append(
                f"namespaceSelector {spec.namespace_selector.describe()} matches no namespace"
                " (kube-system is reached only by name)"
            )
        return NO_MATCHING_NAMESPACES, "; ".join(parts) or "no namespace is in scope"
    if match.selected > 0:
        owners = _names(match.claimed_by.items())
        return ALL_PODS_CLAIMED, f"every pod it selects is claimed by an older policy: {owners}"
    selector = spec.pod_selector.describe() if spec.pod_selector else "<everything>"
    return NO_MATCHING_PODS, (
        f"no running pod matches podSelector {selector} in the"
        f" {_plural(match.namespaces_in_scope, 'namespace')} in scope"
        f" ({_plural(match.pods_in_scope, 'pod')} there)"
    )


def compute_status(
    entry: PolicyEntry,
    match: PolicyMatch,
    reports: Aggregate,
    previous: PolicyStatus,
    now: dt.datetime,
) -> PolicyStatus:
    """The whole status of one policy (``reports``: the sums of its reports)."""
    gen = entry.generation
    conds: tuple[Condition, ...] = previous.conditions
    if entry.policy is None:
        message = entry.error or "invalid spec"
        conds = set_condition(
            conds,
            type_=ACCEPTED,
            status="False",
            reason=INVALID_SPEC,
            message=message,
            now=now,
            observed_generation=gen,
        )
        conds = set_condition(
            conds,
            type_=READY,
            status="False",
            reason=INVALID_SPEC,
            message="the spec is not accepted; see condition Accepted",
            now=now,
            observed_generation=gen,
        )
        conds = tuple(c for c in conds if c.type != OVERLAPPING)
        return _with_aggregate(PolicyStatus(observed_generation=gen, conditions=conds), reports)

    conds = set_condition(
        conds,
        type_=ACCEPTED,
        status="True",
        reason=VALID,
        message="the spec is valid",
        now=now,
        observed_generation=gen,
    )
    if match.applied > 0:
        message = (
            f"applies to {_plural(match.applied, 'pod')} in"
            f" {_plural(match.namespaces_in_scope, 'namespace')}"
        )
        if match.missing_namespaces:
            message += f"; namespaces {list(match.missing_namespaces)} do not exist"
        conds = set_condition(
            conds,
            type_=READY,
            status="True",
            reason=APPLIED,
            message=message,
            now=now,
            observed_generation=gen,
        )
    else:
        reason, message = _not_ready_reason(entry, match)
        conds = set_condition(
            conds,
            type_=READY,
            status="False",
            reason=reason,
            message=message,
            now=now,
            observed_generation=gen,
        )
    if match.claimed_by:
        conds = set_condition(
            conds,
            type_=OVERLAPPING,
            status="True",
            reason=OVERLAP_LOST,
            message="pods also selected by older policies, which apply to them: "
            + _names(match.claimed_by.items()),
            now=now,
            observed_generation=gen,
        )
    elif match.shares_with:
        conds = set_condition(
            conds,
            type_=OVERLAPPING,
            status="True",
            reason=OVERLAP_WON,
            message="this policy applies to pods also selected by newer policies: "
            + _names(match.shares_with.items()),
            now=now,
            observed_generation=gen,
        )
    else:
        conds = set_condition(
            conds,
            type_=OVERLAPPING,
            status="False",
            reason=NO_OVERLAP,
            message="no other policy selects its pods",
            now=now,
            observed_generation=gen,
        )
    status = PolicyStatus(
        observed_generation=gen,
        conditions=conds,
        matched_namespaces=match.namespaces_in_scope,
        matched_pods=match.applied,
    )
    return _with_aggregate(status, reports)


def _with_aggregate(status: PolicyStatus, agg: Aggregate) -> PolicyStatus:
    # Reports are measurements: they are shown even for a policy that is not
    # (or no longer) accepted, until the agent or the pod's deletion removes them.
    return replace(
        status,
        pods_with_findings=agg.pods_with_findings,
        leaked_now=agg.leaked_now,
        at_risk_now=agg.at_risk_now,
        killed_total=agg.killed_total,
        extended_total=agg.extended_total,
        nodes_reporting=agg.nodes_reporting,
        top_pods=agg.top_pods,
    )


@dataclass(frozen=True, slots=True)
class PolicyEvent:
    """A Kubernetes Event to post on the policy."""

    type: str  # "Normal" or "Warning"
    reason: str
    message: str


_WARNING_REASONS = frozenset(
    {INVALID_SPEC, NO_MATCHING_NAMESPACES, NO_MATCHING_PODS, ALL_PODS_CLAIMED, OVERLAP_LOST}
)


def events_for(before: Iterable[Condition], after: Iterable[Condition]) -> list[PolicyEvent]:
    """Events for condition transitions (status or reason changed), not for every write.

    A first ``Overlapping=False`` is no news and gets no Event; a Ready
    condition that only says "invalid spec" repeats Accepted and gets none.
    """
    events = []
    for change in condition_changes(before, after):
        cond = change.condition
        if change.previous is None and cond.type == OVERLAPPING and cond.status == "False":
            continue
        if cond.type == READY and cond.reason == INVALID_SPEC:
            continue
        kind = "Warning" if cond.reason in _WARNING_REASONS else "Normal"
        events.append(PolicyEvent(kind, cond.reason, f"{cond.type}={cond.status}: {cond.message}"))
    return events
