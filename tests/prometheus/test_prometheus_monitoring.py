"""The chart's dashboard and alerts against a real Prometheus scraping a real agent
and operator (issue 10 §5; design.md §6).

The stack (scenario.py): two agents and the operator as processes, a real
control plane, leak labs with kills, refused kills, extensions and an
unreadable rule source, and Prometheus 1 s scrapes with the chart's rules
(``for:`` shortened, expressions unchanged; rules.py).  Each alert must fire in
the situation it is written for, and none may fire (or be pending) while the
lab is clean; every dashboard query must return data from the real server.
The static checks (promtool, metric names) stay in tests/chart.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from prometheus import rules, scenario
from prometheus.promserver import has_number
from prometheus.scenario import Stack

pytestmark = [pytest.mark.prometheus, pytest.mark.kernel, pytest.mark.kube,
              pytest.mark.timeout(600)]  # fmt: skip

DASHBOARD = rules.REPO / "charts" / "halfclose" / "files" / "dashboard.json"
# Alerts of the chart with no situation in scenario.py yet, and why. A new alert
# must be given a scenario or be listed here: the test fails otherwise.
NO_SCENARIO: dict[str, str] = {}
VAULT_LEAKS_SEEN = scenario.VAULT_LEAKS  # archive/flush's sockets are unproven, not leaked


def _alerts() -> list[str]:
    return [r["alert"] for r in rules.chart_rules()]


def _ok(stack: Stack) -> None:
    if stack.record.error:
        pytest.fail(f"the scenario broke before its end: {stack.record.error}", pytrace=False)


def test_clean_lab_fires_no_alert(monitored: Stack) -> None:
    rec = monitored.record
    assert rec.clean_alerts is not None, rec.error
    assert rec.clean_seconds > rules.longest_for(monitored.rules)
    assert rec.clean_alerts == [], f"alerts pending or firing in a clean lab: {rec.clean_alerts}"


@pytest.mark.parametrize("alert", _alerts())
def test_alert_fires_in_its_situation(monitored: Stack, alert: str) -> None:
    if alert in NO_SCENARIO:
        pytest.skip(f"{alert}: no scenario yet: {NO_SCENARIO[alert]}")
    result = monitored.record.alerts.get(alert)
    if result is None:
        _ok(monitored)
        pytest.fail(f"{alert} has no scenario in tests/prometheus/scenario.py (nor NO_SCENARIO)")
    assert result.error is None, f"{alert} ({result.situation}): {result.error}"
    assert result.firing, alert
    # Its annotations, rendered by Prometheus with the real labels, name what they say.
    for firing in result.firing:
        for key, text in firing["annotations"].items():
            assert text and "<no value>" not in text, f"{alert} {key}: {text!r}"


def test_alerts_fire_only_where_their_situation_is(monitored: Stack) -> None:
    """At the end of the fault phase exactly the expected alerts fire: none for the
    pod whose leaks were killed, the two leaks in shop/pay (under the threshold),
    the extended or flushed pods, or agent A."""
    _ok(monitored)
    agent_b = f"halfclose-agent-{scenario.NODE_B}"
    assert monitored.record.faults_firing == sorted(
        [
            ("HalfCloseCollision", scenario.GATE[0], scenario.GATE[1]),
            ("HalfCloseKillFailures", scenario.PAY[0], scenario.PAY[1]),
            ("HalfCloseLeakedSockets", scenario.VAULT[0], scenario.VAULT[1]),
            ("HalfCloseScanErrors", scenario.RELEASE_NS, agent_b),
            ("HalfCloseScanIncomplete", scenario.OLD[0], scenario.OLD[1]),
        ]
    )


def test_the_phases_did_what_they_say(monitored: Stack) -> None:
    """The situations are real: kills, refused kills, extensions, unreadable rules."""
    _ok(monitored)
    facts = monitored.record.facts
    fired = {k: r.seconds and round(r.seconds, 1) for k, r in monitored.record.alerts.items()}
    print(f"\nphases: {monitored.record.timings}\nfacts: {facts}\nsituation->firing s: {fired}")
    assert facts["killed in cart"] >= 3, facts
    assert facts["kill failures in pay"] >= 2, facts
    assert facts["extended in books"] >= 1, facts
    assert facts["leaked in vault"] >= 10, facts
    assert facts["incomplete scans (agent A)"] >= 1, facts
    assert facts["permission errors (B)"] > 30, facts
    assert facts["leak lifetimes observed"] >= 3, facts
    assert facts["collisions in gate"] >= 1, facts
    assert facts["unproven in flush"] == 2 and facts["killed in flush"] == 0, facts
    # The operator's per-policy sums, from the reports the agent wrote.
    assert facts["operator: leaked under report"] == VAULT_LEAKS_SEEN, facts
    assert facts["operator: killed under kill"] == facts["killed in cart"], facts


def test_an_unreadable_rule_source_raises_an_alert(monitored: Stack) -> None:
    _ok(monitored)
    assert monitored.record.facts["incomplete scans (agent A)"] >= 1
    assert [a["alertname"] for a in monitored.record.incomplete_alerts] == [
        "HalfCloseScanIncomplete"
    ], "legacy/old's unreadable rules raise exactly the incomplete-scan alert"


# --- the dashboard ---------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def _targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            for t in p.get("targets", []):
                out.append((f"{p['title']} [{t.get('refId', '?')}]", t["expr"]))
    return out


_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute(expr: str, values: dict[str, str]) -> str:
    """A panel query as Grafana sends it: its variables replaced by their values."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]

    return _VAR.sub(one, expr)


