"""Inbound TPROXY capture on the real kernel (issue 9 §7, design.md §2 part 2).

The lab's ``istio-tproxy`` style lays istio-iptables' TPROXY mode: mangle
PREROUTING diverts inbound TCP to the proxy's IP_TRANSPARENT listener on
15006 (``TPROXY --tproxy-mark``, ``ip rule fwmark lookup 133``, a ``local``
route), with no NAT.  The accepted sockets keep the original local port
(pod-ip:8080).  Clients sit outside the pod (the upstream netns) and close
late, after the pod's conntrack entry expired:

- with Istio's DROP_INVALID (``-m conntrack --ctstate INVALID -j DROP`` in
  mangle PREROUTING) their FIN is dropped and the proxy's pair leaks;
- without it the FIN reaches the transparent socket and nothing leaks.

The product is driven through its CLI (``support.product``); the kernel
(``ss``, iptables counters, conntrack, sock_diag) is the oracle.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from halfclose.agent.core.model import TcpState
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.agent.kernel.sockdiag import SockDiag
from halfclose.lab import Lab, ProxiedPair
from support import product
from support.lab_fixtures import LabFactory
from support.scratchnet import wait_for

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("conntrack", "iptables")),
    reason="needs conntrack, iptables (see .ci/system-deps)",
)

CW = 2


def drops(lab: Lab) -> int:
    """Packets the pod's DROP_INVALID rule dropped (0 when there is no such rule)."""
    out = subprocess.run(
        ["ip", "netns", "exec", lab.pod_netns(0),
         "iptables", "-t", "mangle", "-L", "PREROUTING", "-v", "-x", "-n"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sum(
        int(line.split()[0]) for line in out.splitlines() if "DROP" in line and "INVALID" in line
    )


def ss_rows(netns: str) -> dict[tuple[str, str], str]:
    out = subprocess.run(
        ["ss", "-N", netns, "-Htan"], capture_output=True, text=True, check=True
    ).stdout
    return {(f[3], f[4]): f[0] for f in (line.split() for line in out.splitlines()) if len(f) >= 5}


def proxy_states(lab: Lab, pairs: list[ProxiedPair]) -> list[tuple[str, str]]:
    rows = ss_rows(lab.pod_netns(0))
    service = str(lab.inbound_service(0))
    return [
        (
            rows.get((str(p.proxy_downstream), str(p.app)), "-"),
            rows.get((str(p.proxy_upstream), service), "-"),
        )
        for p in pairs
    ]


def entries_left(lab: Lab, pairs: list[ProxiedPair]) -> int:
    """The pod's conntrack entries of these client connections."""
    out = subprocess.run(
        ["ip", "netns", "exec", lab.pod_netns(0), "conntrack", "-L", "-p", "tcp"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sum(1 for p in pairs for line in out.splitlines() if f"sport={p.app.port} " in line)


def test_tproxy_sockets_are_transparent_and_keep_the_original_port(
    make_lab: LabFactory,
) -> None:
    """sock_diag's INET_DIAG_SOCKOPT on a real TPROXY capture: listener and accepted socket."""
    lab = make_lab(style="istio-tproxy")
    (inbound,) = lab.idle(1, inbound=True)
    (outbound,) = lab.idle(1)
    assert str(inbound.proxy_downstream) == f"{lab.pod_ip(0)}:8080"
    with NetnsHandle.from_name(lab.pod_netns(0)) as h:
        diag = SockDiag.open(h)
        try:
            _, socks = diag.dump([TcpState.LISTEN, TcpState.ESTABLISHED])
        finally:
            diag.close()
    by_local = {(str(s.local), str(s.peer), s.state): s.transparent for s in socks}
    assert by_local[("0.0.0.0:15006", "0.0.0.0:0", TcpState.LISTEN)] is True
    assert by_local[(str(inbound.proxy_downstream), str(inbound.app), TcpState.ESTABLISHED)]
    # The outbound (REDIRECT) listener, its socket, and the app server: not transparent.
    assert by_local[("0.0.0.0:15001", "0.0.0.0:0", TcpState.LISTEN)] is False
    assert by_local[("0.0.0.0:8080", "0.0.0.0:0", TcpState.LISTEN)] is False
    assert not by_local[(str(outbound.proxy_downstream), str(outbound.app), TcpState.ESTABLISHED)]


def test_with_drop_invalid_the_late_fin_is_dropped_and_the_leak_is_found_and_killed(
    make_lab: LabFactory,
) -> None:
    """Base: TPROXY ports were never looked at; the leaks on :8080 went unseen."""
    lab = make_lab(style="istio-tproxy", pod_drop_invalid=True, close_wait_timeout=CW)
    assert drops(lab) == 0
    leaks = lab.leak(2, inbound=True)
    live = lab.live_half_close(1, inbound=True)
    # The clients' late FINs hit the INVALID drop (and are retransmitted).
    wait_for(lambda: drops(lab) >= 2, timeout=5)
    assert proxy_states(lab, leaks) == [("FIN-WAIT-2", "CLOSE-WAIT")] * 2
    assert all(str(p.proxy_downstream) == f"{lab.pod_ip(0)}:8080" for p in leaks)

    report = product.scan(lab.pod_netns(0), "--min-idle", "0")
    apps = [str(p.app) for p in leaks]
    assert product.kinds(report, apps) == ["leaked", "leaked"]
    assert product.kinds(report, [str(p.app) for p in live]) != ["leaked"]
    assert all(product.by_peer(report)[a]["local"] == f"{lab.pod_ip(0)}:8080" for a in apps)

    killed = product.scan(lab.pod_netns(0), "--action", "kill", "--min-idle", "0")
    assert [product.by_peer(killed)[a]["action"] for a in apps] == ["killed", "killed"]
    # The proxy closes the upstream half itself: gone, or LAST-ACK (closed, its
    # FIN to the app server is INVALID by now, dropped too, and retransmitted).
    wait_for(
        lambda: all(d == "-" and u in ("-", "LAST-ACK") for d, u in proxy_states(lab, leaks)),
        timeout=5,
    )
    time.sleep(0.5)
    assert proxy_states(lab, live) == [("FIN-WAIT-2", "CLOSE-WAIT")]


def test_without_drop_invalid_the_late_fin_is_delivered_and_nothing_leaks(
    make_lab: LabFactory,
) -> None:
    """No NAT and no drop: a late FIN finds the transparent socket; never report a leak."""
    lab = make_lab(style="istio-tproxy", close_wait_timeout=CW)
    late = lab.late_close(2, after_seconds=CW + 6, inbound=True)
    pairs = list(late.pairs)
    # The pod's entries expire while the proxy sockets wait half-closed ...
    wait_for(lambda: entries_left(lab, pairs) == 0, timeout=CW + 10, interval=0.2)
    assert time.time() < late.closes_at - 0.5, "the clients closed before the entries expired"
    time.sleep(1.0)
    # ... and that alone proves nothing: the capture is not one that loses FINs.
    before = product.scan(lab.pod_netns(0), "--min-idle", "0")
    assert time.time() < late.closes_at, "the scan ran after the clients closed"
    assert all(k in (None, "unproven") for k in product.kinds(before, [str(p.app) for p in pairs]))
    lab.wait_late_closed(late)
    wait_for(
        lambda: all(d in ("-", "TIME-WAIT") and u in ("-", "TIME-WAIT", "LAST-ACK")
                    for d, u in proxy_states(lab, pairs)),
        timeout=5,
    )  # fmt: skip
    assert drops(lab) == 0
    after = product.scan(lab.pod_netns(0), "--min-idle", "0")
    assert not [f for f in after["findings"] if f["kind"] in ("leaked", "collision")]
