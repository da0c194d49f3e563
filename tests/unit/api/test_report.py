"""Report status building (findings capped, newest first, totals) and the report manifest."""

from __future__ import annotations

import datetime as dt

import pytest

from halfclose.api import (
    FINDINGS_CAP,
    ReportError,
    ReportFinding,
    ScanSummary,
    build_report_status,
    find_condition,
    format_time,
    parse_report,
    report_manifest,
    report_status_json,
)

T0 = dt.datetime(2025, 6, 1, 12, 0, 0, tzinfo=dt.UTC)


def _finding(
    port: int, at: dt.datetime, kind: str = "leaked", action: str = "none"
) -> ReportFinding:
    return ReportFinding(
        kind=kind,  # type: ignore[arg-type]
        state="FIN-WAIT-2",
        local="127.0.0.1:15001",
        peer=f"192.0.2.10:{port}",
        idle_seconds=90,
        pid=42,
        process="envoy",
        action=action,  # type: ignore[arg-type]
        observed_time=format_time(at),
    )


def test_first_scan() -> None:
    scan = ScanSummary(
        scanned_at=T0,
        leaked=2,
        at_risk=1,
        killed=2,
        findings=[_finding(1, T0), _finding(2, T0, action="killed")],
    )
    status = build_report_status(scan, leaked_alert_threshold=10)
    assert (status.leaked, status.at_risk, status.killed_total) == (2, 1, 2)
    assert status.last_scan_time == "2025-06-01T12:00:00Z"
    assert [f.peer for f in status.findings] == ["192.0.2.10:1", "192.0.2.10:2"]
    leaking = find_condition(status.conditions, "Leaking")
    assert leaking is not None and leaking.status == "False"
    assert leaking.reason == "BelowThreshold"


def test_totals_accumulate_and_findings_are_newest_first_capped() -> None:
    status = None
    for i in range(FINDINGS_CAP + 5):
        at = T0 + dt.timedelta(seconds=15 * i)
        scan = ScanSummary(
            scanned_at=at,
            leaked=1,
            at_risk=0,
            killed=1,
            extended=2,
            findings=[_finding(1000 + i, at, action="killed")],
        )
        status = build_report_status(scan, status, leaked_alert_threshold=10)
    assert status is not None
    assert status.killed_total == FINDINGS_CAP + 5
    assert status.extended_total == 2 * (FINDINGS_CAP + 5)
    assert len(status.findings) == FINDINGS_CAP
    ports = [int(f.peer.rsplit(":", 1)[1]) for f in status.findings]
    assert ports == sorted(ports, reverse=True)
    assert ports[0] == 1000 + FINDINGS_CAP + 4


def test_same_connection_seen_again_is_one_finding() -> None:
    first = build_report_status(
        ScanSummary(scanned_at=T0, leaked=0, at_risk=1, findings=[_finding(7, T0, "at-risk")]),
        leaked_alert_threshold=10,
    )
    later = T0 + dt.timedelta(seconds=60)
    second = build_report_status(
        ScanSummary(scanned_at=later, leaked=1, at_risk=0, findings=[_finding(7, later)]),
        first,
        leaked_alert_threshold=10,
    )
    assert [(f.kind, f.observed_time) for f in second.findings] == [("leaked", format_time(later))]


def test_leaking_condition_transitions_once() -> None:
    over = build_report_status(
        ScanSummary(scanned_at=T0, leaked=3, at_risk=0), leaked_alert_threshold=3
    )
    cond = find_condition(over.conditions, "Leaking")
    assert cond is not None and (cond.status, cond.reason) == ("True", "ThresholdExceeded")
    still = build_report_status(
        ScanSummary(scanned_at=T0 + dt.timedelta(minutes=1), leaked=5, at_risk=0),
        over,
        leaked_alert_threshold=3,
    )
    cond2 = find_condition(still.conditions, "Leaking")
    assert cond2 is not None
    assert cond2.last_transition_time == cond.last_transition_time  # no transition
    assert "5 leaked" in cond2.message


def test_manifest_is_owned_by_the_pod_and_round_trips() -> None:
    scan = ScanSummary(scanned_at=T0, leaked=1, at_risk=0, findings=[_finding(1, T0)])
    status = build_report_status(scan, leaked_alert_threshold=10)
    manifest = report_manifest(
        namespace="shop",
        pod_name="web-1",
        pod_uid="uid-1",
        node_name="node-a",
        policy="istio",
        status=status,
    )
    assert manifest["metadata"]["name"] == "web-1"
    (owner,) = manifest["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Pod", "web-1", "uid-1")
    assert manifest["metadata"]["labels"] == {
        "halfclose.io/policy": "istio",
        "halfclose.io/node": "node-a",
    }
    assert manifest["spec"] == {
        "podName": "web-1",
        "podUID": "uid-1",
        "nodeName": "node-a",
        "policy": "istio",
    }
    report = parse_report(manifest)
    assert report.status == status
    assert report_status_json(status)["findings"][0]["observedTime"] == "2025-06-01T12:00:00Z"


def test_long_names_are_not_labels() -> None:
    long_policy = "p" * 100
    manifest = report_manifest(
        namespace="n", pod_name="a", pod_uid="u", node_name="node", policy=long_policy
    )
    assert manifest["metadata"]["labels"] == {"halfclose.io/node": "node"}
    assert manifest["spec"]["policy"] == long_policy


def test_unreadable_report() -> None:
    with pytest.raises(ReportError, match=r"spec.podName: required value"):
        parse_report(
            {
                "metadata": {"name": "a", "namespace": "n"},
                "spec": {"podUID": "u", "nodeName": "n", "policy": "p"},
            }
        )
