"""HalfCloseReport: one per pod with findings, written by the node agent.

The report is named after its pod, lives in the pod's namespace and is owned
by the pod (an ownerReference), so it goes when the pod goes.  The agent
builds the whole status with ``build_report_status`` from the previous status
and one scan; counters that are totals (``killedTotal``, ``extendedTotal``)
accumulate there, in one place.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from halfclose.api.conditions import LEAKING, Condition, set_condition
from halfclose.api.names import API_VERSION, NODE_LABEL, POLICY_LABEL, REPORT_KIND
from halfclose.api.schema import (
    SchemaError,
    api_object,
    decode,
    encode,
    format_time,
    parse_time,
    prop,
)
from halfclose.errors import UserError

# Findings kept in a report's status: enough to see what is going on, small
# enough that a pod with 19,000 leaks (ztunnel, docs/detection.md) stays a small object.
FINDINGS_CAP = 20

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

FindingKind = Literal["leaked", "collision", "at-risk", "unproven"]
# docs/detection.md: the part of the proof an ``unproven`` finding misses (the
# agent's UnprovenReason; the API does not import the agent).
UnprovenReason = Literal[
    "not-nat-captured",
    "entry-removed-early",
    "idle-unknown",
    "conntrack-inactive",
    "timeouts-unknown",
]
FindingAction = Literal["none", "killed", "extended", "failed", "skipped"]


class ReportError(UserError, ValueError):
    """A HalfCloseReport object that cannot be read."""


@api_object("Which pod the report is about and which policy it was made under.")
@dataclass(frozen=True, slots=True, kw_only=True)
class ReportSpec:
    pod_name: str = prop("The pod's name.", required=True, min_length=1, max_length=253)
    pod_uid: str = prop(
        "The pod's UID (a report is about one pod incarnation).",
        required=True,
        max_length=64,
        json_name="podUID",  # Kubernetes spells acronyms in capitals (podIP, hostIP)
    )
    node_name: str = prop("The node the pod runs on.", required=True, max_length=253)
    policy: str = prop(
        "The HalfClosePolicy that applies to the pod.",
        required=True,
        min_length=1,
        max_length=253,
    )


@api_object("The proxy's paired upstream socket (CLOSE_WAIT).", emit_defaults=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class FindingUpstream:
    local: str = prop("Local address, as ss prints it.", required=True, max_length=64)
    peer: str = prop("Peer address, as ss prints it.", required=True, max_length=64)
    state: str = prop("TCP state, as ss prints it.", required=True, max_length=16)


@api_object("One flagged socket (design.md §2).", emit_defaults=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class ReportFinding:
    kind: FindingKind = prop(
        "leaked: all four parts of the proof hold (owned FIN_WAIT2, NAT-captured port, NAT"
        " entry gone, silent longer than the entry could live): the FIN can never arrive."
        " collision: leaked, and the app's new connection from the same port is waiting on"
        " it now (istio#43301). at-risk: FIN_WAIT2 whose NAT entry is still counting down."
        " unproven: a part of the proof is missing (see reason); never acted on.",
        required=True,
    )
    reason: UnprovenReason | None = prop(
        "For unproven findings: the missing part of the proof.", default=None
    )
    state: str = prop("TCP state, as ss prints it (FIN-WAIT-2).", required=True, max_length=16)
    local: str = prop("The proxy socket's local address (ip:port).", required=True, max_length=64)
    peer: str = prop("The app side's address (ip:port).", required=True, max_length=64)
    idle_seconds: int | None = prop(
        "Seconds since the peer last sent anything.",
        default=None,
        minimum=0,
    )
    pid: int | None = prop("The owning process.", default=None, minimum=0)
    process: str | None = prop("The owning process's name.", default=None, max_length=64)
    upstream: FindingUpstream | None = prop("The paired upstream socket, if known.", default=None)
    action: FindingAction = prop("What the agent did.", default="none")
    error: str | None = prop("Why the action failed.", default=None, max_length=256)
    observed_time: str = prop("When the scan saw it.", required=True, format="date-time")

    @property
    def identity(self) -> tuple[str, str]:
        """Findings with the same addresses are the same connection."""
        return (self.local, self.peer)


@api_object("What the agent found in the pod.", emit_defaults=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class ReportStatus:
    leaked: int = prop("Leaked sockets in the last scan.", default=0, minimum=0)
    collision: int = prop(
        "Leaked sockets an app's new connection was waiting on, in the last scan.",
        default=0,
        minimum=0,
    )
    at_risk: int = prop("At-risk sockets in the last scan.", default=0, minimum=0)
    unproven: int = prop(
        "Candidates missing a part of the proof in the last scan (never acted on).",
        default=0,
        minimum=0,
    )
    killed_total: int = prop(
        "Sockets destroyed since the report was created.", default=0, minimum=0
    )
    extended_total: int = prop(
        "Conntrack entries extended since the report was created.", default=0, minimum=0
    )
    conntrack_patched: bool = prop(
        "The pod's netns close_wait sysctl is raised (PatchConntrack with Sysctl).",
        default=False,
    )
    last_scan_time: str | None = prop(
        "When the last scan finished.", default=None, format="date-time"
    )
    findings: tuple[ReportFinding, ...] = prop(
        f"The most recent findings, newest first, at most {FINDINGS_CAP}.",
        default=(),
        max_items=FINDINGS_CAP,
    )
    conditions: tuple[Condition, ...] = prop(
        "Leaking.",
        default=(),
        max_items=8,
        list_type="map",
        list_map_keys=("type",),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """A parsed HalfCloseReport."""

    namespace: str
    name: str
    spec: ReportSpec
    status: ReportStatus = field(default_factory=ReportStatus)


def parse_report(obj: Mapping[str, Any]) -> Report:
    """Read a HalfCloseReport object; raises ``ReportError`` naming the field."""
    meta = obj.get("metadata") or {}
    namespace, name = meta.get("namespace"), meta.get("name")
    if not namespace or not name:
        raise ReportError("HalfCloseReport: metadata.name and metadata.namespace are required")
    try:
        spec = decode(ReportSpec, obj.get("spec"), "spec")
        status = decode(ReportStatus, obj.get("status") or {}, "status")
    except SchemaError as exc:
        raise ReportError(f"HalfCloseReport {namespace}/{name}: {exc}") from None
    return Report(namespace=str(namespace), name=str(name), spec=spec, status=status)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanSummary:
    """One scan of one pod, as the agent hands it to ``build_report_status``.

    ``killed``/``extended`` count this scan's actions; the status keeps totals.
    """

    scanned_at: dt.datetime
    leaked: int
    at_risk: int
    collision: int = 0
    unproven: int = 0
    killed: int = 0
    extended: int = 0
    conntrack_patched: bool = False
    findings: Sequence[ReportFinding] = ()


def build_report_status(
    scan: ScanSummary,
    previous: ReportStatus | None = None,
    *,
    leaked_alert_threshold: int,
    cap: int = FINDINGS_CAP,
) -> ReportStatus:
    """The report status after ``scan``.

    Findings: this scan's, then the previous ones not seen again, newest
    first by ``observedTime``, one per connection, at most ``cap``.  Totals
    add this scan's actions to the previous totals.  Condition Leaking is
    True when ``leaked + collision >= leaked_alert_threshold``.
    """
    prev = previous or ReportStatus()
    latest: dict[tuple[str, str], ReportFinding] = {}
    for finding in [*scan.findings, *prev.findings]:
        kept = latest.get(finding.identity)
        if kept is None or _observed(finding) > _observed(kept):
            latest[finding.identity] = finding
    # sorted() is stable: within one observedTime, this scan's order is kept.
    findings = sorted(latest.values(), key=_observed, reverse=True)[:cap]
    # A collision is a leak too (one an app is waiting on).
    leaked = scan.leaked + scan.collision
    leaking = leaked >= leaked_alert_threshold
    conditions = set_condition(
        prev.conditions,
        type_=LEAKING,
        status="True" if leaking else "False",
        reason="ThresholdExceeded" if leaking else "BelowThreshold",
        message=f"{leaked} leaked sockets (alert threshold {leaked_alert_threshold})",
        now=scan.scanned_at,
    )
    return ReportStatus(
        leaked=scan.leaked,
        collision=scan.collision,
        at_risk=scan.at_risk,
        unproven=scan.unproven,
        killed_total=prev.killed_total + scan.killed,
        extended_total=prev.extended_total + scan.extended,
        conntrack_patched=scan.conntrack_patched,
        last_scan_time=format_time(scan.scanned_at),
        findings=tuple(findings),
        conditions=conditions,
    )


def _observed(finding: ReportFinding) -> dt.datetime:
    return parse_time(finding.observed_time)


def report_status_json(status: ReportStatus) -> dict[str, Any]:
    """The status as JSON, for a ``/status`` patch."""
    result = encode(status)
    assert isinstance(result, dict)
    return result


def report_manifest(
    *,
    namespace: str,
    pod_name: str,
    pod_uid: str,
    node_name: str,
    policy: str,
    status: ReportStatus | None = None,
) -> dict[str, Any]:
    """A HalfCloseReport for a pod: named after it, owned by it, labelled for lookups."""
    spec = ReportSpec(pod_name=pod_name, pod_uid=pod_uid, node_name=node_name, policy=policy)
    manifest: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": REPORT_KIND,
        "metadata": {
            "name": pod_name,
            "namespace": namespace,
            "labels": {
                key: value
                for key, value in ((POLICY_LABEL, policy), (NODE_LABEL, node_name))
                # Names may be 253 characters, label values only 63: skip what
                # cannot be a label rather than fail to report.
                if len(value) <= 63 and _LABEL_VALUE.match(value)
            },
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod_name,
                    "uid": pod_uid,
                    # Not a controller reference: the pod's controller is its
                    # ReplicaSet; the report only needs to die with the pod.
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": encode(spec),
    }
    if status is not None:
        manifest["status"] = report_status_json(status)
    return manifest


def findings_from(items: Iterable[Mapping[str, Any]]) -> tuple[ReportFinding, ...]:
    """Decode findings JSON (e.g. from the CLI's scan output plus observedTime)."""
    try:
        return tuple(decode(ReportFinding, item, f"findings[{i}]") for i, item in enumerate(items))
    except SchemaError as exc:
        raise ReportError(str(exc)) from None
