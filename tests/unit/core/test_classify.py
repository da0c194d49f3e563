"""The pure classifier (design.md §2): the four-part proof on plain values."""

from __future__ import annotations

import ipaddress

import pytest

from halfclose.agent.core.classify import (
    DELAYED_ACK_MARGIN_SECONDS,
    Evidence,
    classify,
    is_candidate,
    silence_bar,
)
from halfclose.agent.core.model import (
    Capture,
    CaptureEvidence,
    ConntrackEntry,
    Endpoint,
    FlowTuple,
    HalfClosedTimeouts,
    Kind,
    Owner,
    SocketRecord,
    TcpState,
    UnprovenReason,
)

PORTS = frozenset({15001, 15006})
PROXY = Owner(100, "envoy", 7)
RULES = CaptureEvidence(rule_ports=PORTS)
# The lab's figure: close_wait 5 s, fin_wait 120 s -> silence must be >= 5 s.
TIMEOUTS = HalfClosedTimeouts(close_wait=5, fin_wait=120)


def ep(text: str) -> Endpoint:
    return Endpoint.parse(text)


def sock(
    state: TcpState = TcpState.FIN_WAIT2,
    *,
    local: str = "127.0.0.1:15001",
    peer: str = "192.0.2.10:40000",
    inode: int = 1000,
    idle_ms: int | None = 6000,
    sent_ms: int | None = None,
    cookie: int = 1,
    transparent: bool = False,
) -> SocketRecord:
    return SocketRecord(
        state,
        ep(local),
        ep(peer),
        cookie,
        inode,
        1337,
        idle_ms,
        idle_ms,
        last_data_sent_ms=idle_ms if sent_ms is None else sent_ms,
        transparent=transparent,
    )


def entry_for(s: SocketRecord, state: str = "CLOSE_WAIT") -> ConntrackEntry:
    original = FlowTuple(s.peer.ip, s.peer.port, ipaddress.ip_address("203.0.113.10"), 7777)
    return ConntrackEntry(original, s.nat_reply_tuple, state, 30)


def evidence(
    lookups: dict[FlowTuple, ConntrackEntry | None],
    capture: CaptureEvidence = RULES,
    timeouts: HalfClosedTimeouts | None = TIMEOUTS,
) -> Evidence:
    return Evidence(capture, lookups, timeouts)


def gone(*socks: SocketRecord) -> Evidence:
    return evidence({s.nat_reply_tuple: None for s in socks})


def test_leaked_when_entry_absent_at_risk_when_present() -> None:
    leaked = sock(peer="192.0.2.10:40001", inode=1, cookie=1)
    live = sock(peer="192.0.2.10:40002", inode=2, cookie=2)
    lookups = {leaked.nat_reply_tuple: None, live.nat_reply_tuple: entry_for(live)}
    owners = {1: PROXY, 2: PROXY}
    out = classify([live, leaked], PORTS, evidence(lookups), owners)
    assert [(f.kind, f.socket) for f in out] == [(Kind.LEAKED, leaked), (Kind.AT_RISK, live)]
    assert out[0].entry is None and out[1].entry == entry_for(live)
    assert out[0].owner == PROXY
    assert out[0].capture is Capture.RULE and out[0].min_silence_seconds == 5.2
    assert out[0].reason is None


@pytest.mark.parametrize(
    "healthy",
    [
        sock(state=TcpState.ESTABLISHED),
        sock(state=TcpState.CLOSE_WAIT),
        sock(state=TcpState.TIME_WAIT, inode=0),
        sock(state=TcpState.LISTEN, peer="0.0.0.0:0"),
        sock(inode=0),  # orphan FIN_WAIT2: the kernel's fin timer handles it
        sock(local="192.0.2.10:8080"),  # FIN_WAIT2 on a port not judged
        sock(local="192.0.2.10:8080", transparent=True),  # TPROXY, but INVALID not dropped
    ],
    ids=["established", "close-wait", "time-wait", "listen", "orphan", "other-port", "tproxy"],
)
def test_healthy_sockets_are_never_flagged(healthy: SocketRecord) -> None:
    # Even with "no entry" evidence on hand, none of these may be judged.
    assert not is_candidate(healthy, PORTS, RULES)
    assert classify([healthy], PORTS, gone(healthy), {}) == []


def test_a_candidate_that_was_not_looked_up_is_not_called_leaked() -> None:
    s = sock()
    assert classify([s], PORTS, evidence({}), {}) == []


def test_inbound_capture_port_and_ipv6() -> None:
    s = sock(local="[2001:db8::10]:15006", peer="[2001:db8::20]:5000")
    (f,) = classify([s], PORTS, gone(s), {})
    assert f.kind is Kind.LEAKED and f.owner is None  # owner unknown is still a finding


