"""ScanResult -> the JSON contract of docs/detection.md, and a table for people (like ``ss``).

JSON shape (a contract: users' scripts read it)::

    {"netns", "capture_ports": [int], "sockets_examined": int,
     "duration_seconds": float, "findings": [{"kind": "leaked" | "collision" |
     "at-risk" | "unproven", "reason"? (for unproven: the missing part), "state",
     "local", "peer", "idle_seconds", "pid", "process",
     "upstream": {"local", "peer", "state"} | null,
     "action": "none" | "killed" | "extended" | "failed", "error"?}],
     "warnings": [str]}

Endpoints and states are spelled as ``ss`` prints them.  Actions are the
remediation's business: its ``ActionReport`` (one outcome per finding) is
read here as it is everywhere else; its fields are additive (``would``,
``upstream_closed``, ``timeout_before``/``timeout_after``; top level
``kill_summary``, ``conntrack_patch``).  The document is plain dicts and
lists, built once: ``json.dumps`` without indent encodes it in C.
An unproven finding's ``reason`` is always the proof's (``not-nat-captured``,
``entry-removed-early``, ...): nothing acts on it, so no action reason is due.
Additive fields: ``capture`` (how part 2 was shown: rule, conntrack, tproxy)
and ``silence_seconds`` (part 4's measure) per finding; ``min_silence_seconds``
(part 4's bar in this netns) at the top.
"""

from __future__ import annotations

from typing import Any

from halfclose.agent.core.model import Endpoint, Finding, Kind, Outcome, SocketRecord
from halfclose.agent.core.outcome import ActionReport, FindingOutcome
from halfclose.agent.engine.scan import ScanResult


def _idle(sock: SocketRecord) -> float | None:
    idle = sock.idle_seconds
    return None if idle is None else round(idle, 3)


def _silence(sock: SocketRecord) -> float | None:
    silence = sock.silence_seconds
    return None if silence is None else round(silence, 3)


class _Spell:
    """Endpoint spellings, memoised per address for one document.

    At 20k findings ``str(Endpoint)`` (``ipaddress`` formatting) was most of
    the JSON's build time; a pod's sockets share a handful of addresses.
    """

    __slots__ = ("_hosts",)

    def __init__(self) -> None:
        self._hosts: dict[object, str] = {}

    def __call__(self, ep: Endpoint) -> str:
        host = self._hosts.get(ep.ip)
        if host is None:
            full = str(ep)  # the one spelling rule (model.Endpoint.__str__)
            host = full[: full.rfind(":")]
            self._hosts[ep.ip] = host
        return f"{host}:{ep.port}"


def finding_dict(
    f: Finding, outcome: FindingOutcome | None = None, spell: _Spell | None = None
) -> dict[str, Any]:
    ep = spell or _Spell()
    up = f.upstream
    sock = f.socket
    owner = f.owner
    out: dict[str, Any] = {
        "kind": f.kind.value,
        "state": sock.state.ss_name,
        "local": ep(sock.local),
        "peer": ep(sock.peer),
        "idle_seconds": _idle(sock),
        "pid": owner.pid if owner else None,
        "process": owner.process if owner else None,
        "upstream": (
            {"local": ep(up.local), "peer": ep(up.peer), "state": up.state.ss_name}
            if up is not None
            else None
        ),
        "action": _NONE,
        "capture": f.capture.value if f.capture is not None else None,
        "silence_seconds": _silence(sock),
    }
    if outcome is not None:
        out.update(outcome.to_json_fields())
    if f.reason is not None:
        out["reason"] = f.reason.value  # an unproven finding: the proof's missing part
    return out


_NONE = Outcome.NONE.value


def to_json_dict(result: ScanResult, report: ActionReport | None = None) -> dict[str, Any]:
    of = report.by_cookie if report is not None else {}
    spell = _Spell()
    doc: dict[str, Any] = {
        "netns": result.netns,
        "capture_ports": list(result.capture_ports),
        "sockets_examined": result.sockets_examined,
        "duration_seconds": round(result.duration_seconds, 6),
        "findings": [finding_dict(f, of.get(f.socket.cookie), spell) for f in result.findings],
        "warnings": list(result.warnings),
        "min_silence_seconds": result.timeouts.shortest if result.timeouts else None,
    }
    if report is not None:
        doc.update(report.extra_json())
    return doc


def counts(result: ScanResult) -> dict[Kind, int]:
    """Findings per kind, every kind present (0 when none)."""
    out = dict.fromkeys(Kind, 0)
    for f in result.findings:
        out[f.kind] += 1
    return out


def _process(f: Finding) -> str:
    if f.owner is None:
        return "-"
    return f'users:(("{f.owner.process}",pid={f.owner.pid},fd={f.owner.fd}))'


def _idle_text(sock: SocketRecord) -> str:
    idle = sock.idle_seconds
    return "-" if idle is None else f"{idle:.1f}s"


def render_table(result: ScanResult, report: ActionReport | None = None) -> str:
    """A summary line, then one row per finding in ``ss`` spelling (then the report's notes)."""
    outcomes = report.by_cookie if report is not None and report.action != "report" else {}
    n = counts(result)
    ports = ",".join(map(str, result.capture_ports)) or "none"
    tally = f"{n[Kind.LEAKED]} leaked, {n[Kind.AT_RISK]} at-risk"
    if n[Kind.COLLISION]:
        tally = f"{n[Kind.COLLISION]} collision, " + tally
    if n[Kind.UNPROVEN]:
        tally += f", {n[Kind.UNPROVEN]} unproven (never acted on)"
    lines = [
        f"netns {result.netns}: capture ports {ports}; "
        f"{result.sockets_examined} half-closed sockets examined in "
        f"{result.duration_seconds * 1000:.1f} ms; {tally}"
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
            f"{f.kind} ({f.reason})" if f.reason is not None else str(f.kind),
            f.socket.state.ss_name,
            str(f.socket.local),
            str(f.socket.peer),
            _idle_text(f.socket),
            _process(f),
            f"{up.local} -> {up.peer} {up.state.ss_name}" if up else "-",
        ]
        if show_action:
            o = outcomes.get(f.socket.cookie)
            text = o.action.value if o else _NONE
            if o and o.error:
                text += f" ({o.error})"
            elif o and o.reason and f.reason is None:
                text += f" ({o.reason.value})"
            row.append(text)
        rows.append(row)
    cols = [*header, "Action"] if show_action else list(header)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines.append(fmt.format(*cols).rstrip())
    lines.extend(fmt.format(*r).rstrip() for r in rows)
    return "\n".join(lines)


def render_notes(report: ActionReport | None) -> list[str]:
    """Lines a person should read after the table (a netns-wide change, how to undo it)."""
    if report is None:
        return []
    return report.notes()
