"""Alerts and dashboard: promtool checks and unit tests, and every PromQL
expression parses and reads only metrics that halfclose exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import chart, promql

pytestmark = pytest.mark.chart

needs_promtool = pytest.mark.skipif(
    chart.promtool() is None, reason="promtool not installed (Debian package prometheus)"
)
ALERTS = chart.CHART / "files" / "alerts.yaml"
DASHBOARD = chart.CHART / "files" / "dashboard.json"
PROMTOOL_TESTS = sorted((Path(__file__).parent / "promtool").glob("*.yaml"))
# Series Prometheus makes itself for every target: not exported by halfclose.
SYNTHETIC = {"up"}


def _rules(groups: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in groups["groups"] for r in g["rules"]]


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard, with Grafana's variables filled in."""
    dashboard = _dashboard()
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            selector = promql.variable_selector(query)
            assert selector, f"variable {var['name']}: not a label_values() query: {query}"
            exprs.append(selector)
    return [promql.from_grafana(e) for e in exprs]


def rule_queries(values: dict[str, Any] | None = None) -> list[str]:
    rule = chart.one(chart.render({**(values or {}), "alerts": {"enabled": True}}),
                     "PrometheusRule")  # fmt: skip
    return [r["expr"] for r in _rules(rule["spec"])]


def known_series() -> set[str]:
    names: set[str] = set(SYNTHETIC)
    for name, metric_type in chart.documented_metrics().items():
        names |= chart.series_names(name, metric_type)
    return names


# --- promtool -------------------------------------------------------------------


@needs_promtool
def test_standalone_rule_file_passes_promtool_check() -> None:
    result = chart.run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


