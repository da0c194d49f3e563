"""HalfCloseReport and Event writes, buffered while the API server is away.

Reports go through ``reports.PendingReports`` (one per pod, last write wins, so
no report is lost); Events through a bounded queue, oldest dropped first, with
repeats folded by ``events.EventCorrelator``.

Threading: ``submit``/``event`` may be called from any thread; one writer
thread owns the HTTP calls.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from halfclose.agent.kube.client import ApiError, RawClient
from halfclose.agent.kube.events import EventCorrelator, PodEvent, event_object, now_iso
from halfclose.agent.kube.reports import PendingReports, ReportUpdate, creatable, reports_path

# The logger name from before the split of kube/reports.py: log filters keep matching.
log = logging.getLogger("halfclose.agent.kube.reports")


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
                        body={"count": series.count, "lastTimestamp": now_iso(event.at)},
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
