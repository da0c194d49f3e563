"""The four-part proof of a leak (docs/detection.md), as pure functions.

Inputs are what the kernel layer measured; nothing here does I/O.

A socket is a *candidate* when it is FIN_WAIT2, owned by a process (inode != 0:
an orphan has the kernel's tcp_fin_timeout and will go by itself) and examined:
its local port is one of the ports being judged, or it is a transparent
(TPROXY) socket where TPROXY is judged.  Everything else (ESTABLISHED,
CLOSE_WAIT, TIME_WAIT, orphans, other ports) is healthy and never flagged.

For a candidate, the parts are checked in order; the first that fails decides:

1. the socket: owned FIN_WAIT2 (the candidate test);
2. the capture: its local port is shown to be a TCP NAT capture, by the rules
   or by DST_NAT conntrack entries, or it is a TPROXY socket where INVALID
   packets are dropped.  Otherwise ``unproven`` (not-nat-captured): without
   NAT a late FIN is delivered normally and nothing leaks;
3. the mapping: the entry under the (normalized) NAT reply tuple.  A live
   entry -> ``at-risk``.  None, or one still opening (SYN_SENT/SYN_RECV: the
   app's new connection from the same port, istio#43301) -> the mapping is
   gone;
4. the expiry: silent both ways for at least the shortest half-closed timeout
   of this netns.  Sooner, the entry was removed by something else
   (``conntrack -F``/``-D``, eviction) and the app may still be alive:
   ``unproven`` (entry-removed-early).

All four -> ``leaked``, or ``collision`` when the app's new connection holds the
tuple right now.

``min_idle_seconds`` is the user's threshold on top of the proof: findings whose
peer has been idle less than that are left out, except collisions (the app is
hanging now; waiting helps nobody).  A socket whose age is unknown passes only
when the threshold is 0: an unknown age must not satisfy "idle for at least N s".
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from halfclose.agent.core.model import (
    Capture,
    CaptureEvidence,
    ConntrackEntry,
    Finding,
    FindingSlots,
    FlowTuple,
    HalfClosedTimeouts,
    IPAddress,
    Kind,
    Owner,
    SocketRecord,
    TcpState,
    UnprovenReason,
)
from halfclose.agent.core.pairing import upstreams

# Part 4's margin.  The leaked socket's own pure ACKs re-arm the conntrack
# entry, and tcp_info records no age for them: after the last data it received,
# a socket ACKs up to the delayed-ACK maximum later (TCP_DELACK_MAX, 200 ms).
# So an entry can outlive the last packet tcp_info shows by that much, and
# "silent for the shortest timeout" proves expiry only with it added.
DELAYED_ACK_MARGIN_SECONDS = 0.2


def silence_bar(timeouts: HalfClosedTimeouts) -> float:
    """Part 4's bar: the silence that proves the entry went by expiry (seconds)."""
    return timeouts.shortest + DELAYED_ACK_MARGIN_SECONDS


@dataclass(frozen=True, slots=True)
class Evidence:
    """What the kernel layer measured in one netns, for the proof.

    ``lookups`` maps a normalized reply tuple to its entry, or to None when the
    lookup found none; a candidate whose tuple was not looked up is skipped
    (absence of evidence is not the proof a leak needs).  ``by_cookie`` holds
    the same answers keyed by the socket looked up (its cookie), as the scan
    builds them: the tuple is built once, for the request, and never hashed.  ``timeouts`` None
    means part 4 cannot be shown; ``timeouts_missing`` says why.
    """

    capture: CaptureEvidence
    lookups: Mapping[FlowTuple, ConntrackEntry | None] = field(default_factory=dict)
    timeouts: HalfClosedTimeouts | None = None
    timeouts_missing: UnprovenReason = UnprovenReason.TIMEOUTS_UNKNOWN
    by_cookie: Mapping[int, ConntrackEntry | None] = field(default_factory=dict)

    def entry(self, sock: SocketRecord) -> tuple[bool, ConntrackEntry | None]:
        """(looked up?, the entry under the socket's NAT reply tuple or None)."""
        by_cookie = self.by_cookie
        if sock.cookie in by_cookie:
            return True, by_cookie[sock.cookie]
        reply = sock.nat_reply_tuple
        if reply in self.lookups:
            return True, self.lookups[reply]
        return False, None


def examined(sock: SocketRecord, ports: Collection[int], capture: CaptureEvidence) -> bool:
    """Is this socket one the scan judges (by port, or as a TPROXY socket)?"""
    return sock.local.port in ports or (capture.tproxy_examined and sock.transparent)


