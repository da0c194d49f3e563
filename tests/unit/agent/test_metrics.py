"""The agent registry against the docs/metrics.md contract, and per-pod cleanup."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from halfclose.agent.daemon.metrics import AgentMetrics

DOC = Path(__file__).resolve().parents[3] / "docs" / "metrics.md"


def documented_agent_metrics() -> dict[str, tuple[str, set[str]]]:
    text = DOC.read_text()
    section = text.split("## Agent", 1)[1].split("\n## ", 1)[0]
    out: dict[str, tuple[str, set[str]]] = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`(halfclose_\w+)`\s*\|\s*([\w ()0-9]+?)\s*\|\s*([^|]*)\|", line)
        if m:
            labels = {x.strip() for x in m.group(3).split(",") if x.strip()}
            out[m.group(1)] = (m.group(2).split()[0], labels)
    return out


def live_metrics(registry: CollectorRegistry) -> dict[str, tuple[str, set[str]]]:
    out: dict[str, tuple[str, set[str]]] = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        out[name] = (family.type, labels)
    return out


def test_registry_matches_the_contract() -> None:
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry, node="n1")
    # Touch every labelled series so its label names show in the samples.
    metrics.leaked.labels("ns", "p").set(1)
    metrics.at_risk.labels("ns", "p").set(1)
    metrics.killed.labels("ns", "p").inc()
    metrics.kill_failures.labels("ns", "p", "EPERM").inc()
    metrics.extended.labels("ns", "p").inc()
    metrics.scan_errors.labels("netns_gone").inc()
    metrics.collisions.labels("ns", "p").inc()
    metrics.unproven.labels("ns", "p", "entry-removed-early").set(1)
    documented = documented_agent_metrics()
    assert len(documented) == 14
    assert live_metrics(registry) == documented


def test_forget_pod_removes_its_series_only() -> None:
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry, node="n1")
    for pod in ("a", "b"):
        metrics.leaked.labels("ns", pod).set(3)
        metrics.killed.labels("ns", pod).inc()
        metrics.kill_failures.labels("ns", pod, "EPERM").inc()
        metrics.collisions.labels("ns", pod).inc()
        metrics.unproven.labels("ns", pod, "not-nat-captured").set(2)
        metrics.unproven.labels("ns", pod, "idle-unknown").set(1)
    metrics.forget_pod("ns", "a")
    metrics.forget_pod("ns", "never-seen")  # harmless
    pods = {
        s.labels.get("pod")
        for family in registry.collect()
        for s in family.samples
        if "pod" in s.labels
    }
    assert pods == {"b"}
