"""The monitored lab: real Prometheus, agents, operator and Kubernetes API, in phases.

The kernel side: three labs (``halfclose.lab``) -- an Istio-style one
(iptables-nft) with six pod netns, a Linkerd-style one on iptables-legacy whose
rules the agent cannot read with the chart's capabilities (no NET_RAW), and a
slow one (60 s close_wait: entries are extended or flushed, never racing their
expiry) -- plus the collision pod of tests/support/collision.py.  Their proxies
are made to look like containerd containers (tests/support/podcgroup.py), so
the agents resolve Pods to netns through the real /proc, as on a node.

Kubernetes objects (cluster ``Cluster``):

  node-a (agent A, the chart's capabilities)
    shop/cart    lab pod 0  policy kill    KillSockets: leaks form and are killed
    archive/vault lab pod 1 policy report  Report: 12 leaks held
    shop/pay     lab pod 2  policy kill    the kernel refuses SOCK_DESTROY here
    ledger/books slow lab   policy extend  PatchConntrack/PerEntry: entries extended
    legacy/old   legacy lab policy legacy  (made in the fault phase) rules unreadable
    archive/flush slow lab  policy report  conntrack -F under live half-closes:
                 unproven (entry-removed-early), never acted on
    depot/gate   tests/support/collision.py's pod  policy observe (Report): the
                 app reconnects from a leaked socket's port (istio#43301)
  node-b (agent B)
    batch/b0..b5 lab pods 0..5 (a sleeper in each netns)  policy batch (Report)

Phases (``run``): clean (no alert may fire or even be pending), faults (agent B
restarted without CAP_SYS_ADMIN; leaks, kills, refused kills, extensions, the
legacy policy, a conntrack flush, a port-reuse collision), agent B stopped
(agent down), the agent job without targets (agent absent).  Each alert's
wait is recorded, not raised, so every test reports its own result.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from halfclose.lab import Lab, LabSettings
from prometheus import programs, rules
from prometheus.promserver import (
    PrometheusError,
    PrometheusServer,
    Target,
    die_with_parent,
    rfc3339,
    scrape_config,
)
from support import collision
from support.podcgroup import FakeContainers, pod_object

CLOSE_WAIT = 2
AGENT_JOB = "halfclose-agent"  # the chart's metrics.agentJob / operatorJob defaults
OPERATOR_JOB = "halfclose-operator"
RELEASE_NS = "halfclose-system"
G, V = "halfclose.io", "v1alpha1"
NODE_A, NODE_B = "node-a", "node-b"
# (namespace, pod, lab pod index) on node A, by role.
CART = ("shop", "cart", 0)
VAULT = ("archive", "vault", 1)
PAY = ("shop", "pay", 2)
BOOKS = ("ledger", "books", 1)  # in the slow lab: extended well before expiry
OLD = ("legacy", "old", 0)  # in the legacy lab
GATE = ("depot", "gate")  # the collision pod
FLUSH = ("archive", "flush", 0)  # in the slow lab: flushed, not expired
# The slow lab's close_wait: an at-risk entry stays this long, so extending it
# (PerEntry) or flushing it never races its expiry, however busy the machine.
SLOW_CLOSE_WAIT = 60
MESH_PODS = 6
VAULT_LEAKS = 12  # the alert's default threshold is 10
# Agent B without CAP_SYS_ADMIN cannot enter a netns: each of its six pods'
# netns fails at every reconcile (at least every 5 s); the alert needs a
# 10-minute rate above 0.05/s, i.e. more than 30 errors (about 10 s here).
SCAN_ERRORS_TIMEOUT = 90.0
ALERT_TIMEOUT = 60.0  # per alert, once its situation is made (it fired 1-26 s after)


class Cluster(Protocol):
    """The Kubernetes side: objects as an admin makes them, kubeconfigs per program."""

    def agent_kubeconfig(self) -> str: ...
    def operator_kubeconfig(self) -> str: ...
    def apply(self, obj: dict[str, Any]) -> None: ...
    def put_pod(self, pod: dict[str, Any]) -> None: ...


def policy(name: str, namespaces: list[str], action: str, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "namespaces": namespaces,
        "action": action,
        "thresholds": {"minIdleSeconds": 0, "maxKillsPerMinute": 1000},
        "scanIntervalSeconds": 2,
    }
    spec.update(extra)
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "HalfClosePolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def node(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}


@dataclass
class AlertResult:
    """What became of one alert's situation."""

    alert: str
    situation: str
    firing: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    seconds: float | None = None  # situation made -> alert firing


