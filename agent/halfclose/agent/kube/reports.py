"""HalfCloseReport and Event writes, buffered while the API server is away.

Reports are state, not history: only the newest desired report of each pod
matters, so the buffer keeps one entry per pod (last write wins) and is
bounded by the number of pods on the node (plus a hard cap).  An outage of any
length therefore costs at most one write per pod when the server is back, and
no report is lost.  Events are history, but best effort (as in client-go's
recorder): a bounded queue, oldest dropped first.

Threading: ``submit``/``event`` may be called from any thread; one writer
thread owns the HTTP calls.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from halfclose.agent.kube.client import JSON, ApiError, RawClient
from halfclose.api.names import GROUP, REPORT_PLURAL, VERSION

log = logging.getLogger(__name__)

REPORTING_COMPONENT = "halfclose.io/agent"
SOURCE_COMPONENT = "halfclose-agent"


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


@dataclass(frozen=True, slots=True)
class PodEvent:
    pod: PodRef
    reason: str
    message: str
    type: str = "Normal"  # or "Warning"
    at: float = field(default_factory=time.time)


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


def _now_iso(at: float | None = None) -> str:
    moment = dt.datetime.fromtimestamp(at if at is not None else time.time(), dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


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


def event_name(event: PodEvent) -> str:
    """Unique per series: pod name + a nanosecond stamp, as client-go's recorder does."""
    return f"{event.pod.name}.{time.time_ns():x}"


def event_object(
    event: PodEvent, node: str, name: str | None = None, series: EventSeries | None = None
) -> JSON:
    pod = event.pod
    stamp = _now_iso(event.at)
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
        "firstTimestamp": _now_iso(series.first) if series else stamp,
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


class ReportWriter:
    """Writes report updates and events on its own thread, retrying on outages."""

    def __init__(
        self,
        client: RawClient,
        node: str,
        *,
        on_pending: Callable[[int], None] = lambda n: None,
        capacity: int = 2048,
        max_events: int = 512,
        retry_initial: float = 0.2,
        retry_max: float = 15.0,
    ) -> None:
        self.client = client
        self.node = node
        self.on_pending = on_pending
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._lock = threading.Lock()
        self._pending = PendingReports(capacity)
        self._events: deque[PodEvent] = deque(maxlen=max_events)
        self._correlator = EventCorrelator()  # used by the writer thread only
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self.writes = 0
        self._thread = threading.Thread(target=self._run, name="report-writer", daemon=True)

    # -- producers ------------------------------------------------------------------

    def submit(self, update: ReportUpdate) -> None:
        with self._lock:
            self._pending.put(update)
            self._idle.clear()
            self.on_pending(len(self._pending))
        self._wake.set()

    def event(self, event: PodEvent) -> None:
        with self._lock:
            self._events.append(event)
            self._idle.clear()
        self._wake.set()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._events)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, flush_timeout: float = 3.0) -> None:
        """Try to flush what is buffered for up to ``flush_timeout``, then stop."""
        self._idle.wait(flush_timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(flush_timeout + 5.0)

    def wait_idle(self, timeout: float) -> bool:
        return self._idle.wait(timeout)

    # -- the writer -----------------------------------------------------------------

    def _run(self) -> None:
        delay = self.retry_initial
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._flush():
                delay = self.retry_initial
                continue
            self._stop.wait(delay)  # the API is away: back off, keep the buffer
            delay = min(self.retry_max, delay * 2)
            self._wake.set()
        self._flush()

    def _flush(self) -> bool:
        """Write everything pending; False when the API was unreachable."""
        with self._lock:
            updates = self._pending.take()
        ok = True
        for i, update in enumerate(updates):
            try:
                self._write(update)
                self.writes += 1
            except ApiError as exc:
                if exc.unreachable:
                    with self._lock:
                        for rest in updates[i:]:
                            self._pending.put_back(rest)
                    ok = False
                    log.info("report write deferred (%s); %d pending", exc, len(updates) - i)
                    break
                # A 4xx the server will answer the same way next time: drop it, loudly.
                log.error(
                    "report for %s/%s rejected: %s", update.pod.namespace, update.pod.name, exc
                )
        while ok:
            with self._lock:
                if not self._events:
                    break
                event = self._events[0]
            try:
                self._write_event(event)
            except ApiError as exc:
                if exc.unreachable:
                    ok = False
                    break
                log.warning("event on %s/%s rejected: %s", event.pod.namespace, event.pod.name, exc)
            with self._lock:
                if self._events and self._events[0] is event:
                    self._events.popleft()
        with self._lock:
            self.on_pending(len(self._pending))
            if ok and not self._pending and not self._events:
                self._idle.set()
        return ok

    def _write_event(self, event: PodEvent) -> None:
        series, new = self._correlator.observe(event)
        base = f"/api/v1/namespaces/{event.pod.namespace}/events"
        try:
            if not new:
                try:
                    self.client.request(
                        "PATCH",
                        f"{base}/{series.name}",
                        body={"count": series.count, "lastTimestamp": _now_iso(event.at)},
                        content_type="application/merge-patch+json",
                    )
                    return
                except ApiError as exc:
                    if exc.status != 404:
                        raise
                    # The Event expired (the API server's event TTL): a new series.
                    self._correlator.forget(event)
                    series, new = self._correlator.observe(event)
            self.client.request(
                "POST", base, body=event_object(event, self.node, series.name, series)
            )
        except ApiError:
            # Not written (it is retried, or dropped as rejected): the count it
            # took must not show up on the next occurrence.
            self._correlator.undo(event, new)
            raise

    def _write(self, update: ReportUpdate) -> None:
        pod = update.pod
        base = reports_path(pod.namespace)
        if update.status is None:
            try:
                self.client.request("DELETE", f"{base}/{pod.name}")
            except ApiError as exc:
                if exc.status != 404:
                    raise
            return
        patch = {"status": dict(update.status)}
        try:
            self.client.request(
                "PATCH",
                f"{base}/{pod.name}/status",
                body=patch,
                content_type="application/merge-patch+json",
            )
            return
        except ApiError as exc:
            if exc.status != 404:
                raise
        # First findings for this pod: create, then set the status (the status
        # subresource ignores status in a create, as a real API server does).
        if update.manifest is None:
            raise ApiError(404, f"no report for {pod.namespace}/{pod.name} and no manifest")
        try:
            self.client.request("POST", base, body=creatable(update.manifest))
        except ApiError as exc:
            if exc.status != 409:
                raise
        self.client.request(
            "PATCH",
            f"{base}/{pod.name}/status",
            body=patch,
            content_type="application/merge-patch+json",
        )
