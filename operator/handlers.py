"""kopf wiring: thin handlers over the pure modules (view, assignment, status).

How the operator works (docs/api.md, "The operator"):

- kopf *indexes* hold what the decisions need -- namespaces' labels, running
  pods' labels, parsed policies, report counters -- and kopf starts no other
  handler until every index has its initial listing, so the first status
  written after a start or a restart is computed from complete data;
- every watch event bumps ``OperatorState.revision``;
- one kopf *timer* per policy, every ``debounce_seconds``, recomputes the
  policy's whole status when the revision moved (level-based: create,
  update, resume and changes of pods, namespaces, reports and other policies
  all take this one path) and patches it only when it differs from what is
  stored.  However many reports change in between, a policy gets at most one
  status write per interval;
- Events are posted for condition transitions only;
- a deleted policy's reports are deleted (nothing acts on them any more);
- leader election is kopf peering: replicas with distinct priorities, the
  highest active, the rest paused (timers and handlers stopped).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
import kubernetes
from prometheus_client import CollectorRegistry

from halfclose.api import (
    GROUP,
    POLICY_KIND,
    POLICY_PLURAL,
    READY,
    REPORT_KIND,
    REPORT_PLURAL,
    VERSION,
    PolicyStatus,
    encode,
    is_true,
)
from halfclose.api.schema import SchemaError, decode
from halfclose.operator.assignment import Assignment, assign
from halfclose.operator.http import ProbeServer
from halfclose.operator.kube import (
    connection_info,
    delete_reports,
    ensure_peering,
    load_configuration,
)
from halfclose.operator.metrics import OperatorMetrics
from halfclose.operator.settings import OperatorSettings
from halfclose.operator.status import compute_status, events_for
from halfclose.operator.view import (
    PodInfo,
    PolicyEntry,
    ReportError,
    ReportSummary,
    pod_from,
    policy_entry_from,
    report_from,
)

log = logging.getLogger("halfclose.operator")
Logger = logging.Logger | logging.LoggerAdapter[Any]

# The status keys the operator owns: a key it no longer sets is removed.
_STATUS_KEYS = tuple(encode(PolicyStatus(observed_generation=0, conditions=())).keys())


@dataclass
class OperatorState:
    """Mutable state shared by the handlers of one operator (one event loop)."""

    settings: OperatorSettings
    metrics: OperatorMetrics
    revision: int = 0
    computed_at: dict[str, int] = field(default_factory=dict)  # policy -> revision
    readiness: dict[str, bool] = field(default_factory=dict)
    api: kubernetes.client.ApiClient | None = None
    probes: ProbeServer | None = None
    _assignment: Assignment | None = None
    _assignment_revision: int = -1
    _assignment_clock: float = 0.0

    def bump(self) -> None:
        self.revision += 1

    def assignment(self, build: Callable[[], Assignment]) -> tuple[Assignment, int]:
        """The cluster-wide assignment and the revision it reflects.

        Rebuilt when the revision moved, but at most once per half debounce
        interval: N policy timers ticking after one pod event share one
        O(pods x policies) pass.  A policy computed from an older revision is
        recomputed on its next tick.
        """
        now = time.monotonic()
        fresh_enough = now - self._assignment_clock < self.settings.debounce_seconds / 2
        if self._assignment is None or (
            self._assignment_revision != self.revision and not fresh_enough
        ):
            self._assignment_revision = self.revision
            self._assignment = build()
            self._assignment_clock = now
        return self._assignment, self._assignment_revision

    def forget(self, policy: str) -> None:
        self.computed_at.pop(policy, None)
        self.readiness.pop(policy, None)
        self.metrics.forget_policies([policy])
        self.metrics.set_policy_readiness(self.readiness)


@dataclass(frozen=True, slots=True)
class Indexes:
    """kopf's indexes, which it passes to every handler as keyword arguments."""

    namespace_labels: kopf.Index[str, Mapping[str, str]]
    pods_by_namespace: kopf.Index[str, PodInfo]
    policies_by_name: kopf.Index[str, PolicyEntry]
    reports_by_policy: kopf.Index[str, ReportSummary]

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> Indexes:
        return cls(**{f: kwargs[f] for f in cls.__dataclass_fields__})


