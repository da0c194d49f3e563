"""Carrying out a remediation plan in one network namespace (docs/remediation.md).

Every change is preceded by a re-check against the kernel (the socket re-read
by tuple *and cookie*, its NAT entry looked up again), because a socket can
close, or an entry vanish, between the scan and the action.  The rules for
what may be touched live in the pure ``halfclose.agent.core.plan``; this
module only asks the kernel and applies them.

- kill: the batched path of ``engine.kill`` (``SOCK_DESTROY`` keyed by the
  cookie from the re-read; ENOENT/ESTALE mean the socket went by itself,
  "already-gone", not a failure).  The proxy's paired upstream CLOSE_WAIT
  sockets are checked *later* (``verify``, one dump): a proxy that closes its
  upstream when the downstream errors (Envoy, HAProxy) makes them go; any that
  stay are reported (per finding when the scan paired it, else by count in
  ``KillSummary``).  The CLI waits for that (``remediate``, bounded); the agent
  schedules it, so its loop never sleeps for a proxy.
- extend: a ctnetlink update of that one entry's timeout, *without*
  IPS_FIXED_TIMEOUT (measured on 6.18: a fixed timeout survives the
  connection's close and can never be changed or cleared again; a plain one
  is reset by the connection's next packet, so the entry follows the normal
  LAST_ACK/TIME_WAIT timeouts once the app closes).
"""

from __future__ import annotations

import dataclasses
import errno
import time
from collections.abc import Callable
from dataclasses import dataclass

from halfclose.agent.core.model import ConntrackEntry, Outcome, SocketRecord
from halfclose.agent.core.outcome import ActionReport, FindingOutcome, KillSummary, UpstreamCheck
from halfclose.agent.core.plan import (
    ActionKind,
    Decision,
    Op,
    Plan,
    SkipReason,
    recheck_extend,
)
from halfclose.agent.engine.kill import (
    UPSTREAM_DUE_SECONDS,
    UpstreamStatus,
    close_wait_baseline,
    errno_name,
    kill,
    verify_upstreams,
)
from halfclose.agent.kernel.conntrack import Conntrack
from halfclose.agent.kernel.sockdiag import SockDiag


@dataclass(frozen=True, slots=True)
class ExecSettings:
    """How long to watch paired upstream sockets go after kills (all of them together)."""

    upstream_wait_seconds: float = 2.0
    poll_seconds: float = 0.05


def skipped(plan: Plan) -> ActionReport:
    """The report of a plan that touches no socket (report-only, patch-conntrack)."""
    return ActionReport(
        plan.settings.action,
        plan.settings.dry_run,
        tuple(FindingOutcome(d.finding, Outcome.SKIPPED, d.reason) for d in plan.decisions),
    )