@needs_promtool
def test_rendered_prometheusrule_with_full_values_passes_promtool_check(
    full_manifests: list[chart.Manifest], tmp_path: Path
) -> None:
    spec = chart.one(full_manifests, "PrometheusRule")["spec"]
    rules = _rules(spec)
    leaked = next(r for r in rules if r["alert"] == "HalfCloseLeakedSockets")
    assert leaked["expr"].endswith(">= 25") and leaked["for"] == "15m"
    assert all(r["labels"]["team"] == "platform-networking" for r in rules)
    scan = next(r for r in rules if r["alert"] == "HalfCloseScanErrors")
    assert 'reason!~"netns_gone|permission"' in scan["expr"]
    assert all(
        r["annotations"]["runbook_url"].startswith("https://wiki.example.com/") for r in rules
    )
    assert 'job="hc-agent"' in next(r for r in rules if r["alert"] == "HalfCloseAgentDown")["expr"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    result = chart.run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    result = chart.run_promtool("test", "rules", *map(str, PROMTOOL_TESTS), cwd=chart.REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(PROMTOOL_TESTS)


@needs_promtool
def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The unit tests pin the thresholds: the same tests against rules with a
    threshold moved by one fail."""
    moved = ALERTS.read_text(encoding="utf-8").replace(
        "(halfclose_leaked_sockets) >= 10", "(halfclose_leaked_sockets) >= 11"
    )
    assert moved != ALERTS.read_text(encoding="utf-8")
    rules = tmp_path / "charts" / "halfclose" / "files" / "alerts.yaml"
    rules.parent.mkdir(parents=True)
    rules.write_text(moved, encoding="utf-8")
    test_dir = tmp_path / "tests" / "chart" / "promtool"
    test_dir.mkdir(parents=True)
    test = test_dir / "leaked_sockets.yaml"
    test.write_text((Path(__file__).parent / "promtool" / test.name).read_text(), "utf-8")
    result = chart.run_promtool("test", "rules", str(test))
    assert result.returncode != 0
    assert "HalfCloseLeakedSockets" in result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    alerts = {r["alert"] for r in _rules(yaml.safe_load(ALERTS.read_text(encoding="utf-8")))}
    fired: set[str] = set()
    for path in PROMTOOL_TESTS:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert spec["rule_files"] == ["../../../charts/halfclose/files/alerts.yaml"], path.name
        for group in spec["tests"]:
            for case in group.get("alert_rule_test", []):
                if case.get("exp_alerts"):
                    fired.add(case["alertname"])
    assert alerts == fired
    assert alerts == {
        "HalfCloseLeakedSockets",
        "HalfCloseCollision",
        "HalfCloseAgentDown",
        "HalfCloseAgentAbsent",
        "HalfCloseKillFailures",
        "HalfCloseScanErrors",
        "HalfCloseScanIncomplete",
    }


def test_every_alert_links_a_runbook_section_that_exists() -> None:
    install = (chart.REPO / "docs" / "install.md").read_text(encoding="utf-8")
    anchors = {line.lstrip("#").strip().lower() for line in install.splitlines()
               if line.startswith("#")}  # fmt: skip
    for rule in _rules(yaml.safe_load(ALERTS.read_text(encoding="utf-8"))):
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        anchor = annotations["runbook_url"].rsplit("#", 1)[1]
        assert anchor == rule["alert"].lower()
        assert anchor in anchors, f"docs/install.md has no section {rule['alert']}"


# --- PromQL: valid, and only halfclose's metrics ----------------------------------


@needs_promtool
def test_every_expression_parses(tmp_path: Path) -> None:
    """promtool is the parser: each dashboard and rule expression becomes a
    recording rule of a throwaway rule file."""
    exprs = dashboard_queries() + rule_queries() + rule_queries(chart.full_values())
    rules = [{"record": f"halfclose:check_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "exprs.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}), "utf-8")
    result = chart.run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


@needs_promtool
def test_expression_check_rejects_bad_promql(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    bad = {"groups": [{"name": "x", "rules": [{"record": "a:b", "expr": "sum by (le (x)"}]}]}
    path.write_text(yaml.safe_dump(bad), "utf-8")
    assert chart.run_promtool("check", "rules", str(path)).returncode != 0


def test_expressions_read_only_documented_metrics() -> None:
    known = known_series()
    used: set[str] = set()
    for expr in dashboard_queries() + rule_queries():
        names = promql.metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - known
        assert not unknown, f"{expr!r} reads {sorted(unknown)}: not in docs/metrics.md"
        used |= names
    # The dashboard shows every family the issue asks for.
    for name in (
        "halfclose_leaked_sockets", "halfclose_at_risk_sockets",
        "halfclose_sockets_killed_total", "halfclose_kill_failures_total",
        "halfclose_leak_lifetime_seconds_bucket", "halfclose_scan_duration_seconds_bucket",
        "halfclose_scan_errors_total", "halfclose_watched_netns", "halfclose_collisions_total",
        "halfclose_operator_policies", "halfclose_operator_reconcile_total",
    ):  # fmt: skip
        assert name in used, name


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (namespace) (rate(a_total{namespace=~"x|y", pod="p"}[5m]))', {"a_total"}),
        ("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m])))", {"h_bucket"}),
        ("x * on (job, instance) group_left (node) info_metric", {"x", "info_metric"}),
        ('count(up{job="a"} == 0) or vector(0)', {"up"}),
        ("a / ignoring(reason) b offset 5m > 1e3", {"a", "b"}),
        ('absent(up{job="halfclose-agent"})', {"up"}),
        ("topk(10, max without (instance) (m:recorded))", {"m:recorded"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert promql.metric_names(expr) == names


def test_grafana_variables_are_filled_in() -> None:
    expr = 'sum(rate(x{ns=~"$namespace", pod=~"${pod}"}[$__rate_interval])) > $__range'
    assert promql.from_grafana(expr) == 'sum(rate(x{ns=~"namespace", pod=~"pod"}[5m])) > 1h'


# --- the dashboard ---------------------------------------------------------------


def test_dashboard_is_templated_and_well_formed() -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["namespace"]["type"] == "query" and variables["namespace"]["includeAll"]
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}  # fmt: skip
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
    # Per-pod panels follow the namespace and pod selection.
    leaked = next(p for p in panels if p["title"] == "Leaked sockets by pod (top 10)")
    assert 'namespace=~"$namespace"' in leaked["targets"][0]["expr"]


# --- against the real registries ---------------------------------------------------
# These import the agent's and the operator's metrics modules and skip (with the
# reason) while a module does not exist yet. The lead makes them mandatory once
# both programs are in.


def _exported(registry: Any) -> dict[str, str]:
    """Series name -> family type, for every family a registry would expose."""
    out: dict[str, str] = {}
    for family in registry.collect():
        kind = family.type
        if kind == "counter":
            out[f"{family.name}_total"] = kind
        elif kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[f"{family.name}{suffix}"] = kind
        elif kind == "info":
            out[f"{family.name}_info"] = kind
        else:
            out[family.name] = kind
    return out


def _agent_registry() -> Any:
    metrics = pytest.importorskip(
        "halfclose.agent.daemon.metrics", reason="the agent's metrics module does not exist yet"
    )
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    metrics.AgentMetrics(registry, node="node-1")
    return registry


def _operator_registry() -> Any:
    metrics = pytest.importorskip(
        "halfclose.operator.metrics", reason="the operator's metrics module does not exist yet"
    )
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    metrics.OperatorMetrics(registry)
    return registry


@pytest.mark.parametrize("program", ["agent", "operator"])
def test_registry_exports_exactly_the_documented_metrics(program: str) -> None:
    registry = _agent_registry() if program == "agent" else _operator_registry()
    exported = set(_exported(registry))
    prefix = "halfclose_operator_" if program == "operator" else "halfclose_"
    documented: set[str] = set()
    for name, metric_type in chart.documented_metrics().items():
        if name.startswith("halfclose_operator_") == (program == "operator"):
            documented |= chart.series_names(name, metric_type)
    assert {n for n in exported if n.startswith(prefix)} == documented


def test_chart_expressions_read_only_exported_metrics() -> None:
    exported = set(_exported(_agent_registry())) | set(_exported(_operator_registry()))
    for expr in dashboard_queries() + rule_queries():
        unknown = promql.metric_names(expr) - exported - SYNTHETIC
        assert not unknown, f"{expr!r} reads {sorted(unknown)}, which no registry exports"
