"""Everything the operator knows, kept up to date one watch event at a time.

No I/O here: the informers call the ``on_*`` sinks with each object (or
None when it is gone), every object is decoded once per change, and the
report counters of each policy are kept incrementally (add the new summary,
subtract the old one), so an event costs O(1) whatever the number of
reports.  The reconciler reads the inventory and writes statuses.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from halfclose.api import API_VERSION, POLICY_KIND
from halfclose.api.policy import TOP_PODS
from halfclose.operator.assignment import Assignment, assign
from halfclose.operator.status import Aggregate, top_pod_rank, top_pods
from halfclose.operator.view import (
    PodInfo,
    PolicyEntry,
    ReportError,
    ReportSummary,
    pod_from,
    policy_entry_from,
    report_from,
)

Key = tuple[str, str]  # (namespace or "", name)


@dataclass(slots=True)
class PolicyRecord:
    """A policy as stored: parsed spec, identity, and the status the server holds."""

    entry: PolicyEntry
    uid: str
    resource_version: str
    status: dict[str, Any]
    finalizers: tuple[str, ...] = ()
    annotations: tuple[str, ...] = ()  # keys only

    @property
    def reference(self) -> dict[str, str]:
        """An Event's involvedObject (no namespace: the policy is cluster-scoped)."""
        return {
            "apiVersion": API_VERSION,
            "kind": POLICY_KIND,
            "name": self.entry.name,
            "uid": self.uid,
            "resourceVersion": self.resource_version,
        }


@dataclass(slots=True)
class ReportTally:
    """One policy's reports and their running sums."""

    reports: dict[Key, ReportSummary] = field(default_factory=dict)
    notable: dict[Key, ReportSummary] = field(default_factory=dict)  # top-pods candidates
    leaked: int = 0
    at_risk: int = 0
    killed_total: int = 0
    extended_total: int = 0
    with_findings: int = 0
    nodes: Counter[str] = field(default_factory=Counter)

    def add(self, key: Key, r: ReportSummary, sign: int = 1) -> None:
        self.leaked += sign * r.leaked
        self.at_risk += sign * r.at_risk
        self.killed_total += sign * r.killed_total
        self.extended_total += sign * r.extended_total
        self.with_findings += sign * int(r.has_findings)
        if r.node:
            self.nodes[r.node] += sign
            if self.nodes[r.node] <= 0:
                del self.nodes[r.node]
        if sign > 0:
            self.reports[key] = r
            if r.has_findings or r.killed_total:
                self.notable[key] = r
        else:
            self.reports.pop(key, None)
            self.notable.pop(key, None)

    def aggregate(self, top: int = TOP_PODS) -> Aggregate:
        ranked = heapq.nsmallest(top, self.notable.values(), key=top_pod_rank)
        return Aggregate(
            pods_with_findings=self.with_findings,
            leaked_now=self.leaked,
            at_risk_now=self.at_risk,
            killed_total=self.killed_total,
            extended_total=self.extended_total,
            nodes_reporting=len(self.nodes),
            top_pods=top_pods(ranked),
        )


_EMPTY = ReportTally()


