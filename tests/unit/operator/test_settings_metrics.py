"""Operator settings from flags/env, and the metrics contract (docs/metrics.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from halfclose.errors import UserError
from halfclose.operator.metrics import OperatorMetrics
from halfclose.operator.settings import settings_from

DOCS = Path(__file__).resolve().parents[3] / "docs" / "metrics.md"


def test_defaults() -> None:
    s = settings_from([], {})
    assert (s.metrics_port, s.liveness_port, s.debounce_seconds) == (9480, 8080, 2.0)
    assert s.peering == "halfclose"
    assert s.log_level == "INFO"
    assert 1 <= s.priority < 2**31


def test_random_priorities_differ() -> None:
    assert len({settings_from([], {}).priority for _ in range(5)}) > 1


def test_flags_override_environment() -> None:
    env = {
        "HALFCLOSE_OPERATOR_METRICS_PORT": "9999",
        "HALFCLOSE_OPERATOR_DEBOUNCE_SECONDS": "5",
        "HALFCLOSE_OPERATOR_LOG_LEVEL": "debug",
    }
    s = settings_from(["--metrics-port", "1234", "--priority", "7"], env)
    assert (s.metrics_port, s.debounce_seconds, s.log_level, s.priority) == (1234, 5.0, "DEBUG", 7)
    assert settings_from(["--standalone", "--liveness-port", "0"], {}).peering is None
    assert settings_from(["--liveness-port", "0"], {}).liveness_port is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--metrics-port", "70000"],
        ["--debounce-seconds", "0"],
        ["--log-level", "loud"],
        ["--bogus"],
    ],
)
def test_bad_settings_are_user_errors(argv: list[str]) -> None:
    with pytest.raises(UserError):
        settings_from(argv, {})


def _documented_operator_metrics() -> dict[str, tuple[str, set[str]]]:
    section = DOCS.read_text().split("## Operator", 1)[1]
    rows = re.findall(
        r"^\| `(halfclose_[a-z_]+)` \| ([a-z ()0-9]+?) \|\s*([a-z, ]*?)\s*\|", section, re.MULTILINE
    )
    return {
        name: (kind.split()[0], {lbl.strip() for lbl in labels.split(",") if lbl.strip()})
        for name, kind, labels in rows
    }


def test_metrics_are_exactly_the_documented_ones() -> None:
    documented = _documented_operator_metrics()
    assert len(documented) == 6
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    # Labelled series appear once used; use each the way the handlers do.
    metrics.set_policy_totals("p", leaked=3, killed_total=4)
    metrics.reconcile_total.labels(kind="HalfClosePolicy", result="ok").inc()
    metrics.status_writes_total.inc()
    exported = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {k for s in family.samples for k in s.labels}
        exported[name] = (family.type, labels)
    assert exported == documented


def test_readiness_and_forgetting_a_policy() -> None:
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    metrics.set_policy_readiness({"a": True, "b": False, "c": True})
    assert registry.get_sample_value("halfclose_operator_policies", {"ready": "True"}) == 2
    assert registry.get_sample_value("halfclose_operator_policies", {"ready": "False"}) == 1
    metrics.set_policy_totals("a", leaked=3, killed_total=4)
    metrics.forget_policies(["a", "never-set"])
    assert (
        registry.get_sample_value("halfclose_operator_policy_leaked_sockets", {"policy": "a"})
        is None
    )
