"""Deciding what to do with each finding (pure; docs/remediation.md).

This code decides which sockets in other people's pods get destroyed, so the
rules are few, explicit and all here:

- ``kill`` only a socket the four-part proof (``classify``) called *leaked* or
  *collision*, still FIN_WAIT2, owned, examined, carrying a socket cookie, and at
  most ``max_kills`` of them per scan.  Collisions go first and regardless of
  ``min_idle_seconds`` (the app's new connection hangs until the stale socket
  goes, istio#43301); leaks must be idle at least ``min_idle_seconds``.
- ``extend`` only the entry of an *at-risk* socket whose entry is in
  CLOSE_WAIT (the state whose timer forms the leak); never a collision's
  entry (it is the app's new connection).
- ``unproven`` findings and anything else are skipped with a reason a person
  can read.

``recheck_kill`` / ``recheck_extend`` repeat the proof against what the kernel
says right before acting: a socket can close, receive a packet, or its entry
vanish or reappear, between the scan and the action.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from halfclose.agent.core.model import (
    Capture,
    ConntrackEntry,
    Finding,
    Kind,
    SocketRecord,
    TcpState,
)
from halfclose.errors import UserError

# Why 60 s: under the default nf_conntrack_tcp_timeout_close_wait (60 s) a
# socket cannot be leaked by this mechanism before it has been idle that long
# (the entry only expires after 60 s without packets), so the default costs
# nothing for real leaks.  A "leaked" socket younger than that means something
# unusual removed the entry (a conntrack flush, table pressure), and then the
# app's next *data* segment can still be picked up mid-stream by conntrack
# (nf_conntrack_tcp_loose) and re-NATed to the proxy: waiting one more scan is
# cheap, destroying a connection that would have recovered is not.
DEFAULT_MIN_IDLE_SECONDS = 60.0

# Bounds the blast radius of a bug (or a surprise) per scan; the rest of a
# large backlog goes on the next scans.  Field reports show ~1,200 leaked
# pairs per pod, so a backlog clears in a handful of scans.
DEFAULT_MAX_KILLS = 200

# What an extended entry (or a patched netns) gets as its CLOSE_WAIT timeout:
# Envoy's tcp_proxy idle timeout.  Past it the proxy closes the socket itself,
# so holding the entry longer protects nothing.
DEFAULT_CLOSE_WAIT_TIMEOUT = 3600

# The kernel clamps conntrack timeouts to INT_MAX jiffies; keep far below.
MAX_CLOSE_WAIT_TIMEOUT = 7 * 24 * 3600


class ActionKind(enum.StrEnum):
    REPORT = "report"
    KILL = "kill"
    EXTEND_CONNTRACK = "extend-conntrack"
    PATCH_CONNTRACK = "patch-conntrack"


class Op(enum.StrEnum):
    """What the plan does with one finding."""

    NONE = "none"
    KILL = "kill"
    EXTEND = "extend"


class SkipReason(enum.StrEnum):
    """Why a finding was left alone (the JSON ``reason`` field)."""

    REPORT_ONLY = "report-only"
    NETNS_WIDE = "netns-wide-action"  # patch-conntrack acts on the netns, not on sockets
    NOT_LEAKED = "not-leaked"  # kill asked; the NAT entry is still alive
    UNPROVEN = "unproven"  # part of the proof is missing: never acted on
    NOT_AT_RISK = "not-at-risk"  # extend asked; the entry is gone already (kill it)
    NOT_FIN_WAIT2 = "not-fin-wait-2"
    NOT_CAPTURE_PORT = "not-capture-port"
    ORPHAN = "orphan"  # no owning process: the kernel's FIN_WAIT2 timer handles it
    NO_COOKIE = "no-cookie"  # SOCK_DESTROY without a cookie can hit the listener
    IDLE_UNKNOWN = "idle-unknown"
    TOO_YOUNG = "too-young"
    OVER_MAX_KILLS = "over-max-kills"
    ENTRY_NOT_CLOSE_WAIT = "entry-not-close-wait"
    FIXED_TIMEOUT = "fixed-timeout"  # the kernel refuses timeout changes on such entries
    DRY_RUN = "dry-run"
    # Found by the re-check right before acting:
    ALREADY_GONE = "already-gone"
    STATE_CHANGED = "state-changed"
    ENTRY_REAPPEARED = "entry-reappeared"
    NOT_SILENT = "not-silent"  # a packet moved since the scan: part 4 no longer holds
    ENTRY_GONE = "entry-gone"
    LONG_ENOUGH = "timeout-long-enough"  # never shorten an entry's timeout


@dataclass(frozen=True, slots=True)
class ActionSettings:
    """What the person asked for (``halfclose scan --action ...``)."""

    action: ActionKind = ActionKind.REPORT
    min_idle_seconds: float = DEFAULT_MIN_IDLE_SECONDS
    max_kills: int = DEFAULT_MAX_KILLS
    dry_run: bool = False
    close_wait_timeout: int = DEFAULT_CLOSE_WAIT_TIMEOUT

    def __post_init__(self) -> None:
        if self.min_idle_seconds < 0:
            raise UserError(f"--min-idle must be >= 0, not {self.min_idle_seconds:g}")
        if self.max_kills < 0:
            raise UserError(f"--max-kills must be >= 0, not {self.max_kills}")
        if not 1 <= self.close_wait_timeout <= MAX_CLOSE_WAIT_TIMEOUT:
            raise UserError(
                f"--close-wait-timeout must be 1..{MAX_CLOSE_WAIT_TIMEOUT} seconds, "
                f"not {self.close_wait_timeout}"
            )


@dataclass(frozen=True, slots=True)
class Decision:
    finding: Finding
    op: Op
    reason: SkipReason | None = None  # set exactly when op is NONE


@dataclass(frozen=True, slots=True)
class Plan:
    settings: ActionSettings
    capture_ports: frozenset[int]
    decisions: tuple[Decision, ...]

    @property
    def kills(self) -> list[Decision]:
        return [d for d in self.decisions if d.op is Op.KILL]

    @property
    def extends(self) -> list[Decision]:
        return [d for d in self.decisions if d.op is Op.EXTEND]

    def capped(self, limit: int) -> Plan:
        """This plan with at most ``limit`` kills, by the same priority as ``max_kills``.

        The agent plans once, asks its node-wide budget for ``len(kills)``, and
        caps the plan at what was granted: the rest waits for the next scan.
        """
        kills = self.kills
        if len(kills) <= limit:
            return self
        keep = {id(d) for d in sorted(kills, key=lambda d: _kill_priority(d.finding))[:limit]}
        decisions = tuple(
            d
            if d.op is not Op.KILL or id(d) in keep
            else Decision(d.finding, Op.NONE, SkipReason.OVER_MAX_KILLS)
            for d in self.decisions
        )
        return Plan(self.settings, self.capture_ports, decisions)


def _socket_guard(
    sock: SocketRecord, capture_ports: Collection[int], capture: Capture | None = None
) -> SkipReason | None:
    """The rules every action shares: only owned FIN_WAIT2 proxy sockets, with a cookie.

    A TPROXY socket keeps the connection's original port, so it passes the
    port rule by being transparent where the proof says TPROXY captures it.
    """
    if sock.state is not TcpState.FIN_WAIT2:
        return SkipReason.NOT_FIN_WAIT2
    tproxied = capture is Capture.TPROXY and sock.transparent
    if sock.local.port not in capture_ports and not tproxied:
        return SkipReason.NOT_CAPTURE_PORT
    if sock.orphan:
        return SkipReason.ORPHAN
    if sock.cookie == 0:
        return SkipReason.NO_COOKIE
    return None


def _kill_reason(
    finding: Finding, capture_ports: Collection[int], settings: ActionSettings
) -> SkipReason | None:
    if finding.kind is Kind.UNPROVEN:
        return SkipReason.UNPROVEN
    if not _mapping_gone(finding.kind, finding.entry):
        return SkipReason.NOT_LEAKED
    if finding.capture is None or finding.min_silence_seconds is None:
        return SkipReason.UNPROVEN  # not a finding the proof produced
    guard = _socket_guard(finding.socket, capture_ports, finding.capture)
    if guard is not None:
        return guard
    if finding.kind is Kind.COLLISION:
        return None  # the app is hanging on it now: no minimum idle
    idle = finding.socket.idle_seconds
    if idle is None:
        return SkipReason.IDLE_UNKNOWN
    if idle < settings.min_idle_seconds:
        return SkipReason.TOO_YOUNG
    return None


def _mapping_gone(kind: Kind, entry: ConntrackEntry | None) -> bool:
    """Part 3 as the kinds state it: no entry (leaked) or a new connection's (collision)."""
    if kind is Kind.LEAKED:
        return entry is None
    if kind is Kind.COLLISION:
        return entry is not None and entry.opening
    return False


