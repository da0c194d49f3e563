"""The agent registry against the docs/metrics.md contract, and per-pod cleanup."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from halfclose.agent.daemon.metrics import AgentMetrics, PodGauges

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
    metrics.state.publish("ns", "p", PodGauges(1, 1, (("entry-removed-early", 1),)))
    metrics.killed.labels("ns", "p").inc()
    metrics.kill_failures.labels("ns", "p", "EPERM").inc()
    metrics.extended.labels("ns", "p").inc()
    metrics.scan_errors.labels("netns_gone").inc()
    metrics.collisions.labels("ns", "p").inc()
    documented = documented_agent_metrics()
    assert len(documented) == 15
    assert live_metrics(registry) == documented


def test_forget_pod_removes_its_series_only() -> None:
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry, node="n1")
    for pod in ("a", "b"):
        metrics.state.publish(
            "ns", pod, PodGauges(3, 0, (("not-nat-captured", 2), ("idle-unknown", 1)))
        )
        metrics.killed.labels("ns", pod).inc()
        metrics.kill_failures.labels("ns", pod, "EPERM").inc()
        metrics.collisions.labels("ns", pod).inc()
    metrics.forget_pod("ns", "a")
    metrics.forget_pod("ns", "never-seen")  # harmless
    pods = {
        s.labels.get("pod")
        for family in registry.collect()
        for s in family.samples
        if "pod" in s.labels
    }
    assert pods == {"b"}


def test_gauges_are_read_at_scrape_time_and_a_reason_at_zero_has_no_series() -> None:
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry, node="n1")
    metrics.state.publish("ns", "a", PodGauges(2, 1, (("idle-unknown", 1),)))
    metrics.state.watched_netns = 3
    assert (
        registry.get_sample_value("halfclose_leaked_sockets", {"namespace": "ns", "pod": "a"}) == 2
    )
    assert registry.get_sample_value("halfclose_watched_netns") == 3
    metrics.state.publish("ns", "a", PodGauges(0, 0))  # the next scan: nothing unproven
    labels = {"namespace": "ns", "pod": "a", "reason": "idle-unknown"}
    assert registry.get_sample_value("halfclose_unproven_sockets", labels) is None
    assert (
        registry.get_sample_value("halfclose_leaked_sockets", {"namespace": "ns", "pod": "a"}) == 0
    )
