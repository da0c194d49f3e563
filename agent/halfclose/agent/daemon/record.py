"""What the agent says about a reconcile: metrics, Events, log lines and the report.

Everything here reads one scan's ``ScanResult`` and the engine's
``ActionReport`` — nothing re-derives an outcome.  Reports are rewritten only
when their fingerprint (counts, findings' identity/kind/action, policy)
changes, and at least every ``REPORT_REFRESH_SECONDS`` so ``lastScanTime``
shows the agent is alive.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from halfclose.agent.core.model import Finding, Kind, Outcome
from halfclose.agent.core.outcome import ActionReport, FindingOutcome
from halfclose.agent.daemon.metrics import AgentMetrics, PodGauges
from halfclose.agent.daemon.ports import ReportSink
from halfclose.agent.daemon.targets import PodTarget
from halfclose.agent.daemon.watched import WatchedNetns
from halfclose.agent.engine.scan import ScanResult
from halfclose.agent.kube.events import PodEvent
from halfclose.agent.kube.reports import PodRef, ReportUpdate
from halfclose.api.policy import Policy
from halfclose.api.report import (
    FindingUpstream,
    ReportFinding,
    ReportStatus,
    ScanSummary,
    build_report_status,
    report_manifest,
    report_status_json,
)

log = logging.getLogger("halfclose.agent.actions")

REPORT_REFRESH_SECONDS = 300.0
# Per-collision Events per scan; more are summed up in one.
MAX_COLLISION_EVENTS = 5


@dataclass(slots=True)
class PodState:
    """What the agent remembers about a pod between scans."""

    target: PodTarget
    status: ReportStatus | None = None
    reported: tuple[object, ...] | None = None
    reported_at: float = float("-inf")

    @property
    def ref(self) -> PodRef:
        t = self.target
        return PodRef(t.namespace, t.name, t.uid)


def collision_text(finding: Finding) -> str:
    """``127.0.0.1:15001<-192.0.2.10:51920 blocking a new connection from 192.0.2.10:51920
    to 203.0.113.10:7777`` (the destination when the new entry names it)."""
    s = finding.socket
    text = f"{s.local}<-{s.peer} blocking a new connection from {s.peer}"
    entry = finding.entry
    if entry is not None:
        o = entry.original
        dst = f"[{o.dst}]:{o.dport}" if o.dst.version == 6 else f"{o.dst}:{o.dport}"
        text += f" to {dst}"
    return text


def report_finding(finding: Finding, outcome: FindingOutcome | None, at: str) -> ReportFinding:
    up = finding.upstream
    idle = finding.socket.idle_seconds
    return ReportFinding(
        kind=finding.kind.value,  # the same values: test_collision_glue
        reason=finding.reason.value if finding.reason is not None else None,
        state=finding.socket.state.ss_name,
        local=str(finding.socket.local),
        peer=str(finding.socket.peer),
        idle_seconds=int(idle) if idle is not None else None,
        pid=finding.owner.pid if finding.owner else None,
        process=finding.owner.process[:64] if finding.owner else None,
        upstream=(
            FindingUpstream(local=str(up.local), peer=str(up.peer), state=up.state.ss_name)
            if up is not None
            else None
        ),
        action=outcome.action.value if outcome is not None else "none",
        error=outcome.error if outcome is not None else None,
        observed_time=at,
    )


def _unproven_counts(findings: list[Finding]) -> tuple[tuple[str, int], ...]:
    """``halfclose_unproven_sockets{reason}``: one series per reason seen, none at 0."""
    counts: dict[str, int] = {}
    for f in findings:
        if f.kind is Kind.UNPROVEN and f.reason is not None:
            counts[f.reason.value] = counts.get(f.reason.value, 0) + 1
    return tuple(sorted(counts.items()))


def fingerprint(status: ReportStatus, policy: str) -> tuple[object, ...]:
    """What makes a report worth rewriting (the timestamps do not)."""
    return (
        status.leaked,
        status.collision,
        status.at_risk,
        status.unproven,
        status.killed_total,
        status.extended_total,
        status.conntrack_patched,
        tuple((f.identity, f.kind, f.action) for f in status.findings),
        policy,
    )


class Recorder:
    """Turns (scan, action report) into metrics, Events, INFO lines and the pod's report."""

    def __init__(
        self,
        metrics: AgentMetrics,
        reports: ReportSink,
        *,
        node_name: str,
        clock: Callable[[], float],
        wall: Callable[[], float],
        on_lifetime: Callable[[float], None],
    ) -> None:
        self.metrics = metrics
        self.reports = reports
        self.node_name = node_name
        self.clock = clock
        self.wall = wall
        self.on_lifetime = on_lifetime

    def event(self, state: PodState, reason: str, message: str, type_: str = "Normal") -> None:
        self.reports.event(PodEvent(state.ref, reason, message, type_, at=self.wall()))

    def record(
        self,
        watched: WatchedNetns,
        state: PodState,
        policy: Policy,
        result: ScanResult,
        report: ActionReport,
    ) -> None:
        ns, pod = state.target.namespace, state.target.name
        wall = self.wall()
        scanned_at = dt.datetime.fromtimestamp(wall, dt.UTC)
        stamp = scanned_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        findings = result.findings
        collisions = [f for f in findings if f.kind is Kind.COLLISION]
        fresh = [f for f in collisions if f.socket.cookie not in watched.collisions_seen]
        if fresh:
            self.metrics.collisions.labels(ns, pod).inc(len(fresh))
        watched.collisions_seen = {f.socket.cookie for f in collisions}
        leaked = [f for f in findings if f.kind in (Kind.LEAKED, Kind.COLLISION)]
        for f in leaked:
            watched.leaked_since.setdefault(f.socket.cookie, wall)
        killed_ports, unblocked, gone = self._outcomes(watched, state, report, wall)
        watched.prune_expiries(wall)
        seen_now = {f.socket.cookie for f in leaked}
        watched.leaked_since = {
            c: t for c, t in watched.leaked_since.items() if c in seen_now and c not in gone
        }
        left = {k: 0 for k in Kind}
        for f in findings:
            if f.socket.cookie not in gone:
                left[f.kind] += 1
        self.metrics.state.publish(
            ns,
            pod,
            PodGauges(
                leaked=left[Kind.LEAKED] + left[Kind.COLLISION],
                at_risk=left[Kind.AT_RISK],
                unproven=_unproven_counts(findings),
                incomplete=bool(result.warnings),
            ),
        )
        self._log_actions(watched, state, report)
        self._events(
            state, report, unblocked, [f for f in fresh if f not in unblocked], killed_ports
        )
        self._report(
            state,
            policy,
            ScanSummary(
                scanned_at=scanned_at,
                leaked=left[Kind.LEAKED],
                collision=left[Kind.COLLISION],
                at_risk=left[Kind.AT_RISK],
                unproven=left[Kind.UNPROVEN],
                killed=report.killed,
                extended=report.extended,
                conntrack_patched=watched.sysctl_patched,
                findings=[report_finding(f, report.of(f), stamp) for f in findings],
            ),
        )

    def record_actions(
        self, watched: WatchedNetns, state: PodState, policy: Policy, report: ActionReport
    ) -> None:
        """The fast path's kills (sockets re-checked without a scan): metrics,
        lifetimes, the INFO line, Events and the report, now.

        A re-check sees only its sockets, not the netns: the report's counts
        stay the last scan's, less the killed sockets that scan reported; the
        killed ones join its findings and ``killedTotal``.
        """
        wall = self.wall()
        killed_ports, unblocked, _gone = self._outcomes(watched, state, report, wall)
        self._log_actions(watched, state, report)
        self._events(state, report, unblocked, [], killed_ports)
        if not report.killed:
            return
        at = dt.datetime.fromtimestamp(wall, dt.UTC)
        stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ")
        killed = [
            report_finding(o.finding, o, stamp)
            for o in report.outcomes
            if o.outcome is Outcome.KILLED
        ]
        prev = state.status or ReportStatus()
        was = {f.identity: f.kind for f in prev.findings}
        gone: dict[str | None, int] = {}
        for f in killed:
            kind = was.get(f.identity)
            gone[kind] = gone.get(kind, 0) + 1
        self._report(
            state,
            policy,
            ScanSummary(
                scanned_at=at,
                leaked=max(0, prev.leaked - gone.get(Kind.LEAKED.value, 0)),
                collision=max(0, prev.collision - gone.get(Kind.COLLISION.value, 0)),
                at_risk=max(0, prev.at_risk - gone.get(Kind.AT_RISK.value, 0)),
                unproven=prev.unproven,
                killed=report.killed,
                conntrack_patched=watched.sysctl_patched,
                findings=killed,
            ),
        )

    def _outcomes(
        self, watched: WatchedNetns, state: PodState, report: ActionReport, wall: float
    ) -> tuple[dict[int, int], list[Finding], set[int]]:
        """Per-outcome metrics and leak lifetimes: (kills per port, collisions
        unblocked, cookies killed)."""
        ns, pod = state.target.namespace, state.target.name
        killed_ports: dict[int, int] = {}
        unblocked: list[Finding] = []
        gone: set[int] = set()
        for o in report.outcomes:
            f = o.finding
            if o.outcome is Outcome.KILLED:
                gone.add(f.socket.cookie)
                if f.kind is Kind.COLLISION:
                    unblocked.append(f)
                else:
                    port = f.socket.local.port
                    killed_ports[port] = killed_ports.get(port, 0) + 1
                lifetime = watched.lifetime(f, wall)
                self.metrics.leak_lifetime.observe(lifetime)
                self.on_lifetime(lifetime)
                self.metrics.killed.labels(ns, pod).inc()
            elif o.outcome is Outcome.EXTENDED:
                self.metrics.extended.labels(ns, pod).inc()
            elif o.outcome is Outcome.FAILED:
                self.metrics.kill_failures.labels(ns, pod, o.error or "unknown").inc()
        return killed_ports, unblocked, gone

    def _log_actions(self, watched: WatchedNetns, state: PodState, report: ActionReport) -> None:
        """One structured INFO line per action taken (nothing when nothing was done)."""
        failures = report.failures()
        if not (report.killed or report.extended or failures):
            return
        t = state.target
        log.info(
            "action=%s pod=%s/%s netns=%d killed=%d extended=%d failed=%d failures=%s "
            "dry_run=%s outcome=%s",
            report.action.value,
            t.namespace,
            t.name,
            watched.inode,
            report.killed,
            report.extended,
            sum(failures.values()),
            ",".join(f"{k}:{n}" for k, n in sorted(failures.items())) or "-",
            report.dry_run,
            "failed" if failures else "ok",
        )

    def _events(
        self,
        state: PodState,
        report: ActionReport,
        unblocked: list[Finding],
        hanging: list[Finding],
        killed_ports: dict[int, int],
    ) -> None:
        self._collision_events(state, unblocked, hanging)
        plain = report.killed - len(unblocked)
        if plain:
            ports_text = ", ".join(f":{p}" for p in sorted(killed_ports))
            self.event(
                state,
                "LeakedSocketsKilled",
                f"Killed {plain} leaked half-closed socket{'s' if plain != 1 else ''} "
                f"on {ports_text}",
            )
        failures = report.failures()
        if failures:
            detail = ", ".join(f"{n} {r}" for r, n in sorted(failures.items()))
            self.event(state, "KillFailed", f"Could not kill leaked sockets: {detail}", "Warning")
        extended = report.extended
        if extended:
            self.event(
                state,
                "ConntrackEntriesExtended",
                f"Extended {extended} conntrack entr{'ies' if extended != 1 else 'y'} of "
                "half-closed proxy connections",
            )

    def _collision_events(
        self, state: PodState, killed: list[Finding], left: list[Finding]
    ) -> None:
        """Say which connect a kill unblocked, or which one hangs (not killed)."""
        for f in killed[:MAX_COLLISION_EVENTS]:
            self.event(state, "CollisionUnblocked", f"Killed stale socket {collision_text(f)}")
        if len(killed) > MAX_COLLISION_EVENTS:
            more = len(killed) - MAX_COLLISION_EVENTS
            self.event(
                state,
                "CollisionUnblocked",
                f"Killed {more} more stale sockets blocking new connections",
            )
        for f in left[:MAX_COLLISION_EVENTS]:
            self.event(
                state,
                "PortReuseCollision",
                f"Stale socket {collision_text(f)} (not killed)",
                "Warning",
            )

    def _report(self, state: PodState, policy: Policy, summary: ScanSummary) -> None:
        status = build_report_status(
            summary,
            state.status,
            leaked_alert_threshold=policy.spec.thresholds.leaked_per_pod_alert,
        )
        # Unproven findings keep a report too: users see them, nobody acts on them.
        clean = (
            status.leaked == 0
            and status.collision == 0
            and status.at_risk == 0
            and status.unproven == 0
        )
        if (
            clean
            and status.killed_total == 0
            and status.extended_total == 0
            and not status.conntrack_patched
        ):
            if state.status is not None:
                # Clean again and nothing was ever done: no report at all.
                state.status = None
                state.reported = None
                self.reports.submit(ReportUpdate(state.ref, None, None))
            return
        if clean:
            # Cleared: counts at zero; what was acted on stays as history.
            status = ReportStatus(
                leaked=0,
                at_risk=0,
                killed_total=status.killed_total,
                extended_total=status.extended_total,
                conntrack_patched=status.conntrack_patched,
                last_scan_time=status.last_scan_time,
                findings=tuple(f for f in status.findings if f.action != "none"),
                conditions=status.conditions,
            )
        state.status = status
        mark = fingerprint(status, policy.name)
        now = self.clock()
        if mark == state.reported and now - state.reported_at < REPORT_REFRESH_SECONDS:
            return
        state.reported, state.reported_at = mark, now
        t = state.target
        manifest = report_manifest(
            namespace=t.namespace,
            pod_name=t.name,
            pod_uid=t.uid,
            node_name=self.node_name,
            policy=policy.name,
        )
        self.reports.submit(ReportUpdate(state.ref, manifest, report_status_json(status)))