class Executor:
    """Applies plans with netlink sockets already open inside the target netns."""

    def __init__(
        self,
        diag: SockDiag,
        conntrack: Conntrack,
        settings: ExecSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._diag = diag
        self._ct = conntrack
        self._settings = settings or ExecSettings()
        self._clock = clock
        self._sleep = sleep

    def remediate(self, plan: Plan) -> ActionReport:
        """Execute, then watch the upstream legs go for up to ``upstream_wait_seconds``.

        For a caller that may wait (the CLI).  The agent calls ``execute`` and
        ``verify`` itself, later, so its loop never sleeps here.
        """
        report = self.execute(plan)
        deadline = self._clock() + self._settings.upstream_wait_seconds
        while report.pending is not None:
            report = self.verify(report, final=self._clock() >= deadline)
            if report.pending is not None:
                self._sleep(self._settings.poll_seconds)
        return report

    def execute(self, plan: Plan, *, watch_unpaired: bool = True) -> ActionReport:
        """One outcome per decision, in the plan's order; kills' upstream check pending.

        Kills go through the batched kill path (``engine.kill``: re-reads,
        conntrack GETs and destroys many per ``send``), extensions one by one.
        ``watch_unpaired`` False skips the CLOSE_WAIT baseline that kills
        without a known upstream leg are verified by (a dump of the host's
        whole TCP hash): the agent's fast path, whose sockets were never
        paired, checks only the legs it knows.
        """
        dry_run = plan.settings.dry_run
        kills = plan.kills
        unpaired = [d for d in kills if d.finding.upstream is None] if watch_unpaired else []
        baseline = (
            close_wait_baseline(self._diag, unpaired, plan.capture_ports)
            if unpaired and not dry_run
            else None
        )
        killed = iter(
            kill(self._diag, self._ct, kills, plan.capture_ports, dry_run=dry_run) if kills else ()
        )
        outcomes: list[FindingOutcome] = []
        for decision in plan.decisions:
            if decision.op is Op.KILL:
                r = next(killed)
                would = Op.KILL if r.reason is SkipReason.DRY_RUN else None
                outcomes.append(
                    FindingOutcome(decision.finding, r.outcome, r.reason, r.error, would)
                )
            elif decision.op is Op.EXTEND:
                outcomes.append(self._extend(plan, decision))
            else:
                outcomes.append(FindingOutcome(decision.finding, Outcome.SKIPPED, decision.reason))
        report = ActionReport(plan.settings.action, dry_run, tuple(outcomes))
        if plan.settings.action is not ActionKind.KILL or dry_run:
            return report
        done = [i for i, o in enumerate(outcomes) if o.outcome is Outcome.KILLED]
        if not done:
            return report.replace(kills=KillSummary())
        paired = tuple((i, up) for i in done if (up := outcomes[i].finding.upstream) is not None)
        if not paired and not watch_unpaired:
            return report.replace(kills=KillSummary(killed=len(done)))
        check = UpstreamCheck(
            paired=paired,
            unpaired_kills=len(done) - len(paired) if watch_unpaired else 0,
            uids=frozenset(d.finding.socket.uid for d in unpaired),
            baseline=baseline,
            capture_ports=plan.capture_ports,
            due_after_seconds=UPSTREAM_DUE_SECONDS,
        )
        return report.replace(pending=check)

    def verify(self, report: ActionReport, *, final: bool = True) -> ActionReport:
        """One CLOSE_WAIT dump: have the killed sockets' upstream legs closed? (no sleeping)

        With ``final`` False, a check that is not complete yet stays pending.
        """
        check = report.pending
        if check is None:
            return report
        try:
            status = verify_upstreams(
                self._diag,
                paired_legs=[up for _, up in check.paired],
                unpaired_kills=check.unpaired_kills,
                uids=check.uids,
                baseline=check.baseline,
                capture_ports=check.capture_ports,
            )
        except OSError:
            if not final:
                return report
            # Nothing verified: nothing may be claimed closed.
            status = UpstreamStatus(frozenset(), 0, 0)
        closed = {i for i, up in check.paired if up.cookie in status.closed}
        done = len(closed) == len(check.paired) and status.unpaired_closed >= check.unpaired_kills
        if not done and not final:
            return report
        summary = KillSummary(
            killed=report.killed,
            paired=len(check.paired),
            paired_closed=len(closed),
            unpaired_closed=status.unpaired_closed,
            unpaired_candidates=status.unpaired_candidates,
        )
        outcomes = list(report.outcomes)
        for i, _up in check.paired:
            outcomes[i] = dataclasses.replace(outcomes[i], upstream_closed=i in closed)
        return report.replace(outcomes=tuple(outcomes), kills=summary, pending=None)

    def _current(self, sock: SocketRecord) -> SocketRecord | None:
        """The socket as the kernel has it now, by tuple *and cookie* (None: gone)."""
        current: SocketRecord | None = self._diag.get(sock)
        return current

    # -- extend ---------------------------------------------------------------

    def _extend(self, plan: Plan, decision: Decision) -> FindingOutcome:
        finding = decision.finding
        target = plan.settings.close_wait_timeout
        reply = finding.socket.nat_reply_tuple
        try:
            current = self._current(finding.socket)
            entry_now = self._ct.get_by_reply(reply)
        except OSError as exc:
            return FindingOutcome(finding, Outcome.FAILED, error=errno_name(exc.errno))
        reason = recheck_extend(decision, current, entry_now, plan.capture_ports, target)
        before = entry_now.timeout if entry_now is not None else None
        if reason is not None:
            return FindingOutcome(finding, Outcome.SKIPPED, reason, timeout_before=before)
        assert entry_now is not None
        if plan.settings.dry_run:
            return FindingOutcome(
                finding, Outcome.SKIPPED, SkipReason.DRY_RUN, would=Op.EXTEND, timeout_before=before
            )
        try:
            self._ct.update(entry_now, timeout=target)
            after_entry: ConntrackEntry | None = self._ct.get_by_reply(reply)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return FindingOutcome(
                    finding, Outcome.SKIPPED, SkipReason.ENTRY_GONE, timeout_before=before
                )
            return FindingOutcome(
                finding, Outcome.FAILED, error=errno_name(exc.errno), timeout_before=before
            )
        return FindingOutcome(
            finding,
            Outcome.EXTENDED,
            timeout_before=before,
            timeout_after=after_entry.timeout if after_entry is not None else None,
        )
