"""The pure classifier (design.md §2) on plain values."""

from __future__ import annotations

import ipaddress

import pytest

from halfclose.agent.core.classify import classify, is_candidate
from halfclose.agent.core.model import (
    ConntrackEntry,
    Endpoint,
    FlowTuple,
    Kind,
    Owner,
    SocketRecord,
    TcpState,
)

PORTS = frozenset({15001, 15006})
PROXY = Owner(100, "envoy", 7)


def ep(text: str) -> Endpoint:
    return Endpoint.parse(text)


def sock(
    state: TcpState = TcpState.FIN_WAIT2,
    *,
    local: str = "127.0.0.1:15001",
    peer: str = "192.0.2.10:40000",
    inode: int = 1000,
    idle_ms: int | None = 5000,
    cookie: int = 1,
) -> SocketRecord:
    return SocketRecord(state, ep(local), ep(peer), cookie, inode, 1337, idle_ms, idle_ms)


def entry_for(s: SocketRecord, state: str = "CLOSE_WAIT") -> ConntrackEntry:
    original = FlowTuple(s.peer.ip, s.peer.port, ipaddress.ip_address("203.0.113.10"), 7777)
    return ConntrackEntry(original, s.nat_reply_tuple, state, 30)


def test_leaked_when_entry_absent_at_risk_when_present() -> None:
    leaked = sock(peer="192.0.2.10:40001", inode=1, cookie=1)
    live = sock(peer="192.0.2.10:40002", inode=2, cookie=2)
    lookups = {leaked.nat_reply_tuple: None, live.nat_reply_tuple: entry_for(live)}
    owners = {1: PROXY, 2: PROXY}
    out = classify([live, leaked], PORTS, lookups, owners)
    assert [(f.kind, f.socket) for f in out] == [(Kind.LEAKED, leaked), (Kind.AT_RISK, live)]
    assert out[0].entry is None and out[1].entry == entry_for(live)
    assert out[0].owner == PROXY


@pytest.mark.parametrize(
    "healthy",
    [
        sock(state=TcpState.ESTABLISHED),
        sock(state=TcpState.CLOSE_WAIT),
        sock(state=TcpState.TIME_WAIT, inode=0),
        sock(state=TcpState.LISTEN, peer="0.0.0.0:0"),
        sock(inode=0),  # orphan FIN_WAIT2: the kernel's fin timer handles it
        sock(local="192.0.2.10:8080"),  # FIN_WAIT2 on a port no rule captures
    ],
    ids=["established", "close-wait", "time-wait", "listen", "orphan", "other-port"],
)
def test_healthy_sockets_are_never_flagged(healthy: SocketRecord) -> None:
    # Even with "no entry" evidence on hand, none of these may be judged.
    assert not is_candidate(healthy, PORTS)
    assert classify([healthy], PORTS, {healthy.nat_reply_tuple: None}, {}) == []


def test_a_candidate_that_was_not_looked_up_is_not_called_leaked() -> None:
    s = sock()
    assert classify([s], PORTS, {}, {}) == []


def test_inbound_capture_port_and_ipv6() -> None:
    s = sock(local="[2001:db8::10]:15006", peer="[2001:db8::20]:5000")
    (f,) = classify([s], PORTS, {s.nat_reply_tuple: None}, {})
    assert f.kind is Kind.LEAKED and f.owner is None  # owner unknown is still a finding


@pytest.mark.parametrize(
    ("idle_ms", "min_idle", "flagged"),
    [
        (5000, 0.0, True),
        (5000, 5.0, True),
        (4999, 5.0, False),
        (None, 0.0, True),
        (None, 1.0, False),
    ],
)
def test_min_idle_filters_both_kinds(idle_ms: int | None, min_idle: float, flagged: bool) -> None:
    leaked = sock(idle_ms=idle_ms, peer="192.0.2.10:1", cookie=1)
    live = sock(idle_ms=idle_ms, peer="192.0.2.10:2", cookie=2)
    lookups = {leaked.nat_reply_tuple: None, live.nat_reply_tuple: entry_for(live)}
    out = classify([leaked, live], PORTS, lookups, {}, min_idle)
    assert len(out) == (2 if flagged else 0)


def test_idle_age_is_the_most_recent_of_data_and_ack() -> None:
    s = SocketRecord(
        TcpState.FIN_WAIT2, ep("127.0.0.1:15001"), ep("192.0.2.10:1"), 1, 1, 0, 9000, 2000
    )
    assert s.idle_seconds == 2.0
    (f,) = classify([s], PORTS, {s.nat_reply_tuple: None}, {}, min_idle_seconds=2.0)
    assert classify([s], PORTS, {s.nat_reply_tuple: None}, {}, min_idle_seconds=2.5) == []
    assert f.kind is Kind.LEAKED
