"""The four parts of the proof on replayed kernel answers (tests/data/netlink/capture_proof.py).

The dumps were recorded in a netns with a TCP REDIRECT to 15001, a UDP
REDIRECT of 53 to 15053, close_wait 1 s, a dual-stack proxy listener whose
three half-closed sockets hold IPv4-mapped addresses (entry live / deleted /
replaced by a SYN_SENT one) and a plain server's half-closed socket on 8080;
everything silent for 1.5 s.  The codecs decode what the kernel said, and the
pure classifier is judged on it.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
from typing import Any

from halfclose.agent.core.classify import Evidence, classify
from halfclose.agent.core.model import (
    Capture,
    CaptureEvidence,
    ConntrackEntry,
    Endpoint,
    FlowTuple,
    HalfClosedTimeouts,
    Kind,
    SocketRecord,
    TcpState,
    UnprovenReason,
)
from halfclose.agent.kernel import ctnetlink as ct
from halfclose.agent.kernel import inetdiag
from halfclose.agent.kernel import netlink as nl
from support.nldump import DATA, load_datagrams

CAPTURE_PORTS = frozenset({15001})


def _expected() -> dict[str, Any]:
    return json.loads((DATA / "proof_expected.json").read_text())  # type: ignore[no-any-return]


EXPECTED = _expected()


def _messages(name: str) -> list[nl.Message]:
    return [m for d in load_datagrams(name) for m in nl.iter_messages(memoryview(d))]


def _sockets() -> list[SocketRecord]:
    out: list[SocketRecord] = []
    for name in ("proof_sockdiag_v4.dump", "proof_sockdiag_v6.dump"):
        _, socks = inetdiag.parse_dump(_messages(name))
        out.extend(socks)
    return out


def _by_name() -> dict[str, SocketRecord]:
    socks = {s.cookie: s for s in _sockets()}
    return {name: socks[d["cookie"]] for name, d in EXPECTED["sockets"].items()}


def _entries(name: str) -> list[ConntrackEntry]:
    return [
        ct.decode_entry(m.payload)
        for m in _messages(name)
        if m.type == ct.MSG_NEW  # dump items and GET answers are IPCTNL_MSG_CT_NEW
    ]


def _get(name: str) -> ConntrackEntry | None:
    """What a recorded GET answered: the entry, or None for ENOENT."""
    (msg,) = [m for m in _messages(name) if m.type != nl.NLMSG_DONE]
    if msg.type == nl.NLMSG_ERROR:
        assert nl.error_code(msg) == errno.ENOENT
        return None
    return ct.decode_entry(msg.payload)


def _reply(name: str) -> FlowTuple:
    src, sport, dst, dport = EXPECTED["replies"][name]
    return FlowTuple(ipaddress.ip_address(src), sport, ipaddress.ip_address(dst), dport)


def _lookups() -> dict[FlowTuple, ConntrackEntry | None]:
    return {_reply(n): _get(f"proof_get_{n}.dump") for n in ("live", "gone", "collision")}


def _timeouts() -> HalfClosedTimeouts:
    return HalfClosedTimeouts(**EXPECTED["timeouts"])


# -- part 1: the socket ------------------------------------------------------------


def test_part1_the_proxy_sockets_are_owned_fin_wait2_with_silence_known() -> None:
    for name, sock in _by_name().items():
        assert sock.state is TcpState.FIN_WAIT2 and not sock.orphan, name
        assert sock.silence_seconds is not None
        assert sock.silence_seconds >= EXPECTED["silent_at_least_seconds"] - 0.1, name


# -- part 2: the capture -------------------------------------------------------------


def test_part2_dst_nat_dump_shows_the_tcp_capture_and_nothing_else() -> None:
    entries = _entries("proof_dst_nat_v4.dump")
    # The kernel filtered: TCP, destination-NATed entries only (the live one).
    assert entries and all(e.dst_nat and e.l4proto == socket.IPPROTO_TCP for e in entries)
    endpoints = {Endpoint(e.reply.src, e.reply.sport) for e in entries}
    assert endpoints == {Endpoint(ipaddress.ip_address("127.0.0.1"), 15001)}


def test_part2_a_udp_redirect_is_no_tcp_capture() -> None:
    everything = _entries("proof_ct_dump_v4.dump")
    udp = [e for e in everything if e.l4proto == socket.IPPROTO_UDP]
    assert udp and all(e.dst_nat and e.reply.sport == 15053 for e in udp)
    # What the scanner keeps from an unfiltered dump (an older kernel).
    kept = {e.reply.sport for e in everything if e.dst_nat and e.l4proto == socket.IPPROTO_TCP}
    assert kept == {15001}


def test_part2_the_mapped_proxy_socket_matches_the_dst_nat_endpoint() -> None:
    live = _by_name()["live"]
    assert str(live.local) == "[::ffff:127.0.0.1]:15001"  # as ss prints it
    nat = {Endpoint(e.reply.src, e.reply.sport) for e in _entries("proof_dst_nat_v4.dump")}
    assert CaptureEvidence(nat_endpoints=frozenset(nat)).proves(live) is Capture.CONNTRACK


# -- part 3: the mapping ---------------------------------------------------------------


def test_part3_mapped_addresses_are_looked_up_as_ipv4() -> None:
    live = _by_name()["live"]
    assert live.nat_reply_tuple == _reply("live")
    # The request the scanner sends now: AF_INET, IPv4 addresses.
    (msg,) = nl.iter_messages(memoryview(ct.encode_get_by_reply(live.nat_reply_tuple, 1)))
    assert msg.payload[0] == socket.AF_INET
    # ... and the same for the raw mapped tuple (normalized in the codec too).
    raw = FlowTuple(live.local.ip, live.local.port, live.peer.ip, live.peer.port)
    (msg,) = nl.iter_messages(memoryview(ct.encode_get_by_reply(raw, 1)))
    assert msg.payload[0] == socket.AF_INET
    # The kernel's answers: by IPv4 the live entry; by mapped IPv6 nothing,
    # which the old code read as "mapping gone" and killed live connections.
    assert _get("proof_get_live.dump") is not None
    assert _get("proof_get_mapped.dump") is None


def test_part3_a_syn_sent_entry_is_not_this_connections_mapping() -> None:
    entry = _get("proof_get_collision.dump")
    assert entry is not None and entry.tcp_state == "SYN_SENT" and entry.opening
    live = _get("proof_get_live.dump")
    assert live is not None and not live.opening


# -- all parts together ------------------------------------------------------------------


def _classify(timeouts: HalfClosedTimeouts, ports: frozenset[int]) -> dict[str, tuple[Kind, Any]]:
    nat = {Endpoint(e.reply.src, e.reply.sport) for e in _entries("proof_dst_nat_v4.dump")}
    evidence = Evidence(
        CaptureEvidence(rule_ports=CAPTURE_PORTS, nat_endpoints=frozenset(nat)),
        _lookups(),
        timeouts,
    )
    findings = classify(_sockets(), ports, evidence, {})
    names = {d["cookie"]: n for n, d in EXPECTED["sockets"].items()}
    return {names[f.socket.cookie]: (f.kind, f.reason) for f in findings}


def test_the_four_parts_on_the_recorded_netns() -> None:
    # Its own timeouts (close_wait 1 s) and 1.5 s of silence: the deleted entry
    # could have expired, so that is a leak; the SYN_SENT one a collision.
    assert _classify(_timeouts(), CAPTURE_PORTS | {8080}) == {
        "live": (Kind.AT_RISK, None),
        "gone": (Kind.LEAKED, None),
        "collision": (Kind.COLLISION, None),
        "plain": (Kind.UNPROVEN, UnprovenReason.NOT_NAT_CAPTURED),
    }


def test_the_same_sockets_under_default_timeouts_are_removed_early() -> None:
    # With 60 s close_wait, 1.5 s of silence cannot have outlived the entry.
    default = HalfClosedTimeouts(close_wait=60, fin_wait=120)
    assert _classify(default, CAPTURE_PORTS) == {
        "live": (Kind.AT_RISK, None),
        "gone": (Kind.UNPROVEN, UnprovenReason.ENTRY_REMOVED_EARLY),
        "collision": (Kind.UNPROVEN, UnprovenReason.ENTRY_REMOVED_EARLY),
    }