def variable_values(dashboard: dict[str, Any], range_seconds: int, **chosen: str) -> dict[str, str]:
    """Grafana's built-ins plus each template variable: ``chosen`` or its default
    ("All" = allValue for a query variable, the text of a textbox)."""
    values = {
        "__range": f"{range_seconds}s",
        # Grafana: max(4 x scrape interval, step + scrape interval), 1m with its
        # default 15 s scrape interval setting.
        "__rate_interval": "1m",
        "__interval": "15s",
    }
    for var in dashboard["templating"]["list"]:
        name = var["name"]
        if name in chosen:
            values[name] = chosen[name]
        elif var["type"] == "query":
            assert var.get("includeAll"), name
            values[name] = var.get("allValue") or ".*"
        elif var["type"] == "textbox":
            values[name] = var["current"]["value"]
        elif var["type"] == "datasource":
            continue
        else:
            raise AssertionError(f"variable {name}: type {var['type']} not handled")
    return values


def test_template_variables_list_values(monitored: Stack) -> None:
    """The namespace and pod pickers offer the lab's pods (label_values())."""
    _ok(monitored)
    prom, rec = monitored.prom, monitored.record
    offered: dict[str, list[str]] = {}
    for var in _dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"])
        assert m, var["query"]
        selector = substitute(m.group(1), {"namespace": "archive"})
        offered[var["name"]] = prom.api(
            f"label/{m.group(2)}/values",
            **{"match[]": selector, "start": f"{rec.started:.3f}", "end": f"{rec.ended:.3f}"},
        )
    assert {"shop", "archive", "ledger", "legacy", "batch", "depot"} <= set(offered["namespace"])
    assert set(offered["pod"]) == {"vault", "flush"}  # the pods of namespace archive


def test_every_dashboard_query_returns_data(monitored: Stack) -> None:
    """Each panel query, as Grafana would send it over the scenario's time range,
    returns at least one series with a number in it; a stat panel's
    ``... or vector(0)`` must have data before its fallback too."""
    _ok(monitored)
    rec, prom = monitored.record, monitored.prom
    dashboard = _dashboard()
    span = int(rec.ended - rec.started) + 1
    values = variable_values(dashboard, span)  # "All" namespaces and pods
    empty = []
    for title, raw in _targets(dashboard):
        expr = substitute(raw, values)
        left = re.sub(r"\s+or\s+vector\(0\)\s*$", "", expr)
        for q in dict.fromkeys((expr, left)):
            series = prom.query_range(q, rec.started, rec.ended, step=1.0)
            if not has_number(series):
                empty.append(f"{title}: {q}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
