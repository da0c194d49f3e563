"""Carrying out a remediation plan in one network namespace (docs/remediation.md).

Every change is preceded by a re-check against the kernel (the socket re-read
by tuple *and cookie*, its NAT entry looked up again), because a socket can
close, or an entry vanish, between the scan and the action.  The rules for
what may be touched live in the pure ``halfclose.agent.core.plan``; this
module only asks the kernel and applies them.

- kill: ``SOCK_DESTROY`` keyed by the cookie from the re-read.  ENOENT/ESTALE
  mean the socket went by itself ("already-gone"), not a failure.  Then the
  proxy's paired upstream CLOSE_WAIT socket is watched for a bounded moment:
  a proxy that closes its upstream when the downstream errors (Envoy, HAProxy)
  makes it go; any that stay are reported (per finding when the scan paired
  it, else by count in ``KillSummary``).
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

from halfclose.agent.core.model import ConntrackEntry, Endpoint, Outcome, SocketRecord, TcpState
from halfclose.agent.core.outcome import ActionReport, FindingOutcome, KillSummary, UpstreamCheck
from halfclose.agent.core.plan import (
    ActionKind,
    Decision,
    Op,
    Plan,
    SkipReason,
    recheck_extend,
    recheck_kill,
)
from halfclose.agent.kernel.conntrack import Conntrack
from halfclose.agent.kernel.sockdiag import SockDiag

# The socket is gone already: the kernel has nothing to destroy.
_GONE = frozenset({errno.ENOENT, errno.ESTALE})


# On Linux ENOTSUP == EOPNOTSUPP; the kernel's name for what SOCK_DESTROY
# answers without CONFIG_INET_DIAG_DESTROY is EOPNOTSUPP.
_PREFERRED_NAMES = {errno.EOPNOTSUPP: "EOPNOTSUPP"}


def errno_name(err: int | None) -> str:
    if err is None:
        return "EUNKNOWN"
    return _PREFERRED_NAMES.get(err) or errno.errorcode.get(err, f"errno {err}")


@dataclass(frozen=True, slots=True)
class ExecSettings:
    """How long to watch paired upstream sockets go after kills (all of them together)."""

    upstream_wait_seconds: float = 2.0
    poll_seconds: float = 0.05


def _ends(plan: Plan) -> frozenset[tuple[Endpoint, Endpoint]]:
    """Both ends of each connection being killed (a local peer is no upstream leg)."""
    return frozenset(
        (d.finding.socket.peer.normalized(), d.finding.socket.local.normalized())
        for d in plan.kills
    )


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

    def execute(self, plan: Plan) -> ActionReport:
        """One outcome per decision, in the plan's order; kills' upstream check pending."""
        outcomes: list[FindingOutcome] = []
        unpaired = [d for d in plan.kills if d.finding.upstream is None]
        uids = frozenset(d.finding.socket.uid for d in unpaired)
        baseline = (
            self._close_waits(plan.capture_ports, uids, _ends(plan))
            if unpaired and not plan.settings.dry_run
            else None
        )
        for decision in plan.decisions:
            if decision.op is Op.KILL:
                outcomes.append(self._kill(plan, decision))
            elif decision.op is Op.EXTEND:
                outcomes.append(self._extend(plan, decision))
            else:
                outcomes.append(FindingOutcome(decision.finding, Outcome.SKIPPED, decision.reason))
        report = ActionReport(plan.settings.action, plan.settings.dry_run, tuple(outcomes))
        killed = [i for i, o in enumerate(outcomes) if o.outcome is Outcome.KILLED]
        if plan.settings.action is not ActionKind.KILL or plan.settings.dry_run:
            return report
        if not killed:
            return report.replace(kills=KillSummary())
        paired = tuple((i, up) for i in killed if (up := outcomes[i].finding.upstream) is not None)
        check = UpstreamCheck(
            paired=paired,
            unpaired_kills=len(killed) - len(paired),
            uids=uids,
            baseline=baseline,
            capture_ports=plan.capture_ports,
            ends=_ends(plan),
        )
        return report.replace(pending=check)

    def verify(self, report: ActionReport, *, final: bool = True) -> ActionReport:
        """One look at the killed sockets' upstream legs (no sleeping).

        With ``final`` False, a check that is not complete yet stays pending.
        """
        check = report.pending
        if check is None:
            return report
        closed = {i for i, up in check.paired if not self._upstream_open(up)}
        paired_cookies = {up.cookie for _, up in check.paired}
        unpaired_closed = 0
        if check.unpaired_kills and check.baseline is not None:
            now = self._close_waits(check.capture_ports, check.uids, check.ends)
            if now is not None:
                unpaired_closed = len(check.baseline - now - paired_cookies)
        done = len(closed) == len(check.paired) and unpaired_closed >= check.unpaired_kills
        if not done and not final:
            return report
        summary = KillSummary(
            killed=report.killed,
            paired=len(check.paired),
            paired_closed=len(closed),
            # Closed legs beyond the unpaired kills belong to something else.
            unpaired_closed=min(unpaired_closed, check.unpaired_kills),
            unpaired_candidates=(
                len(check.baseline - paired_cookies) if check.baseline is not None else 0
            ),
        )
        outcomes = list(report.outcomes)
        for i, _up in check.paired:
            outcomes[i] = dataclasses.replace(outcomes[i], upstream_closed=i in closed)
        return report.replace(outcomes=tuple(outcomes), kills=summary, pending=None)

    def _close_waits(
        self,
        capture_ports: frozenset[int],
        uids: frozenset[int],
        ends: frozenset[tuple[Endpoint, Endpoint]],
    ) -> frozenset[int] | None:
        """Cookies of the CLOSE_WAIT sockets that may be the proxy's upstream legs."""
        try:
            _, socks = self._diag.dump([TcpState.CLOSE_WAIT])
        except OSError:
            return None  # then the count is unknown, and reported as none closed
        # The other end of a connection being killed, when it lives in this
        # netns (a client of a plain server), is no upstream leg: its going
        # away after the kill says nothing about a proxy.
        return frozenset(
            s.cookie
            for s in socks
            if s.uid in uids
            and s.local.port not in capture_ports
            and not s.orphan
            and (s.local.normalized(), s.peer.normalized()) not in ends
        )

    # -- kill ----------------------------------------------------------------

    def _current(self, sock: SocketRecord) -> SocketRecord | None:
        """The socket as the kernel has it now, by tuple *and cookie* (None: gone)."""
        current: SocketRecord | None = self._diag.get(sock)
        return current

    def _kill(self, plan: Plan, decision: Decision) -> FindingOutcome:
        finding = decision.finding
        try:
            current = self._current(finding.socket)
            entry_now = self._ct.get_by_reply(finding.socket.nat_reply_tuple) if current else None
        except OSError as exc:
            # A failed re-check must never read as "safe to kill".
            return FindingOutcome(finding, Outcome.FAILED, error=errno_name(exc.errno))
        reason = recheck_kill(decision, current, entry_now, plan.capture_ports)
        if reason is not None:
            return FindingOutcome(finding, Outcome.SKIPPED, reason)
        assert current is not None  # recheck_kill returns ALREADY_GONE otherwise
        if plan.settings.dry_run:
            return FindingOutcome(finding, Outcome.SKIPPED, SkipReason.DRY_RUN, would=Op.KILL)
        try:
            # The re-read record carries the same cookie (the re-check proved
            # it): SOCK_DESTROY can only hit this socket, never the listener.
            self._diag.destroy(current)
        except OSError as exc:
            if exc.errno in _GONE:
                return FindingOutcome(finding, Outcome.SKIPPED, SkipReason.ALREADY_GONE)
            return FindingOutcome(finding, Outcome.FAILED, error=errno_name(exc.errno))
        return FindingOutcome(finding, Outcome.KILLED)

    def _upstream_open(self, up: SocketRecord) -> bool:
        """Is the proxy's upstream socket still waiting in CLOSE_WAIT?"""
        try:
            current = self._current(up)
        except OSError:
            return True  # unknown: report it as still there rather than claim success
        return current is not None and current.state is TcpState.CLOSE_WAIT

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
