"""The netns reconciler: scan, plan, act, record; return when to run next.

``reconcile(watched) -> seconds`` is the whole contract with the queue.  It
never sleeps: a kill's upstream-leg verification comes back pending from the
kernel side and is done by a later reconcile (``UpstreamCheck.due_after``),
so one netns's proxy never delays another netns's kill.  Failures keep their
type up to here and become one log line and ``scan_errors_total{reason}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from halfclose.agent.core.model import Outcome
from halfclose.agent.core.outcome import ActionReport
from halfclose.agent.core.plan import DEFAULT_MAX_KILLS, ActionKind, Plan, make_plan
from halfclose.agent.core.reasons import error_reason
from halfclose.agent.daemon import schedule
from halfclose.agent.daemon.metrics import AgentMetrics
from halfclose.agent.daemon.pods import PodReconciler, action_settings, wants_sysctl
from halfclose.agent.daemon.ports import Kernel
from halfclose.agent.daemon.record import PodState, Recorder
from halfclose.agent.daemon.settings import AgentSettings
from halfclose.agent.daemon.watched import WatchedNetns, new_warnings
from halfclose.agent.engine.act import skipped
from halfclose.agent.engine.scan import ScanResult, ScanSettings
from halfclose.agent.kernel.ctevents import collision_forming, leak_countdown, leak_forming
from halfclose.api.policy import KILL_SOCKETS, Policy

log = logging.getLogger(__name__)

# The per-scan cap under the node-wide bucket (the plan's own default).
MAX_KILLS_PER_SCAN = DEFAULT_MAX_KILLS


class NetnsReconciler:
    def __init__(
        self,
        settings: AgentSettings,
        metrics: AgentMetrics,
        *,
        kernel: Kernel,
        recorder: Recorder,
        pods: PodReconciler,
        clock: Callable[[], float],
        wall: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.kernel = kernel
        self.recorder = recorder
        self.pods = pods
        self.clock = clock
        self.wall = wall
        self.scans = 0

    # -- events only say *when* -----------------------------------------------------

    def on_events(self, watched: WatchedNetns) -> list[tuple[int, float]]:
        """Drain the netns's conntrack events: (inode, delay) keys to enqueue."""
        try:
            batch = self.kernel.drain_events(watched.inode)
        except Exception as exc:
            reason = error_reason(exc)
            log.warning("conntrack events of netns %d: %s: %s", watched.inode, reason, exc)
            self.metrics.scan_errors.labels(reason=reason).inc()
            return []
        wall = self.wall()
        out: list[tuple[int, float]] = []
        relevant = batch.overflowed
        for event in batch.events:
            if event.created:
                if collision_forming(event, watched.stale_replies):
                    # The app reuses a stale socket's port and hangs until it
                    # goes: scan now (the kill, under KillSockets, comes first).
                    log.info(
                        "netns %d: new connection under stale reply tuple %s: scanning",
                        watched.inode,
                        event.reply,
                    )
                    out.append((watched.inode, 0.0))
                continue
            if leak_forming(event, watched.capture_ports):
                known = watched.expired_at.get(event.reply)
                watched.note_expiry(event.reply, wall)
                # An entry predicted to expire before the last scan began: that
                # scan saw its leak (the GC's DESTROY is just late).  No rescan.
                relevant = relevant or known is None or known > watched.scanned_wall
                continue
            countdown = leak_countdown(event, watched.capture_ports)
            if countdown is not None:
                # The proxy just half-closed this connection: the leak can form
                # when the entry's timer runs out.  Scan just after that.
                watched.note_expiry(event.reply, wall + countdown, predicted=True)
                out.append((watched.inode, schedule.countdown_delay(countdown)))
        if relevant:
            out.append((watched.inode, self.settings.event_debounce_seconds))
        if out:
            now = self.clock()
            watched.scan_at = min(watched.scan_at, now + min(d for _, d in out))
        return out

    # -- one reconcile ---------------------------------------------------------------

    def reconcile(self, watched: WatchedNetns) -> float:
        interval = self.pods.interval(watched)
        state = self.pods.owner(watched)
        if state is None:
            return interval
        policy = state.target.policy
        if watched.scan_at > self.clock():
            # Only a kill's upstream check is due: one dump, no scan.
            try:
                self._verify(watched)
            except Exception as exc:
                return self._failed(watched, exc, interval)
            return self._next(watched)
        try:
            self._verify(watched)
            self._sysctl(watched, state, policy)
            watched.scanned_wall = self.wall()
            result = self.kernel.scan(
                watched.inode,
                ScanSettings(
                    capture_ports=frozenset(policy.spec.capture_ports) or None,
                    min_idle_seconds=0.0,  # the plan applies the threshold; report all
                    proc_root=self.settings.host_proc,
                    rules_max_age_seconds=60.0,
                    owners=False,  # looked up below, only for what is reported
                ),
            )
            watched.capture_ports = frozenset(result.capture_ports)
            self._watch_new(watched, watched.remember_stale(result.findings))
            self._note_warnings(watched, result.warnings)
            report = self._act(watched, policy, result)
            result = self._owners(watched, result, report)
        except Exception as exc:
            return self._failed(watched, exc, interval)
        watched.failures = 0
        self.scans += 1
        self.metrics.scan_duration.observe(result.duration_seconds)
        self.recorder.record(watched, state, policy, result, report)
        timing = schedule.Timing(
            interval=interval,
            min_idle=float(policy.spec.thresholds.min_idle_seconds),
            kills=policy.spec.action == KILL_SOCKETS,
        )
        now_w = self.wall()
        for f in result.findings:
            expiry = schedule.expected_expiry(f)
            if expiry is not None:
                # Leak lifetimes start at the entry's expiry, even when the GC's
                # DESTROY event comes late.
                watched.note_expiry(f.socket.nat_reply_tuple, now_w + expiry, predicted=True)
        watched.scan_at = self.clock() + schedule.next_delay(result.findings, timing)
        return self._next(watched)

    def _next(self, watched: WatchedNetns) -> float:
        """Seconds until the netns's next scan or upstream check, whichever is first."""
        at = watched.scan_at
        if watched.unverified is not None and watched.verify_at is not None:
            at = min(at, watched.verify_at)
        return max(0.0, at - self.clock())

    def _owners(
        self, watched: WatchedNetns, result: ScanResult, report: ActionReport
    ) -> ScanResult:
        """Owners for the findings still there (a killed socket has none to report).

        Cached per netns by cookie: a /proc pass only when new sockets show up.
        """
        gone = {o.finding.socket.cookie for o in report.outcomes if o.outcome is Outcome.KILLED}
        live = [f for f in result.findings if f.socket.cookie not in gone]
        new = [f for f in live if f.owner is None and f.socket.cookie not in watched.owners]
        if new:
            found = self.kernel.attach_owners(watched.inode, replace(result, findings=new))
            watched.owners.update((f.socket.cookie, f.owner) for f in found.findings)
        watched.owners = {f.socket.cookie: watched.owners.get(f.socket.cookie) for f in live}
        if not any(watched.owners.values()):
            return result
        return replace(
            result,
            findings=[
                f.with_owner(watched.owners.get(f.socket.cookie)) if f.owner is None else f
                for f in result.findings
            ],
        )

    def _failed(self, watched: WatchedNetns, exc: Exception, interval: float) -> float:
        reason = error_reason(exc)
        self.metrics.scan_errors.labels(reason=reason).inc()
        watched.failures += 1
        log.warning(
            "scan of netns %d (%s) failed: %s: %s",
            watched.inode,
            "/".join(watched.pods[0]) if watched.pods else "-",
            reason,
            exc,
        )
        if reason == "netns_gone":
            self.kernel.invalidate()
            self.pods.wants_pass = True
        delay = schedule.backoff(watched.failures, interval)
        watched.scan_at = self.clock() + delay
        return delay

    def _act(self, watched: WatchedNetns, policy: Policy, result: ScanResult) -> ActionReport:
        settings = action_settings(policy, max_kills=MAX_KILLS_PER_SCAN)
        plan: Plan = make_plan(result.findings, result.capture_ports, settings)
        granted = 0
        bucket = self.pods.bucket
        if settings.action is ActionKind.KILL and not settings.dry_run and bucket is not None:
            # Plan once; ask the node-wide budget for what qualifies; cap at the grant.
            granted = bucket.take(len(plan.kills), self.clock())
            plan = plan.capped(granted)
        if not plan.kills and not plan.extends:
            return skipped(plan)  # nothing to re-check or touch: no kernel call
        report = self.kernel.remediate(watched.inode, plan)
        if granted and bucket is not None:
            bucket.give_back(granted - report.killed)
        if report.pending is not None:
            watched.unverified = report
            watched.verify_at = self.clock() + report.pending.due_after_seconds
        return report

    def _verify(self, watched: WatchedNetns) -> None:
        """The last kill's upstream check, when it is due (one dump; logged)."""
        pending = watched.unverified
        if pending is None or watched.verify_at is None or self.clock() < watched.verify_at:
            return
        watched.unverified = watched.verify_at = None
        done = self.kernel.verify_upstreams(watched.inode, pending)
        if done.kills is not None:
            log.info("action=verify-upstreams netns=%d %s", watched.inode, done.kills.describe())

    def _sysctl(self, watched: WatchedNetns, state: PodState, policy: Policy) -> None:
        if not wants_sysctl(policy) or watched.sysctl_patched or policy.spec.dry_run:
            return
        timeout = policy.spec.conntrack.close_wait_timeout_seconds
        patch = self.kernel.patch_sysctl(watched.inode, timeout)
        if patch.changed:
            self.recorder.event(
                state,
                "ConntrackSysctlPatched",
                f"Raised nf_conntrack_tcp_timeout_close_wait to {timeout}s in "
                "the pod's network namespace",
            )
        watched.sysctl_patched = True
        self.metrics.state.patched_pods = len(self.kernel.patched_inodes())

    def _watch_new(self, watched: WatchedNetns, on: bool) -> None:
        if on == watched.watching_new or watched.events_fd is None:
            return
        try:
            self.kernel.watch_new(watched.inode, on)
            watched.watching_new = on
        except OSError as exc:  # the poll interval still finds collisions, later
            log.warning("netns %d: cannot watch conntrack NEW events: %s", watched.inode, exc)

    def _note_warnings(self, watched: WatchedNetns, warnings: tuple[str, ...]) -> None:
        """Log and count each new scan warning once per netns, not once per scan.

        A warning means the scan ran but may miss leaks (unreadable NAT rules,
        no conntrack to prove a leak with): scan_errors{reason="incomplete"}
        feeds the scan-errors alert, so someone fixes the access or the ports.
        """
        for warning in new_warnings(watched.warnings, warnings):
            log.warning("netns %d (%s): %s", watched.inode, "/".join(watched.pods[0]), warning)
            self.metrics.scan_errors.labels(reason="incomplete").inc()
        watched.warnings = warnings
