"""The node agent against the real control plane AND the real-kernel lab, together.

The world is Node-less: a Namespace, a Pod whose ``spec.nodeName`` is the
agent's node and whose ``containerID`` is made to resolve to a lab pod's netns
(the lab proxy is moved into a cgroup2 ``cri-containerd-<id>.scope``), so the
agent runs unmodified: real watches of a real kube-apiserver, real /proc, real
netlink.  It authenticates with the chart's agent ServiceAccount token, so its
RBAC is the chart's, and talks through the fault proxy (tests/support/faultproxy.py),
which the outage test uses to fail its writes and drop its watches.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from halfclose.agent.daemon.main import Daemon
from halfclose.agent.daemon.settings import AgentSettings
from halfclose.api.report import report_manifest
from support.controlplane import ControlPlane
from support.faultproxy import FaultProxy
from support.podcgroup import FakeContainers, can_fake_containers, pod_object

pytestmark = [
    pytest.mark.kube,
    pytest.mark.kernel,
    pytest.mark.skipif(bool(can_fake_containers()), reason=str(can_fake_containers())),
]

NODE = "node-a"
CLOSE_WAIT = 2
G, V = "halfclose.io", "v1alpha1"


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def policy(name: str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "namespaces": ["shop"],
        "thresholds": {"minIdleSeconds": 0},
        "scanIntervalSeconds": 30,
    }
    base.update(spec)
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "HalfClosePolicy",
        "metadata": {"name": name},
        "spec": base,
    }


class World:
    """The control plane seeded with a namespace, our pod and a pod of another node;
    ``kubeconfig`` acts as the chart's agent, through the fault ``proxy``."""

    def __init__(
        self, api: ControlPlane, lab: Any, containers: FakeContainers, proxy: FaultProxy
    ) -> None:
        self.api = api
        self.lab = lab
        self.proxy = proxy
        self.kubeconfig = api.chart_kubeconfig("agent", server=proxy.url)
        cid = containers.adopt(lab.proxy_pid(0))
        api.put_object(
            "",
            "v1",
            "namespaces",
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": "shop", "labels": {"mesh": "on"}},
            },
        )
        self.pod = api.put_object("", "v1", "pods", pod_object("shop", "web", NODE, cid))
        api.put_object(
            "", "v1", "pods", pod_object("shop", "far", "node-b", FakeContainers.new_id())
        )

    def report(self) -> dict[str, Any] | None:
        obj: dict[str, Any] | None = self.api.get_object(G, V, "halfclosereports", "web", "shop")
        return obj

    def events(self) -> list[dict[str, Any]]:
        return [
            e
            for e in self.api.objects("", "v1", "events", "shop")
            if e.get("involvedObject", {}).get("name") == "web"
        ]

    def close_wait_sysctl(self) -> int:
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.lab.pod_netns(0),
                "sysctl",
                "-n",
                "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return int(out.stdout)


class RunningAgent:
    def __init__(self, world: World, state_dir: Path) -> None:
        settings = AgentSettings(
            node_name=NODE,
            kubeconfig=world.kubeconfig,
            metrics_host="127.0.0.1",
            metrics_port=0,
            state_dir=str(state_dir),
            shutdown_flush_seconds=3.0,
        )
        self.daemon = Daemon.build(settings)
        self.thread = threading.Thread(target=self.daemon.run, name="agent", daemon=True)

    def __enter__(self) -> RunningAgent:
        self.daemon.start()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "the agent did not shut down"

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.daemon.http.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        value = self.daemon.registry.get_sample_value(name, labels)
        return value or 0.0


@pytest.fixture
def world(
    kube: ControlPlane, lab: Any, containers: FakeContainers, fault_proxy: FaultProxy
) -> World:
    return World(kube, lab, containers, fault_proxy)


AGENT_USER = "system:serviceaccount:halfclose-system:halfclose-agent"


def agent_requests(api: ControlPlane) -> list[Any]:
    return [r for r in api.requests if r.user == AGENT_USER]


