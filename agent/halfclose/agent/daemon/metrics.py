"""The agent's Prometheus metrics: every name of docs/metrics.md, defined once.

The registry is injected so tests (and several agents in one process) never
share the global default.  Per-pod series are removed when the pod goes away
(``forget_pod``): a node churns through thousands of pods, and a gauge that
kept every pod that ever existed would be a slow memory leak of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

try:
    VERSION = version("halfclose")
except PackageNotFoundError:  # running from a source tree without an install
    VERSION = "0+unknown"


# Leak lifetimes: the agent aims at <= 1 s; the status quo is Envoy's 3600 s
# idle timeout, so the buckets span both.
LIFETIME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
SCAN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry, node: str) -> None:
        self.registry = registry
        pod = ("namespace", "pod")
        self.killed = Counter(
            "halfclose_sockets_killed",
            "Leaked sockets destroyed with SOCK_DESTROY",
            pod,
            registry=registry,
        )
        self.collisions = Counter(
            "halfclose_collisions",
            "Stale (leaked) sockets found blocking a new connection from their port "
            "(istio#43301), counted once per socket",
            pod,
            registry=registry,
        )
        self.kill_failures = Counter(
            "halfclose_kill_failures",
            "SOCK_DESTROY attempts that failed (reason = errno name)",
            (*pod, "reason"),
            registry=registry,
        )
        self.extended = Counter(
            "halfclose_conntrack_entries_extended",
            "Conntrack entries extended (PerEntry strategy)",
            pod,
            registry=registry,
        )
        self.scan_duration = Histogram(
            "halfclose_scan_duration_seconds",
            "One netns scan, dump to decision",
            buckets=SCAN_BUCKETS,
            registry=registry,
        )
        self.scan_errors = Counter(
            "halfclose_scan_errors",
            "Scans that failed, by reason",
            ("reason",),
            registry=registry,
        )
        self.leak_lifetime = Histogram(
            "halfclose_leak_lifetime_seconds",
            "NAT entry expiry to leaked socket destroyed",
            buckets=LIFETIME_BUCKETS,
            registry=registry,
        )
        self.pending_reports = Gauge(
            "halfclose_pending_report_updates",
            "Report writes buffered while the API is unreachable",
            registry=registry,
        )
        self.info = Gauge(
            "halfclose_agent_info",
            "Build and node identity",
            ("version", "node"),
            registry=registry,
        )
        self.info.labels(version=VERSION, node=node).set(1)
        # The last scan's state, read at scrape time (see StateCollector).
        self.state = StateCollector()
        registry.register(self.state)

    def forget_pod(self, namespace: str, pod: str) -> None:
        """Drop every per-pod series of a pod that no longer exists or matches."""
        self.state.forget(namespace, pod)
        for metric in (self.killed, self.extended, self.collisions):
            with contextlib.suppress(KeyError):
                metric.remove(namespace, pod)
        # This one carries a third label: remove each reason seen for the pod.
        for with_reason in (self.kill_failures,):
            for labels in _label_sets(with_reason):
                if labels[:2] == (namespace, pod):
                    with contextlib.suppress(KeyError):
                        with_reason.remove(*labels)


@dataclass(frozen=True, slots=True)
class PodGauges:
    """One pod's counts from its netns's last scan (after that scan's kills)."""

    leaked: int  # leaked + collision, still there
    at_risk: int
    unproven: tuple[tuple[str, int], ...] = ()  # (reason, count), counts above 0 only
    # The scan ran but may miss leaks (unreadable NAT rules, no conntrack to
    # prove a leak with): a state, not an event, so the alert holds as long as
    # the cause does, whatever the scan interval.
    incomplete: bool = False


class StateCollector(Collector):
    """The agent's gauges, computed at scrape time from the last published state.

    The loop thread replaces whole immutable values (``publish``); a scrape
    copies the dict and reads them, so there is no lock and no per-series
    bookkeeping: a pod that is forgotten simply stops being yielded, and an
    unproven reason at 0 has no series.
    """

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], PodGauges] = {}
        self.watched_netns = 0
        self.patched_pods = 0

    def publish(self, namespace: str, pod: str, gauges: PodGauges) -> None:
        self.pods[(namespace, pod)] = gauges

    def forget(self, namespace: str, pod: str) -> None:
        self.pods.pop((namespace, pod), None)

    def collect(self) -> Iterator[Metric]:
        pods = dict(self.pods)  # one C-level copy: safe against the loop's writes
        labels = ["namespace", "pod"]
        leaked = GaugeMetricFamily(
            "halfclose_leaked_sockets",
            "Leaked FIN_WAIT2 proxy sockets seen in the last scan",
            labels=labels,
        )
        at_risk = GaugeMetricFamily(
            "halfclose_at_risk_sockets",
            "At-risk FIN_WAIT2 proxy sockets seen in the last scan",
            labels=labels,
        )
        unproven = GaugeMetricFamily(
            "halfclose_unproven_sockets",
            "FIN_WAIT2 proxy sockets of the last scan that miss a part of the leak proof "
            "(reason = the part); never acted on",
            labels=[*labels, "reason"],
        )
        incomplete = GaugeMetricFamily(
            "halfclose_scan_incomplete",
            "1 when the pod's last scan ran but may miss leaks (a NAT rule source could "
            "not be read, or conntrack could prove nothing); see the scan warnings in the log",
            labels=labels,
        )
        for (ns, pod), g in sorted(pods.items()):
            leaked.add_metric([ns, pod], g.leaked)
            at_risk.add_metric([ns, pod], g.at_risk)
            incomplete.add_metric([ns, pod], 1 if g.incomplete else 0)
            for reason, n in g.unproven:
                unproven.add_metric([ns, pod, reason], n)
        yield leaked
        yield at_risk
        yield unproven
        yield incomplete
        yield GaugeMetricFamily(
            "halfclose_watched_netns",
            "Pod network namespaces the agent watches",
            value=self.watched_netns,
        )
        yield GaugeMetricFamily(
            "halfclose_conntrack_patched_pods",
            "Pods whose netns close_wait sysctl the agent has patched",
            value=self.patched_pods,
        )


def _label_sets(metric: Counter | Gauge) -> set[tuple[str, ...]]:
    # prometheus_client keeps children keyed by label values; there is no
    # public accessor, and collect() gives the same information publicly.
    out: set[tuple[str, ...]] = set()
    for family in metric.collect():
        for sample in family.samples:
            if "reason" in sample.labels:
                out.add(tuple(sample.labels[n] for n in ("namespace", "pod", "reason")))
    return out
