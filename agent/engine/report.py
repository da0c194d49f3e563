"""ScanResult -> the JSON contract of design.md §4, and a table for people (like ``ss``).

JSON shape (a contract: users' scripts read it)::

    {"netns", "capture_ports": [int], "sockets_examined": int,
     "duration_seconds": float, "findings": [{"kind", "state", "local", "peer",
     "idle_seconds", "pid", "process", "upstream": {"local", "peer", "state"} | null,
     "action": "none" | "killed" | "extended" | "failed", "error"?}]}

Endpoints and states are spelled as ``ss`` prints them.  Actions are the
remediation's business: it passes each finding's outcome in by socket cookie.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from halfclose.agent.core.model import Finding, Kind, Outcome, SocketRecord
from halfclose.agent.engine.scan import ScanResult


@dataclass(frozen=True, slots=True)
class FindingOutcome:
    """What an action did to one finding (absent: ``action`` is "none")."""

    action: Outcome
    error: str | None = None
    reason: str | None = None


Outcomes = Mapping[int, FindingOutcome]  # keyed by the finding's socket cookie


def _idle(sock: SocketRecord) -> float | None:
    idle = sock.idle_seconds
    return None if idle is None else round(idle, 3)


def finding_dict(f: Finding, outcome: FindingOutcome | None = None) -> dict[str, Any]:
    up = f.upstream
    out: dict[str, Any] = {
        "kind": str(f.kind),
        "state": f.socket.state.ss_name,
        "local": str(f.socket.local),
        "peer": str(f.socket.peer),
        "idle_seconds": _idle(f.socket),
        "pid": f.owner.pid if f.owner else None,
        "process": f.owner.process if f.owner else None,
        "upstream": (
            {"local": str(up.local), "peer": str(up.peer), "state": up.state.ss_name}
            if up is not None
            else None
        ),
        "action": str(outcome.action) if outcome else str(Outcome.NONE),
    }
    if outcome and outcome.error:
        out["error"] = outcome.error
    if outcome and outcome.reason:
        out["reason"] = outcome.reason
    return out


def to_json_dict(result: ScanResult, outcomes: Outcomes | None = None) -> dict[str, Any]:
    outcomes = outcomes or {}
    return {
        "netns": result.netns,
        "capture_ports": list(result.capture_ports),
        "sockets_examined": result.sockets_examined,
        "duration_seconds": round(result.duration_seconds, 6),
        "findings": [finding_dict(f, outcomes.get(f.socket.cookie)) for f in result.findings],
        "warnings": list(result.warnings),
    }


def _process(f: Finding) -> str:
    if f.owner is None:
        return "-"
    return f'users:(("{f.owner.process}",pid={f.owner.pid},fd={f.owner.fd}))'


def _idle_text(sock: SocketRecord) -> str:
    idle = sock.idle_seconds
    return "-" if idle is None else f"{idle:.1f}s"


def render_table(result: ScanResult, outcomes: Outcomes | None = None) -> str:
    """A summary line, then one row per finding in ``ss`` spelling."""
    outcomes = outcomes or {}
    leaked = sum(1 for f in result.findings if f.kind is Kind.LEAKED)
    at_risk = len(result.findings) - leaked
    ports = ",".join(map(str, result.capture_ports)) or "none"
    lines = [
        f"netns {result.netns}: capture ports {ports}; "
        f"{result.sockets_examined} half-closed sockets examined in "
        f"{result.duration_seconds * 1000:.1f} ms; {leaked} leaked, {at_risk} at-risk"
    ]
    lines.extend(f"warning: {w}" for w in result.warnings)
    if not result.findings:
        return "\n".join(lines)
    header = (
        "Kind",
        "State",
        "Local Address:Port",
        "Peer Address:Port",
        "Idle",
        "Process",
        "Upstream (local -> peer state)",
    )
    rows = []
    show_action = bool(outcomes)
    for f in result.findings:
        up = f.upstream
        row = [
            str(f.kind),
            f.socket.state.ss_name,
            str(f.socket.local),
            str(f.socket.peer),
            _idle_text(f.socket),
            _process(f),
            f"{up.local} -> {up.peer} {up.state.ss_name}" if up else "-",
        ]
        if show_action:
            o = outcomes.get(f.socket.cookie)
            text = str(o.action) if o else str(Outcome.NONE)
            if o and (o.error or o.reason):
                text += f" ({o.error or o.reason})"
            row.append(text)
        rows.append(row)
    cols = [*header, "Action"] if show_action else list(header)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines.append(fmt.format(*cols).rstrip())
    lines.extend(fmt.format(*r).rstrip() for r in rows)
    return "\n".join(lines)