class _RoutineSuccessFilter(logging.Filter):
    """Drops kopf's "Handler 'x' succeeded." lines for handlers that run all the time.

    The status timer ticks every debounce interval and the event handlers run
    for every pod change: their success is the normal case, not news.
    """

    ROUTINE = ("status", "namespace_event", "pod_event", "report_event", "policy_event")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.endswith(" succeeded.") and any(f"'{h}'" in message for h in self.ROUTINE)
        )


_QUIET = _RoutineSuccessFilter()


def _values(index: Mapping[Any, Iterable[Any]]) -> Iterable[Any]:
    for key in index:
        yield from index[key]


def _namespaces(index: Mapping[str, Iterable[Mapping[str, str]]]) -> dict[str, Mapping[str, str]]:
    return {name: next(iter(store)) for name in index for store in [index[name]] if store}


def _stored_status(body: Mapping[str, Any]) -> tuple[PolicyStatus, dict[str, Any]]:
    raw = dict(body.get("status") or {})
    try:
        return decode(PolicyStatus, raw, "status"), raw
    except SchemaError:
        return PolicyStatus(), raw


def build_operator(
    settings: OperatorSettings, *, metrics_registry: CollectorRegistry | None = None
) -> tuple[kopf.OperatorRegistry, OperatorState]:
    """A kopf registry with every handler, and the state they share.

    ``halfclose.operator.main`` runs it with ``kopf.run``; tests run it with
    ``kopf.testing.KopfRunner(..., registry=registry)``.
    """
    registry = kopf.OperatorRegistry()
    state = OperatorState(settings, OperatorMetrics(metrics_registry or CollectorRegistry()))
    metrics = state.metrics

    async def api_client() -> kubernetes.client.ApiClient:
        # One configuration for kopf's login and our own client (loaded on first use).
        if state.api is None:
            config = await asyncio.to_thread(load_configuration, settings.kubeconfig)
            state.api = kubernetes.client.ApiClient(config)
        return state.api

    @kopf.on.login(id="login", registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info((await api_client()).configuration)

    @kopf.on.startup(id="startup", registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Only the Events the operator posts on purpose, not every handler log line.
        settings.posting.level = logging.WARNING
        # Nothing of kopf's own bookkeeping in our status (its schema would prune it).
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration"
        )
        settings.peering.stealth = True
        # Re-list now and then, so a silently stalled watch cannot hide changes for long.
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        api = await api_client()
        if state.settings.peering and not settings.peering.standalone:
            created = await asyncio.to_thread(ensure_peering, api, state.settings.peering)
            if created:
                log.info("created ClusterKopfPeering %r", state.settings.peering)
        state.probes = ProbeServer(
            metrics, state.settings.metrics_host, state.settings.metrics_port
        )
        await state.probes.start()
        state.probes.ready = True
        logging.getLogger("kopf.objects").addFilter(_QUIET)
        log.info("metrics and /readyz on port %s", state.probes.port)

    @kopf.on.cleanup(id="cleanup", registry=registry)
    async def cleanup(**_: Any) -> None:
        logging.getLogger("kopf.objects").removeFilter(_QUIET)
        if state.probes is not None:
            await state.probes.stop()
        if state.api is not None:
            await asyncio.to_thread(state.api.close)

    @kopf.on.probe(id="policies", registry=registry)
    def probe_policies(**_: Any) -> int:
        return len(state.readiness)

    # ----------------------------------------------------------------- indexes

    @kopf.index("namespaces", id="namespace_labels", registry=registry)
    def namespace_labels(name: str, labels: Mapping[str, str], **_: Any) -> dict[str, Any]:
        return {name: dict(labels)}

    @kopf.index("pods", id="pods_by_namespace", registry=registry)
    def pods_by_namespace(body: kopf.Body, **_: Any) -> dict[str, PodInfo]:
        pod = pod_from(body)
        return {pod.namespace: pod} if pod else {}

    @kopf.index(GROUP, VERSION, POLICY_PLURAL, id="policies_by_name", registry=registry)
    def policies_by_name(body: kopf.Body, name: str, **_: Any) -> dict[str, PolicyEntry]:
        return {name: policy_entry_from(body)}

    @kopf.index(GROUP, VERSION, REPORT_PLURAL, id="reports_by_policy", registry=registry)
    def reports_by_policy(body: kopf.Body, **_: Any) -> dict[str, ReportSummary]:
        try:
            report = report_from(body)
        except ReportError as exc:
            log.warning("ignoring unreadable report: %s", exc)
            return {}
        return {report.policy: report}

    # ------------------------------------------------------------------ events

    @kopf.on.event("namespaces", id="namespace_event", registry=registry)
    @kopf.on.event("pods", id="pod_event", registry=registry)
    async def inventory_changed(**_: Any) -> None:
        state.bump()

    @kopf.on.event(GROUP, VERSION, REPORT_PLURAL, id="report_event", registry=registry)
    async def report_changed(*, type: str, body: kopf.Body, **kwargs: Any) -> None:
        state.bump()
        result = "ok"
        if type != "DELETED":
            try:
                report_from(body)
            except ReportError:
                result = "error"
        metrics.reconcile_total.labels(kind=REPORT_KIND, result=result).inc()
        metrics.reports.set(sum(1 for _ in _values(Indexes.of(kwargs).reports_by_policy)))

    @kopf.on.event(GROUP, VERSION, POLICY_PLURAL, id="policy_event", registry=registry)
    async def policy_changed(*, type: str, name: str, logger: Logger, **kwargs: Any) -> None:
        state.bump()
        if type != "DELETED":
            return
        state.forget(name)
        owned = [(r.namespace, r.name) for r in Indexes.of(kwargs).reports_by_policy.get(name, [])]
        if owned and state.api is not None:
            # Nothing acts on these any more; a pod now under another policy gets
            # a fresh report from its agent.
            deleted = await asyncio.to_thread(delete_reports, state.api, owned)
            logger.info("policy %s deleted: deleted %d of its reports", name, deleted)

    # ------------------------------------------------------------------ status

    @kopf.timer(
        GROUP,
        VERSION,
        POLICY_PLURAL,
        id="status",
        registry=registry,
        interval=settings.debounce_seconds,
        backoff=settings.debounce_seconds,
    )
    async def policy_status(
        *,
        name: str,
        body: kopf.Body,
        patch: kopf.Patch,
        logger: Logger,
        **kwargs: Any,
    ) -> None:
        idx = Indexes.of(kwargs)
        previous, stored = _stored_status(body)
        generation = int(body.get("metadata", {}).get("generation") or 0)
        if (
            state.computed_at.get(name) == state.revision
            and previous.observed_generation == generation
        ):
            return  # nothing changed since the last computation
        try:
            entries: list[PolicyEntry] = list(_values(idx.policies_by_name))
            entry = next((e for e in entries if e.name == name), None)
            if entry is None or entry.generation != generation:
                entry = policy_entry_from(body)  # the index lags the live body

            def build() -> Assignment:
                valid = [e.policy for e in entries if e.policy is not None]
                return assign(
                    valid, _namespaces(idx.namespace_labels), _values(idx.pods_by_namespace)
                )

            assignment, revision = state.assignment(build)
            status = compute_status(
                entry,
                assignment.of(name),
                idx.reports_by_policy.get(name, []),
                previous,
                dt.datetime.now(dt.UTC),
            )
        except Exception:
            metrics.reconcile_total.labels(kind=POLICY_KIND, result="error").inc()
            raise
        metrics.reconcile_total.labels(kind=POLICY_KIND, result="ok").inc()
        state.computed_at[name] = revision
        wanted = encode(status)
        current = {k: v for k, v in stored.items() if k in _STATUS_KEYS}
        if wanted != current:
            for key in _STATUS_KEYS:
                patch.status[key] = wanted.get(key)  # None removes a key we no longer set
            metrics.status_writes_total.inc()
            for event in events_for(previous.conditions, status.conditions):
                kopf.event(body, type=event.type, reason=event.reason, message=event.message)
                logger.info("%s: %s", event.reason, event.message)
        state.readiness[name] = is_true(status.conditions, READY)
        metrics.set_policy_readiness(state.readiness)
        metrics.set_policy_totals(name, status.leaked_now, status.killed_total)

    return registry, state
