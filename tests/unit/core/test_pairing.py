"""Pairing a flagged downstream socket with the proxy's upstream CLOSE_WAIT socket."""

from __future__ import annotations

import dataclasses

from halfclose.agent.core.model import (
    ConntrackEntry,
    Endpoint,
    Finding,
    FlowTuple,
    Kind,
    Owner,
    SocketRecord,
    TcpState,
)
from halfclose.agent.core.pairing import pair

PORTS = frozenset({15001})
UPSTREAM = "203.0.113.10:7777"


def ep(text: str) -> Endpoint:
    return Endpoint.parse(text)


def down(
    n: int, *, ack_ms: int = 5000, sent: int = 100, got: int = 10, pid: int = 100
) -> tuple[SocketRecord, Owner]:
    # Downstream (accept()ed): bytes_acked counts the FIN it sent.
    s = SocketRecord(
        TcpState.FIN_WAIT2,
        ep("127.0.0.1:15001"),
        ep(f"192.0.2.10:{40000 + n}"),
        cookie=n,
        inode=n,
        uid=1337,
        last_data_recv_ms=ack_ms + 50,
        last_ack_recv_ms=ack_ms,
        bytes_acked=sent + 1,
        bytes_received=got,
    )
    return s, Owner(pid, "envoy", n)


def up(
    n: int, *, ack_ms: int = 5040, sent: int = 10, got: int = 100, peer: str = UPSTREAM
) -> SocketRecord:
    # Upstream (connect()ed): bytes_acked counts its SYN, bytes_received the FIN.
    return SocketRecord(
        TcpState.CLOSE_WAIT,
        ep(f"192.0.2.10:{50000 + n}"),
        ep(peer),
        cookie=1000 + n,
        inode=1000 + n,
        uid=1337,
        last_data_recv_ms=ack_ms,
        last_ack_recv_ms=ack_ms,
        bytes_acked=sent + 1,
        bytes_received=got + 1,
    )


def leaked(s: SocketRecord, owner: Owner) -> Finding:
    return Finding(Kind.LEAKED, s, owner)


def at_risk(s: SocketRecord, owner: Owner, dest: str = UPSTREAM) -> Finding:
    d = ep(dest)
    entry = ConntrackEntry(
        FlowTuple(s.peer.ip, s.peer.port, d.ip, d.port), s.nat_reply_tuple, "CLOSE_WAIT", 20
    )
    return Finding(Kind.AT_RISK, s, owner, entry)


def owners_of(*socks: SocketRecord, pid: int = 100) -> dict[int, Owner]:
    return {s.inode: Owner(pid, "envoy", s.inode) for s in socks}


def test_byte_counters_pair_leaks_formed_at_the_same_instant() -> None:
    # Same FIN time for all: only the counters can tell them apart.
    d1, o1 = down(1, sent=100)
    d2, o2 = down(2, sent=107)
    u1, u2 = up(1, got=100), up(2, got=107)
    owners = owners_of(u1, u2) | {1: o1, 2: o2}
    out = pair([leaked(d1, o1), leaked(d2, o2)], [u2, u1], PORTS, owners)
    assert [f.upstream for f in out] == [u1, u2]


def test_fin_time_pairs_when_counters_are_equal() -> None:
    d1, o1 = down(1, ack_ms=9000)
    d2, o2 = down(2, ack_ms=3000)
    u1, u2 = up(1, ack_ms=9040), up(2, ack_ms=3040)
    owners = owners_of(u1, u2) | {1: o1, 2: o2}
    out = pair([leaked(d1, o1), leaked(d2, o2)], [u1, u2], PORTS, owners)
    assert [f.upstream for f in out] == [u1, u2]


def test_indistinguishable_leaks_are_left_unpaired() -> None:
    d1, o1 = down(1)
    d2, o2 = down(2)
    u1, u2 = up(1), up(2)
    owners = owners_of(u1, u2) | {1: o1, 2: o2}
    out = pair([leaked(d1, o1), leaked(d2, o2)], [u1, u2], PORTS, owners)
    assert [f.upstream for f in out] == [None, None]


