"""Dual-stack proxy listeners on the real kernel (issue 9 §3, design.md §2 part 3).

A proxy listening on ``[::]`` with IPV6_V6ONLY=0 (ztunnel's default; any proxy
binding ``::``) holds IPv4 peers as ``::ffff:a.b.c.d``, while their conntrack
entries are IPv4.  The lab's ``dual_stack`` option builds exactly that proxy.
The product is driven through its CLI (``support.product``), so these tests
can judge another build: ``HALFCLOSE_BIN=/work/base/.venv/bin/halfclose``.
The kernel (``ss``, ``conntrack -L``) is the oracle.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from halfclose.agent.core.model import Endpoint
from halfclose.lab import Lab, ProxiedPair
from support import product
from support.lab_fixtures import LabFactory
from support.scratchnet import wait_for

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("conntrack",)),
    reason="needs conntrack (see .ci/system-deps)",
)


def mapped(ep: Endpoint) -> str:
    """How the dual-stack proxy's socket (and ss, and the scan) spell an IPv4 peer."""
    return f"[::ffff:{ep.ip}]:{ep.port}"


def peers(pairs: list[ProxiedPair]) -> list[str]:
    return [mapped(p.app) for p in pairs]


def proxy_states(lab: Lab, pairs: list[ProxiedPair]) -> list[tuple[str, str]]:
    """(downstream state, upstream state) of each pair's proxy sockets, '-' when gone."""
    rows = subprocess.run(
        ["ss", "-N", lab.pod_netns(0), "-Htan"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    down: dict[str, str] = {}
    up: dict[str, str] = {}
    for line in rows:
        f = line.split()
        if len(f) >= 5:
            down.setdefault(f[4], f[0])  # keyed by peer
            up.setdefault(f[3], f[0])  # keyed by local
    return [(down.get(mapped(p.app), "-"), up.get(str(p.proxy_upstream), "-")) for p in pairs]


def ct_timeouts(lab: Lab, pairs: list[ProxiedPair]) -> list[int | None]:
    """Seconds left on each pair's IPv4 NAT entry (``conntrack -L``), None when absent."""
    out = subprocess.run(
        ["ip", "netns", "exec", lab.pod_netns(0), "conntrack", "-L", "-p", "tcp"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found: dict[int, int] = {}
    for line in out.splitlines():
        f = line.split()
        sport = next((w for w in f if w.startswith("sport=")), None)
        if sport is not None and "dport=7777" in f:
            found[int(sport[6:])] = int(f[2])
    return [found.get(p.app.port) for p in pairs]


def test_dual_stack_listener_holds_ipv4_peers_as_mapped(make_lab: LabFactory) -> None:
    lab = make_lab(dual_stack=True)
    (pair,) = lab.idle(1)
    assert str(pair.proxy_downstream) == "[::ffff:127.0.0.1]:15001"
    listeners = subprocess.run(
        ["ss", "-N", lab.pod_netns(0), "-Htlne", "sport", "= :15001"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "v6only:0" in listeners and "*:15001" in listeners


def test_scan_reports_only_the_leaks_not_the_live_half_closes(make_lab: LabFactory) -> None:
    """Base: every live half-close on the mapped listener was reported leaked."""
    lab = make_lab(dual_stack=True)
    leaks = lab.leak(2)
    live = lab.live_half_close(2)
    idle = lab.idle(1)
    report = product.scan(lab.pod_netns(0), "--min-idle", "0")
    assert product.kinds(report, peers(leaks)) == ["leaked", "leaked"]
    assert product.kinds(report, peers(live)) == ["at-risk", "at-risk"]
    assert product.kinds(report, peers(idle)) == [None]
    assert sorted(f["peer"] for f in report["findings"] if f["kind"] == "leaked") == sorted(
        peers(leaks)
    )


def test_kill_destroys_the_leaks_and_spares_the_live_half_closes(make_lab: LabFactory) -> None:
    """Base: ``--action kill`` destroyed the live connections too."""
    lab = make_lab(dual_stack=True)
    leaks = lab.leak(2)
    live = lab.live_half_close(2)
    report = product.scan(lab.pod_netns(0), "--action", "kill", "--min-idle", "0")
    acted = {f["peer"]: f["action"] for f in report["findings"]}
    assert [acted.get(p) for p in peers(leaks)] == ["killed", "killed"]
    assert all(acted.get(p) in (None, "none") for p in peers(live))
    # The proxy closes the upstream half of a destroyed pair itself.
    wait_for(lambda: proxy_states(lab, leaks) == [("-", "-")] * 2, timeout=5)
    time.sleep(1.0)  # the live apps keep sending: their pairs stay as they were
    assert proxy_states(lab, live) == [("FIN-WAIT-2", "CLOSE-WAIT")] * 2


def test_extend_conntrack_finds_and_extends_the_ipv4_entries(make_lab: LabFactory) -> None:
    """Base: the IPv6 lookup found nothing, so nothing could ever be extended."""
    cw = 5  # the at-risk window must outlast a scan subprocess on a busy machine
    lab = make_lab(dual_stack=True, close_wait_timeout=cw)
    late = lab.late_close(2, after_seconds=cw + 4)
    pairs = list(late.pairs)
    report = product.scan(lab.pod_netns(0), "--action", "extend-conntrack", "--min-idle", "0")
    found = product.by_peer(report)
    assert [(found[p]["kind"], found[p]["action"]) for p in peers(pairs)] == [
        ("at-risk", "extended")
    ] * 2
    assert all(t is not None and t > 3500 for t in ct_timeouts(lab, pairs))
    # The app closes after the original timeout would have dropped the entry:
    # its FIN is un-NATed and the proxy's sockets close; nothing leaks.
    lab.wait_late_closed(late)
    wait_for(
        lambda: all(s in (("-", "-"), ("TIME-WAIT", "LAST-ACK"), ("TIME-WAIT", "-"))
                    for s in proxy_states(lab, pairs)),
        timeout=5,
    )  # fmt: skip
    after = product.scan(lab.pod_netns(0), "--min-idle", "0")
    assert product.kinds(after, peers(pairs)) == [None, None]
