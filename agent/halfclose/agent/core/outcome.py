"""What a remediation did: one immutable ``ActionReport`` (docs/remediation.md).

Every exporter reads this one type: the CLI's JSON and table, the agent's
PodLeakReport status, its Events, its log lines and the metrics.  Nothing
re-derives an outcome, and "a skip reads as action none" is said once, here
(``FindingOutcome.action``).

All fields are plain data (enums, ints, strings, the core model's frozen
records), so the report can cross a process boundary as JSON (the
privileged worker) without a second, lossy shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from halfclose.agent.core.model import Finding, Outcome, SocketRecord
from halfclose.agent.core.plan import ActionKind, Op, SkipReason


@dataclass(frozen=True, slots=True)
class FindingOutcome:
    """What happened to one finding.  ``would`` is the op a dry run held back."""

    finding: Finding
    outcome: Outcome
    reason: SkipReason | None = None
    error: str | None = None  # errno name when outcome is FAILED
    would: Op | None = None
    timeout_before: int | None = None  # extend: entry timeout before/after, seconds
    timeout_after: int | None = None
    upstream_closed: bool | None = None  # kill: did the paired CLOSE_WAIT go away?

    @property
    def action(self) -> Outcome:
        """docs/detection.md ``action``: none|killed|extended|failed (a skip is "none")."""
        return Outcome.NONE if self.outcome is Outcome.SKIPPED else self.outcome

    def to_json_fields(self) -> dict[str, object]:
        """The fields this adds to a finding's JSON object (additive to the contract)."""
        out: dict[str, object] = {"action": self.action.value}
        if self.reason is not None and self.finding.reason is None:
            # An unproven finding's reason is the proof's missing part, never ours.
            out["reason"] = self.reason.value
        if self.would is not None:
            out["would"] = self.would.value
        if self.error is not None:
            out["error"] = self.error
        if self.timeout_before is not None:
            out["timeout_before"] = self.timeout_before
        if self.timeout_after is not None:
            out["timeout_after"] = self.timeout_after
        if self.upstream_closed is not None:
            out["upstream_closed"] = self.upstream_closed
        return out


@dataclass(frozen=True, slots=True)
class KillSummary:
    """Kills in one plan and what became of the proxy's upstream legs.

    Pairing a downstream socket with its upstream leg is best-effort (the
    scan says None rather than guess), so for kills without a known pair the
    check is by count: the CLOSE_WAIT sockets off the capture ports, of the
    killed sockets' uids (the proxy's), before and after the kills.
    """

    killed: int = 0
    paired: int = 0  # killed with a known upstream leg
    paired_closed: int = 0  # ... whose leg closed
    unpaired_closed: int = 0  # the proxy's CLOSE_WAIT sockets that closed, for the others
    # CLOSE_WAIT sockets that could be upstream legs of the unpaired kills
    # (same holder uid, off the capture ports) before the kills: 0 means there
    # is no proxy upstream to speak of (e.g. a server's own sockets).
    unpaired_candidates: int = 0

    @property
    def upstream_closed(self) -> int:
        return self.paired_closed + self.unpaired_closed

    @property
    def upstream_watched(self) -> int:
        """Upstream legs that could close: the known pairs, plus candidates for the rest."""
        return self.paired + min(self.unpaired_candidates, self.killed - self.paired)

    def describe(self) -> str:
        if not self.killed:
            return "killed nothing"
        what = f"killed {self.killed} leaked socket(s)"
        if not self.upstream_watched:
            # Nothing paired and no CLOSE_WAIT socket of the holder: claiming
            # "the proxy closed N upstream sockets" would describe no proxy.
            return f"{what}; no CLOSE-WAIT upstream socket of their holder was found to watch"
        return (
            f"{what}; the proxy closed {self.upstream_closed} of its CLOSE-WAIT upstream "
            f"socket(s) ({self.upstream_watched} watched)"
        )

    def to_json_dict(self) -> dict[str, int]:
        return {
            "killed": self.killed,
            "paired": self.paired,
            "upstream_closed": self.upstream_closed,
            "upstream_watched": self.upstream_watched,
        }


