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

from halfclose.agent.core.model import Finding, FlowTuple, Kind, Outcome
from halfclose.agent.core.outcome import ActionReport
from halfclose.agent.core.plan import DEFAULT_MAX_KILLS, ActionKind, Plan, make_plan
from halfclose.agent.core.reasons import error_reason
from halfclose.agent.daemon import schedule
from halfclose.agent.daemon.metrics import AgentMetrics
from halfclose.agent.daemon.pods import PodReconciler, action_settings, wants_sysctl
from halfclose.agent.daemon.ports import Kernel
from halfclose.agent.daemon.rechecks import Due, probe_for
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
# Sockets re-checked per reconcile of one netns on the fast path: the rest stay
# due, and the netns goes back in the queue behind every netns due before it.
MAX_RECHECKS_PER_TURN = 256


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
        self.rechecks = 0  # fast-path turns (sockets re-checked without a scan)

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
        now = self.clock()
        fast = self._fast_path(watched)
        out: list[tuple[int, float]] = []
        scans: list[float] = []
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
                    scans.append(0.0)
                continue
            if leak_forming(event, watched.capture_ports):
                known = watched.expired_at.get(event.reply)
                watched.note_expiry(event.reply, wall)
                if fast and (
                    event.reply in watched.rechecks
                    or watched.rechecks.saw_expired(event.reply, known)
                ):
                    # Its socket's re-check is due when the proof can hold, or
                    # one after the predicted expiry saw it (the DESTROY is late).
                    continue
                # An entry predicted to expire before the last scan began: that
                # scan saw its leak (the GC's DESTROY is just late).  No rescan.
                relevant = relevant or known is None or known > watched.scanned_wall
                continue
            countdown = leak_countdown(event, watched.capture_ports)
            if countdown is not None:
                # The proxy just half-closed this connection: the leak can form
                # when the entry's timer runs out.  Judge it just after that:
                # its socket alone (the fast path), else by a scan.
                watched.note_expiry(event.reply, wall + countdown, predicted=True)
                delay = schedule.countdown_delay(countdown)
                if fast and self._recheck_later(watched, event.reply, now + delay):
                    out.append((watched.inode, delay))
                else:
                    scans.append(delay)
        if relevant:
            scans.append(self.settings.event_debounce_seconds)
        if scans:
            self._scan_soon(watched, now + min(scans))
            out.append((watched.inode, min(scans)))
        return out

    @staticmethod
    def _scan_soon(watched: WatchedNetns, at: float) -> None:
        """A scan by ``at`` for a reason other than the interval (urgent work)."""
        if at < watched.scan_at or watched.scan_routine:
            watched.scan_at = min(watched.scan_at, at)
            watched.scan_routine = False

    def _fast_path(self, watched: WatchedNetns) -> bool:
        """Re-check due sockets alone (no scan)?  Under KillSockets, not dry run:
        the kill needs the sockets at the moment the proof holds; a report can
        wait for the scans (which also keep its counts)."""
        state = self.pods.owner(watched)
        if state is None:
            return False
        spec = state.target.policy.spec
        return spec.action == KILL_SOCKETS and not spec.dry_run

    @staticmethod
    def _recheck_later(
        watched: WatchedNetns,
        reply: FlowTuple,
        at: float,
        finding: Finding | None = None,
    ) -> bool:
        """Have the socket under ``reply`` re-checked at ``at``; False when the netns
        has too many due (then scan).  A socket known from a scan keeps its record
        (cookie) and upstream leg; one only an event named is asked for by tuple."""
        if finding is not None:
            return watched.rechecks.add(reply, Due(at, finding.socket, finding.upstream))
        known = watched.rechecks.by_reply.get(reply)
        if known is not None:
            return watched.rechecks.add(reply, Due(at, known.socket, known.upstream))
        return watched.rechecks.add(reply, Due(at, probe_for(reply)))

    # -- one reconcile ---------------------------------------------------------------

    def reconcile(self, watched: WatchedNetns) -> float:
        interval = self.pods.interval(watched)
        state = self.pods.owner(watched)
        if state is None:
            return interval
        policy = state.target.policy
        fast = self._fast_path(watched)
        if not fast:
            watched.rechecks.clear()  # the policy changed: scans decide again
        now = self.clock()
        recheck_at = watched.rechecks.next_at()
        scan_due = watched.scan_at <= now
        if recheck_at is not None and recheck_at <= now and (watched.scan_routine or not scan_due):
            # Sockets whose proof is due, alone (a GET each); a routine scan
            # waits behind every netns's urgent work (the loop requeues it).
            try:
                if self._recheck(watched, state, policy, interval):
                    return self._next(watched)
            except Exception as exc:
                return self._failed(watched, exc, interval)
            # Only a scan can judge them: now.
        elif not scan_due:
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
            result = self.kernel.scan(watched.inode, self._scan_settings(policy))
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
        self._note_expiries(watched, result.findings)
        # The scan saw every socket: what is due again is what it found.
        watched.rechecks.clear()
        rest = result.findings
        if fast:
            rest = self._schedule_rechecks(watched, rest, timing)
        delay = schedule.next_delay(rest, timing)
        watched.scan_at = self.clock() + delay
        watched.scan_routine = delay >= timing.interval
        return self._next(watched)

    def _note_expiries(self, watched: WatchedNetns, findings: list[Finding]) -> None:
        now_w = self.wall()
        for f in findings:
            expiry = schedule.expected_expiry(f)
            if expiry is not None:
                # Leak lifetimes start at the entry's expiry, even when the GC's
                # DESTROY event comes late.
                watched.note_expiry(f.socket.nat_reply_tuple, now_w + expiry, predicted=True)

    def _schedule_rechecks(
        self, watched: WatchedNetns, findings: list[Finding], timing: schedule.Timing
    ) -> list[Finding]:
        """Each finding due again (its expiry, its proof, its age) is re-checked
        alone then; the ones that do not fit are left to a scan (returned)."""
        now = self.clock()
        rest: list[Finding] = []
        for f in findings:
            delay = schedule.finding_delay(f, timing)
            if delay is None:
                continue
            at = now + max(schedule.MIN_SCAN_SPACING, delay)
            if not self._recheck_later(watched, f.socket.nat_reply_tuple, at, f):
                rest.append(f)
        return rest

    def _recheck(
        self, watched: WatchedNetns, state: PodState, policy: Policy, interval: float
    ) -> bool:
        """The fast path: judge the due sockets alone, kill the proven ones.

        The proof is the scan's on fresh reads (``Kernel.recheck``); the kill
        goes through the same plan, budget and kill-time re-check.  False
        when only a scan can judge them (the caller scans now).
        """
        now = self.clock()
        due = watched.rechecks.next_at()
        if due is None or due > now:
            return True
        batch = watched.rechecks.pop_due(now, MAX_RECHECKS_PER_TURN)
        judged_at = self.wall()  # the sockets are read after this
        result = self.kernel.recheck(
            watched.inode, tuple(d.socket for d in batch), self._scan_settings(policy)
        )
        if result is None:
            return False
        self.rechecks += 1
        for d in batch:
            watched.rechecks.note_judged(d.socket.nat_reply_tuple, judged_at)
        # The scan's pairing, kept: the kill verifies those upstream legs.
        legs = {d.socket.cookie: d.upstream for d in batch if d.upstream is not None}
        if legs:
            result = replace(
                result,
                findings=[f.with_upstream(legs.get(f.socket.cookie)) for f in result.findings],
            )
        report = self._act(watched, policy, result, watch_unpaired=False)
        self.recorder.record_actions(watched, state, policy, report)
        self._note_expiries(watched, result.findings)
        timing = schedule.Timing(
            interval=interval,
            min_idle=float(policy.spec.thresholds.min_idle_seconds),
            kills=True,
        )
        killed = {o.finding.socket.cookie for o in report.outcomes if o.outcome is Outcome.KILLED}
        left = [f for f in result.findings if f.socket.cookie not in killed]
        if any(f.kind is not Kind.AT_RISK for f in left):
            # A leak left alive (too young, over the budget, a failed kill) or an
            # unproven socket: the scan's bookkeeping must see it (the report, the
            # gauges, the stale tuples a NEW event is matched against).  Next turn.
            self._scan_soon(watched, now)
        rest = self._schedule_rechecks(watched, left, timing)
        if rest:
            self._scan_soon(watched, now + schedule.next_delay(rest, timing))
        return True

    def urgent_delay(self, watched: WatchedNetns) -> float | None:
        """Seconds until the netns's next urgent work (a re-check or a scan not the
        interval's), None when only routine work (interval scan, upstream check) waits."""
        times = [t for t in (watched.rechecks.next_at(),) if t is not None]
        if not watched.scan_routine:
            times.append(watched.scan_at)
        return max(0.0, min(times) - self.clock()) if times else None

    def _scan_settings(self, policy: Policy) -> ScanSettings:
        return ScanSettings(
            capture_ports=frozenset(policy.spec.capture_ports) or None,
            min_idle_seconds=0.0,  # the plan applies the threshold; report all
            proc_root=self.settings.host_proc,
            rules_max_age_seconds=60.0,
            # A rule change is seen by the next scan (nftables' generation
            # id); unchanged rules are re-read only every 10 min (issue 11:
            # the re-reads' processes were ~3 % of a core at 110 netns).
            rules_unchanged_max_age_seconds=600.0,
            # An idle netns (no half-closed socket, no TCP segment since) is
            # dumped every 5 min, not every interval: each dump walks the
            # node's whole TCP hash (issue 11).
            quiet_skip_max_seconds=300.0,
            owners=False,  # looked up below, only for what is reported
        )

    def _next(self, watched: WatchedNetns) -> float:
        """Seconds until the netns's next scan, re-check or upstream check, whichever is first."""
        at = watched.scan_at
        recheck_at = watched.rechecks.next_at()
        if recheck_at is not None:
            at = min(at, recheck_at)
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
        watched.scan_routine = False
        return delay

    def _act(
        self,
        watched: WatchedNetns,
        policy: Policy,
        result: ScanResult,
        *,
        watch_unpaired: bool = True,
    ) -> ActionReport:
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
        report = self.kernel.remediate(watched.inode, plan, watch_unpaired)
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