def test_other_processes_and_states_are_never_candidates() -> None:
    d1, o1 = down(1)
    other_pid = up(1)
    established = SocketRecord(
        TcpState.ESTABLISHED,
        ep("192.0.2.10:50009"),
        ep(UPSTREAM),
        9,
        9,
        0,
        5040,
        5040,
        bytes_acked=11,
        bytes_received=101,
    )
    owners = owners_of(other_pid, pid=200) | owners_of(established) | {1: o1}
    out = pair([leaked(d1, o1)], [other_pid, established], PORTS, owners)
    assert out[0].upstream is None


def test_a_far_away_fin_is_not_a_pair() -> None:
    d1, o1 = down(1, ack_ms=5000, sent=1)
    u1 = up(1, ack_ms=60000, got=2)  # counters disagree and the FIN is a minute apart
    out = pair([leaked(d1, o1)], [u1], PORTS, owners_of(u1) | {1: o1})
    assert out[0].upstream is None


def test_at_risk_pairs_by_original_destination() -> None:
    d1, o1 = down(1)
    to_service = up(1, peer="203.0.113.20:443", sent=0, got=0)  # counters useless here
    elsewhere = up(2)
    owners = owners_of(to_service, elsewhere) | {1: o1}
    out = pair([at_risk(d1, o1, dest="203.0.113.20:443")], [elsewhere, to_service], PORTS, owners)
    assert out[0].upstream == to_service


def test_upstream_claimed_by_an_at_risk_socket_is_not_reused_for_a_leak() -> None:
    d1, o1 = down(1)
    d2, o2 = down(2)
    only = up(1)
    owners = owners_of(only) | {1: o1, 2: o2}
    out = pair([leaked(d2, o2), at_risk(d1, o1)], [only], PORTS, owners)
    assert out[1].upstream == only
    assert out[0].upstream is None


def test_unowned_finding_is_not_paired() -> None:
    d1, _ = down(1)
    u1 = up(1)
    out = pair([Finding(Kind.LEAKED, d1, None)], [u1], PORTS, owners_of(u1))
    assert out[0].upstream is None


def test_ipv6_and_capture_port_close_wait_is_not_an_upstream() -> None:
    d1, o1 = down(1)
    inbound_cw = SocketRecord(
        TcpState.CLOSE_WAIT,
        ep("[2001:db8::1]:15001"),
        ep("[2001:db8::2]:1"),
        5,
        5,
        0,
        5040,
        5040,
        bytes_acked=11,
        bytes_received=101,
    )
    out = pair([leaked(d1, o1)], [inbound_cw], PORTS, owners_of(inbound_cw) | {1: o1})
    assert out[0].upstream is None


def test_without_proc_owners_pairs_by_socket_uid() -> None:
    """The agent's default capabilities cannot list a sidecar's /proc/<pid>/fd:
    owners are unknown, and the socket uid from sock_diag groups the legs."""
    d1, _ = down(1, sent=100, got=10)
    d2, _ = down(2, sent=200, got=20)
    u1, u2 = up(1, sent=10, got=100), up(2, sent=20, got=200)
    # The app's own CLOSE_WAIT socket under another uid, with counters that would
    # match d1 exactly: a different holder is never a candidate.
    app = dataclasses.replace(up(3, sent=10, got=100), uid=1000, cookie=3003, inode=3003)
    findings = [Finding(Kind.LEAKED, d1, None), Finding(Kind.LEAKED, d2, None)]
    out = pair(findings, [d1, d2, app, u1, u2], PORTS, owners={})
    assert [f.upstream for f in out] == [u1, u2]
    only_app = pair(findings[:1], [d1, app], PORTS, owners={})
    assert only_app[0].upstream is None
