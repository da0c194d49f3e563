"""The scanner on the real kernel: exactly the leaks, nothing healthy.

Ground truth comes from the fixtures (the lab's LeakedPair list, the mini mesh's
connection table) and from independent oracles (`ss`, `conntrack`).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from halfclose.agent.core.model import Kind, UnprovenReason
from halfclose.agent.engine.scan import Scanner, ScanSettings, scan
from halfclose.agent.kernel.netns import NetnsHandle
from support.minimesh import minimesh, ss_lines
from support.scratchnet import holder, lab_factory, run, scratch_netns, skip_unless_root

pytestmark = pytest.mark.kernel

# Healthy sockets made in the pod netns: a FIN_WAIT2 on a port no rule captures
# (127.0.0.1 is exempt from the REDIRECT), and an orphaned FIN_WAIT2 on the
# capture port itself ([::1]:15001: the proxy listens on IPv4 only), which the
# kernel's fin timer owns.
HEALTHY = r"""
import socket, time
out = []
lst = socket.socket(); lst.bind(("127.0.0.1", 18080)); lst.listen(8)
c = socket.create_connection(("127.0.0.1", 18080)); a, _ = lst.accept()
a.shutdown(socket.SHUT_WR)                  # owned FIN_WAIT2 on :18080
out += [c, a, lst]
l6 = socket.socket(socket.AF_INET6); l6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
l6.bind(("::1", 15001)); l6.listen(8)
c6 = socket.create_connection(("::1", 15001)); a6, _ = l6.accept()
a6.close()                                  # orphan FIN_WAIT2 on [::1]:15001
out += [c6, l6]
time.sleep(0.1)
"""


def _findings(result: Any, kind: Kind) -> dict[tuple[str, str], Any]:
    return {(str(f.socket.local), str(f.socket.peer)): f for f in result.findings if f.kind is kind}


def _conntrack_has_reply(netns: str, local: str, peer: str) -> bool:
    """Independent oracle: does `conntrack -L` list an entry with this reply tuple?"""
    lport, pport = local.rpartition(":")[2], peer.rpartition(":")[2]
    out = run(
        "conntrack",
        "-L",
        "-p",
        "tcp",
        "--reply-port-src",
        lport,
        "--reply-port-dst",
        pport,
        netns=netns,
        check=False,
    ).stdout
    return bool(out.strip())


def test_minimesh_exact_leaks_with_their_upstream_pairs() -> None:
    skip_unless_root("iptables", "conntrack", "ss", "nsenter")
    with minimesh(leaks=3, live=2) as mm, NetnsHandle.from_name(mm.netns) as handle:
        result = scan(handle, ScanSettings())
        examined = ss_lines(mm.netns, "state", "fin-wait-2", "state", "close-wait")
        assert result.capture_ports == (15001,)
        assert result.sockets_examined == len(examined)
        leaked = _findings(result, Kind.LEAKED)
        at_risk = _findings(result, Kind.AT_RISK)
        assert set(leaked) == {(c.down, c.app) for c in mm.leaked}
        assert set(at_risk) == {(c.down, c.app) for c in mm.live}
        for c in mm.leaked:
            f = leaked[(c.down, c.app)]
            assert f.upstream is not None and str(f.upstream.local) == c.up  # distinct bytes
            assert f.owner is not None and f.owner.pid == mm.proxy.pid
            assert f.entry is None and not _conntrack_has_reply(mm.netns, c.down, c.app)
        for c in mm.live:
            f = at_risk[(c.down, c.app)]
            assert f.entry is not None and f.entry.tcp_state == "CLOSE_WAIT"
            assert _conntrack_has_reply(mm.netns, c.down, c.app)
            # The live legs' byte counts moved on (the app keeps sending and
            # this proxy does not forward): a pair, if any, must be the right one.
            assert f.upstream is None or str(f.upstream.local) == c.up


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Any:
    make_lab = lab_factory(request)
    return make_lab(close_wait_timeout=2)


def test_lab_exactly_the_leaks_and_nothing_healthy(lab: Any) -> None:
    leaks = lab.leak(count=3)
    idle = lab.idle(count=2)
    live = lab.live_half_close(count=2)
    ns = lab.pod_netns(0)
    with holder(ns, HEALTHY):
        lines = ss_lines(ns, "state", "fin-wait-2")
        assert any(":18080 " in ln for ln in lines)  # the fixtures did what they claim
        assert any("[::1]:15001" in ln for ln in lines)
        with NetnsHandle.from_name(ns) as handle:
            result = scan(handle, ScanSettings())
        examined = ss_lines(ns, "state", "fin-wait-2", "state", "close-wait")
    assert set(result.capture_ports) == set(lab.capture_ports)
    assert result.sockets_examined == len(examined)
    leaked = _findings(result, Kind.LEAKED)
    at_risk = _findings(result, Kind.AT_RISK)
    assert set(leaked) == {(str(p.proxy_downstream), str(p.app)) for p in leaks}
    assert set(at_risk) == {(str(p.proxy_downstream), str(p.app)) for p in live}
    flagged_peers = {peer for _local, peer in leaked | at_risk}
    assert not flagged_peers & {str(p.app) for p in idle}
    for p in leaks:
        f = leaked[(str(p.proxy_downstream), str(p.app))]
        assert f.owner is not None and f.owner.pid == lab.proxy_pid(0)
        # The lab's connections carry distinct byte counts, so every pair is found.
        assert f.upstream is not None and f.upstream.local == p.proxy_upstream
        assert not _conntrack_has_reply(ns, str(p.proxy_downstream), str(p.app))
    for p in live:
        f = at_risk[(str(p.proxy_downstream), str(p.app))]
        assert f.upstream is not None and f.upstream.local == p.proxy_upstream


def test_lab_pid_target_min_idle_and_scanner_reuse(lab: Any) -> None:
    leaks = lab.leak(count=2)
    lab.live_half_close(count=1)
    want = {(str(p.proxy_downstream), str(p.app)) for p in leaks}
    with NetnsHandle.from_pid(lab.proxy_pid(0)) as handle, Scanner(handle) as scanner:
        by_pid = scanner.scan(ScanSettings())
        assert set(_findings(by_pid, Kind.LEAKED)) == want
        assert len(_findings(by_pid, Kind.AT_RISK)) == 1
        # Leaks are older than the close_wait timeout (2 s); the live one hears
        # from its app about every second.
        youngest_leak = min(f.socket.idle_seconds for f in by_pid.findings if f.kind is Kind.LEAKED)
        old = scanner.scan(ScanSettings(min_idle_seconds=1.9))
        assert youngest_leak >= 1.9
        assert set(_findings(old, Kind.LEAKED)) == want and not _findings(old, Kind.AT_RISK)
        assert scanner.scan(ScanSettings(min_idle_seconds=3600)).findings == []
        # Explicit ports override detection: a port nobody uses finds nothing.
        assert scanner.scan(ScanSettings(capture_ports=frozenset({15999}))).findings == []


def test_json_of_a_lab_scan_is_serialisable(lab: Any) -> None:
    from halfclose.agent.engine.report import to_json_dict

    lab.leak(count=1)
    with NetnsHandle.from_path(lab.pod_netns_path(0)) as handle:
        doc = to_json_dict(scan(handle))
    text = json.dumps(doc)
    assert json.loads(text)["findings"][0]["kind"] == "leaked"


def test_sockdiag_reread_and_destroy_by_cookie() -> None:
    """The kernel-layer hooks remediation builds on: re-read one socket, destroy it."""
    import dataclasses
    import errno

    from halfclose.agent.kernel.netlink import NetlinkError

    skip_unless_root("iptables", "conntrack", "ss", "nsenter")
    with minimesh(leaks=2, live=0) as mm, NetnsHandle.from_name(mm.netns) as handle:
        with Scanner(handle) as scanner:
            first, second = scan(handle).findings
            again = scanner.sockdiag.get(first.socket)
            assert again is not None and again.cookie == first.socket.cookie
            # A wrong cookie must not fall through to another socket (the listener).
            wrong = dataclasses.replace(first.socket, cookie=first.socket.cookie + 10_000)
            with pytest.raises(NetlinkError) as exc:
                scanner.sockdiag.destroy(wrong)
            assert exc.value.errno == errno.ENOENT
            scanner.sockdiag.destroy(first.socket)
            assert scanner.sockdiag.get(first.socket) is None
            with pytest.raises(NetlinkError) as exc:
                scanner.sockdiag.destroy(first.socket)
            assert exc.value.errno == errno.ENOENT
        lines = ss_lines(mm.netns, "state", "fin-wait-2", "( sport = :15001 )")
        assert not any(str(first.socket.peer) in ln for ln in lines)
        assert any(str(second.socket.peer) in ln for ln in lines)
        assert ss_lines(mm.netns, "state", "listening", "( sport = :15001 )")


def test_forced_ports_without_conntrack_prove_no_leak() -> None:
    """A FIN_WAIT2 on a hand-given port in a netns where conntrack tracks nothing
    (no rule needs it) has no entry, but that proves nothing: never "leaked".
    No NAT rule and no DST_NAT entry shows a capture: unproven, not-nat-captured."""
    skip_unless_root("ip")
    with scratch_netns("noct") as ns, holder(ns, HEALTHY):
        assert any(":18080 " in ln for ln in ss_lines(ns, "state", "fin-wait-2"))
        with NetnsHandle.from_name(ns) as handle:
            result = scan(handle, ScanSettings(capture_ports=frozenset({18080})))
    assert result.findings
    assert {(f.kind, f.reason) for f in result.findings} == {
        (Kind.UNPROVEN, UnprovenReason.NOT_NAT_CAPTURED)
    }


def test_forced_ports_still_prove_leaks_where_conntrack_tracks(lab: Any) -> None:
    """The control: with the table in use, explicit ports find exactly the leaks."""
    leaks = lab.leak(count=2)
    lab.idle(count=1)  # a live entry, as in any pod with traffic
    with NetnsHandle.from_name(lab.pod_netns(0)) as handle:
        result = scan(handle, ScanSettings(capture_ports=frozenset(lab.capture_ports)))
    assert result.warnings == ()
    assert set(_findings(result, Kind.LEAKED)) == {
        (str(p.proxy_downstream), str(p.app)) for p in leaks
    }