def _extend_reason(finding: Finding, capture_ports: Collection[int]) -> SkipReason | None:
    if finding.kind is Kind.UNPROVEN:
        return SkipReason.UNPROVEN
    if finding.kind is not Kind.AT_RISK or finding.entry is None or finding.entry.opening:
        return SkipReason.NOT_AT_RISK
    guard = _socket_guard(finding.socket, capture_ports, finding.capture)
    if guard is not None:
        return guard
    return _entry_guard(finding.entry)


def _entry_guard(entry: ConntrackEntry) -> SkipReason | None:
    if entry.tcp_state != "CLOSE_WAIT":
        return SkipReason.ENTRY_NOT_CLOSE_WAIT
    if entry.fixed_timeout:
        return SkipReason.FIXED_TIMEOUT
    return None


def _kill_priority(f: Finding) -> tuple[bool, float]:
    """Collisions first (an app hangs on each), then the leaks idle longest."""
    return (f.kind is not Kind.COLLISION, -(f.socket.idle_seconds or 0.0))


def make_plan(
    findings: Iterable[Finding], capture_ports: Collection[int], settings: ActionSettings
) -> Plan:
    """One decision per finding, in the findings' order.

    When more sockets qualify for a kill than ``max_kills`` allows,
    collisions go first (an app is hanging on each), then the leaks idle
    longest: they are the surest leaks and the oldest damage.
    """
    ports = frozenset(capture_ports)
    items = list(findings)
    decisions: list[Decision] = []
    if settings.action is ActionKind.KILL:
        # Each finding judged once; the priority sort only when the cap bites
        # (at 20k leaks both were ~2/3 of the plan's time).
        reasons = [_kill_reason(f, ports, settings) for f in items]
        eligible = [f for f, reason in zip(items, reasons, strict=True) if reason is None]
        chosen: set[int] | None = None
        if len(eligible) > settings.max_kills:
            eligible.sort(key=_kill_priority)
            chosen = {id(f) for f in eligible[: settings.max_kills]}
        for f, judged in zip(items, reasons, strict=True):
            reason = judged
            if reason is None and chosen is not None and id(f) not in chosen:
                reason = SkipReason.OVER_MAX_KILLS
            decisions.append(
                Decision(f, Op.KILL) if reason is None else Decision(f, Op.NONE, reason)
            )
    elif settings.action is ActionKind.EXTEND_CONNTRACK:
        for f in items:
            reason = _extend_reason(f, ports)
            decisions.append(
                Decision(f, Op.EXTEND) if reason is None else Decision(f, Op.NONE, reason)
            )
    else:
        reason = (
            SkipReason.NETNS_WIDE
            if settings.action is ActionKind.PATCH_CONNTRACK
            else SkipReason.REPORT_ONLY
        )
        decisions = [Decision(f, Op.NONE, reason) for f in items]
    return Plan(settings, ports, tuple(decisions))


