"""The agent loop on a thread, with in-memory Kubernetes adapters (kernel tests).

``TimedRemediator`` stamps each plan it carries out (CLOCK_MONOTONIC, the
clock the lab processes print), so a test can say when the agent acted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from halfclose.agent.core.model import Kind, Outcome
from halfclose.agent.core.outcome import ActionReport
from halfclose.agent.core.plan import Plan
from halfclose.agent.daemon.loop import Agent
from halfclose.agent.daemon.metrics import AgentMetrics
from halfclose.agent.daemon.remediate import EngineRemediator
from halfclose.agent.daemon.settings import AgentSettings
from halfclose.agent.engine.scan import Scanner
from halfclose.agent.kube.fake import FakeReports, FakeWorld

NODE = "node-test"


def policy(name: str, **spec: Any) -> dict[str, Any]:
    base = {"namespaces": ["shop"], "thresholds": {"minIdleSeconds": 0}, "scanIntervalSeconds": 30}
    base.update(spec)
    return {
        "apiVersion": "halfclose.io/v1alpha1",
        "kind": "HalfClosePolicy",
        "metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": base,
    }


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return value or 0.0


@dataclass(slots=True)
class Acted:
    started: float  # CLOCK_MONOTONIC before the plan's first action
    kills: tuple[Kind, ...]  # the kinds the plan kills, in order
    outcomes: tuple[tuple[Kind, Outcome], ...] | None = None  # once execute() returned


class TimedRemediator(EngineRemediator):
    """Stamps each plan before it runs (the upstream check comes later, deferred)."""

    def __init__(self, state_dir: str) -> None:
        super().__init__(state_dir)
        self.acted: list[Acted] = []

    def execute(self, scanner: Scanner, plan: Plan, watch_unpaired: bool = True) -> ActionReport:
        acted = Acted(time.monotonic(), tuple(d.finding.kind for d in plan.kills))
        self.acted.append(acted)
        report = super().execute(scanner, plan, watch_unpaired)
        acted.outcomes = tuple((o.finding.kind, o.outcome) for o in report.outcomes)
        return report


class Running:
    """``with Running(tmp) as run:`` the agent runs; it is stopped and joined on exit."""

    def __init__(self, tmp: Path) -> None:
        self.registry = CollectorRegistry()
        self.world = FakeWorld()
        self.reports = FakeReports()
        self.remediator = TimedRemediator(str(tmp))
        settings = AgentSettings(node_name=NODE, state_dir=str(tmp))
        self.agent = Agent(
            settings, AgentMetrics(self.registry, NODE), self.world, self.reports, self.remediator
        )
        self.world.on_change = self.agent.notify
        self.thread = threading.Thread(target=self.agent.run, daemon=True)

    def sample(self, name: str, **labels: str) -> float:
        return sample(self.registry, name, **labels)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.agent.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
