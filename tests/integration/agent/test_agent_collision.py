"""The agent and istio#43301 on the real kernel: a collision is killed within a second.

The pod of tests/support/collision.py runs under a KillSockets policy whose
``minIdleSeconds`` (3600) keeps its leak alive, and whose scan interval (30 s)
is far away: only the conntrack NEW event of the app's reused port can make
the agent act in time.  The app's connect must complete within a second of
the agent acting (its next SYN retransmission reaches the listener).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from pathlib import Path

import pytest

from halfclose.agent.core.model import Kind, Outcome
from support.agentrun import NODE, Running, policy, wait_for
from support.collision import APP_IP, PROXY_PORT, SERVICE, form_leak, pod
from support.podcgroup import FakeContainers, can_fake_containers, pod_object
from support.scratchnet import skip_unless_root

# init_net's fixed inode number (include/linux/proc_ns.h PROC_NET_INIT_INO).
INIT_NET_INODE = 0xEFFFFFF9

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(bool(can_fake_containers()), reason=str(can_fake_containers())),
]


def test_agent_kills_a_collision_on_the_new_event_and_the_connect_completes(
    containers: FakeContainers, tmp_path: Path
) -> None:
    skip_unless_root("iptables", "conntrack", "ss", "sysctl")
    with pod() as (ns, proxy, app), Running(tmp_path) as run:
        cid = containers.adopt(proxy.pid)
        run.world.put_namespace("shop")
        run.world.put_pod(pod_object("shop", "web", NODE, cid))
        run.world.put_policy(
            policy("kill", action="KillSockets", thresholds={"minIdleSeconds": 3600})
        )
        labels = {"namespace": "shop", "pod": "web"}
        wait_for("the netns watched", lambda: run.sample("halfclose_watched_netns") == 1, 10)
        c = form_leak(ns, proxy, app)
        wait_for(
            "the leak seen (and kept: too young)",
            lambda: run.sample("halfclose_leaked_sockets", **labels) == 1,
            10,
        )
        assert run.sample("halfclose_sockets_killed_total", **labels) == 0
        c.drop_challenge_acks()

        assert c.stale_present()
        connect = c.reconnect(timeout=20)
        what, connected = connect.result(timeout=10)

        assert what == "CONNECTED"
        plans = [a for a in run.remediator.acted if Kind.COLLISION in a.kills]
        assert len(plans) == 1, run.remediator.acted
        (plan,) = plans
        acted = plan.started
        assert plan.kills[0] is Kind.COLLISION  # first in its plan
        wait_for("the plan carried out", lambda: plan.outcomes is not None, 5)
        assert plan.outcomes is not None
        assert (Kind.COLLISION, Outcome.KILLED) in plan.outcomes
        reaction, unblock = acted - connect.started, connected - acted
        print(
            f"\ncollision agent: acted {reaction:.3f}s after connect() (NEW event -> kill); "
            f"connect completed {unblock:.3f}s after the agent acted "
            f"({connected - connect.started:.3f}s after connect())"
        )
        assert reaction < 1.0  # the event, not the 30 s scan interval
        assert unblock <= 1.0
        assert not c.stale_present()
        assert ("ESTAB", f"{APP_IP}:{c.app_port}", f"{SERVICE[0]}:{SERVICE[1]}") in c.ss()
        wait_for(
            "the collision counted",
            lambda: run.sample("halfclose_collisions_total", **labels) == 1,
            5,
        )
        assert run.sample("halfclose_sockets_killed_total", **labels) == 1
        messages = [e.message for e in run.reports.events if e.reason == "CollisionUnblocked"]
        assert messages == [
            f"Killed stale socket 127.0.0.1:{PROXY_PORT}<-{APP_IP}:{c.app_port} blocking a new "
            f"connection from {APP_IP}:{c.app_port} to {SERVICE[0]}:{SERVICE[1]}"
        ]


def test_a_pod_in_the_host_netns_is_refused(
    containers: FakeContainers, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A "container" that is a process of this (the host's) network namespace.
    here = os.stat("/proc/self/ns/net").st_ino
    host = {INIT_NET_INODE}
    with contextlib.suppress(OSError):  # pid 1 may be out of reach (a sandbox)
        host.add(os.stat("/proc/1/ns/net").st_ino)
    if here not in host:
        pytest.skip("this test runs outside the host's network namespace")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino == here
        cid = containers.adopt(sleeper.pid)
        caplog.set_level(logging.WARNING, logger="halfclose.agent.daemon.loop")
        with Running(tmp_path) as run:
            run.world.put_namespace("shop")
            run.world.put_pod(pod_object("shop", "hostish", NODE, cid))
            run.world.put_policy(policy("observe", action="Report"))
            wait_for(
                "the refusal",
                lambda: run.sample("halfclose_scan_errors_total", reason="host_netns") == 1,
                5,
            )
            time.sleep(0.3)  # another reconcile: refused once, not counted again
            run.agent.notify()
            time.sleep(0.3)
            assert run.sample("halfclose_scan_errors_total", reason="host_netns") == 1
            assert run.sample("halfclose_watched_netns") == 0
            assert run.agent.scans == 0
            events = [(e.reason, e.type) for e in run.reports.events]
            assert events == [("HostNetnsRefused", "Warning")]
        refusals = [
            r.getMessage() for r in caplog.records if "host network namespace" in r.getMessage()
        ]
        assert refusals == [
            "refusing pod shop/hostish: its containers resolve to the host network namespace; "
            "the agent never scans or acts on the node's own sockets"
        ]
    finally:
        containers.release(sleeper.pid)
        sleeper.kill()
        sleeper.wait()


def test_under_report_a_collision_is_counted_and_announced_not_killed(
    containers: FakeContainers, tmp_path: Path
) -> None:
    skip_unless_root("iptables", "conntrack", "ss", "sysctl")
    with pod() as (ns, proxy, app), Running(tmp_path) as run:
        cid = containers.adopt(proxy.pid)
        run.world.put_namespace("shop")
        run.world.put_pod(pod_object("shop", "web", NODE, cid))
        run.world.put_policy(policy("observe", action="Report"))
        labels = {"namespace": "shop", "pod": "web"}
        wait_for("the netns watched", lambda: run.sample("halfclose_watched_netns") == 1, 10)
        c = form_leak(ns, proxy, app)
        wait_for("the leak seen", lambda: run.sample("halfclose_leaked_sockets", **labels) == 1, 10)
        c.drop_challenge_acks()
        connect = c.reconnect(timeout=20)
        wait_for(
            "the collision counted",
            lambda: run.sample("halfclose_collisions_total", **labels) == 1,
            1.0,  # the NEW event, not the 30 s interval
        )
        wait_for("the Event", lambda: bool(run.reports.events), 2)
        assert [(e.reason, e.type, e.message) for e in run.reports.events] == [
            (
                "PortReuseCollision",
                "Warning",
                f"Stale socket 127.0.0.1:{PROXY_PORT}<-{APP_IP}:{c.app_port} blocking a new "
                f"connection from {APP_IP}:{c.app_port} to {SERVICE[0]}:{SERVICE[1]} "
                "(not killed)",
            )
        ]
        assert c.stale_present()  # Report never acts
        assert ("SYN-SENT", f"{APP_IP}:{c.app_port}", f"{SERVICE[0]}:{SERVICE[1]}") in c.ss()
        report = run.reports.reports[("shop", "web")]
        assert report["collision"] == 1
        assert [f["kind"] for f in report["findings"]] == ["collision"]
        del connect
