"""HalfCloseReport objects as the agent writes them, and the buffer of pending writes.

Reports are state, not history: only the newest desired report of each pod
matters, so the buffer keeps one entry per pod (last write wins) and is
bounded by the number of pods on the node (plus a hard cap).  An outage of any
length therefore costs at most one write per pod when the server is back, and
no report is lost.  ``writer.ReportWriter`` sends them.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from halfclose.agent.kube.client import JSON
from halfclose.api.names import GROUP, REPORT_PLURAL, VERSION


@dataclass(frozen=True, slots=True)
class PodRef:
    namespace: str
    name: str
    uid: str


@dataclass(frozen=True, slots=True)
class ReportUpdate:
    """The desired report of one pod: ``status`` None means "no report" (delete it).

    ``manifest`` is the object to create when the report does not exist yet
    (``halfclose.api.report.report_manifest``); ``status`` the status JSON.
    """

    pod: PodRef
    manifest: Mapping[str, Any] | None
    status: Mapping[str, Any] | None


class PendingReports:
    """Last-write-wins buffer of report updates, one per pod, bounded (pure).

    When full, the oldest pod's pending update is dropped and counted — a
    node with more pods than ``capacity`` is a misconfiguration, not a reason
    to grow without bound.
    """

    def __init__(self, capacity: int = 2048) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], ReportUpdate] = OrderedDict()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, update: ReportUpdate) -> None:
        key = (update.pod.namespace, update.pod.name)
        self._items.pop(key, None)  # re-insert at the end: newest
        self._items[key] = update
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
            self.dropped += 1

    def take(self) -> list[ReportUpdate]:
        items = list(self._items.values())
        self._items.clear()
        return items

    def put_back(self, update: ReportUpdate) -> None:
        """Requeue a failed write unless a newer one for the pod arrived meanwhile."""
        key = (update.pod.namespace, update.pod.name)
        if key not in self._items:
            self._items[key] = update
            self._items.move_to_end(key, last=False)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
                self.dropped += 1


def reports_path(namespace: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{REPORT_PLURAL}"


def creatable(manifest: Mapping[str, Any]) -> JSON:
    """The manifest as created: never a controller, never blocking the pod's deletion.

    ``controller: false`` — the pod's controller is its ReplicaSet (or none);
    ``blockOwnerDeletion: false`` — a report must never hold a pod back.
    Garbage collection removes the report when the pod goes.
    """
    obj = json.loads(json.dumps(manifest))
    obj.pop("status", None)  # ignored on create by the status subresource anyway
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or ():
        ref["controller"] = False
        ref["blockOwnerDeletion"] = False
    return cast(JSON, obj)