def is_candidate(
    sock: SocketRecord, ports: Collection[int], capture: CaptureEvidence | None = None
) -> bool:
    """Part 1, on an examined socket: FIN_WAIT2, owned (not an orphan)."""
    if sock.state is not TcpState.FIN_WAIT2 or sock.orphan:
        return False
    return examined(sock, ports, capture or CaptureEvidence())


def candidates(
    sockets: Iterable[SocketRecord], ports: Collection[int], capture: CaptureEvidence | None = None
) -> list[SocketRecord]:
    """The candidates among ``sockets``: ``is_candidate`` for many sockets at once.

    The same three tests, with the per-scan constants read once: a scan runs
    this over every socket it dumped (40,000 at 20k leaks).
    """
    fin_wait2 = TcpState.FIN_WAIT2
    tproxy = (capture or CaptureEvidence()).tproxy_examined
    return [
        s
        for s in sockets
        if s.state is fin_wait2
        and s.inode != 0  # not an orphan (SocketRecord.orphan)
        and (s.local.port in ports or (tproxy and s.transparent))
    ]


def old_enough(sock: SocketRecord, min_idle_seconds: float) -> bool:
    if min_idle_seconds <= 0:
        return True
    idle = sock.idle_seconds
    return idle is not None and idle >= min_idle_seconds


# by_cookie's answer for a socket that was not looked up by cookie.
_NOT_LOOKED_UP: Any = object()


def _judge_all(
    socks: Iterable[SocketRecord],
    evidence: Evidence,
    owner_of: Callable[[int], Owner | None],
    *,
    seal: bool = True,
) -> list[Any]:
    """``judge`` for each of ``socks``, in order (None answers left out).

    The proof's one implementation: ``judge`` runs it for one socket,
    ``classify`` for a scan's candidates.  What is the same for every
    candidate (the bar, the lookups, the capture test) is read once, and
    each finding is built positionally; the checks, their order and their
    reasons are the four-part proof of docs/detection.md.

    ``seal=False`` leaves each finding a mutable ``FindingSlots`` (every field
    set, ``upstream`` None) for ``classify_paired`` to finish.
    """
    timeouts = evidence.timeouts
    threshold = silence_bar(timeouts) if timeouts is not None else None
    missing = evidence.timeouts_missing
    rule_ports = evidence.capture.rule_ports
    proves = evidence.capture.proves
    by_cookie = evidence.by_cookie
    entry_of = evidence.entry
    unproven, at_risk = Kind.UNPROVEN, Kind.AT_RISK
    leaked, collision = Kind.LEAKED, Kind.COLLISION
    by_rule = Capture.RULE
    not_captured = UnprovenReason.NOT_NAT_CAPTURED
    idle_unknown = UnprovenReason.IDLE_UNKNOWN
    removed_early = UnprovenReason.ENTRY_REMOVED_EARLY
    new = object.__new__
    out: list[Finding] = []
    append = out.append
    for sock in socks:
        entry: ConntrackEntry | None = None
        reason: UnprovenReason | None = None
        # Part 2: the capture.  A rule port is CaptureEvidence.proves' first
        # answer, taken here without the call.
        capture = by_rule if sock.local.port in rule_ports else proves(sock)
        if capture is None:
            kind = unproven
            reason = not_captured
        else:
            # Part 3: the mapping (not looked up: no finding at all).
            # Evidence.entry's first answer, taken without the call.
            got = by_cookie.get(sock.cookie, _NOT_LOOKED_UP)
            if got is _NOT_LOOKED_UP:
                looked_up, entry = entry_of(sock)
                if not looked_up:
                    continue
            else:
                entry = got  # a ConntrackEntry or None
            if entry is not None and not entry.opening:
                kind = at_risk
            else:
                # Part 4: the expiry.  The silence is
                # SocketRecord.silence_seconds, computed the same way (the
                # youngest of three ages, None if any is unknown) without a
                # property call per socket.
                recv, ack = sock.last_data_recv_ms, sock.last_ack_recv_ms
                sent = sock.last_data_sent_ms
                if threshold is None:
                    reason = missing
                elif recv is None or ack is None or sent is None:
                    reason = idle_unknown
                elif min(recv, ack, sent) / 1000.0 < threshold:
                    reason = removed_early
                kind = unproven if reason is not None else leaked if entry is None else collision
        # new_finding(kind, sock, owner, entry, None, reason, capture, threshold), inline.
        f: Any = new(FindingSlots)
        f.kind = kind
        f.socket = sock
        f.owner = owner_of(sock.inode)
        f.entry = entry
        f.upstream = None
        f.reason = reason
        f.capture = capture
        f.min_silence_seconds = threshold
        if seal:
            f.__class__ = Finding
        append(f)
    return out


