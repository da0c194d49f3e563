"""What the operator knows about the cluster: small immutable summaries.

The inventory holds these (one per object), built from watch events by
``from_*`` constructors, once per change; the pure reconcile code reads them.
They hold only what the decisions need (labels, not whole pod specs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from halfclose.api import Policy, PolicyError, ReportError, parse_policy

FINISHED_POD_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True, slots=True)
class PodInfo:
    namespace: str
    name: str
    labels: Mapping[str, str]


def pod_from(obj: Mapping[str, Any]) -> PodInfo | None:
    """A pod that can have proxy sockets; None for finished pods.

    The operator watches pods' metadata only, with a field selector that
    leaves finished pods out (they arrive as deletions); a full pod's phase
    is checked too.
    """
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


_SPEC_STRINGS = ("podName", "nodeName", "policy")
_COUNTERS = (
    ("leaked", "leaked"),
    ("at_risk", "atRisk"),
    ("killed_total", "killedTotal"),
    ("extended_total", "extendedTotal"),
)


def report_from(obj: Mapping[str, Any]) -> ReportSummary:
    """Raises ``ReportError`` for an object that is not a readable report.

    Reads the three spec fields and four counters the aggregate needs, with
    their types checked, and nothing else: findings and conditions are for
    people and the agent, and the schema decoder costs ~0.1 ms a report --
    2 s of every start with 20,000 reports.  (The API server has validated
    the rest against the CRD's schema.)
    """
    meta = obj.get("metadata") or {}
    namespace, name = meta.get("namespace"), meta.get("name")
    if not namespace or not name:
        raise ReportError("HalfCloseReport: metadata.name and metadata.namespace are required")
    where = f"HalfCloseReport {namespace}/{name}"
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise ReportError(f"{where}: spec: required")
    strings: dict[str, str] = {}
    for json_name in _SPEC_STRINGS:
        value = spec.get(json_name)
        if not isinstance(value, str) or (not value and json_name != "nodeName"):
            raise ReportError(f"{where}: spec.{json_name}: must be a non-empty string")
        strings[json_name] = value
    status = obj.get("status") or {}
    if not isinstance(status, Mapping):
        raise ReportError(f"{where}: status: must be an object")
    counters: dict[str, int] = {}
    for attr, json_name in _COUNTERS:
        value = status.get(json_name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ReportError(f"{where}: status.{json_name}: must be an integer >= 0")
        counters[attr] = value
    return ReportSummary(
        namespace=str(namespace),
        name=str(name),
        pod=strings["podName"],
        node=strings["nodeName"],
        policy=strings["policy"],
        **counters,
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