def recheck_kill(
    decision: Decision,
    current: SocketRecord | None,
    entry_now: ConntrackEntry | None,
    capture_ports: Collection[int],
) -> SkipReason | None:
    """Is the kill still right, given the socket and entry as they are now?

    ``current`` is the socket re-read by tuple *and cookie* (None: gone);
    ``entry_now`` the entry looked up again by the socket's (normalized) NAT
    reply tuple.  The proof's parts are held again: part 1 (state, cookie,
    owner), part 2 (the capture the scan showed, on the same port), part 3
    (no entry, or only a new connection's opening one) and part 4 (still
    silent for the netns's shortest half-closed timeout).
    """
    finding = decision.finding
    planned = finding.socket
    if current is None:
        return SkipReason.ALREADY_GONE
    if current.cookie != planned.cookie:
        # The tuple now names another socket (the port was reused): ours is gone.
        return SkipReason.ALREADY_GONE
    if finding.kind is Kind.UNPROVEN or finding.capture is None:
        return SkipReason.UNPROVEN
    guard = _socket_guard(current, capture_ports, finding.capture)
    if guard is SkipReason.NOT_FIN_WAIT2:
        return SkipReason.STATE_CHANGED
    if guard is not None:
        return guard
    if entry_now is not None and not entry_now.opening:
        return SkipReason.ENTRY_REAPPEARED
    silence = current.silence_seconds
    if finding.min_silence_seconds is None or silence is None:
        return SkipReason.UNPROVEN
    if silence < finding.min_silence_seconds:
        return SkipReason.NOT_SILENT
    return None


def recheck_extend(
    decision: Decision,
    current: SocketRecord | None,
    entry_now: ConntrackEntry | None,
    capture_ports: Collection[int],
    target_timeout: int,
) -> SkipReason | None:
    """Is extending still right?  The entry must be the one the scan saw.

    An entry with at least ``target_timeout`` seconds left is left alone: an
    extension must never shorten what someone (a patched netns) gave it.
    """
    planned = decision.finding.socket
    if current is None or current.cookie != planned.cookie:
        return SkipReason.ALREADY_GONE
    guard = _socket_guard(current, capture_ports, decision.finding.capture)
    if guard is SkipReason.NOT_FIN_WAIT2:
        return SkipReason.STATE_CHANGED
    if guard is not None:
        return guard
    if entry_now is None:
        return SkipReason.ENTRY_GONE
    if entry_now.opening:
        # A new connection holds the tuple now (istio#43301): never extend it.
        return SkipReason.STATE_CHANGED
    seen = decision.finding.entry
    if seen is not None and seen.entry_id and entry_now.entry_id != seen.entry_id:
        # Same reply tuple, different entry: not the connection the scan judged.
        return SkipReason.STATE_CHANGED
    guard = _entry_guard(entry_now)
    if guard is not None:
        return guard
    if entry_now.timeout >= target_timeout:
        return SkipReason.LONG_ENOUGH
    return None
