"""The agent and the proof's part 4 on the real kernel: a flush is not an expiry.

``conntrack -F`` in a pod netns removes the NAT entries of live half-closes
(design.md §3).  The agent hears the DESTROY events and scans at once; with
``minIdleSeconds: 0`` the pre-proof agent killed those sockets ~150 ms later
(issue 9).  Now they are ``unproven`` (``entry-removed-early``): counted in
``halfclose_unproven_sockets``, carried to the report with their reason, and
never acted on.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from support.agentrun import NODE, Running, policy, wait_for
from support.podcgroup import FakeContainers, can_fake_containers, pod_object

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(bool(can_fake_containers()), reason=str(can_fake_containers())),
]

# Long enough that the flush comes well before any entry could have expired.
CLOSE_WAIT = 30


def fin_wait2(netns: str) -> int:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "ss", "-Htan", "state", "fin-wait-2", "sport", "= :15001"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return len(out.splitlines())


def test_flushed_entries_make_unproven_findings_that_are_reported_never_killed(
    make_lab: Any, containers: FakeContainers, tmp_path: Path
) -> None:
    lab = make_lab(close_wait_timeout=CLOSE_WAIT)
    netns = lab.pod_netns(0)
    cid = containers.adopt(lab.proxy_pid(0))
    with Running(tmp_path) as run:  # minIdleSeconds: 0, as the issue found it
        run.world.put_namespace("shop")
        run.world.put_pod(pod_object("shop", "web", NODE, cid))
        run.world.put_policy(policy("kill", action="KillSockets", scanIntervalSeconds=1))
        labels = {"namespace": "shop", "pod": "web"}
        wait_for("the netns watched", lambda: run.sample("halfclose_watched_netns") == 1, 10)
        lab.late_close(count=3, after_seconds=120)  # half-closed, the app silent for now
        wait_for("3 at-risk", lambda: run.sample("halfclose_at_risk_sockets", **labels) == 3, 10)
        assert fin_wait2(netns) == 3
        subprocess.run(
            ["ip", "netns", "exec", netns, "conntrack", "-F"],
            check=True,
            capture_output=True,
            timeout=10,
        )
        time.sleep(1.5)  # DESTROY events -> scans, and periodic ones: nothing is killed
        assert fin_wait2(netns) == 3
        assert run.sample("halfclose_sockets_killed_total", **labels) == 0
        assert run.sample("halfclose_leaked_sockets", **labels) == 0
        assert not any(a.kills for a in run.remediator.acted)
        wait_for(
            "3 unproven (entry-removed-early)",
            lambda: (
                run.sample("halfclose_unproven_sockets", reason="entry-removed-early", **labels)
                == 3
            ),
            5,
        )
        report = run.reports.reports[("shop", "web")]
        assert report["unproven"] == 3
        unproven = [f for f in report["findings"] if f["kind"] == "unproven"]
        assert len(unproven) == 3
        assert {(f["reason"], f["action"]) for f in unproven} == {("entry-removed-early", "none")}