def sockets(lab: Any) -> set[tuple[str, str, str]]:
    out = subprocess.run(
        ["ip", "netns", "exec", lab.pod_netns(0), "ss", "-Htan"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = set()
    for line in out.splitlines():
        f = line.split()
        rows.add((f[0], f[3], f[4]))
    return rows


KILLED = re.compile(r"Killed (\d+) leaked half-closed sockets on :15001")


def _killed_in(events: list[dict[str, Any]]) -> int:
    """Sockets the LeakedSocketsKilled Events name (a repeated message is one series)."""
    total = 0
    for e in events:
        match = KILLED.fullmatch(e.get("message", ""))
        if e.get("reason") == "LeakedSocketsKilled" and match:
            total += int(match.group(1)) * int(e.get("count") or 1)
    return total


def test_kill_policy_kills_reports_and_counts(world: World, tmp_path: Path) -> None:
    api = world.api
    with RunningAgent(world, tmp_path) as agent:
        assert agent.get("/healthz")[0] == 200
        api.kubectl("apply", "-f", "-", input=_yaml(policy("kill", action="KillSockets")))
        wait_for("readiness", lambda: agent.get("/readyz")[0] == 200, 10)
        wait_for(
            "the pod's netns watched", lambda: agent.metric("halfclose_watched_netns") == 1, 10
        )
        world.lab.idle(2)
        established = {row for row in sockets(world.lab) if row[0] == "ESTAB"}
        assert len(established) >= 4
        world.lab.late_close(count=3, after_seconds=CLOSE_WAIT + 4)
        wait_for(
            "3 kills",
            lambda: (
                agent.metric("halfclose_sockets_killed_total", namespace="shop", pod="web") == 3
            ),
            CLOSE_WAIT + 8,
        )
        report = wait_for(
            "the report",
            lambda: (r := world.report()) and (r.get("status") or {}).get("killedTotal") == 3 and r,
            10,
        )
        # The three may go in one kill batch or two (their re-checks fall due
        # milliseconds apart): one Event per batch, "Killed N ...".
        events = wait_for(
            "the events", lambda: _killed_in(world.events()) == 3 and world.events(), 10
        )
        _, metrics_text = agent.get("/metrics")
    # A restarted agent carries the pod's totals on from its report.
    with RunningAgent(world, tmp_path) as agent:
        wait_for(
            "the pod's netns watched", lambda: agent.metric("halfclose_watched_netns") == 1, 10
        )
        world.lab.late_close(count=1, after_seconds=CLOSE_WAIT + 4)
        wait_for(
            "killedTotal 4 after the restart",
            lambda: (r := world.report()) and (r.get("status") or {}).get("killedTotal") == 4,
            CLOSE_WAIT + 10,
        )
    expected = report_manifest(
        namespace="shop",
        pod_name="web",
        pod_uid=world.pod["metadata"]["uid"],
        node_name=NODE,
        policy="kill",
    )
    assert report["spec"] == expected["spec"]
    assert report["metadata"]["labels"] == expected["metadata"]["labels"]
    owner = report["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "Pod",
        "web",
        world.pod["metadata"]["uid"],
    )
    assert owner["controller"] is False and owner["blockOwnerDeletion"] is False
    assert report["status"]["leaked"] == 0  # cleared: the pod is clean again
    killed = [f for f in report["status"]["findings"] if f["action"] == "killed"]
    assert len(killed) == 3 and all(f["kind"] == "leaked" for f in killed)
    assert events and all(e["reason"] == "LeakedSocketsKilled" for e in events)
    for event in events:
        assert KILLED.fullmatch(event["message"]), event["message"]
        assert event["type"] == "Normal"
        assert event["reportingComponent"] == "halfclose.io/agent"
    assert 'halfclose_sockets_killed_total{namespace="shop",pod="web"} 3.0' in metrics_text
    assert "halfclose_leak_lifetime_seconds_count 3.0" in metrics_text
    # The healthy connections survived.
    assert established <= sockets(world.lab)
    # Pods of this node only, by server-side field selector: never a cluster-wide pod list.
    calls = agent_requests(api)
    pod_requests = [r for r in calls if r.path == "/api/v1/pods"]
    assert pod_requests, "the agent never listed pods"
    assert all(r.query.get("fieldSelector") == f"spec.nodeName={NODE}" for r in pod_requests)
    assert not any(r.path.startswith("/api/v1/namespaces/shop/pods") for r in calls)
    assert [r for r in calls if r.code in {401, 403}] == []  # the chart's RBAC sufficed


def test_report_policy_changes_nothing(world: World, tmp_path: Path) -> None:
    api = world.api
    leaks = world.lab.leak(2)
    world.lab.live_half_close(1)
    before = sockets(world.lab)
    with RunningAgent(world, tmp_path) as agent:
        api.put_object(G, V, "halfclosepolicies", policy("observe", action="Report"))
        report = wait_for(
            "the report",
            lambda: (r := world.report()) and (r.get("status") or {}).get("leaked") == 2 and r,
            10,
        )
        scans = agent.daemon.agent.scans
        wait_for("another scan", lambda: agent.daemon.agent.scans > scans, CLOSE_WAIT + 32)
        assert agent.metric("halfclose_leaked_sockets", namespace="shop", pod="web") == 2
        assert agent.metric("halfclose_at_risk_sockets", namespace="shop", pod="web") == 1
        # The pod stops matching: its report goes, and so do its series.
        api.delete_object(G, V, "halfclosepolicies", "observe")
        wait_for("the report deleted", lambda: world.report() is None, 10)
        wait_for(
            "the series removed",
            lambda: (
                agent.daemon.registry.get_sample_value(
                    "halfclose_leaked_sockets", {"namespace": "shop", "pod": "web"}
                )
                is None
            ),
            5,
        )
        assert agent.metric("halfclose_watched_netns") == 0
    assert sockets(world.lab) == before
    assert report["status"]["atRisk"] == 1
    assert report["status"]["killedTotal"] == 0
    assert {f["action"] for f in report["status"]["findings"]} == {"none"}
    assert len(leaks) == 2
    assert world.events() == []


def test_sysctl_strategy_patches_and_restores_on_policy_deletion(
    world: World, tmp_path: Path
) -> None:
    api = world.api
    assert world.close_wait_sysctl() == CLOSE_WAIT
    with RunningAgent(world, tmp_path):
        api.put_object(
            G,
            V,
            "halfclosepolicies",
            policy(
                "prevent",
                action="PatchConntrack",
                conntrack={"strategy": "Sysctl", "closeWaitTimeoutSeconds": 600},
            ),
        )
        wait_for("the sysctl patched", lambda: world.close_wait_sysctl() == 600, 10)
        assert list((tmp_path / "conntrack").glob("*.json")), "no restore record written"
        events = wait_for("the event", world.events, 10)
        assert events[0]["reason"] == "ConntrackSysctlPatched"
        api.delete_object(G, V, "halfclosepolicies", "prevent")
        wait_for("the sysctl restored", lambda: world.close_wait_sysctl() == CLOSE_WAIT, 10)
        assert not list((tmp_path / "conntrack").glob("*.json"))


def test_sysctl_restored_after_a_restart_when_the_policy_went_meanwhile(
    world: World, tmp_path: Path
) -> None:
    api = world.api
    with RunningAgent(world, tmp_path):
        api.put_object(
            G,
            V,
            "halfclosepolicies",
            policy(
                "prevent",
                action="PatchConntrack",
                conntrack={"strategy": "Sysctl", "closeWaitTimeoutSeconds": 600},
            ),
        )
        wait_for("the sysctl patched", lambda: world.close_wait_sysctl() == 600, 10)
    assert world.close_wait_sysctl() == 600  # SIGTERM leaves the patch in place
    api.delete_object(G, V, "halfclosepolicies", "prevent")  # while the agent is down
    with RunningAgent(world, tmp_path):
        wait_for("the sysctl restored", lambda: world.close_wait_sysctl() == CLOSE_WAIT, 10)


def test_api_outage_loses_no_report(world: World, tmp_path: Path) -> None:
    api = world.api
    api.put_object(G, V, "halfclosepolicies", policy("kill", action="KillSockets"))
    with RunningAgent(world, tmp_path) as agent:
        wait_for(
            "the pod's netns watched", lambda: agent.metric("halfclose_watched_netns") == 1, 10
        )
        # From now on every report and event write fails, and the watches drop.
        world.proxy.fail(10_000, 503, path_regex="halfclosereports|events")
        assert world.proxy.drop_watches() >= 3  # policies, pods, namespaces
        world.lab.late_close(count=2, after_seconds=CLOSE_WAIT + 4)
        wait_for(
            "2 kills during the outage",
            lambda: (
                agent.metric("halfclose_sockets_killed_total", namespace="shop", pod="web") == 2
            ),
            CLOSE_WAIT + 8,
        )
        wait_for(
            "the buffered update", lambda: agent.metric("halfclose_pending_report_updates") >= 1, 5
        )
        assert world.report() is None
        world.proxy.clear()  # the API is back
        report = wait_for(
            "the report after the outage",
            lambda: (r := world.report()) and (r.get("status") or {}).get("killedTotal") == 2 and r,
            20,
        )
        wait_for(
            "an empty buffer", lambda: agent.metric("halfclose_pending_report_updates") == 0, 5
        )
    assert report["status"]["leaked"] == 0


def _yaml(obj: dict[str, Any]) -> str:
    import yaml

    return str(yaml.safe_dump(obj))


def test_console_script_runs_and_stops_cleanly_on_sigterm(
    kube: ControlPlane, tmp_path: Path
) -> None:
    import os
    import signal
    import sys

    script = Path(sys.prefix) / "bin" / "halfclose-agent"
    env = dict(
        os.environ,
        NODE_NAME=NODE,
        KUBECONFIG=kube.chart_kubeconfig("agent"),
        METRICS_PORT="0",
        STATE_DIR=str(tmp_path),
        LOG_LEVEL="INFO",
    )
    proc = subprocess.Popen([str(script)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        started = time.monotonic()
        line = ""
        while "metrics on" not in line and time.monotonic() - started < 20:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the agent exited early"
        assert "metrics on" in line
        wait_for(
            "the policy watch",
            lambda: any(
                r.path == f"/apis/{G}/{V}/halfclosepolicies" and r.verb == "watch"
                for r in agent_requests(kube)
            ),
            10,
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_configuration_is_one_line_and_exit_2(tmp_path: Path) -> None:
    import os
    import sys

    script = Path(sys.prefix) / "bin" / "halfclose-agent"
    env = {k: v for k, v in os.environ.items() if k != "NODE_NAME"}
    done = subprocess.run(
        [str(script)], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "NODE_NAME" in done.stderr
    env["NODE_NAME"] = NODE
    env["METRICS_PORT"] = "http"
    done = subprocess.run(
        [str(script)], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == "halfclose-agent: error: METRICS_PORT must be a port number, not 'http'"
    )
