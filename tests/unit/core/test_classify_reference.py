"""The classifier of issue 11 against the one it replaced, on random inputs.

``classify``/``judge`` now read the per-scan constants once and build each
finding positionally; the proof itself (its parts, their order, their
reasons) must not change.  ``reference_*`` below is agent/core/classify.py
before that change (main at ff36cc3), copied verbatim but for the names: both
must give equal findings, in the same order, on every input.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Collection, Iterable, Mapping

import pytest

from halfclose.agent.core.classify import (
    Evidence,
    candidates,
    classify,
    is_candidate,
    judge,
    silence_bar,
)
from halfclose.agent.core.model import (
    Capture,
    CaptureEvidence,
    ConntrackEntry,
    Endpoint,
    Finding,
    FlowTuple,
    HalfClosedTimeouts,
    IPAddress,
    Kind,
    Owner,
    SocketRecord,
    TcpState,
    UnprovenReason,
)

# -- the reference: agent/core/classify.py at ff36cc3, verbatim but renamed ----------


def reference_examined(
    sock: SocketRecord, ports: Collection[int], capture: CaptureEvidence
) -> bool:
    """Is this socket one the scan judges (by port, or as a TPROXY socket)?"""
    return sock.local.port in ports or (capture.tproxy_examined and sock.transparent)


def reference_is_candidate(
    sock: SocketRecord, ports: Collection[int], capture: CaptureEvidence | None = None
) -> bool:
    """Part 1, on an examined socket: FIN_WAIT2, owned (not an orphan)."""
    if sock.state is not TcpState.FIN_WAIT2 or sock.orphan:
        return False
    return reference_examined(sock, ports, capture or CaptureEvidence())


def reference_old_enough(sock: SocketRecord, min_idle_seconds: float) -> bool:
    if min_idle_seconds <= 0:
        return True
    idle = sock.idle_seconds
    return idle is not None and idle >= min_idle_seconds


def reference_judge(sock: SocketRecord, evidence: Evidence, owner: Owner | None) -> Finding | None:
    """Parts 2-4 for one candidate (part 1 is the caller's ``is_candidate``).

    None when the candidate's reply tuple was not looked up.
    """
    threshold = silence_bar(evidence.timeouts) if evidence.timeouts is not None else None
    capture = evidence.capture.proves(sock)
    if capture is None:
        return Finding(
            Kind.UNPROVEN,
            sock,
            owner,
            reason=UnprovenReason.NOT_NAT_CAPTURED,
            min_silence_seconds=threshold,
        )
    looked_up, entry = evidence.entry(sock)
    if not looked_up:
        return None
    if entry is not None and not entry.opening:
        return Finding(
            Kind.AT_RISK, sock, owner, entry, capture=capture, min_silence_seconds=threshold
        )
    reason: UnprovenReason | None = None
    silence = sock.silence_seconds
    if threshold is None:
        reason = evidence.timeouts_missing
    elif silence is None:
        reason = UnprovenReason.IDLE_UNKNOWN
    elif silence < threshold:
        reason = UnprovenReason.ENTRY_REMOVED_EARLY
    if reason is not None:
        return Finding(
            Kind.UNPROVEN,
            sock,
            owner,
            entry,
            reason=reason,
            capture=capture,
            min_silence_seconds=threshold,
        )
    kind = Kind.LEAKED if entry is None else Kind.COLLISION
    return Finding(kind, sock, owner, entry, capture=capture, min_silence_seconds=threshold)


def reference_classify(
    sockets: Iterable[SocketRecord],
    ports: Collection[int],
    evidence: Evidence,
    owners: Mapping[int, Owner],
    min_idle_seconds: float = 0.0,
) -> list[Finding]:
    """Findings for the candidates among ``sockets``: collisions, leaks, then the rest."""
    findings: list[Finding] = []
    for sock in sockets:
        if not reference_is_candidate(sock, ports, evidence.capture):
            continue
        finding = reference_judge(sock, evidence, owners.get(sock.inode))
        if finding is None:
            continue
        if finding.kind is not Kind.COLLISION and not reference_old_enough(sock, min_idle_seconds):
            continue
        findings.append(finding)
    findings.sort(key=reference__order)
    return findings


REFERENCE_KIND_ORDER = {Kind.COLLISION: 0, Kind.LEAKED: 1, Kind.AT_RISK: 2, Kind.UNPROVEN: 3}


def reference__order(f: Finding) -> tuple[int, int, int, int, int]:
    # Addresses compare as numbers (no string formatting per finding); an
    # IPv4 address sorts before every IPv6 one (its number is < 2**32 and v6
    # numbers are offset above it).
    s = f.socket
    local, peer = s.local, s.peer
    return (
        REFERENCE_KIND_ORDER[f.kind],
        reference__ip_key(local.ip),
        local.port,
        reference__ip_key(peer.ip),
        peer.port,
    )


def reference__ip_key(ip: IPAddress) -> int:
    return int(ip) if ip.version == 4 else int(ip) + (1 << 32)


# -- random inputs -----------------------------------------------------------------

ADDRESSES = [
    ipaddress.ip_address(a)
    for a in (
        "127.0.0.1",
        "192.0.2.10",
        "192.0.2.11",
        "::ffff:127.0.0.1",
        "::ffff:192.0.2.10",
        "2001:db8::1",
        "2001:db8::2",
    )
]
PORT_CHOICES = [15001, 15006, 8080, 40000, 40001]
TIMEOUT_CHOICES = [1, 2, 5, 60, 120]
AGE_CHOICES = [None, 0, 999, 1000, 1199, 1200, 1201, 2200, 5199, 5200, 60_000]
ENTRY_STATES = ["ESTABLISHED", "CLOSE_WAIT", "SYN_SENT", "SYN_RECV", "SYN_SENT2", "TIME_WAIT"]


def _ep(rng: random.Random) -> Endpoint:
    return Endpoint(rng.choice(ADDRESSES), rng.choice(PORT_CHOICES))


def _socket(rng: random.Random, cookie: int) -> SocketRecord:
    state = rng.choice([TcpState.FIN_WAIT2] * 6 + [TcpState.CLOSE_WAIT, TcpState.ESTABLISHED])
    return SocketRecord(
        state,
        _ep(rng),
        _ep(rng),
        cookie,
        rng.choice([0, cookie, cookie]),
        1337,
        rng.choice(AGE_CHOICES),
        rng.choice(AGE_CHOICES),
        last_data_sent_ms=rng.choice(AGE_CHOICES),
        transparent=rng.random() < 0.2,
    )


def _entry(rng: random.Random, s: SocketRecord) -> ConntrackEntry:
    original = FlowTuple(s.peer.ip, s.peer.port, ipaddress.ip_address("203.0.113.10"), 7777)
    return ConntrackEntry(original, s.nat_reply_tuple, rng.choice(ENTRY_STATES), 30)


def _case(
    rng: random.Random,
) -> tuple[list[SocketRecord], frozenset[int], Evidence, dict[int, Owner], float]:
    socks = [_socket(rng, c) for c in range(1, rng.choice([1, 5, 40]) + 1)]
    ports = frozenset(rng.sample(PORT_CHOICES[:3], rng.choice([1, 2])))
    capture = CaptureEvidence(
        rule_ports=frozenset(rng.sample(PORT_CHOICES[:3], rng.choice([0, 1, 2]))),
        nat_endpoints=frozenset(
            Endpoint(rng.choice(ADDRESSES[:3]), rng.choice(PORT_CHOICES[:3]))
            for _ in range(rng.choice([0, 2]))
        ),
        tproxy_ports=frozenset(rng.sample([15006, 15008], rng.choice([0, 1]))),
        drops_invalid=rng.random() < 0.5,
        tproxy_examined=rng.random() < 0.5,
    )
    by_cookie: dict[int, ConntrackEntry | None] = {}
    lookups: dict[FlowTuple, ConntrackEntry | None] = {}
    for s in socks:
        answer = _entry(rng, s) if rng.random() < 0.4 else None
        where = rng.random()
        if where < 0.5:
            by_cookie[s.cookie] = answer
        elif where < 0.8:
            lookups[s.nat_reply_tuple] = answer
        # else: not looked up at all
    timeouts = (
        HalfClosedTimeouts(rng.choice(TIMEOUT_CHOICES), rng.choice(TIMEOUT_CHOICES))
        if rng.random() < 0.8
        else None
    )
    missing = rng.choice([UnprovenReason.TIMEOUTS_UNKNOWN, UnprovenReason.CONNTRACK_INACTIVE])
    evidence = Evidence(capture, lookups, timeouts, missing, by_cookie)
    owners = {s.inode: Owner(100, "envoy", s.inode) for s in socks if rng.random() < 0.7}
    min_idle = rng.choice([0.0, 0.0, 1.0, 5.2, 60.0])
    rng.shuffle(socks)
    return socks, ports, evidence, owners, min_idle


@pytest.mark.parametrize("seed", range(300))
def test_same_findings_as_the_reference(seed: int) -> None:
    socks, ports, evidence, owners, min_idle = _case(random.Random(seed))
    want = reference_classify(socks, ports, evidence, owners, min_idle)
    assert classify(socks, ports, evidence, owners, min_idle) == want
    assert candidates(socks, ports, evidence.capture) == [
        s for s in socks if reference_is_candidate(s, ports, evidence.capture)
    ]
    for s in socks:
        assert is_candidate(s, ports, evidence.capture) == reference_is_candidate(
            s, ports, evidence.capture
        )
        owner = owners.get(s.inode)
        assert judge(s, evidence, owner) == reference_judge(s, evidence, owner)


def test_the_random_inputs_reach_every_verdict() -> None:
    """Every kind and every reason comes up, so the comparison above covers them."""
    seen: set[object] = set()
    for seed in range(300):
        socks, ports, evidence, owners, min_idle = _case(random.Random(seed))
        for f in reference_classify(socks, ports, evidence, owners, min_idle):
            seen.add(f.kind)
            seen.add(f.reason)
            seen.add(f.capture)
    assert seen >= set(Kind) | set(UnprovenReason) | set(Capture)
