"""Port reuse onto a leaked socket (istio#43301) on the real kernel: the CLI.

The app connects again from a leaked socket's port (tests/support/collision.py
builds the pod); its SYN is NATed to the proxy port, meets the stale FIN_WAIT2
socket and, with the challenge ACK lost, the connect hangs while conntrack holds
a SYN_SENT entry under the stale socket's reply tuple.  The product must call
that a ``collision`` and, asked to kill, destroy it first whatever ``--min-idle``
says: the app's next SYN then reaches the listener (measured here: tens of ms
after a kill that comes before the app's first retransmission, at most its
retransmission timer after a later one).  The kernel's own view (``ss``, ``conntrack -L``) and the
app's own clock are the oracles.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from halfclose.cli.main import main
from support.collision import APP_IP, PROXY_PORT, SERVICE, Collision, collision
from support.scratchnet import skip_unless_root

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds a netns pod"),
]


@pytest.fixture
def coll() -> Any:
    skip_unless_root("iptables", "conntrack", "ss", "sysctl")
    with collision() as c:
        c.drop_challenge_acks()
        yield c


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main([*argv, "--output", "json"]) == 0
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


def the_finding(doc: dict[str, Any], c: Collision) -> dict[str, Any]:
    (finding,) = [f for f in doc["findings"] if f["peer"] == f"{APP_IP}:{c.app_port}"]
    assert finding["local"] == f"127.0.0.1:{PROXY_PORT}"
    return finding


def test_the_collision_is_reported_and_without_a_kill_the_connect_hangs(
    coll: Collision, capsys: pytest.CaptureFixture[str]
) -> None:
    connect = coll.reconnect(timeout=20)
    entry = coll.wait_syn_sent()
    # conntrack holds the new connection under the stale socket's reply tuple.
    assert f"src=127.0.0.1 dst={APP_IP} sport={PROXY_PORT} dport={coll.app_port}" in entry
    assert f"dst={SERVICE[0]} sport={coll.app_port} dport={SERVICE[1]}" in entry

    doc = run_json(["scan", "--netns", coll.netns], capsys)
    finding = the_finding(doc, coll)
    assert (finding["kind"], finding["action"]) == ("collision", "none")

    # Past the SYN retransmissions of 3.5 s (every second on 6.18, whose
    # net.ipv4.tcp_syn_linear_timeouts is 4) the app still hangs: the bug.
    time.sleep(3.5)
    assert ("SYN-SENT", f"{APP_IP}:{coll.app_port}", f"{SERVICE[0]}:{SERVICE[1]}") in coll.ss()
    assert coll.stale_present()
    assert coll.syn_sent_entry() is not None

    # Killed this late, the app's own SYN timer decides: its next retransmission
    # (1 s apart for the first 4 here, then doubling; 1, 3, 7 s on kernels
    # without tcp_syn_linear_timeouts).  Why the agent acts on the NEW event.
    acting = time.monotonic()
    doc = run_json(["scan", "--netns", coll.netns, "--action", "kill"], capsys)
    assert the_finding(doc, coll)["action"] == "killed"
    what, stamp = connect.result(timeout=10)
    assert what == "CONNECTED"
    print(
        f"\ncollision CLI, late: killed {acting - connect.started:.3f}s after connect(); "
        f"connect completed {stamp - acting:.3f}s after the scan started"
    )
    assert stamp - connect.started < 8.0  # the third SYN, at 7 s


def test_kill_destroys_the_collision_first_and_the_connect_completes_within_a_second(
    coll: Collision, capsys: pytest.CaptureFixture[str]
) -> None:
    connect = coll.reconnect(timeout=20)
    coll.wait_syn_sent()
    assert coll.stale_present()

    # --min-idle far above the socket's idle age: a collision is killed regardless.
    acting = time.monotonic()
    doc = run_json(
        ["scan", "--netns", coll.netns, "--action", "kill", "--min-idle", "3600"], capsys
    )
    acted = time.monotonic()
    finding = the_finding(doc, coll)
    assert (finding["kind"], finding["action"]) == ("collision", "killed")
    assert not coll.stale_present()

    what, stamp = connect.result(timeout=10)
    assert what == "CONNECTED"
    latency = stamp - acting  # an upper bound: the kill happened in [acting, acted]
    print(
        f"\ncollision CLI: connect started {acting - connect.started:.3f}s before the scan; "
        f"scan+kill took {acted - acting:.3f}s; connect completed {latency:.3f}s after "
        f"the scan started ({stamp - connect.started:.3f}s after connect())"
    )
    assert latency <= 1.0
    # The new connection is the app's, through the NAT to the proxy's listener.
    assert ("ESTAB", f"{APP_IP}:{coll.app_port}", f"{SERVICE[0]}:{SERVICE[1]}") in coll.ss()
