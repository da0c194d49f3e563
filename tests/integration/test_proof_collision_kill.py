"""The kill path of a collision (istio#43301), on the real kernel, through the CLI.

When the app reuses a leaked socket's ephemeral port, conntrack holds the new
connection's SYN_SENT entry under the stale socket's reply tuple, and the new
connection hangs until the stale socket goes.  The scan reports it as
``collision`` and ``--action kill`` destroys it first: regardless of
``--min-idle``, ahead of older leaks within ``--max-kills``; the re-check right
before SOCK_DESTROY accepts the SYN_SENT entry (it is not this connection's).

The new connection's entry is made with ``conntrack -I`` (the exact tuples a
reused port produces) so the test does not depend on the challenge ACK being
lost; tests/integration/test_collision*.py reproduce the whole hang.
Before (commit 33bbaae) such a socket read as at-risk and kill refused it
(``not-leaked``), exactly while the app hung.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from support.scratchnet import run, skip_unless_root, ss

pytestmark = pytest.mark.kernel


def halfclose(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "halfclose", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def new_connection_entry(netns: str, pair: Any, service: Any) -> None:
    """The SYN_SENT entry a reused app port makes, under the stale socket's reply tuple."""
    eport = str(pair.app.port)
    run(
        "conntrack", "-I", "-p", "tcp",
        "-s", str(pair.app.ip), "-d", str(service.ip),
        "--sport", eport, "--dport", str(service.port),
        "-r", str(pair.proxy_downstream.ip), "-q", str(pair.app.ip),
        "--reply-port-src", str(pair.proxy_downstream.port), "--reply-port-dst", eport,
        "--state", "SYN_SENT", "--timeout", "60",
        netns=netns,
    )  # fmt: skip


def kill(netns: str, *args: str) -> dict[str, Any]:
    proc = halfclose("scan", "--netns", netns, "--action", "kill", "--output", "json", *args)
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def fin_wait2_peers(netns: str) -> set[str]:
    return {ln.split()[-1] for ln in ss(netns, "state", "fin-wait-2")}


def test_a_collision_is_killed_first_regardless_of_min_idle(make_lab: Any) -> None:
    skip_unless_root("conntrack", "ss")
    lab = make_lab()
    first, second, third = lab.leak(count=3)
    ns = lab.pod_netns(0)

    # Seconds-old leaks, --min-idle 600: only the collision qualifies.
    new_connection_entry(ns, first, lab.service)
    doc = kill(ns, "--min-idle", "600")
    found = {f["peer"]: f for f in doc["findings"]}
    assert (found[str(first.app)]["kind"], found[str(first.app)]["action"]) == (
        "collision",
        "killed",
    )
    assert str(second.app) not in found and str(third.app) not in found  # too young to list
    left = fin_wait2_peers(ns)
    assert str(first.app) not in left and {str(second.app), str(third.app)} <= left

    # Budget of one: the collision goes first, the plain leak waits.
    new_connection_entry(ns, third, lab.service)
    doc = kill(ns, "--min-idle", "0", "--max-kills", "1")
    assert [(f["peer"], f["kind"], f["action"]) for f in doc["findings"]] == [
        (str(third.app), "collision", "killed"),
        (str(second.app), "leaked", "none"),
    ]
    assert doc["findings"][1]["reason"] == "over-max-kills"
    left = fin_wait2_peers(ns)
    assert str(third.app) not in left and str(second.app) in left