@dataclass(frozen=True, slots=True)
class PatchReport:
    """Before/after of one sysctl patch, restore or status call."""

    netns: str
    netns_inode: int
    operation: str  # patch | restore | status
    before: int
    after: int
    original: int | None  # the value recorded before the first patch (None: not patched)
    changed: bool
    dry_run: bool
    state_file: str

    def to_json_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        what = {"patch": "patched", "restore": "restored", "status": "is"}[self.operation]
        if self.operation == "status":
            state = (
                f"patched (original {self.original} s)"
                if self.original is not None
                else "not patched by halfclose"
            )
            return f"{self.netns}: close_wait timeout {self.before} s, {state}"
        if self.dry_run:
            return (
                f"{self.netns}: dry run: close_wait timeout would go "
                f"{self.before} -> {self.after} s"
            )
        if self.operation == "restore" and self.original is None:
            return f"{self.netns}: nothing to restore (no patch recorded); {self.after} s"
        if not self.changed:
            return f"{self.netns}: close_wait timeout already {self.after} s (nothing to do)"
        return f"{self.netns}: close_wait timeout {what} {self.before} -> {self.after} s"


@dataclass(frozen=True, slots=True)
class UpstreamCheck:
    """The upstream-leg verification of a kill, done later in one CLOSE_WAIT dump.

    A proxy closes its upstream leg a moment after its downstream socket is
    destroyed; sleeping for that in the agent's only loop thread delays every
    other netns, so the kill returns this and the reconciler calls
    ``Kernel.verify_upstreams`` once it is due.
    """

    paired: tuple[tuple[int, SocketRecord], ...]  # (outcome index, upstream leg)
    unpaired_kills: int  # kills without a known leg: checked by count
    uids: frozenset[int]  # the killed sockets' holders (the proxy's uid)
    # CLOSE_WAIT cookies (the holder's, off the capture ports) before the kills;
    # None when that dump failed (then nothing is claimed closed).
    baseline: frozenset[int] | None
    capture_ports: frozenset[int] = frozenset()
    due_after_seconds: float = 0.1


@dataclass(frozen=True, slots=True)
class ActionReport:
    """The outcome of ``remediate(plan)``: one ``FindingOutcome`` per decision, in order."""

    action: ActionKind
    dry_run: bool
    outcomes: tuple[FindingOutcome, ...] = ()
    kills: KillSummary | None = None  # kill, not a dry run: the upstream legs
    patch: PatchReport | None = None  # patch-conntrack: the netns-wide change
    pending: UpstreamCheck | None = None  # verification not done yet (see UpstreamCheck)
    _by_cookie: dict[int, FindingOutcome] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_cookie.update((o.finding.socket.cookie, o) for o in self.outcomes)

    def of(self, finding: Finding) -> FindingOutcome | None:
        return self._by_cookie.get(finding.socket.cookie)

    @property
    def by_cookie(self) -> Mapping[int, FindingOutcome]:
        return self._by_cookie

    def count(self, outcome: Outcome) -> int:
        return sum(1 for o in self.outcomes if o.outcome is outcome)

    @property
    def killed(self) -> int:
        return self.count(Outcome.KILLED)

    @property
    def extended(self) -> int:
        return self.count(Outcome.EXTENDED)

    def failures(self) -> dict[str, int]:
        """Failed actions by errno name."""
        out: dict[str, int] = {}
        for o in self.outcomes:
            if o.outcome is Outcome.FAILED:
                key = o.error or "unknown"
                out[key] = out.get(key, 0) + 1
        return out

    def replace(self, **changes: object) -> ActionReport:
        return dataclasses.replace(self, _by_cookie={}, **changes)  # type: ignore[arg-type]

    def notes(self) -> list[str]:
        """Lines a person should read after the table."""
        out: list[str] = []
        if self.kills is not None:
            out.append(self.kills.describe())
        if self.patch is not None:
            out.append(self.patch.describe())
        return out

    def extra_json(self) -> dict[str, object]:
        """Top-level JSON fields the action adds (``kill_summary``, ``conntrack_patch``)."""
        out: dict[str, object] = {}
        if self.kills is not None:
            out["kill_summary"] = self.kills.to_json_dict()
        if self.patch is not None:
            out["conntrack_patch"] = self.patch.to_json_dict()
        return out


def report_only(findings: tuple[Finding, ...] | list[Finding]) -> ActionReport:
    """The report of a scan nobody acted on (every finding: action none)."""
    return ActionReport(
        ActionKind.REPORT,
        dry_run=False,
        outcomes=tuple(
            FindingOutcome(f, Outcome.SKIPPED, SkipReason.REPORT_ONLY) for f in findings
        ),
    )
