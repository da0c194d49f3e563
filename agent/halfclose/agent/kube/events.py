"""Kubernetes Events about pods: the Event object, and folding repeats into one series.

Events are history, but best effort (as in client-go's recorder): the writer
keeps a bounded queue, oldest dropped first (``writer.ReportWriter``).
"""

from __future__ import annotations

import datetime as dt
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from halfclose.agent.kube.client import JSON
from halfclose.agent.kube.reports import PodRef

REPORTING_COMPONENT = "halfclose.io/agent"
SOURCE_COMPONENT = "halfclose-agent"


@dataclass(frozen=True, slots=True)
class PodEvent:
    pod: PodRef
    reason: str
    message: str
    type: str = "Normal"  # or "Warning"
    at: float = field(default_factory=time.time)


def now_iso(at: float | None = None) -> str:
    moment = dt.datetime.fromtimestamp(at if at is not None else time.time(), dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def event_name(event: PodEvent) -> str:
    """Unique per series: pod name + a nanosecond stamp, as client-go's recorder does."""
    return f"{event.pod.name}.{time.time_ns():x}"


def event_object(
    event: PodEvent, node: str, name: str | None = None, series: EventSeries | None = None
) -> JSON:
    pod = event.pod
    stamp = now_iso(event.at)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": name or event_name(event),
            "namespace": pod.namespace,
        },
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": pod.uid,
        },
        "reason": event.reason,
        "message": event.message,
        "type": event.type,
        "count": series.count if series else 1,
        "firstTimestamp": now_iso(series.first) if series else stamp,
        "lastTimestamp": stamp,
        "source": {"component": SOURCE_COMPONENT, "host": node},
        "reportingComponent": REPORTING_COMPONENT,
        "reportingInstance": node,
    }


@dataclass(slots=True)
class EventSeries:
    """One Event object in the API that repeats of the same event are counted on."""

    name: str
    count: int
    first: float
    last: float


class EventCorrelator:
    """Folds repeats of an event into one Event object, as client-go's correlator does.

    The same (pod, reason, type, message) within ``window`` seconds of the last
    occurrence bumps ``count``/``lastTimestamp`` on the existing Event instead of
    creating another: a failure that persists (EPERM on every scan) stays one
    line in ``kubectl get events`` with a count, not hundreds of objects.
    Bounded: the least recently seen series is forgotten first (pure).
    """

    def __init__(self, window: float = 600.0, capacity: int = 1024) -> None:
        self.window = window
        self.capacity = capacity
        self._series: OrderedDict[tuple[str, str, str, str, str, str], EventSeries] = OrderedDict()

    @staticmethod
    def key(event: PodEvent) -> tuple[str, str, str, str, str, str]:
        pod = event.pod
        return (pod.namespace, pod.name, pod.uid, event.reason, event.type, event.message)

    def observe(self, event: PodEvent) -> tuple[EventSeries, bool]:
        """The series this event belongs to, and whether it is new (create) or a repeat (patch)."""
        key = self.key(event)
        series = self._series.get(key)
        if series is not None and event.at - series.last <= self.window:
            series.count += 1
            series.last = event.at
            self._series.move_to_end(key)
            return series, False
        series = EventSeries(event_name(event), 1, event.at, event.at)
        self._series[key] = series
        self._series.move_to_end(key)
        while len(self._series) > self.capacity:
            self._series.popitem(last=False)
        return series, True

    def forget(self, event: PodEvent) -> None:
        """The series' Event is gone from the API (expired, deleted): start anew."""
        self._series.pop(self.key(event), None)

    def undo(self, event: PodEvent, new: bool) -> None:
        """The write for ``observe(event)`` did not happen: take its count back."""
        if new:
            self.forget(event)
            return
        series = self._series.get(self.key(event))
        if series is not None and series.count > 1:
            series.count -= 1