# -- part 2: the capture -------------------------------------------------------


def test_listed_port_without_nat_is_unproven_not_nat_captured() -> None:
    # --capture-ports 8080 on a plain server: no rule, no DST_NAT entry.
    s = sock(local="192.0.2.1:8080", peer="192.0.2.10:40000")
    (f,) = classify([s], {8080}, gone(s), {})
    assert (f.kind, f.reason, f.capture) == (Kind.UNPROVEN, UnprovenReason.NOT_NAT_CAPTURED, None)


def test_dst_nat_entries_prove_the_capture_without_rules() -> None:
    s = sock(local="127.0.0.1:15001")
    other = sock(local="192.0.2.1:15001", peer="192.0.2.10:40001", cookie=2)
    capture = CaptureEvidence(nat_endpoints=frozenset({ep("127.0.0.1:15001")}))
    out = classify([s, other], PORTS, evidence({s.nat_reply_tuple: None}, capture), {})
    by_sock = {f.socket: f for f in out}
    assert by_sock[s].kind is Kind.LEAKED and by_sock[s].capture is Capture.CONNTRACK
    # Same port, another address: no entry was NATed to it.
    assert by_sock[other].reason is UnprovenReason.NOT_NAT_CAPTURED


def test_tproxy_socket_needs_an_invalid_drop_and_keeps_its_original_port() -> None:
    s = sock(local="192.0.2.1:8080", peer="198.51.100.7:50000", transparent=True)
    plain = sock(local="192.0.2.1:8080", peer="198.51.100.7:50001", cookie=2)
    dropping = CaptureEvidence(
        tproxy_ports=frozenset({15006}), drops_invalid=True, tproxy_examined=True
    )
    out = classify(
        [s, plain], frozenset({15006}), evidence({s.nat_reply_tuple: None}, dropping), {}
    )
    assert [(f.kind, f.capture, f.socket) for f in out] == [(Kind.LEAKED, Capture.TPROXY, s)]
    # Listed by hand but INVALID is not dropped: the late FIN arrives.
    passing = CaptureEvidence(tproxy_ports=frozenset({15006}))
    (f,) = classify([s], {8080}, evidence({s.nat_reply_tuple: None}, passing), {})
    assert f.reason is UnprovenReason.NOT_NAT_CAPTURED


# -- part 3: the mapping ---------------------------------------------------------


def test_ipv4_mapped_peer_is_looked_up_as_ipv4() -> None:
    # A dual-stack listener ([::]:15001) holds an IPv4 peer as ::ffff:a.b.c.d.
    s = sock(local="[::ffff:127.0.0.1]:15001", peer="[::ffff:192.0.2.10]:40000")
    assert s.nat_reply_tuple == FlowTuple(
        ipaddress.ip_address("127.0.0.1"), 15001, ipaddress.ip_address("192.0.2.10"), 40000
    )
    live = entry_for(sock(local="127.0.0.1:15001", peer="192.0.2.10:40000"))
    (f,) = classify([s], PORTS, evidence({live.reply: live}), {})
    assert f.kind is Kind.AT_RISK and f.entry == live


@pytest.mark.parametrize("state", ["SYN_SENT", "SYN_RECV", "SYN_SENT2"])
def test_new_connection_on_the_tuple_is_a_collision(state: str) -> None:
    s = sock()
    syn = entry_for(s, state)
    (f,) = classify([s], PORTS, evidence({s.nat_reply_tuple: syn}), {})
    assert (f.kind, f.entry) == (Kind.COLLISION, syn)


def test_collision_ignores_min_idle_and_sorts_first() -> None:
    colliding = sock(peer="192.0.2.10:1", cookie=1, idle_ms=6000)
    leaked = sock(peer="192.0.2.10:2", cookie=2, idle_ms=600_000)
    lookups = {colliding.nat_reply_tuple: entry_for(colliding, "SYN_SENT")}
    lookups[leaked.nat_reply_tuple] = None
    out = classify([leaked, colliding], PORTS, evidence(lookups), {}, min_idle_seconds=60)
    assert [f.kind for f in out] == [Kind.COLLISION, Kind.LEAKED]


# -- part 4: the expiry ----------------------------------------------------------


