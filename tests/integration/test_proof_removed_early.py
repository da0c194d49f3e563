"""Absence is not expiry (design.md §2 part 4), on the real kernel, through the CLI.

``conntrack -F`` or ``-D`` in a pod netns removes the NAT entries of *live*
half-closed connections: the app is still sending, and its next packet is
picked up mid-stream (nf_conntrack_tcp_loose) and NATed to the proxy again.
Such a socket has no entry, but it has not been silent for as long as a
half-closed entry lives in this netns, so its entry did not expire: it is
``unproven`` (entry-removed-early) and nothing may destroy it.

Before the proof (commit 33bbaae) the same scan called all three "leaked" and
``--action kill --min-idle 0`` destroyed them.

The app is paused (SIGSTOP) for the moment we flush and look, so the scan
meets the emptied table every time rather than racing the app's next byte
(it writes one every second); once it continues, its next write revives the
entries, re-NATed to the proxy: the connections were alive all along.
Packets already in flight are let land first: an upstream ACK that arrives
after the flush matches no entry, is picked up as a new inbound connection and
REDIRECTed to the proxy's inbound port (as Istio's ISTIO_INBOUND does), whose
RST then tears the pair down: a real effect of flushing, but not this test's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from support.scratchnet import run, skip_unless_root, ss, wait_for

pytestmark = pytest.mark.kernel

# Long enough that the app's 1 s writes keep every entry alive (the lab sends
# every min(1 s, close_wait / 4)); the proof's bar is then >= 20 s of silence.
CLOSE_WAIT = 20
# Delayed ACKs (40-200 ms) of what the app sent last have landed by then.
SETTLE = 0.5


def halfclose(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "halfclose", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def scan_kill(netns: str) -> dict[str, Any]:
    proc = halfclose(
        "scan", "--netns", netns, "--action", "kill", "--min-idle", "0", "--output", "json"
    )
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


@contextlib.contextmanager
def app_paused(pid: int) -> Iterator[None]:
    """The app stops writing for a moment (its sockets stay as they are)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(SETTLE)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def live_lab(make_lab: Any, count: int) -> tuple[Any, list[Any]]:
    skip_unless_root("iptables", "conntrack", "ss")
    lab = make_lab(close_wait_timeout=CLOSE_WAIT)
    return lab, lab.live_half_close(count=count)


def fin_wait2_peers(netns: str) -> set[str]:
    # With a state filter ss leaves the State column out: ... Local Peer.
    return {line.split()[-1] for line in ss(netns, "state", "fin-wait-2")}


def by_peer(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["peer"]: f for f in doc["findings"]}


def test_flush_with_live_half_closes_is_unproven_and_never_killed(make_lab: Any) -> None:
    lab, pairs = live_lab(make_lab, 3)
    ns = lab.pod_netns(0)
    apps = {str(p.app) for p in pairs}
    app_pid = lab.app_pid(0)
    assert app_pid is not None
    with app_paused(app_pid):
        run("conntrack", "-F", netns=ns)
        doc = scan_kill(ns)
        still = fin_wait2_peers(ns)
    found = by_peer(doc)
    assert apps <= set(found), doc
    for app in apps:
        f = found[app]
        assert (f["kind"], f.get("reason"), f["action"]) == (
            "unproven",
            "entry-removed-early",
            "none",
        ), f
        assert f["silence_seconds"] < CLOSE_WAIT
    assert doc.get("kill_summary", {}).get("killed", 0) == 0
    assert apps <= still  # every proxy socket is still there
    # Alive: once the app's packets flow again its next byte brings the
    # entries back (re-NATed), and the same sockets read at-risk.
    wait_for(
        lambda: {f["peer"] for f in scan_kill(ns)["findings"] if f["kind"] == "at-risk"} >= apps,
        timeout=15,
        interval=0.5,
    )


def test_delete_of_one_entry_is_unproven_and_never_killed(make_lab: Any) -> None:
    lab, pairs = live_lab(make_lab, 3)
    ns = lab.pod_netns(0)
    victim, *others = pairs
    app_pid = lab.app_pid(0)
    assert app_pid is not None
    with app_paused(app_pid):
        run("conntrack", "-D", "-p", "tcp", "--orig-port-src", str(victim.app.port), netns=ns)
        doc = scan_kill(ns)
        still = fin_wait2_peers(ns)
    found = by_peer(doc)
    v = found[str(victim.app)]
    assert (v["kind"], v.get("reason"), v["action"]) == ("unproven", "entry-removed-early", "none")
    for p in others:
        assert found[str(p.app)]["kind"] == "at-risk"
        assert found[str(p.app)]["action"] == "none"
    assert doc.get("kill_summary", {}).get("killed", 0) == 0
    assert {str(p.app) for p in pairs} <= still
