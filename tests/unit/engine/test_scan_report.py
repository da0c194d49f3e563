"""The JSON contract (design.md §4) and the ss-like table, from a hand-built ScanResult."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable

import pytest

from halfclose.agent.core.model import (
    Capture,
    Endpoint,
    Finding,
    HalfClosedTimeouts,
    Kind,
    Outcome,
    Owner,
    SocketRecord,
    TcpState,
    UnprovenReason,
)
from halfclose.agent.core.outcome import ActionReport, FindingOutcome, KillSummary
from halfclose.agent.core.plan import ActionKind, Op, SkipReason
from halfclose.agent.engine.report import json_chunks, render_table, table_lines, to_json_dict
from halfclose.agent.engine.scan import ScanResult

FINDING_KEYS = {
    "kind",
    "state",
    "local",
    "peer",
    "idle_seconds",
    "pid",
    "process",
    "upstream",
    "action",
    # additive to design.md §4: how part 2 was shown, part 4's measure
    "capture",
    "silence_seconds",
}


def _sock(state: TcpState, local: str, peer: str, cookie: int, idle_ms: int | None) -> SocketRecord:
    return SocketRecord(
        state, Endpoint.parse(local), Endpoint.parse(peer), cookie, cookie, 1337, idle_ms, idle_ms
    )


def _result() -> ScanResult:
    leaked = _sock(TcpState.FIN_WAIT2, "127.0.0.1:15001", "192.0.2.10:40000", 1, 61250)
    upstream = _sock(TcpState.CLOSE_WAIT, "192.0.2.10:50000", "203.0.113.10:7777", 2, 61290)
    at_risk = _sock(TcpState.FIN_WAIT2, "[::ffff:127.0.0.1]:15006", "[2001:db8::9]:1", 3, None)
    return ScanResult(
        netns="hc-lab-pod0",
        capture_ports=(15001, 15006),
        sockets_examined=42,
        duration_seconds=0.0123456789,
        findings=[
            Finding(Kind.LEAKED, leaked, Owner(77, "lab-proxy", 9), None, upstream),
            Finding(Kind.AT_RISK, at_risk, None),
        ],
    )


def test_json_contract_shape_and_spelling() -> None:
    doc = to_json_dict(_result())
    json.dumps(doc)  # serialisable as is
    assert set(doc) == {
        "netns",
        "capture_ports",
        "sockets_examined",
        "duration_seconds",
        "findings",
        "warnings",  # additive to design.md §4: why findings may be incomplete
        "min_silence_seconds",  # additive: part 4's bar in this netns (None: unknown)
    }
    assert doc["warnings"] == []
    assert doc["capture_ports"] == [15001, 15006] and doc["sockets_examined"] == 42
    assert isinstance(doc["duration_seconds"], float)
    first, second = doc["findings"]
    assert set(first) == set(second) == FINDING_KEYS
    assert first == {
        "kind": "leaked",
        "state": "FIN-WAIT-2",
        "local": "127.0.0.1:15001",
        "peer": "192.0.2.10:40000",
        "idle_seconds": 61.25,
        "pid": 77,
        "process": "lab-proxy",
        "upstream": {
            "local": "192.0.2.10:50000",
            "peer": "203.0.113.10:7777",
            "state": "CLOSE-WAIT",
        },
        "action": "none",
        "capture": None,
        "silence_seconds": None,
    }
    assert second["kind"] == "at-risk" and second["local"] == "[::ffff:127.0.0.1]:15006"
    assert second["pid"] is None and second["upstream"] is None and second["idle_seconds"] is None


def test_outcomes_fill_action_and_error_by_cookie() -> None:
    r = _result()
    failed = FindingOutcome(r.findings[0], Outcome.FAILED, error="EPERM")
    doc = to_json_dict(r, ActionReport(ActionKind.KILL, False, (failed,)))
    assert doc["findings"][0]["action"] == "failed" and doc["findings"][0]["error"] == "EPERM"
    assert doc["findings"][1]["action"] == "none" and "error" not in doc["findings"][1]


def test_table_reads_like_ss() -> None:
    text = render_table(_result())
    lines = text.splitlines()
    assert lines[0].startswith("netns hc-lab-pod0: capture ports 15001,15006; 42 ")
    assert "1 leaked, 1 at-risk" in lines[0]
    assert lines[1].split()[:2] == ["Kind", "State"]
    assert 'users:(("lab-proxy",pid=77,fd=9))' in lines[2]
    assert "192.0.2.10:50000 -> 203.0.113.10:7777 CLOSE-WAIT" in lines[2]
    assert lines[3].split()[:4] == [
        "at-risk",
        "FIN-WAIT-2",
        "[::ffff:127.0.0.1]:15006",
        "[2001:db8::9]:1",
    ]


def test_empty_result_is_one_summary_line() -> None:
    r = ScanResult("x", (), 0, 0.001, [])
    assert render_table(r) == (
        "netns x: capture ports none; 0 half-closed sockets examined in 1.0 ms; 0 leaked, 0 at-risk"
    )


def test_unproven_findings_carry_the_missing_part_as_reason() -> None:
    s = _sock(TcpState.FIN_WAIT2, "192.0.2.1:8080", "192.0.2.10:40000", 5, 3000)
    f = Finding(Kind.UNPROVEN, s, None, reason=UnprovenReason.NOT_NAT_CAPTURED)
    r = ScanResult("x", (8080,), 1, 0.001, [f], timeouts=HalfClosedTimeouts(60, 120))
    # Even when an action skipped it with its own reason, the proof's reason shows.
    skipped = FindingOutcome(f, Outcome.SKIPPED, SkipReason.UNPROVEN)
    doc = to_json_dict(r, ActionReport(ActionKind.KILL, False, (skipped,)))
    (item,) = doc["findings"]
    assert (item["kind"], item["reason"], item["action"]) == (
        "unproven",
        "not-nat-captured",
        "none",
    )
    assert doc["min_silence_seconds"] == 60
    lines = render_table(r).splitlines()
    assert lines[0].endswith("0 leaked, 0 at-risk, 1 unproven (never acted on)")
    assert lines[2].startswith("unproven (not-nat-captured)  FIN-WAIT-2")


def _varied() -> tuple[ScanResult, ActionReport]:
    """Every shape a finding's JSON takes: owners or none, IPv4/IPv6/mapped, idle
    known or not, paired or not, each capture, unproven reasons, each outcome
    field, process names JSON must escape."""
    findings: list[Finding] = []
    outcomes: list[FindingOutcome] = []
    names = ["envoy", 'pro"xy\\', "zt\u00fcnnel\u2603", "tab\there", "", "\U0001f600"]
    addrs = ["192.0.2.10", "[2001:db8::9]", "[::ffff:198.51.100.7]", "203.0.113.10"]
    for i in range(40):
        idle = None if i % 7 == 3 else 1000 * i + i % 1000
        s = _sock(
            TcpState.FIN_WAIT2, f"{addrs[i % 4]}:15001", f"{addrs[-i % 4]}:{40000 + i}", i + 1, idle
        )
        up = _sock(
            TcpState.CLOSE_WAIT, f"{addrs[i % 4]}:{50000 + i}", "203.0.113.10:7777", 1000 + i, idle
        )
        owner = None if i % 5 == 4 else Owner(100 + i, names[i % len(names)], 3 + i)
        kind = (Kind.LEAKED, Kind.AT_RISK, Kind.COLLISION, Kind.UNPROVEN)[i % 4]
        reason = UnprovenReason.NOT_NAT_CAPTURED if kind is Kind.UNPROVEN else None
        capture = (None, Capture.RULE, Capture.CONNTRACK, Capture.TPROXY)[
            i % 4 if reason is None else 0
        ]
        f = Finding(kind, s, owner, None, up if i % 3 else None, reason=reason, capture=capture)
        findings.append(f)
        if i % 6 == 0:
            continue  # no outcome: action "none" from the finding alone
        outcomes.append(
            (
                FindingOutcome(f, Outcome.SKIPPED, SkipReason.REPORT_ONLY),
                FindingOutcome(f, Outcome.FAILED, error="EPERM"),
                FindingOutcome(f, Outcome.SKIPPED, SkipReason.NOT_LEAKED, would=Op.KILL),
                FindingOutcome(f, Outcome.EXTENDED, timeout_before=5, timeout_after=60),
                FindingOutcome(f, Outcome.KILLED, upstream_closed=i % 2 == 0),
            )[i % 5]
        )
    r = ScanResult(
        netns='ns "odd" \u00e9',
        capture_ports=(15001, 15006),
        sockets_examined=80,
        duration_seconds=0.1234567891,
        findings=findings,
        warnings=("rules unreadable \u2192 none",),
        timeouts=HalfClosedTimeouts(60, 120),
    )
    report = ActionReport(ActionKind.KILL, False, tuple(outcomes), kills=KillSummary(killed=3))
    return r, report


def _old_text(r: ScanResult, report: ActionReport | None) -> str:
    return json.dumps(to_json_dict(r, report), separators=(",", ":"))


def test_streamed_json_is_the_dict_renderers_text() -> None:
    r, report = _varied()
    for a in (None, report):
        for batch in (1, 7, 1024):
            chunks = list(json_chunks(r, a, batch=batch))
            assert "".join(chunks) == _old_text(r, a)
            assert len(chunks) == 2 + -(-len(r.findings) // batch)  # head, pieces, tail
    empty = ScanResult("x", (), 0, 0.001, [])
    assert "".join(json_chunks(empty)) == _old_text(empty, None)
    assert json.loads("".join(json_chunks(r, report)))["kill_summary"]["killed"] == 3


def test_an_outcome_field_that_replaces_a_base_field_keeps_the_dicts_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Should an outcome ever add a field the finding already has, the dict
    # replaces it in place; the writer must not append a second one.
    r, report = _varied()
    real = FindingOutcome.to_json_fields

    def fields(self: FindingOutcome) -> dict[str, object]:
        return {**real(self), "capture": "overridden", "pid": None}

    monkeypatch.setattr(FindingOutcome, "to_json_fields", fields)
    text = "".join(json_chunks(r, report))
    assert text == _old_text(r, report)
    assert json.loads(text)["findings"][1]["capture"] == "overridden"


def test_table_spells_every_endpoint_as_endpoint_str_does() -> None:
    # The table spells endpoints through a per-address memo; each cell must
    # still read as str(Endpoint) (IPv4, IPv6, IPv4-mapped, many ports).
    r, report = _varied()
    lines = render_table(r, report).splitlines()
    assert lines == list(table_lines(r, report))
    rows = lines[3:]  # summary, one warning, header
    assert len(rows) == len(r.findings)
    for f, line in zip(r.findings, rows, strict=True):
        cells = line.split()
        assert str(f.socket.local) in cells and str(f.socket.peer) in cells, line
        if f.upstream is not None:
            assert f"{f.upstream.local} -> {f.upstream.peer} CLOSE-WAIT" in line


def test_streamed_json_never_holds_the_document() -> None:
    # 5,000 findings written to a sink that keeps nothing: the writer's peak
    # is a piece of the document, the dict renderer's the whole of it twice.
    r, report = _varied()
    many = ScanResult("x", (15001,), 0, 0.0, r.findings * 125)
    report = ActionReport(ActionKind.KILL, False, report.outcomes * 125)
    text = "".join(json_chunks(many, report))
    assert text == _old_text(many, report)

    def peak(write_all: Callable[[], object]) -> int:
        tracemalloc.start()
        try:
            write_all()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    def streamed() -> None:
        for piece in json_chunks(many, report, batch=256):
            len(piece)  # written and dropped

    streaming, whole = peak(streamed), peak(lambda: _old_text(many, report))
    assert whole > len(text)
    assert streaming < len(text) / 4, (streaming, whole, len(text))