@pytest.mark.parametrize(
    ("recv_ms", "sent_ms", "kind", "reason"),
    [
        (5200, 5200, Kind.LEAKED, None),
        (4999, 600_000, Kind.UNPROVEN, UnprovenReason.ENTRY_REMOVED_EARLY),
        # Silent exactly the timeout is not enough: the socket's own delayed
        # ACK (up to 200 ms after the last data) re-armed the entry unseen.
        (5000, 5000, Kind.UNPROVEN, UnprovenReason.ENTRY_REMOVED_EARLY),
        (5199, 600_000, Kind.UNPROVEN, UnprovenReason.ENTRY_REMOVED_EARLY),
        # The app is silent, but the proxy sent data 1 s ago: that packet
        # re-armed the entry, so it cannot have expired since.
        (600_000, 1000, Kind.UNPROVEN, UnprovenReason.ENTRY_REMOVED_EARLY),
        (None, 600_000, Kind.UNPROVEN, UnprovenReason.IDLE_UNKNOWN),
    ],
)
def test_silence_both_ways_for_the_shortest_half_closed_timeout(
    recv_ms: int | None, sent_ms: int, kind: Kind, reason: UnprovenReason | None
) -> None:
    s = sock(idle_ms=recv_ms, sent_ms=sent_ms)
    (f,) = classify([s], PORTS, gone(s), {})
    assert (f.kind, f.reason) == (kind, reason)


def test_shortest_timeout_is_the_smaller_of_close_wait_and_fin_wait() -> None:
    s = sock(idle_ms=30_000)
    fin_short = HalfClosedTimeouts(close_wait=60, fin_wait=20)
    (f,) = classify([s], PORTS, evidence({s.nat_reply_tuple: None}, timeouts=fin_short), {})
    assert f.kind is Kind.LEAKED and f.min_silence_seconds == 20.2
    default = HalfClosedTimeouts(close_wait=60, fin_wait=120)
    (f,) = classify([s], PORTS, evidence({s.nat_reply_tuple: None}, timeouts=default), {})
    assert f.reason is UnprovenReason.ENTRY_REMOVED_EARLY


def test_the_bar_adds_the_delayed_ack_margin_to_the_shortest_timeout() -> None:
    """A pure ACK of the socket re-arms the entry up to TCP_DELACK_MAX (200 ms) after
    the last age tcp_info shows: silence of exactly the timeout proves no expiry."""
    t = HalfClosedTimeouts(close_wait=2, fin_wait=120)
    assert silence_bar(t) == pytest.approx(2.2)
    assert pytest.approx(0.2) == DELAYED_ACK_MARGIN_SECONDS
    for ms, kind in ((2000, Kind.UNPROVEN), (2199, Kind.UNPROVEN), (2200, Kind.LEAKED)):
        s = sock(idle_ms=ms, sent_ms=ms)
        (f,) = classify([s], PORTS, evidence({s.nat_reply_tuple: None}, timeouts=t), {})
        assert f.kind is kind, ms
        assert f.min_silence_seconds == pytest.approx(2.2)


def test_unknown_timeouts_prove_nothing() -> None:
    s = sock(idle_ms=10**9)
    ev = Evidence(RULES, {s.nat_reply_tuple: None}, None, UnprovenReason.CONNTRACK_INACTIVE)
    (f,) = classify([s], PORTS, ev, {})
    assert (f.kind, f.reason) == (Kind.UNPROVEN, UnprovenReason.CONNTRACK_INACTIVE)


def test_removed_early_collision_is_unproven() -> None:
    s = sock(idle_ms=1000)
    (f,) = classify([s], PORTS, evidence({s.nat_reply_tuple: entry_for(s, "SYN_SENT")}), {})
    assert (f.kind, f.reason) == (Kind.UNPROVEN, UnprovenReason.ENTRY_REMOVED_EARLY)


# -- the user's threshold ----------------------------------------------------------


@pytest.mark.parametrize(
    ("idle_ms", "min_idle", "flagged"),
    [
        (6000, 0.0, True),
        (6000, 6.0, True),
        (5999, 6.0, False),
        (None, 0.0, True),
        (None, 1.0, False),
    ],
)
def test_min_idle_filters_leaks_and_at_risk(
    idle_ms: int | None, min_idle: float, flagged: bool
) -> None:
    leaked = sock(idle_ms=idle_ms, peer="192.0.2.10:1", cookie=1)
    live = sock(idle_ms=idle_ms, peer="192.0.2.10:2", cookie=2)
    lookups = {leaked.nat_reply_tuple: None, live.nat_reply_tuple: entry_for(live)}
    out = classify([leaked, live], PORTS, evidence(lookups), {}, min_idle)
    assert len(out) == (2 if flagged else 0)


def test_idle_age_is_the_most_recent_of_data_and_ack() -> None:
    s = SocketRecord(
        TcpState.FIN_WAIT2,
        ep("127.0.0.1:15001"),
        ep("192.0.2.10:1"),
        1,
        1,
        0,
        90000,
        20000,
        last_data_sent_ms=50000,
    )
    assert s.idle_seconds == 20.0 and s.silence_seconds == 20.0
    (f,) = classify([s], PORTS, gone(s), {}, min_idle_seconds=20.0)
    assert classify([s], PORTS, gone(s), {}, min_idle_seconds=20.5) == []
    assert f.kind is Kind.LEAKED
