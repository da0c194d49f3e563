"""What the operator knows about the cluster: small immutable summaries.

kopf's in-memory indexes hold these (one per object), built from watch
events by ``from_*`` constructors; the pure reconcile code reads them.  They
are compared for equality by kopf on every event, so they hold only what the
decisions need (labels, not whole pod specs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from halfclose.api import Policy, PolicyError, ReportError, parse_policy, parse_report

FINISHED_POD_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True, slots=True)
class PodInfo:
    namespace: str
    name: str
    labels: Mapping[str, str]


def pod_from(obj: Mapping[str, Any]) -> PodInfo | None:
    """A pod that can have proxy sockets; None for finished pods."""
    if (obj.get("status") or {}).get("phase") in FINISHED_POD_PHASES:
        return None
    meta = obj.get("metadata") or {}
    return PodInfo(
        str(meta.get("namespace", "")), str(meta.get("name", "")), dict(meta.get("labels") or {})
    )


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    """A HalfClosePolicy as seen: parsed, or the reason it could not be."""

    name: str
    generation: int
    policy: Policy | None
    error: str | None = None


def policy_entry_from(obj: Mapping[str, Any]) -> PolicyEntry:
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    generation = int(meta.get("generation") or 0)
    try:
        return PolicyEntry(name, generation, parse_policy(obj))
    except PolicyError as exc:
        return PolicyEntry(name, generation, None, str(exc))


@dataclass(frozen=True, slots=True)
class ReportSummary:
    """The counters of one HalfCloseReport, for the policy aggregate."""

    namespace: str
    name: str
    pod: str
    node: str
    policy: str
    leaked: int
    at_risk: int
    killed_total: int
    extended_total: int

    @property
    def has_findings(self) -> bool:
        return self.leaked + self.at_risk > 0


def report_from(obj: Mapping[str, Any]) -> ReportSummary:
    """Raises ``ReportError`` for an object that is not a readable report."""
    report = parse_report(obj)
    status = report.status
    return ReportSummary(
        namespace=report.namespace,
        name=report.name,
        pod=report.spec.pod_name,
        node=report.spec.node_name,
        policy=report.spec.policy,
        leaked=status.leaked,
        at_risk=status.at_risk,
        killed_total=status.killed_total,
        extended_total=status.extended_total,
    )


__all__ = [
    "PodInfo",
    "PolicyEntry",
    "ReportError",
    "ReportSummary",
    "pod_from",
    "policy_entry_from",
    "report_from",
]