def judge(sock: SocketRecord, evidence: Evidence, owner: Owner | None) -> Finding | None:
    """Parts 2-4 for one candidate (part 1 is the caller's ``is_candidate``).

    None when the candidate's reply tuple was not looked up.
    """
    found = _judge_all((sock,), evidence, lambda _inode: owner)
    return found[0] if found else None


def classify(
    sockets: Iterable[SocketRecord],
    ports: Collection[int],
    evidence: Evidence,
    owners: Mapping[int, Owner],
    min_idle_seconds: float = 0.0,
) -> list[Finding]:
    """Findings for the candidates among ``sockets``: collisions, leaks, then the rest."""
    findings = _judge_all(candidates(sockets, ports, evidence.capture), evidence, owners.get)
    if min_idle_seconds > 0:
        collision = Kind.COLLISION
        findings = [
            f for f in findings if f.kind is collision or old_enough(f.socket, min_idle_seconds)
        ]
    return _in_order(findings)


def classify_paired(
    sockets: Iterable[SocketRecord],
    ports: Collection[int],
    evidence: Evidence,
    owners: Mapping[int, Owner],
    min_idle_seconds: float,
    *,
    pool: Iterable[SocketRecord],
    capture_ports: Collection[int],
    lap: Callable[[str], None] = lambda _stage: None,
) -> list[Finding]:
    """``pair(classify(sockets, ...), pool, capture_ports, owners)``, each finding built once.

    A scan's 20,000 findings would be built by ``classify`` and built again by
    ``pair`` to add the upstream: here they stay mutable twins until the
    upstream is known, then become Findings (``lap`` marks the two stages).
    """
    # Mutable twins (FindingSlots) until the upstream is set below.
    found: list[Any] = _judge_all(
        candidates(sockets, ports, evidence.capture), evidence, owners.get, seal=False
    )
    if min_idle_seconds > 0:
        collision = Kind.COLLISION
        found = [f for f in found if f.kind is collision or old_enough(f.socket, min_idle_seconds)]
    found = _in_order(found)
    lap("classify")
    twin: Any
    for twin, up in zip(found, upstreams(found, pool, capture_ports, owners), strict=True):
        twin.upstream = up
        twin.__class__ = Finding
    lap("pairing")
    return found


_KIND_ORDER = {Kind.COLLISION: 0, Kind.LEAKED: 1, Kind.AT_RISK: 2, Kind.UNPROVEN: 3}


def _ip_key(ip: IPAddress) -> int:
    # Addresses compare as numbers (no string formatting per finding); an
    # IPv4 address sorts before every IPv6 one (its number is < 2**32 and v6
    # numbers are offset above it).
    return int(ip) if ip.version == 4 else int(ip) + (1 << 32)


# The order, packed into one int: kind (_KIND_ORDER), local address
# (< 2**129), local port (16 bits: TCP), peer address, peer port, most
# significant first.  Ints compare ~3x faster than 5-tuples, and the sort
# compares ~300,000 times at 20k findings.
_IP_BITS = 129
_PORT_BITS = 16
_PEER_BITS = _IP_BITS + _PORT_BITS


def _in_order(findings: list[Finding]) -> list[Finding]:
    """The findings sorted by kind, then local and peer endpoint (stable).

    Each address's number is computed once: the dump shares one address
    object among its sockets (the proxy's local address is one object for
    20,000 sockets), so numbers are kept by the object's identity while the
    findings keep every address alive.
    """
    if len(findings) < 2:
        return findings
    numbers: dict[int, int] = {}
    number = numbers.get

    def new_number(ip: IPAddress) -> int:
        n = numbers[id(ip)] = _ip_key(ip)
        return n

    # The kind, local address and local port, packed and shifted, once per
    # (kind, local endpoint object): one per kind at a proxy's capture port.
    prefixes: dict[Kind, dict[int, int]] = {kind: {} for kind in _KIND_ORDER}

    def new_prefix(f: Finding) -> int:
        local = f.socket.local
        rank = _KIND_ORDER[f.kind]
        n = ((rank << _IP_BITS | _ip_key(local.ip)) << _PORT_BITS | local.port) << _PEER_BITS
        prefixes[f.kind][id(local)] = n
        return n

    keys = [
        (prefixes[f.kind].get(id((s := f.socket).local)) or new_prefix(f))
        | (number(id((peer := s.peer).ip)) or new_number(peer.ip)) << _PORT_BITS
        | peer.port
        for f in findings
    ]
    order = sorted(range(len(findings)), key=keys.__getitem__)
    return [findings[i] for i in order]