@dataclass
class Inventory:
    namespaces: dict[str, Mapping[str, str]] = field(default_factory=dict)
    pods: dict[Key, PodInfo] = field(default_factory=dict)
    policies: dict[str, PolicyRecord] = field(default_factory=dict)
    reports: dict[Key, ReportSummary] = field(default_factory=dict)
    tallies: dict[str, ReportTally] = field(default_factory=dict)
    peers: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    # Deleted policies whose reports the leader has yet to delete.
    deleted_policies: set[str] = field(default_factory=set)
    revision: int = 0  # any change
    selection_revision: int = 0  # pods, namespaces, policy specs: what the assignment reads
    _assignment: Assignment | None = None
    _assignment_revision: int = -1

    # ------------------------------------------------------------------ sinks

    def on_namespace(self, key: Key, obj: Mapping[str, Any] | None) -> None:
        name = key[1]
        if obj is None:
            if self.namespaces.pop(name, None) is None:
                return
        else:
            labels = dict((obj.get("metadata") or {}).get("labels") or {})
            if self.namespaces.get(name) == labels:
                return
            self.namespaces[name] = labels
        self._selection_changed()

    def on_pod(self, key: Key, obj: Mapping[str, Any] | None) -> None:
        pod = pod_from(obj) if obj is not None else None
        if pod is None:
            if self.pods.pop(key, None) is None:
                return
        else:
            if self.pods.get(key) == pod:
                return  # a status or annotation change: nothing a selector reads
            self.pods[key] = pod
        self._selection_changed()

    def on_policy(self, key: Key, obj: Mapping[str, Any] | None) -> None:
        name = key[1]
        old = self.policies.get(name)
        if obj is None:
            if old is None:
                return
            del self.policies[name]
            self.deleted_policies.add(name)
            self._selection_changed()
            return
        meta = obj.get("metadata") or {}
        entry = old.entry if old and old.entry.generation == meta.get("generation") else None
        record = PolicyRecord(
            entry=entry or policy_entry_from(obj),
            uid=str(meta.get("uid", "")),
            resource_version=str(meta.get("resourceVersion", "")),
            status=dict(obj.get("status") or {}),
            finalizers=tuple(meta.get("finalizers") or ()),
            annotations=tuple(meta.get("annotations") or ()),
        )
        self.policies[name] = record
        self.deleted_policies.discard(name)  # re-created before the cleanup ran
        if old is None or old.entry != record.entry or old.uid != record.uid:
            self._selection_changed()
        else:
            self.revision += 1  # a status (ours, or someone's to correct)

    def on_report(self, key: Key, obj: Mapping[str, Any] | None) -> bool:
        """Returns False for an unreadable report (it counts as none)."""
        readable = True
        new: ReportSummary | None = None
        if obj is not None:
            try:
                new = report_from(obj)
            except ReportError:
                readable = False
        old = self.reports.pop(key, None)
        if old is not None:
            self.tallies[old.policy].add(key, old, -1)
        if new is not None:
            self.reports[key] = new
            self.tallies.setdefault(new.policy, ReportTally()).add(key, new)
        if old != new:
            self.revision += 1
        return readable

    def on_peering(self, key: Key, obj: Mapping[str, Any] | None) -> None:
        self.peers = dict((obj or {}).get("status") or {})
        self.revision += 1

    def status_written(self, name: str, body: Mapping[str, Any] | None) -> None:
        """The server's answer to our status patch: the status is known before its watch event.

        Without it the next pass could compare with the status from before the
        write and write again.  An answer older than what the watch already
        brought is ignored.
        """
        record = self.policies.get(name)
        meta = (body or {}).get("metadata") or {}
        if record is None or body is None or meta.get("uid") != record.uid:
            return
        version = str(meta.get("resourceVersion", ""))
        if _newer(version, record.resource_version):
            record.status = dict(body.get("status") or {})
            record.resource_version = version

    # ------------------------------------------------------------------ reads

    def tally(self, policy: str) -> ReportTally:
        return self.tallies.get(policy, _EMPTY)

    def assignment(self) -> Assignment:
        """Which policy applies to which pods; rebuilt only when a selector input moved."""
        if self._assignment is None or self._assignment_revision != self.selection_revision:
            valid = [r.entry.policy for r in self.policies.values() if r.entry.policy]
            self._assignment = assign(valid, self.namespaces, self.pods.values())
            self._assignment_revision = self.selection_revision
        return self._assignment

    def _selection_changed(self) -> None:
        self.selection_revision += 1
        self.revision += 1


def _newer(version: str, than: str) -> bool:
    # resourceVersions are opaque strings; etcd's are integers, and only then can we order them.
    if version.isdigit() and than.isdigit():
        return int(version) > int(than)
    return version != than
