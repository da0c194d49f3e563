"""When a netns needs its next reconcile (pure; docs/agent.md "When a netns is scanned").

A reconcile returns the delay until it next needs to run, the smallest of:
- the policy's scan interval (a floor of certainty: events can be lost);
- an at-risk socket's NAT entry expiry, as ctnetlink reported it, plus a
  margin (the entry goes within [timeout, timeout + 1) s of the scan: the leak
  forms then, and the kernel's GC may send the DESTROY event much later) — or,
  when later, the moment its silence reaches part 4's bar (then it is provable);
- a too-young leak coming of age (``minIdleSeconds``) under KillSockets;
- an ``entry-removed-early`` finding becoming silent long enough to complete
  its proof (part 4): reported as leaked (and acted on) as soon as it is one;
- a kill's deferred upstream verification;
- after a failure, a backoff that doubles per consecutive failure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from halfclose.agent.core.model import Finding, Kind, UnprovenReason

# How long after a predicted NAT entry expiry the scan runs.
EXPIRY_MARGIN = 0.05
# Scans are never closer together than this for one netns (predicted expiries
# are in whole seconds, so a scan "at" expiry may come a little early).
MIN_SCAN_SPACING = 0.1
# Failing netns are retried after this, doubling per failure up to the interval.
ERROR_RETRY_SECONDS = 1.0
MAX_ERROR_RETRY_SECONDS = 5.0
# Part 4's bar may sit above the shortest half-closed timeout by the
# delayed-ACK maximum (TCP_DELACK_MAX, 200 ms; core/classify.py): a scan at
# bare expiry could find the leak "entry-removed-early" and need another.
DELAYED_ACK_MARGIN_SECONDS = 0.2


@dataclass(frozen=True, slots=True)
class Timing:
    interval: float  # the policy's scanIntervalSeconds
    min_idle: float  # the policy's thresholds.minIdleSeconds
    kills: bool  # KillSockets (not dry run): a ripening leak will be acted on


# The states of an at-risk socket's entry whose timer, running out, forms the
# leak.  CLOSE_WAIT: the proxy's FIN was acked.  LAST_ACK and TIME_WAIT: the
# proxy's FIN came *again* (its ACK was lost after conntrack saw it, e.g. a
# loopback backlog drop, and TCP retransmitted it); conntrack cannot tell a
# second FIN of one side from the other side's, so the entry moves on as if
# the app had closed, while the app never did and the proxy's socket stays in
# FIN_WAIT2.  The leak then forms when that state's timer runs out (TIME_WAIT:
# 120 s by default, not CLOSE_WAIT's 60).
FORMING_STATES = frozenset({"CLOSE_WAIT", "LAST_ACK", "TIME_WAIT"})


def expiry_delay(finding: Finding) -> float | None:
    """Seconds until an at-risk socket's entry runs out (and the leak forms)."""
    entry = finding.entry
    if finding.kind is Kind.AT_RISK and entry is not None and entry.tcp_state in FORMING_STATES:
        # ctnetlink reports whole seconds left (rounded down).  For CLOSE_WAIT
        # the silence bar (``proof_delay``) places the expiry inside that
        # second; another state's timer is not the bar's: wait the whole second.
        whole = 0.0 if entry.tcp_state == "CLOSE_WAIT" else 1.0
        return entry.timeout + whole + EXPIRY_MARGIN
    return None


def expected_expiry(finding: Finding) -> float | None:
    """Seconds until an at-risk socket's entry is expected to expire.

    ctnetlink rounds the seconds left down, so the entry goes within
    [timeout, timeout + 1).  Its timer was re-armed by the connection's last
    packet, which the socket's silence dates: expiry ~ the netns's half-closed
    timeout (the silence bar less the delayed-ACK margin) minus that silence,
    kept inside the kernel's bounds.  Without it, a scan at "0 s left" would
    date the leak up to a second early and overstate its lifetime.  Another
    state's timer (``FORMING_STATES``) is not the one the bar derives from:
    its seconds left are all there is.
    """
    entry = finding.entry
    if finding.kind is not Kind.AT_RISK or entry is None or entry.tcp_state not in FORMING_STATES:
        return None
    low = float(entry.timeout)
    if entry.tcp_state != "CLOSE_WAIT":
        return low
    silence, bar = finding.socket.silence_seconds, finding.min_silence_seconds
    if silence is None or bar is None:
        return low
    return min(max(bar - DELAYED_ACK_MARGIN_SECONDS - silence, low), low + 1.0)


def proof_delay(finding: Finding) -> float | None:
    """Seconds until an at-risk socket's leak is *provable*: its entry gone, and
    part 4's silence bar reached (the bar sits a margin above the timeout, so
    a scan at expiry alone would find it ``entry-removed-early``)."""
    expiry = expiry_delay(finding)
    if expiry is None:
        return None
    silence, bar = finding.socket.silence_seconds, finding.min_silence_seconds
    if silence is None or bar is None:
        return expiry
    return max(expiry, bar - silence + EXPIRY_MARGIN)


def countdown_delay(countdown: float) -> float:
    """Seconds from an UPDATE into CLOSE_WAIT until the leak it may form is provable.

    A packet just moved (silence ~0) and the entry's timer is the CLOSE_WAIT
    timeout, at least the netns's shortest half-closed one: part 4's bar
    (shortest + the delayed-ACK margin) is reached by countdown + that margin.
    """
    return countdown + DELAYED_ACK_MARGIN_SECONDS + EXPIRY_MARGIN


def _ripening_delay(finding: Finding, timing: Timing) -> float | None:
    if finding.kind is Kind.LEAKED and timing.kills:
        idle = finding.socket.idle_seconds or 0.0
        if idle >= timing.min_idle:
            return None  # acted on already (or over the budget: the interval covers it)
        return timing.min_idle - idle + EXPIRY_MARGIN
    if finding.kind is Kind.UNPROVEN and finding.reason is UnprovenReason.ENTRY_REMOVED_EARLY:
        silence, bar = finding.socket.silence_seconds, finding.min_silence_seconds
        if silence is None or bar is None:
            return None
        return max(0.0, bar - silence) + EXPIRY_MARGIN
    return None


def finding_delay(finding: Finding, timing: Timing) -> float | None:
    """Seconds until this finding needs judging again (None: not before the interval)."""
    delay = proof_delay(finding)
    if delay is None:
        delay = _ripening_delay(finding, timing)
    return delay


def next_delay(findings: Iterable[Finding], timing: Timing) -> float:
    """Seconds until the netns's next reconcile, after a successful scan."""
    soonest = timing.interval
    for f in findings:
        delay = finding_delay(f, timing)
        if delay is not None and delay < soonest:
            soonest = delay
    return max(MIN_SCAN_SPACING, soonest)


def backoff(failures: int, interval: float) -> float:
    """Delay before retrying a netns after ``failures`` consecutive failed reconciles."""
    delay = ERROR_RETRY_SECONDS * 2.0 ** max(0, failures - 1)
    return min(delay, MAX_ERROR_RETRY_SECONDS, interval)