@dataclass
class Record:
    clean_alerts: list[dict[str, Any]] | None = None  # pending/firing in the clean phase
    clean_seconds: float = 0.0
    alerts: dict[str, AlertResult] = field(default_factory=dict)
    facts: dict[str, float] = field(default_factory=dict)  # metric checks of the phases
    incomplete_alerts: list[dict[str, str]] = field(default_factory=list)
    # (alertname, namespace, pod) firing at the end of the fault phase
    faults_firing: list[tuple[str, str, str]] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # a phase that could not be made at all


class Stack:
    def __init__(self, cluster: Cluster, workdir: Path, prometheus_binary: str) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.prom = PrometheusServer(workdir / "prometheus", prometheus_binary)
        self.prom.workdir.mkdir(parents=True, exist_ok=True)
        self.rules_path = self.prom.workdir / "alerts.yaml"
        self.rules = rules.write_test_rules(self.rules_path)
        prefix = f"hct-{secrets.token_hex(2)}"
        self.mesh = Lab(LabSettings(prefix=f"{prefix}m", pods=MESH_PODS,
                                    close_wait_timeout=CLOSE_WAIT))  # fmt: skip
        self.legacy = Lab(
            LabSettings(
                prefix=f"{prefix}l",
                pods=1,
                close_wait_timeout=CLOSE_WAIT,
                style="linkerd",
                backend="iptables-legacy",
            )
        )
        self.slow = Lab(LabSettings(prefix=f"{prefix}s", pods=2,
                                    close_wait_timeout=SLOW_CLOSE_WAIT))  # fmt: skip
        self.containers: FakeContainers | None = None
        self.exits = contextlib.ExitStack()
        self.gate: tuple[str, Any, Any] | None = None  # collision pod: netns, proxy, app
        self.sleepers: list[subprocess.Popen[bytes]] = []
        self.agent_a: programs.Program | None = None
        self.agent_b: programs.Program | None = None
        self.operator: programs.Program | None = None
        self.record = Record()

    # -- build and tear down -------------------------------------------------------------

    def up(self, containers: FakeContainers) -> None:
        self.containers = containers
        self.mesh.up()
        self.legacy.up()
        self.slow.up()
        for obj in (node(NODE_A), node(NODE_B)):
            self.cluster.apply(obj)
        for ns in ("shop", "archive", "ledger", "legacy", "batch", GATE[0]):
            self.cluster.apply(namespace(ns))
        self.gate = self.exits.enter_context(collision.pod())
        cid = containers.adopt(self.gate[1].pid)
        self.cluster.put_pod(pod_object(GATE[0], GATE[1], NODE_A, cid))
        for ns, name, i in (CART, VAULT, PAY):
            cid = containers.adopt(self.mesh.proxy_pid(i))
            self.cluster.put_pod(pod_object(ns, name, NODE_A, cid))
        cid = containers.adopt(self.legacy.proxy_pid(OLD[2]))
        self.cluster.put_pod(pod_object(OLD[0], OLD[1], NODE_A, cid))
        for ns, name, i in (FLUSH, BOOKS):
            cid = containers.adopt(self.slow.proxy_pid(i))
            self.cluster.put_pod(pod_object(ns, name, NODE_A, cid))
        for i in range(MESH_PODS):
            # Node B's pods: a sleeper in each mesh netns stands for their containers.
            sleeper = subprocess.Popen(
                ["nsenter", f"--net={self.mesh.pod_netns_path(i)}", "--", "sleep", "1800"],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only sets PDEATHSIG
            )
            self.sleepers.append(sleeper)
            cid = containers.adopt(sleeper.pid)
            self.cluster.put_pod(pod_object("batch", f"b{i}", NODE_B, cid))
        self.cluster.apply(policy("kill", ["shop"], "KillSockets"))
        self.cluster.apply(policy("report", ["archive"], "Report"))
        self.cluster.apply(
            policy(
                "extend",
                ["ledger"],
                "PatchConntrack",
                conntrack={"strategy": "PerEntry", "closeWaitTimeoutSeconds": 120},
            )
        )
        self.cluster.apply(policy("batch", ["batch"], "Report"))
        self.cluster.apply(policy("observe", [GATE[0]], "Report"))

        self.agent_a = programs.agent(
            node=NODE_A,
            kubeconfig=self.cluster.agent_kubeconfig(),
            workdir=self.workdir,
            refuse_destroy_in=[self._inode(self.mesh.pod_netns_path(PAY[2]))],
        ).start()
        self.agent_b = programs.agent(
            node=NODE_B, kubeconfig=self.cluster.agent_kubeconfig(), workdir=self.workdir
        ).start()
        self.operator = programs.operator(
            kubeconfig=self.cluster.operator_kubeconfig(), workdir=self.workdir
        ).start()
        self.prom.start(self.config(agents=True))

    def down(self) -> list[str]:
        """Stop everything started, in reverse; returns what failed to stop (never raises)."""
        problems: list[str] = []
        for step in (
            self.prom.close,
            *(p.stop for p in (self.operator, self.agent_b, self.agent_a) if p is not None),
            self._stop_sleepers,
            self.exits.close,
            self.slow.down,
            self.legacy.down,
            self.mesh.down,
        ):
            try:
                step()
            except Exception as exc:  # keep tearing down the rest
                problems.append(f"{getattr(step, '__qualname__', step)}: {exc!r}")
        return problems

    def _stop_sleepers(self) -> None:
        for s in self.sleepers:
            if s.poll() is None:
                s.kill()
            s.wait(10)
        self.sleepers.clear()

    @staticmethod
    def _inode(path: str) -> int:
        return os.stat(path).st_ino

    # -- Prometheus ----------------------------------------------------------------------

    def targets(self, agents: bool) -> list[Target]:
        """The scrape targets a PodMonitor would make (target labels namespace, pod, container)."""
        out: list[Target] = []
        if agents:
            for prog, node_name in ((self.agent_a, NODE_A), (self.agent_b, NODE_B)):
                assert prog is not None
                out.append(
                    Target(
                        AGENT_JOB,
                        f"127.0.0.1:{prog.port}",
                        {
                            "namespace": RELEASE_NS,
                            "pod": f"halfclose-agent-{node_name}",
                            "container": "agent",
                            "endpoint": "metrics",
                        },
                        honor_labels=True,  # as the chart's monitors set it for the agent
                    )
                )
        assert self.operator is not None
        out.append(
            Target(
                OPERATOR_JOB,
                f"127.0.0.1:{self.operator.port}",
                {
                    "namespace": RELEASE_NS,
                    "pod": "halfclose-operator-0",
                    "container": "operator",
                    "endpoint": "metrics",
                },
            )
        )
        return out

    def config(self, agents: bool) -> dict[str, Any]:
        return scrape_config(
            self.targets(agents), [str(self.rules_path)], jobs=(AGENT_JOB, OPERATOR_JOB)
        )

    def value(self, expr: str) -> float | None:
        result = self.prom.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_value(
        self, what: str, expr: str, ok: Callable[[float], bool], timeout: float
    ) -> float:
        def check() -> float | None:
            v = self.value(expr)
            return v if v is not None and ok(v) else None

        found: float = self.prom.wait(what, check, timeout)
        return found

    # -- the phases ----------------------------------------------------------------------

    def run(self) -> Record:
        rec = self.record
        rec.started = time.time()
        try:
            self._settle()
            self._clean()
            self._faults()
            self._agent_down()
            self._agent_absent()
        except Exception as exc:
            rec.error = f"{type(exc).__name__}: {exc}\n{self.logs()}"
        rec.ended = time.time()
        return rec

    def logs(self) -> str:
        parts = [f"--- prometheus\n{self.prom.log(2000)}"]
        for p in (self.agent_a, self.agent_b, self.operator):
            if p is not None:
                parts.append(f"--- {p.name}\n{p.log(3000)}")
        return "\n".join(parts)

    def _settle(self) -> None:
        t0 = time.monotonic()
        for p in (self.agent_a, self.agent_b):
            assert p is not None
            programs.wait_http(p, "/readyz", 60)
        assert self.operator is not None
        programs.wait_http(self.operator, "/metrics", 60)
        self.prom.wait(
            "every target up",
            lambda: (
                (t := self.prom.targets()) and len(t) == 3 and all(x["health"] == "up" for x in t)
            ),
            30,
        )
        self.wait_value(
            "agent A watching its 6 pods' netns",
            f'halfclose_watched_netns{{pod="halfclose-agent-{NODE_A}"}}',
            lambda v: v == 6,
            30,
        )
        self.wait_value(
            "agent B watching 6 netns",
            f'halfclose_watched_netns{{pod="halfclose-agent-{NODE_B}"}}',
            lambda v: v == MESH_PODS,
            30,
        )
        self.wait_value(
            "the operator counting 5 ready policies",
            'halfclose_operator_policies{ready="True"}',
            lambda v: v == 5,
            60,
        )
        # Prometheus evaluates rules from its start but scrapes only after its
        # first target sync (up to 5 s later): absent() is true until then and
        # HalfCloseAgentAbsent pending, as after any Prometheus restart. The
        # clean phase starts once the rules have seen the scraped data.
        scraped = max(rfc3339(t["lastScrape"]) for t in self.prom.targets())
        self.prom.wait(
            "the rules evaluated on scraped data",
            lambda: self.prom.evaluated_since(scraped + 1.0),
            10,
        )
        self.record.timings["settle"] = time.monotonic() - t0

    def _clean(self) -> None:
        """Everything healthy for longer than the longest ``for:``: nothing may
        fire, nor even be pending, at any evaluation of the window."""
        hold = rules.longest_for(self.rules) + 6
        start = time.monotonic()
        seen: list[dict[str, Any]] = []
        while time.monotonic() - start < hold:
            seen.extend({**a["labels"], "state": a["state"]} for a in self.prom.alerts())
            time.sleep(0.5)
        self.record.clean_seconds = time.monotonic() - start
        self.record.clean_alerts = [dict(t) for t in {tuple(sorted(a.items())) for a in seen}]

    def _faults(self) -> None:
        rec = self.record
        t0 = time.monotonic()
        assert self.agent_b is not None
        # Agent B loses CAP_SYS_ADMIN (same port, so the target stays the same).
        self.agent_b.stop()
        self.agent_b = programs.agent(
            node=NODE_B,
            kubeconfig=self.cluster.agent_kubeconfig(),
            workdir=self.workdir,
            caps=("net_admin", "sys_ptrace"),
            port=self.agent_b.port,
        ).start()
        # Up again (or the scenario stops here, with its log): a dead agent B
        # would pass for "agent down", not for scan errors.
        programs.wait_http(self.agent_b, "/healthz", 30)
        made = {"scan": time.monotonic()}
        # The legacy lab's pod comes under a policy: its rules are unreadable.
        self.cluster.apply(policy("legacy", ["legacy"], "Report"))
        # Leaks: killed in cart, held in vault, unkillable in pay, prevented in books.
        made["leaks"] = time.monotonic()
        self.mesh.late_close(count=3, after_seconds=CLOSE_WAIT + 3, pod=CART[2])
        self.mesh.late_close(count=2, after_seconds=CLOSE_WAIT + 3, pod=PAY[2])
        self.slow.late_close(count=2, after_seconds=15, pod=BOOKS[2])
        self.mesh.leak(count=VAULT_LEAKS, pod=VAULT[2])
        self.legacy.leak(count=2, pod=0)
        # Live half-closes whose NAT entries someone flushes: unproven, not leaked.
        self.slow.late_close(count=2, after_seconds=300, pod=FLUSH[2])
        subprocess.run(
            ["ip", "netns", "exec", self.slow.pod_netns(FLUSH[2]), "conntrack", "-F"],
            check=True,
            capture_output=True,
            timeout=10,
        )
        # istio#43301: a leak in the gate pod, then the app reuses its port.
        assert self.gate is not None
        stale = collision.form_leak(*self.gate)
        stale.drop_challenge_acks()
        made["collision"] = time.monotonic()
        stale.reconnect(timeout=30)
        rec.timings["faults made"] = time.monotonic() - t0

        self._expect(
            "HalfCloseCollision",
            "an app connects again from a leaked socket's port under a Report policy",
            made["collision"],
            lambda a: a["labels"].get("namespace") == GATE[0] and a["labels"].get("pod") == GATE[1],
            ALERT_TIMEOUT,
        )

        self._expect(
            "HalfCloseLeakedSockets",
            f"{VAULT_LEAKS} leaks held in archive/vault under a Report policy",
            made["leaks"],
            lambda a: (
                a["labels"].get("namespace") == VAULT[0] and a["labels"].get("pod") == VAULT[1]
            ),
            ALERT_TIMEOUT,
        )
        self._expect(
            "HalfCloseKillFailures",
            "the kernel refuses SOCK_DESTROY in shop/pay's netns (EOPNOTSUPP)",
            made["leaks"],
            lambda a: (
                a["labels"].get("pod") == PAY[1] and a["labels"].get("reason") == "EOPNOTSUPP"
            ),
            ALERT_TIMEOUT,
        )
        self._expect(
            "HalfCloseScanIncomplete",
            "agent A without NET_RAW cannot read legacy/old's iptables-legacy rules",
            made["scan"],
            lambda a: a["labels"].get("namespace") == OLD[0] and a["labels"].get("pod") == OLD[1],
            ALERT_TIMEOUT,
        )
        self._expect(
            "HalfCloseScanErrors",
            "agent B without CAP_SYS_ADMIN cannot enter its pods' netns",
            made["scan"],
            lambda a: a["labels"].get("pod") == f"halfclose-agent-{NODE_B}",
            SCAN_ERRORS_TIMEOUT,
        )
        # scan_errors has no pod label: the target's (the agent pod's) applies.
        a, b = (f'pod="halfclose-agent-{n}"' for n in (NODE_A, NODE_B))
        for name, expr in {
            "killed in cart": 'halfclose_sockets_killed_total{namespace="shop",pod="cart"}',
            "kill failures in pay": 'sum(halfclose_kill_failures_total{pod="pay"})',
            "extended in books": 'halfclose_conntrack_entries_extended_total{pod="books"}',
            "leaked in vault": 'halfclose_leaked_sockets{pod="vault"}',
            "incomplete scans (agent A)": f'halfclose_scan_errors_total{{{a},reason="incomplete"}}',
            "permission errors (B)": f'halfclose_scan_errors_total{{{b},reason="permission"}}',
            "leak lifetimes observed": "sum(halfclose_leak_lifetime_seconds_count)",
            "collisions in gate": 'halfclose_collisions_total{pod="gate"}',
            "unproven in flush": 'sum(halfclose_unproven_sockets{pod="flush"})',
            "killed in flush": 'sum(halfclose_sockets_killed_total{pod="flush"}) or vector(0)',
            "leaked in old": 'sum(halfclose_leaked_sockets{pod="old"})',
            "unproven in old": 'sum(halfclose_unproven_sockets{pod="old"})',
            "slowest scrape s": "max(max_over_time(scrape_duration_seconds[5m]))",
            "operator: leaked under report": (
                'halfclose_operator_policy_leaked_sockets{policy="report"}'
            ),
            "operator: killed under kill": 'halfclose_operator_policy_killed_total{policy="kill"}',
        }.items():
            rec.facts[name] = self.value(expr) or 0.0
        rec.faults_firing = sorted(
            (a["labels"]["alertname"], a["labels"].get("namespace", ""), a["labels"].get("pod", ""))
            for a in self.prom.alerts()
            if a["state"] == "firing"
        )
        # The unreadable rule source has been there for longer than any ``for:``.
        rec.incomplete_alerts = [
            a["labels"]
            for a in self.prom.alerts()
            if a["labels"].get("pod") == OLD[1] and a["state"] == "firing"
        ]

    def _expect(
        self,
        alert: str,
        situation: str,
        since: float,
        match: Callable[[dict[str, Any]], bool],
        timeout: float,
    ) -> None:
        result = AlertResult(alert, situation)
        self.record.alerts[alert] = result
        try:
            result.firing = self.prom.wait(
                f"{alert} firing ({situation})",
                lambda: [a for a in self.prom.firing(alert) if match(a)],
                timeout,
            )
            result.seconds = time.monotonic() - since
        except PrometheusError as exc:
            now = [(a["labels"], a["state"]) for a in self.prom.alerts()]
            result.error = f"{exc}; alerts now: {now}\n{self.logs()}"

    def _agent_down(self) -> None:
        assert self.agent_b is not None
        port = self.agent_b.port
        since = time.monotonic()
        self.agent_b.stop()
        self._expect(
            "HalfCloseAgentDown",
            "agent B stopped (its target stays)",
            since,
            lambda a: a["labels"].get("instance") == f"127.0.0.1:{port}",
            ALERT_TIMEOUT,
        )

    def _agent_absent(self) -> None:
        """The agent job has no target left (a DaemonSet without pods)."""
        since = time.monotonic()
        self.prom.reload(self.config(agents=False))
        self._expect(
            "HalfCloseAgentAbsent",
            "the agent job has no target (Prometheus config with no agent left)",
            since,
            lambda a: True,
            ALERT_TIMEOUT,
        )


@contextlib.contextmanager
def running_stack(
    cluster: Cluster, workdir: Path, prometheus_binary: str, containers: FakeContainers
) -> Iterator[Stack]:
    stack = Stack(cluster, workdir, prometheus_binary)
    try:
        stack.up(containers)
        yield stack
    finally:
        problems = stack.down()
        if problems:
            raise AssertionError(f"teardown: {problems}")
