"""The agent loop on the real kernel with in-memory Kubernetes adapters.

A lab pod's proxy is made to look like a containerd container (a cgroup2
scope named after a container ID), so the agent resolves the Pod object to
the lab's netns exactly as on a node.  Leaks form on their own (the app
closes after the NAT entry expired) while the agent runs.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from support.agentrun import NODE, Running, policy, sample, wait_for
from support.podcgroup import FakeContainers, can_fake_containers, pod_object

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(bool(can_fake_containers()), reason=str(can_fake_containers())),
]

CLOSE_WAIT = 2


def test_kill_policy_kills_leaks_within_a_second_of_forming(
    lab: Any, containers: FakeContainers, tmp_path: Path
) -> None:
    cid = containers.adopt(lab.proxy_pid(0))
    with Running(tmp_path) as run:
        run.world.put_namespace("shop")
        run.world.put_pod(pod_object("shop", "web", NODE, cid))
        run.world.put_policy(policy("kill", action="KillSockets"))
        healthy = lab.idle(2)
        wait_for(
            "the netns to be watched",
            lambda: sample(run.registry, "halfclose_watched_netns") == 1,
            10,
        )
        late = lab.late_close(count=3, after_seconds=CLOSE_WAIT + 4)
        wait_for(
            "3 kills",
            lambda: (
                sample(run.registry, "halfclose_sockets_killed_total", namespace="shop", pod="web")
                == 3
            ),
            CLOSE_WAIT + 6,
        )
        lifetimes = sample(run.registry, "halfclose_leak_lifetime_seconds_sum")
        count = sample(run.registry, "halfclose_leak_lifetime_seconds_count")
        assert count == 3
        assert lifetimes / count < 1.0
        report = run.reports.reports[("shop", "web")]
        assert report["killedTotal"] == 3
        assert report["leaked"] == 0
        messages = [e.message for e in run.reports.events]
        assert "Killed 3 leaked half-closed sockets on :15001" in messages
        assert all(e.type == "Normal" for e in run.reports.events)
        assert [p.proxy_downstream for p in healthy]  # still there
        status = lab.status()
        del late, status


def test_pod_netns_vanishing_is_survived_and_dropped(
    containers: FakeContainers, tmp_path: Path
) -> None:
    from halfclose.lab import Lab, LabSettings

    lab = Lab(
        LabSettings(prefix=f"hct-{secrets.token_hex(2)}-av", pods=1, close_wait_timeout=CLOSE_WAIT)
    )
    lab.up()
    try:
        cid = containers.adopt(lab.proxy_pid(0))
        with Running(tmp_path) as run:
            run.world.put_namespace("shop")
            run.world.put_pod(pod_object("shop", "web", NODE, cid))
            run.world.put_policy(policy("kill", action="KillSockets", scanIntervalSeconds=1))
            wait_for(
                "the netns to be watched",
                lambda: sample(run.registry, "halfclose_watched_netns") == 1,
                10,
            )
            scans = run.agent.scans
            wait_for("a scan", lambda: run.agent.scans > scans, 5)
            lab.down()  # the pod's processes and netns go while the agent watches
            wait_for(
                "the netns dropped",
                lambda: sample(run.registry, "halfclose_watched_netns") == 0,
                10,
            )
            assert run.thread.is_alive()
            assert run.agent.healthy()
    finally:
        lab.down()


def test_pods_sharing_a_netns_are_scanned_once(
    lab: Any, containers: FakeContainers, tmp_path: Path
) -> None:
    import subprocess

    # A second "container" in the same netns (as a pause container would be),
    # named by a second Pod object: one netns, one scanner, one owner of findings.
    sidecar = subprocess.Popen(["ip", "netns", "exec", lab.pod_netns(0), "sleep", "60"])
    try:
        wait_for(
            "the sleeper in the netns",
            lambda: (
                Path(f"/proc/{sidecar.pid}/ns/net").exists()
                and Path(f"/proc/{sidecar.pid}/ns/net").stat().st_ino
                == Path(lab.pod_netns_path(0)).stat().st_ino
            ),
            5,
        )
        cid_a = containers.adopt(lab.proxy_pid(0))
        cid_b = containers.adopt(sidecar.pid)
        with Running(tmp_path) as run:
            run.world.put_namespace("shop")
            run.world.put_pod(pod_object("shop", "b-second", NODE, cid_b))
            run.world.put_pod(pod_object("shop", "a-first", NODE, cid_a))
            run.world.put_policy(policy("observe", action="Report"))
            lab.leak(1)
            # The report appears at the first scan, which may come before the
            # leak has formed: wait for the leak itself, under the first pod.
            wait_for(
                "the leak in a-first's report",
                lambda: (
                    sample(
                        run.registry, "halfclose_leaked_sockets", namespace="shop", pod="a-first"
                    )
                    == 1
                ),
                10,
            )
            assert ("shop", "a-first") in run.reports.reports
            assert sample(run.registry, "halfclose_watched_netns") == 1
            assert len(run.agent.netns) == 1
            assert ("shop", "b-second") not in run.reports.reports
            assert sample(
                run.registry, "halfclose_leaked_sockets", namespace="shop", pod="b-second"
            ) in (None, 0)
    finally:
        containers.release(sidecar.pid)
        sidecar.kill()
        sidecar.wait()
