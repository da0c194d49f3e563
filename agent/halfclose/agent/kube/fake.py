"""In-memory stand-ins for the Kubernetes adapters (first-class, not mocks).

Like node-problem-detector's fake exporters: the agent loop runs unchanged
against them, so the benchmark (and quick experiments) can drive a real
kernel lab without an API server.  ``FakeWorld`` is what the watches would
hold; ``FakeReports`` keeps what the writer would have written, last write
wins per pod, exactly as the API would end up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from halfclose.agent.kube.events import PodEvent
from halfclose.agent.kube.reports import ReportUpdate


class FakeWorld:
    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self.on_change = on_change
        self._lock = threading.Lock()
        self._policies: dict[str, Mapping[str, Any]] = {}
        self._pods: dict[tuple[str, str], Mapping[str, Any]] = {}
        self._namespaces: dict[str, Mapping[str, str]] = {}
        self.is_synced = True

    def put_policy(self, obj: Mapping[str, Any]) -> None:
        with self._lock:
            self._policies[obj["metadata"]["name"]] = obj
        self.on_change()

    def delete_policy(self, name: str) -> None:
        with self._lock:
            self._policies.pop(name, None)
        self.on_change()

    def put_pod(self, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        with self._lock:
            self._pods[(meta["namespace"], meta["name"])] = obj
        self.on_change()

    def delete_pod(self, namespace: str, name: str) -> None:
        with self._lock:
            self._pods.pop((namespace, name), None)
        self.on_change()

    def put_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        with self._lock:
            self._namespaces[name] = dict(labels or {})
        self.on_change()

    # -- WorldSource --------------------------------------------------------------

    def policies(self) -> list[Mapping[str, Any]]:
        with self._lock:
            return list(self._policies.values())

    def pods(self) -> list[Mapping[str, Any]]:
        with self._lock:
            return list(self._pods.values())

    def namespace_labels(self) -> dict[str, Mapping[str, str]]:
        with self._lock:
            return dict(self._namespaces)

    def synced(self) -> bool:
        return self.is_synced

    def previous_report(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return None


class FakeReports:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reports: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.events: list[PodEvent] = []
        self.writes = 0

    def submit(self, update: ReportUpdate) -> None:
        key = (update.pod.namespace, update.pod.name)
        with self._lock:
            self.writes += 1
            if update.status is None:
                self.reports.pop(key, None)
            else:
                self.reports[key] = update.status

    def event(self, event: PodEvent) -> None:
        with self._lock:
            self.events.append(event)
