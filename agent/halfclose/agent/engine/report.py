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
``kill_summary``, ``conntrack_patch``).  ``to_json_dict`` builds the
document as plain dicts and lists; ``json_chunks`` writes the same compact
text piece by piece (what the CLI prints: at 20k findings the dicts and the
whole text were ~25 MB of its peak RSS).
An unproven finding's ``reason`` is always the proof's (``not-nat-captured``,
``entry-removed-early``, ...): nothing acts on it, so no action reason is due.
Additive fields: ``capture`` (how part 2 was shown: rule, conntrack, tproxy)
and ``silence_seconds`` (part 4's measure) per finding; ``min_silence_seconds``
(part 4's bar in this netns) at the top.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from halfclose.agent.core.model import Endpoint, Finding, Kind, Outcome, SocketRecord, TcpState
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

    def host(self, ep: Endpoint) -> str:
        """The spelling of ``ep`` up to its last colon (address, brackets)."""
        host = self._hosts.get(ep.ip)
        if host is None:
            full = str(ep)  # the one spelling rule (model.Endpoint.__str__)
            host = full[: full.rfind(":")]
            self._hosts[ep.ip] = host
        return host

    def __call__(self, ep: Endpoint) -> str:
        return f"{self.host(ep)}:{ep.port}"


def finding_dict(
    f: Finding, outcome: FindingOutcome | None = None, spell: _Spell | None = None
) -> dict[str, Any]:
    out = _base_dict(f, spell or _Spell())
    if outcome is not None:
        out.update(outcome.to_json_fields())
    if f.reason is not None:
        out["reason"] = f.reason.value  # an unproven finding: the proof's missing part
    return out


def _base_dict(f: Finding, ep: _Spell) -> dict[str, Any]:
    """A finding's own fields (before its outcome's and its proof's reason)."""
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
    return out


_NONE = Outcome.NONE.value


def _head(result: ScanResult) -> dict[str, Any]:
    """The document's fields before ``findings``."""
    return {
        "netns": result.netns,
        "capture_ports": list(result.capture_ports),
        "sockets_examined": result.sockets_examined,
        "duration_seconds": round(result.duration_seconds, 6),
    }


def _tail(result: ScanResult, report: ActionReport | None) -> dict[str, Any]:
    """The document's fields after ``findings``."""
    tail: dict[str, Any] = {
        "warnings": list(result.warnings),
        "min_silence_seconds": result.timeouts.shortest if result.timeouts else None,
    }
    if report is not None:
        tail.update(report.extra_json())
    return tail


def to_json_dict(result: ScanResult, report: ActionReport | None = None) -> dict[str, Any]:
    of = report.by_cookie if report is not None else {}
    spell = _Spell()
    doc = _head(result)
    doc["findings"] = [finding_dict(f, of.get(f.socket.cookie), spell) for f in result.findings]
    doc.update(_tail(result, report))
    return doc


# What ``json.dumps(..., separators=(",", ":"))`` does with a str (ensure_ascii:
# the C function itself) and with any other value.
_string = json.encoder.encode_basestring_ascii
_compact = json.JSONEncoder(separators=(",", ":")).encode


def _number(x: float | None) -> str:
    if x is None:
        return "null"
    # json spells a finite float as repr() does; NaN/Infinity its own way.
    return repr(x) if x - x == 0 else _compact(x)


class _Writer:
    """One finding's compact JSON, as text: what ``_compact(finding_dict(...))`` gives.

    At 20k findings building a dict per finding and encoding it was ~14 us a
    finding; here a finding is one f-string over memoised pieces (the
    endpoint hosts, process names and enum values of a pod repeat), and the
    outcome's fields are encoded once per distinct set of them.  Anything
    this shape does not cover (an outcome field that would replace a base
    field) takes the dict path, so the text stays the same by construction.
    """

    __slots__ = ("_base", "_hosts", "_outcomes", "_spell", "_states", "_strings")

    def __init__(self, spell: _Spell, base_keys: frozenset[str]) -> None:
        self._spell = spell
        self._base = base_keys  # the keys finding_dict sets before the outcome's
        # id(address) -> (address, '"HOST:'): an ipaddress object hashes in
        # Python (hex()), an id does not; the address is kept in the value so
        # its id cannot be reused while the memo lives.
        self._hosts: dict[int, tuple[object, str]] = {}
        self._strings: dict[str, str] = {}  # str (a process name, a StrEnum) -> JSON
        self._states: dict[TcpState, str] = {}
        self._outcomes: dict[object, tuple[str, str] | None] = {}

    def _str(self, text: str) -> str:
        out = self._strings.get(text)
        if out is None:
            # A StrEnum member is its value (Kind.LEAKED == "leaked", same hash):
            # either spelling finds the same entry and the same text.
            out = self._strings[text] = _string(str(text))
        return out

    def _state(self, state: TcpState) -> str:
        out = self._states.get(state)
        if out is None:
            out = self._states[state] = _string(state.ss_name)
        return out

    def _ep(self, ep: Endpoint) -> str:
        known = self._hosts.get(id(ep.ip))
        if known is None:
            # '"HOST:' with JSON escapes; a port is digits, which need none.
            known = self._hosts[id(ep.ip)] = (ep.ip, _string(self._spell.host(ep) + ":")[:-1])
        return f'{known[1]}{ep.port}"'

    def _outcome(self, f: Finding, outcome: FindingOutcome | None) -> tuple[str, str] | None:
        """(action, the fields after ``silence_seconds``) as JSON text; None: not this shape."""
        fields = outcome.to_json_fields() if outcome is not None else {}
        key = (tuple(fields.items()), f.reason)
        try:
            return self._outcomes[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable field value: encode without the memo
            return self._encode_outcome(f, fields)
        text = self._outcomes[key] = self._encode_outcome(f, fields)
        return text

    def _encode_outcome(self, f: Finding, fields: dict[str, object]) -> tuple[str, str] | None:
        action = fields.pop("action", _NONE)
        if not self._base.isdisjoint(fields) or (f.reason is not None and "reason" in fields):
            return None  # a field the dict would overwrite in place
        extra = "".join(f",{_string(k)}:{_compact(v)}" for k, v in fields.items())
        if f.reason is not None:
            extra += f',"reason":{self._str(f.reason.value)}'
        return _compact(action), extra

    def __call__(self, f: Finding, outcome: FindingOutcome | None) -> str:
        tail = self._outcome(f, outcome)
        if tail is None:
            return _compact(finding_dict(f, outcome, self._spell))
        action, extra = tail
        sock = f.socket
        owner = f.owner
        up = f.upstream
        ep = self._ep
        upstream = (
            f'{{"local":{ep(up.local)},"peer":{ep(up.peer)},"state":{self._state(up.state)}}}'
            if up is not None
            else "null"
        )
        return (
            f'{{"kind":{self._str(f.kind)},"state":{self._state(sock.state)},'
            f'"local":{ep(sock.local)},"peer":{ep(sock.peer)},'
            f'"idle_seconds":{_number(_idle(sock))},'
            f'"pid":{"null" if owner is None else int.__repr__(owner.pid)},'
            f'"process":{"null" if owner is None else self._str(owner.process)},'
            f'"upstream":{upstream},"action":{action},'
            f'"capture":{"null" if f.capture is None else self._str(f.capture)},'
            f'"silence_seconds":{_number(_silence(sock))}'
            f"{extra}}}"
        )


def json_chunks(
    result: ScanResult, report: ActionReport | None = None, batch: int = 1024
) -> Iterator[str]:
    """The compact JSON document, in pieces of ``batch`` findings.

    ``"".join(json_chunks(r, a))`` equals ``json.dumps(to_json_dict(r, a),
    separators=(",", ":"))`` character for character (the tests hold it to
    that on a real scan).  Written piece by piece, the document never exists
    whole: at 20k findings neither 20k dicts (~18 MB) nor the 6 MB text and
    its copies are held, and it is built in about half the CPU time (at 20k: 135 vs 282 ms).
    """
    head, tail = _head(result), _tail(result, report)
    if not head.keys().isdisjoint(tail) or "findings" in tail:
        yield _compact(to_json_dict(result, report))  # an added field replaces one: the dict's way
        return
    of = report.by_cookie if report is not None else {}
    findings = result.findings
    spell = _Spell()
    write = _Writer(spell, frozenset(_base_dict(findings[0], spell)) if findings else frozenset())
    if findings:
        # The writer spells finding_dict's layout a second time; should the
        # two ever differ, the dict's way is taken (slower, never different).
        first = findings[0]
        if write(first, of.get(first.socket.cookie)) != _compact(
            finding_dict(first, of.get(first.socket.cookie), spell)
        ):
            yield _compact(to_json_dict(result, report))
            return
    yield _compact(head)[:-1] + ',"findings":['
    for start in range(0, len(findings), batch):
        piece = ",".join(
            [write(f, of.get(f.socket.cookie)) for f in findings[start : start + batch]]
        )
        yield piece if start == 0 else "," + piece
    yield "]," + _compact(tail)[1:]


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
    return "\n".join(table_lines(result, report))


def table_lines(result: ScanResult, report: ActionReport | None = None) -> Iterator[str]:
    """``render_table``'s lines, one at a time (the CLI writes them as they come).

    Endpoints are spelled through one memo (at 20k findings ``str(Endpoint)``
    per cell was most of the table's time) and the rows are kept as tuples
    only until their widths are known: the lines and the text are never all
    held at once.
    """
    outcomes = report.by_cookie if report is not None and report.action != "report" else {}
    n = counts(result)
    ports = ",".join(map(str, result.capture_ports)) or "none"
    tally = f"{n[Kind.LEAKED]} leaked, {n[Kind.AT_RISK]} at-risk"
    if n[Kind.COLLISION]:
        tally = f"{n[Kind.COLLISION]} collision, " + tally
    if n[Kind.UNPROVEN]:
        tally += f", {n[Kind.UNPROVEN]} unproven (never acted on)"
    yield (
        f"netns {result.netns}: capture ports {ports}; "
        f"{result.sockets_examined} half-closed sockets examined in "
        f"{result.duration_seconds * 1000:.1f} ms; {tally}"
    )
    for w in result.warnings:
        yield f"warning: {w}"
    if not result.findings:
        return
    header = (
        "Kind",
        "State",
        "Local Address:Port",
        "Peer Address:Port",
        "Idle",
        "Process",
        "Upstream (local -> peer state)",
    )
    show_action = bool(outcomes)
    ep = _Spell()
    kinds: dict[tuple[Kind, object], str] = {}
    rows: list[tuple[str, ...]] = []
    for f in result.findings:
        up = f.upstream
        kind = kinds.get((f.kind, f.reason))
        if kind is None:
            kind = kinds[f.kind, f.reason] = (
                f"{f.kind} ({f.reason})" if f.reason is not None else str(f.kind)
            )
        row: tuple[str, ...] = (
            kind,
            f.socket.state.ss_name,
            ep(f.socket.local),
            ep(f.socket.peer),
            _idle_text(f.socket),
            _process(f),
            f"{ep(up.local)} -> {ep(up.peer)} {up.state.ss_name}" if up else "-",
        )
        if show_action:
            o = outcomes.get(f.socket.cookie)
            text = o.action.value if o else _NONE
            if o and o.error:
                text += f" ({o.error})"
            elif o and o.reason and f.reason is None:
                text += f" ({o.reason.value})"
            row += (text,)
        rows.append(row)
    cols = [*header, "Action"] if show_action else list(header)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths).format
    yield fmt(*cols).rstrip()
    for r in rows:
        yield fmt(*r).rstrip()


def render_notes(report: ActionReport | None) -> list[str]:
    """Lines a person should read after the table (a netns-wide change, how to undo it)."""
    if report is None:
        return []
    return report.notes()
