"""Istio ambient on the real kernel: istio-cni's in-pod rules and a ztunnel (issue 9 §4).

``halfclose lab up --style ambient`` lays the rules istio-cni writes into the
app pod's netns and runs one ztunnel in a netns of its own (``<prefix>-zt``)
that opens its listeners and dials *inside* each pod's netns, listening
dual-stack, its dials marked 0x539.  So the leaked sockets of a pod are owned
by a process of another netns, on a mapped-IPv4 listener, behind a UDP-only
DNS rule: each a way the pre-session scanner went wrong.  The product is
driven through its CLI (``support.product``) and, for the policy run, the
agent loop with in-memory Kubernetes adapters.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from halfclose.lab import Lab, ProxiedPair
from support import product
from support.lab_fixtures import LabFactory
from support.podcgroup import FakeContainers, can_fake_containers, pod_object
from support.scratchnet import wait_for

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("iptables-save",)),
    reason="needs iptables-save (see .ci/system-deps)",
)

CW = 2


def mapped(pair: ProxiedPair) -> str:
    return f"[::ffff:{pair.app.ip}]:{pair.app.port}"


def netns_inode_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def pod_run(lab: Lab, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", lab.pod_netns(0), *argv],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def proxy_states(lab: Lab, pairs: list[ProxiedPair]) -> list[tuple[str, str]]:
    out = pod_run(lab, "ss", "-Htan")
    down: dict[str, str] = {}
    up: dict[str, str] = {}
    for f in (line.split() for line in out.splitlines()):
        if len(f) >= 5:
            down.setdefault(f[4], f[0])
            up.setdefault(f[3], f[0])
    return [(down.get(mapped(p), "-"), up.get(str(p.proxy_upstream), "-")) for p in pairs]


def test_ambient_lab_lays_istio_cni_rules_and_a_ztunnel_from_another_netns(
    make_lab: LabFactory,
) -> None:
    lab = make_lab(style="ambient")
    rules = pod_run(lab, "iptables-save")
    for rule in (
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff "
        "-j REDIRECT --to-ports 15001",
        "-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! "
        "--mark 0x539/0xfff -j REDIRECT --to-ports 15006",
        "-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 "
        "-j REDIRECT --to-ports 15053",
    ):
        assert rule in rules
    assert "lookup 100" in pod_run(lab, "ip", "rule")
    ztunnel = lab.proxy_pid(0)
    assert lab.node_netns is not None
    node_ino = os.stat(f"/run/netns/{lab.node_netns}").st_ino
    pod_ino = os.stat(lab.pod_netns_path(0)).st_ino
    assert netns_inode_of(ztunnel) == node_ino != pod_ino
    listening = pod_run(lab, "ss", "-Htlnpe")
    for port in (15001, 15006, 15008):
        rows = [x for x in listening.splitlines() if f"*:{port} " in x]
        assert len(rows) == 1 and "lab-ztunnel" in rows[0] and "v6only:0" in rows[0], listening
    (pair,) = lab.idle(1)
    dials = pod_run(lab, "ss", "-Htane", "dst", "203.0.113.10")
    row = next(x for x in dials.splitlines() if str(pair.proxy_upstream) in x)
    assert "fwmark:0x539" in row


def test_leak_is_found_with_ztunnel_as_owner_and_killed(make_lab: LabFactory) -> None:
    """Base: owner unknown (searched in the pod's netns only), live half-closes
    reported leaked (mapped addresses), 15053 taken for a TCP capture port."""
    lab = make_lab(style="ambient", close_wait_timeout=CW)
    leaks = lab.leak(2)
    live = lab.live_half_close(1)
    report = product.scan(lab.pod_netns(0), "--min-idle", "0", "--processes")
    assert report["capture_ports"] == [15001, 15006]
    found = product.by_peer(report)
    assert [found[mapped(p)]["kind"] for p in leaks] == ["leaked", "leaked"]
    assert [found[mapped(p)]["kind"] for p in live] == ["at-risk"]
    ztunnel = lab.proxy_pid(0)
    for p in leaks:
        f = found[mapped(p)]
        assert (f["pid"], f["process"]) == (ztunnel, "lab-ztunnel")
        assert f["upstream"] is not None and f["upstream"]["local"] == str(p.proxy_upstream)

    killed = product.scan(lab.pod_netns(0), "--action", "kill", "--min-idle", "0")
    acted = product.by_peer(killed)
    assert [acted[mapped(p)]["action"] for p in leaks] == ["killed", "killed"]
    # ztunnel closes the upstream half of a destroyed pair itself.
    wait_for(lambda: proxy_states(lab, leaks) == [("-", "-")] * 2, timeout=5)
    time.sleep(0.5)
    assert proxy_states(lab, live) == [("FIN-WAIT-2", "CLOSE-WAIT")]


# -- the agent, with a KillSockets policy selecting the app pod ----------------------


def _policy() -> dict[str, Any]:
    return {
        "apiVersion": "halfclose.io/v1alpha1",
        "kind": "HalfClosePolicy",
        "metadata": {"name": "kill", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "namespaces": ["shop"],
            "thresholds": {"minIdleSeconds": 0},
            "scanIntervalSeconds": 1,
            "action": "KillSockets",
        },
    }


@pytest.mark.skipif(bool(can_fake_containers()), reason=str(can_fake_containers()))
def test_kill_policy_on_the_app_pod_kills_the_ztunnel_leaks(
    make_lab: LabFactory, containers: FakeContainers, tmp_path: Path
) -> None:
    from prometheus_client import CollectorRegistry

    from halfclose.agent.daemon.loop import Agent
    from halfclose.agent.daemon.metrics import AgentMetrics
    from halfclose.agent.daemon.remediate import EngineRemediator
    from halfclose.agent.daemon.settings import AgentSettings
    from halfclose.agent.kube.fake import FakeReports, FakeWorld

    node = "node-test"
    lab = make_lab(style="ambient", close_wait_timeout=CW)
    healthy = lab.idle(1)  # starts the app: the app pod's only container
    app_pid = lab.app_pid(0)
    assert app_pid is not None
    cid = containers.adopt(app_pid)
    registry = CollectorRegistry()
    world, reports = FakeWorld(), FakeReports()
    agent = Agent(
        AgentSettings(node_name=node, state_dir=str(tmp_path)),
        AgentMetrics(registry, node),
        world,
        reports,
        EngineRemediator(str(tmp_path)),
    )
    world.on_change = agent.notify
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        world.put_namespace("shop")
        world.put_pod(pod_object("shop", "web", node, cid))
        world.put_policy(_policy())
        wait_for(lambda: registry.get_sample_value("halfclose_watched_netns") == 1, timeout=10)
        live = lab.live_half_close(1)  # at-risk the whole time: never to be killed
        late = lab.late_close(2, after_seconds=CW + 3)
        pairs = list(late.pairs)

        def killed() -> float:
            value = registry.get_sample_value(
                "halfclose_sockets_killed_total", {"namespace": "shop", "pod": "web"}
            )
            return value or 0.0

        wait_for(lambda: killed() == 2, timeout=CW + 15, interval=0.1)
        wait_for(lambda: proxy_states(lab, pairs) == [("-", "-")] * 2, timeout=5)
        time.sleep(2.5)  # two more scans
        assert killed() == 2
        assert proxy_states(lab, list(healthy)) == [("ESTAB", "ESTAB")]
        assert proxy_states(lab, list(live)) == [("FIN-WAIT-2", "CLOSE-WAIT")]
        assert reports.reports[("shop", "web")]["killedTotal"] == 2
    finally:
        agent.stop()
        thread.join(10)
    assert not thread.is_alive()
