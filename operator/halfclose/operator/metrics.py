"""The operator's Prometheus metrics, exactly as docs/metrics.md lists them.

One class owns them all on a registry passed in, so tests read a private
registry and two operators in one process (tests again) do not collide.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.policies = Gauge(
            "halfclose_operator_policies",
            "HalfClosePolicies by Ready condition.",
            ["ready"],
            registry=registry,
        )
        self.policy_leaked_sockets = Gauge(
            "halfclose_operator_policy_leaked_sockets",
            "Leaked sockets now, aggregated from the policy's reports.",
            ["policy"],
            registry=registry,
        )
        self.policy_killed_total = Gauge(
            # A gauge despite the suffix: it is a sum of counters kept by the agents,
            # and it drops when a pod (and its report) goes (docs/metrics.md).
            "halfclose_operator_policy_killed_total",
            "killedTotal aggregated from the policy's reports.",
            ["policy"],
            registry=registry,
        )
        self.reports = Gauge(
            "halfclose_operator_reports",
            "HalfCloseReports the operator knows.",
            registry=registry,
        )
        self.reconcile_total = Counter(
            "halfclose_operator_reconcile",
            "Reconciliations by object kind and result.",
            ["kind", "result"],
            registry=registry,
        )
        self.status_writes_total = Counter(
            "halfclose_operator_status_writes",
            "Policy status patches written (after debouncing).",
            registry=registry,
        )
        for ready in ("True", "False"):
            self.policies.labels(ready=ready).set(0)

    def set_policy_readiness(self, ready_by_policy: Mapping[str, bool]) -> None:
        ready = sum(1 for r in ready_by_policy.values() if r)
        self.policies.labels(ready="True").set(ready)
        self.policies.labels(ready="False").set(len(ready_by_policy) - ready)

    def set_policy_totals(self, policy: str, leaked: int, killed_total: int) -> None:
        self.policy_leaked_sockets.labels(policy=policy).set(leaked)
        self.policy_killed_total.labels(policy=policy).set(killed_total)

    def forget_policies(self, names: Iterable[str]) -> None:
        for name in names:
            for gauge in (self.policy_leaked_sockets, self.policy_killed_total):
                with contextlib.suppress(KeyError):  # never set
                    gauge.remove(name)
