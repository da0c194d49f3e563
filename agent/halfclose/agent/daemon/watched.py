"""What the agent remembers about one watched netns between reconciles (plain state).

No handles here: the kernel side holds the netns open by inode (``Kernel``),
so this is the reconciler's memory only — expiry records for leak lifetimes,
stale reply tuples for collision detection, the sysctl flag, failures for
backoff, and a kill's pending upstream verification.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from halfclose.agent.core.model import Finding, FlowTuple, Kind, Owner, UnprovenReason
from halfclose.agent.core.outcome import ActionReport
from halfclose.agent.daemon.rechecks import Rechecks
from halfclose.agent.daemon.targets import PodKey

# Remembered conntrack destroy/expiry times per netns, for leak lifetimes.
# Bounded per netns; records older than a proxy's idle timeout are useless.
MAX_EXPIRY_RECORDS = 2048
EXPIRY_RECORD_MAX_AGE = 3700.0
# The FIN_WAIT2 findings whose reply tuple a NEW entry may collide with.  Not
# at-risk ones: their entry still holds the tuple (no new entry can take it),
# and when it expires the scan scheduled for that moment finds the leak (or the
# collision) anyway.  Leaving them out keeps NEW events off in the common case
# of a busy pod under KillSockets: at-risk sockets always, leaks seldom.
STALE_KINDS = frozenset({Kind.LEAKED, Kind.COLLISION})


@dataclass(slots=True)
class WatchedNetns:
    inode: int
    path: str
    pods: list[PodKey]
    events_fd: int | None = None
    capture_ports: frozenset[int] | None = None
    sysctl_patched: bool = False  # its close_wait sysctl is raised (and recorded)
    failures: int = 0  # consecutive failed reconciles (backoff)
    # reply tuple -> wall time the entry expired (predicted or DESTROY event)
    expired_at: OrderedDict[FlowTuple, float] = field(default_factory=OrderedDict)
    # socket cookie -> wall time a scan first saw it leaked
    leaked_since: dict[int, float] = field(default_factory=dict)
    # The scan warnings last seen, so each new one is logged and counted once.
    warnings: tuple[str, ...] = ()
    # NAT reply tuples of the stale (leaked, collision, unproven) FIN_WAIT2 sockets
    # of the last scan: a NEW entry under one of them is a collision (istio#43301).
    stale_replies: frozenset[FlowTuple] = frozenset()
    watching_new: bool = False
    # Cookies of the sockets already counted (and announced) as collisions.
    collisions_seen: set[int] = field(default_factory=set)
    # Owners of reported sockets, by cookie (a /proc pass only for new ones).
    owners: dict[int, Owner | None] = field(default_factory=dict)
    # When a scan is due (the queue may also run the netns for a due upstream check).
    scan_at: float = 0.0
    # That scan is the policy interval's (routine): due re-checks and other
    # netns's urgent work go first when the loop is behind.
    scan_routine: bool = False
    # Wall time the last scan started: DESTROYs of entries known expired before
    # it need no scan of their own (the scan saw their leaks).
    scanned_wall: float = float("-inf")
    # A kill whose upstream legs are checked later (ActionReport.pending).
    unverified: ActionReport | None = None
    verify_at: float | None = None
    # Sockets whose proof is due again, re-checked without a scan (KillSockets).
    rechecks: Rechecks = field(default_factory=Rechecks)

    @property
    def owner(self) -> PodKey | None:
        """Pods sharing a netns share its sockets: the first (by name) owns the findings."""
        return self.pods[0] if self.pods else None

    def remember_stale(self, findings: list[Finding]) -> bool:
        """Keep the stale sockets' reply tuples; True when NEW events are worth watching."""
        self.stale_replies = frozenset(
            f.socket.nat_reply_tuple
            for f in findings
            if f.kind in STALE_KINDS
            # Unproven for want of evidence, not of NAT: a reuse of its port is
            # judged afresh by the scan it triggers.
            or (f.kind is Kind.UNPROVEN and f.reason is not UnprovenReason.NOT_NAT_CAPTURED)
        )
        return bool(self.stale_replies)

    def note_expiry(self, reply: FlowTuple, at: float, predicted: bool = False) -> None:
        """Remember when an entry expired (a DESTROY) or will expire (a prediction).

        A newer prediction replaces an older one (packets re-arm the timer);
        a DESTROY, reaped late by the GC, only ever moves the time earlier.
        """
        known = self.expired_at.get(reply)
        if predicted or known is None or at < known:
            self.expired_at[reply] = at
            self.expired_at.move_to_end(reply)
        while len(self.expired_at) > MAX_EXPIRY_RECORDS:
            self.expired_at.popitem(last=False)

    def prune_expiries(self, now: float) -> None:
        # Insertion order is (nearly) time order: drop from the old end.
        while self.expired_at:
            reply, at = next(iter(self.expired_at.items()))
            if at >= now - EXPIRY_RECORD_MAX_AGE:
                break
            del self.expired_at[reply]

    def lifetime(self, finding: Finding, wall: float) -> float:
        """Leak lifetime at ``wall``: from entry expiry (event or prediction), else first seen."""
        since = self.expired_at.get(finding.socket.nat_reply_tuple)
        first = self.leaked_since.get(finding.socket.cookie, wall)
        start = min(since, first) if since is not None else first
        return max(0.0, wall - start)


def new_warnings(previous: tuple[str, ...], current: tuple[str, ...]) -> list[str]:
    """The warnings of this scan that the last scan of the netns did not have.

    A warning that persists is reported once; one that went away and comes
    back is new again (someone fixed the access, then it broke again).
    """
    return [w for w in current if w not in previous]
