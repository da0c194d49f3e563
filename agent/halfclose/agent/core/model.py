"""Plain data the pure core works on (docs/detection.md).

Everything here is immutable and free of I/O: the kernel layer builds these from
netlink dumps, the classifier reads them, and the reporting layers serialise
them.  Nothing in this module knows about Kubernetes or sockets-the-syscall.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def normalize_ip(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) as the IPv4 address it maps.

    A dual-stack listener (``[::]:15001`` without V6ONLY, as ztunnel binds)
    holds IPv4 peers as mapped addresses, but the packets, and so their
    conntrack entries, are IPv4 (docs/detection.md part 3).
    """
    if ip.__class__ is _V4:  # the common case, without ipaddress's property calls
        return ip
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return mapped
    return ip


_V4 = ipaddress.IPv4Address


class TcpState(enum.IntEnum):
    """Kernel TCP states, numbered as in include/net/tcp_states.h."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12

    @property
    def ss_name(self) -> str:
        """The spelling `ss` prints (FIN-WAIT-2, CLOSE-WAIT, ...)."""
        return _SS_NAMES[self]

    @property
    def mask(self) -> int:
        """Bit for sock_diag's ``idiag_states`` kernel-side filter."""
        return 1 << int(self)


_SS_NAMES = {
    TcpState.ESTABLISHED: "ESTAB",
    TcpState.SYN_SENT: "SYN-SENT",
    TcpState.SYN_RECV: "SYN-RECV",
    TcpState.FIN_WAIT1: "FIN-WAIT-1",
    TcpState.FIN_WAIT2: "FIN-WAIT-2",
    TcpState.TIME_WAIT: "TIME-WAIT",
    TcpState.CLOSE: "UNCONN",
    TcpState.CLOSE_WAIT: "CLOSE-WAIT",
    TcpState.LAST_ACK: "LAST-ACK",
    TcpState.LISTEN: "LISTEN",
    TcpState.CLOSING: "CLOSING",
    TcpState.NEW_SYN_RECV: "SYN-RECV",
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: IPAddress
    port: int

    def __str__(self) -> str:
        # Spelled as `ss` prints it: brackets around IPv6, and IPv4-mapped
        # IPv6 addresses shown as `ss` does ([::ffff:192.0.2.1]:80).
        if self.ip.version == 6:
            # Python < 3.13 prints a mapped address in hex (::ffff:7f00:1).
            mapped = self.ip.ipv4_mapped
            if mapped is not None:
                return f"[::ffff:{mapped}]:{self.port}"
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"

    def normalized(self) -> Endpoint:
        """IPv4-mapped IPv6 spelled as IPv4, as conntrack holds it."""
        ip = normalize_ip(self.ip)
        return self if ip is self.ip else Endpoint(ip, self.port)

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Inverse of ``str()``: ``"127.0.0.1:15001"`` or ``"[::1]:15001"``."""
        host, _, port = text.rpartition(":")
        return cls(ipaddress.ip_address(host.strip("[]")), int(port))


@dataclass(frozen=True, slots=True)
class FlowTuple:
    """One direction of a conntrack entry (TCP only): src -> dst."""

    src: IPAddress
    sport: int
    dst: IPAddress
    dport: int

    def __str__(self) -> str:
        return f"src={self.src} dst={self.dst} sport={self.sport} dport={self.dport}"

    def normalized(self) -> FlowTuple:
        """Both addresses with IPv4-mapped IPv6 spelled as IPv4 (what conntrack holds)."""
        src, dst = normalize_ip(self.src), normalize_ip(self.dst)
        if src is self.src and dst is self.dst:
            return self
        return FlowTuple(src, self.sport, dst, self.dport)


@dataclass(frozen=True, slots=True)
class SocketRecord:
    """One TCP socket as sock_diag reports it (the fields the core needs).

    ``inode`` is 0 for an orphan (closed by its process, owned by the kernel,
    which runs tcp_fin_timeout on it): such sockets are never ours to judge.
    ``cookie`` is the 64-bit socket cookie; SOCK_DESTROY must carry it
    (docs/detection.md: without it a stale tuple fell through to the listener).
    The two ``last_*_ms`` values come from tcp_info and are ages in
    milliseconds at dump time; None when tcp_info was not in the dump.
    """

    state: TcpState
    local: Endpoint
    peer: Endpoint
    cookie: int
    inode: int
    uid: int
    last_data_recv_ms: int | None = None
    last_ack_recv_ms: int | None = None
    ifindex: int = 0
    # tcp_info byte counters (RFC 4898), None when tcp_info was not in the dump.
    # A byte-faithful L4 proxy's downstream received what its upstream had
    # acked and vice versa: pairing uses that (agent/core/pairing.py).
    bytes_acked: int | None = None
    bytes_received: int | None = None
    # tcp_info age of our last data segment (ms); with the two ``last_*_recv``
    # ages it proves silence in both directions (docs/detection.md part 4).
    last_data_sent_ms: int | None = None
    # IP_TRANSPARENT, inherited from a TPROXY listener (INET_DIAG_SOCKOPT):
    # such a socket holds the connection's original local port.
    transparent: bool = False

    @property
    def orphan(self) -> bool:
        return self.inode == 0

    @property
    def idle_seconds(self) -> float | None:
        """Seconds since the peer last sent anything (data or a bare ACK)."""
        recv, ack = self.last_data_recv_ms, self.last_ack_recv_ms
        if recv is None:
            return None if ack is None else ack / 1000.0
        return recv / 1000.0 if ack is None else min(recv, ack) / 1000.0

    @property
    def silence_seconds(self) -> float | None:
        """Seconds without a packet either way that tcp_info can see (docs/detection.md part 4).

        The youngest of the three ages: data received, ACK received, data sent.
        None when any is unknown: silence in one direction is not silence.
        """
        recv, ack, sent = self.last_data_recv_ms, self.last_ack_recv_ms, self.last_data_sent_ms
        if recv is None or ack is None or sent is None:
            return None
        return min(recv, ack, sent) / 1000.0

    @property
    def nat_reply_tuple(self) -> FlowTuple:
        """The conntrack *reply* tuple that carries this socket's NAT mapping.

        For a proxy socket ``127.0.0.1:15001 <-> app:eport`` reached through
        REDIRECT, the entry's reply direction is ``src=127.0.0.1:15001
        dst=app:eport`` (docs/detection.md).  The same holds for inbound
        REDIRECT (pod-ip:15006) and, trivially, for TPROXY where no
        translation happens.  IPv4-mapped addresses of a dual-stack listener
        are spelled as IPv4: the packets, and their entry, are IPv4.
        """
        return FlowTuple(
            normalize_ip(self.local.ip),
            self.local.port,
            normalize_ip(self.peer.ip),
            self.peer.port,
        )

    @property
    def local_normalized(self) -> Endpoint:
        """The local endpoint as conntrack would spell it (IPv4-mapped -> IPv4)."""
        return self.local.normalized()


@dataclass(frozen=True, slots=True)
class ConntrackEntry:
    """A TCP conntrack entry, as ctnetlink reports it.

    ``tcp_state`` is the conntrack TCP state name (ESTABLISHED, CLOSE_WAIT,
    ...); ``timeout`` the seconds left; ``status`` the IPS_* bit set
    (FIXED_TIMEOUT is bit 10); ``entry_id`` is ctnetlink's CTA_ID (0 if absent).
    """

    original: FlowTuple
    reply: FlowTuple
    tcp_state: str
    timeout: int
    status: int = 0
    mark: int = 0
    zone: int = 0
    entry_id: int = 0
    # The layer-4 protocol (CTA_PROTO_NUM); 6 is TCP.  Dumps return every
    # protocol, and a UDP entry NATed to 15053 proves no TCP capture.
    l4proto: int = 6

    IPS_DST_NAT = 1 << 5
    IPS_FIXED_TIMEOUT = 1 << 10

    @property
    def fixed_timeout(self) -> bool:
        return bool(self.status & self.IPS_FIXED_TIMEOUT)

    @property
    def dst_nat(self) -> bool:
        """Destination-NATed (REDIRECT, DNAT): the reply source is the NAT target."""
        return bool(self.status & self.IPS_DST_NAT)

    @property
    def opening(self) -> bool:
        """A connection still being opened (SYN_SENT, SYN_RECV, SYN_SENT2).

        Such an entry under a half-closed socket's reply tuple cannot be that
        socket's connection (it was established long ago): it is a new
        connection from the same app port (istio#43301), docs/detection.md part 3.
        """
        return self.tcp_state in OPENING_STATES


# conntrack TCP states of a connection that has not completed its handshake.
OPENING_STATES = frozenset({"SYN_SENT", "SYN_RECV", "SYN_SENT2"})


@dataclass(frozen=True, slots=True)
class Owner:
    """The process holding a socket (from /proc/<pid>/fd)."""

    pid: int
    process: str
    fd: int = -1


class Kind(enum.StrEnum):
    LEAKED = "leaked"
    # Leaked, and the app is reusing the port right now (istio#43301): act first.
    COLLISION = "collision"
    AT_RISK = "at-risk"
    # Some part of the proof is missing: reported with a reason, never acted on.
    UNPROVEN = "unproven"


class UnprovenReason(enum.StrEnum):
    """Why a finding is ``unproven`` (docs/detection.md): the part of the proof that failed."""

    # Part 2: the local port is listed/seen, but no TCP NAT capture (or TPROXY
    # with an INVALID-drop rule) is shown by rules or DST_NAT entries.
    NOT_NAT_CAPTURED = "not-nat-captured"
    # Part 4: the entry is gone sooner than the shortest half-closed timeout
    # (conntrack -F/-D, eviction): a live app's next packet may revive it.
    ENTRY_REMOVED_EARLY = "entry-removed-early"
    # Part 4: no tcp_info ages, so silence cannot be shown.
    IDLE_UNKNOWN = "idle-unknown"
    # Part 3: conntrack does not track this netns at all: absence proves nothing.
    CONNTRACK_INACTIVE = "conntrack-inactive"
    # Part 4: the netns's half-closed conntrack timeouts could not be read,
    # so "silent for longer than the entry could live" cannot be shown.
    TIMEOUTS_UNKNOWN = "timeouts-unknown"


class Capture(enum.StrEnum):
    """How part 2 was shown: what makes the socket's local port a capture (docs/detection.md)."""

    # A TCP REDIRECT/DNAT-to-local rule of this netns targets the port.
    RULE = "rule"
    # DST_NAT TCP conntrack entries of this netns have this endpoint as reply source.
    CONNTRACK = "conntrack"
    # An IP_TRANSPARENT socket (TPROXY) in a netns whose rules drop INVALID packets.
    TPROXY = "tproxy"


@dataclass(frozen=True, slots=True)
class CaptureEvidence:
    """What shows which sockets a NAT capture feeds, for one netns (part 2).

    Built by the engine from the netns's rules and its conntrack table;
    ``nat_endpoints`` are the (normalized) reply sources of DST_NAT TCP entries.
    ``tproxy_examined`` says transparent FIN_WAIT2 sockets are candidates
    whatever their port (a TPROXY socket keeps the original local port).
    """

    rule_ports: frozenset[int] = frozenset()
    nat_endpoints: frozenset[Endpoint] = frozenset()
    tproxy_ports: frozenset[int] = frozenset()
    drops_invalid: bool = False
    tproxy_examined: bool = False

    def proves(self, sock: SocketRecord) -> Capture | None:
        if sock.local.port in self.rule_ports:
            return Capture.RULE
        if sock.local_normalized in self.nat_endpoints:
            return Capture.CONNTRACK
        if sock.transparent and self.drops_invalid and self.tproxy_ports:
            # No NAT: the late FIN arrives, is INVALID, and the rule drops it.
            return Capture.TPROXY
        return None


@dataclass(frozen=True, slots=True)
class HalfClosedTimeouts:
    """A netns's conntrack timeouts for half-closed TCP entries, in seconds."""

    close_wait: int
    fin_wait: int

    @property
    def shortest(self) -> int:
        """The soonest a half-closed entry can expire after its last packet."""
        return min(self.close_wait, self.fin_wait)


class Outcome(enum.StrEnum):
    """What happened to a finding when an action ran (docs/detection.md ``action``)."""

    NONE = "none"
    KILLED = "killed"
    EXTENDED = "extended"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class Finding:
    """A socket the classifier flagged, with what it was correlated to.

    ``entry`` is the conntrack entry under the socket's NAT reply tuple: the
    live one (at-risk), the app's new connection's opening one (collision), or
    None (leaked: its absence is part of the proof).  ``upstream`` is the
    proxy's paired CLOSE_WAIT socket when it could be determined.
    """

    kind: Kind
    socket: SocketRecord
    owner: Owner | None
    entry: ConntrackEntry | None = None
    upstream: SocketRecord | None = None
    # Set for ``Kind.UNPROVEN`` only: which part of the proof is missing.
    reason: UnprovenReason | None = None
    # How part 2 was shown (None when it was not: ``not-nat-captured``).
    capture: Capture | None = None
    # Part 4's threshold for this netns at scan time: the socket must have
    # been silent at least this long.  The kill re-check holds it again.
    min_silence_seconds: float | None = None

    def with_upstream(self, upstream: SocketRecord | None) -> Finding:
        """This finding with ``upstream`` set (``dataclasses.replace`` is ~10x slower:
        pairing calls this once per paired finding, 20,000 times at field scale)."""
        return Finding(
            self.kind,
            self.socket,
            self.owner,
            self.entry,
            upstream,
            self.reason,
            self.capture,
            self.min_silence_seconds,
        )

    def with_owner(self, owner: Owner | None) -> Finding:
        """This finding with ``owner`` set (owners may be looked up after the scan)."""
        return Finding(
            self.kind,
            self.socket,
            owner,
            self.entry,
            self.upstream,
            self.reason,
            self.capture,
            self.min_silence_seconds,
        )


# -- fast constructors for the dump decoder (issue 11) ---------------------------
#
# A frozen dataclass's __init__ sets each field with a call to
# object.__setattr__ (its own __setattr__ refuses): 13 calls per SocketRecord,
# ~5x the cost of plain slot stores, and the sock_diag decoder builds one per
# dumped socket (40,000 at field scale).  These build the same objects from a
# mutable twin with the same __slots__ and then switch the class: Python
# documents ``__class__`` assignment between classes with the same __slots__.
# The result is an ordinary SocketRecord / Endpoint (type, equality, hash).
# The decoder's inner loop fills the twins itself (a call per socket costs as
# much as the stores); anyone doing so must set every slot, then __class__.


class EndpointSlots:
    """Endpoint's slots, mutable: set both, then ``__class__ = Endpoint``."""

    __slots__ = ("ip", "port")


class SocketRecordSlots:
    """SocketRecord's slots, mutable: set all, then ``__class__ = SocketRecord``."""

    # CPython lays slots out by sorted name: the order here does not matter.
    __slots__ = (
        "bytes_acked", "bytes_received", "cookie", "ifindex", "inode", "last_ack_recv_ms",
        "last_data_recv_ms", "last_data_sent_ms", "local", "peer", "state", "transparent", "uid",
    )  # fmt: skip


def new_endpoint(ip: IPAddress, port: int, _new: Any = object.__new__) -> Endpoint:
    """``Endpoint(ip, port)``, without the frozen dataclass's per-field calls."""
    ep = _new(EndpointSlots)
    ep.ip = ip
    ep.port = port
    ep.__class__ = Endpoint
    return ep  # type: ignore[no-any-return]


def new_socket_record(  # noqa: PLR0917 (SocketRecord's own positional order)
    state: TcpState,
    local: Endpoint,
    peer: Endpoint,
    cookie: int,
    inode: int,
    uid: int,
    last_data_recv_ms: int | None,
    last_ack_recv_ms: int | None,
    ifindex: int,
    bytes_acked: int | None,
    bytes_received: int | None,
    last_data_sent_ms: int | None,
    transparent: bool,
    _new: Any = object.__new__,
) -> SocketRecord:
    """``SocketRecord(...)`` with every field given (positional, in field order), ~5x faster."""
    r = _new(SocketRecordSlots)
    r.state = state
    r.local = local
    r.peer = peer
    r.cookie = cookie
    r.inode = inode
    r.uid = uid
    r.last_data_recv_ms = last_data_recv_ms
    r.last_ack_recv_ms = last_ack_recv_ms
    r.ifindex = ifindex
    r.bytes_acked = bytes_acked
    r.bytes_received = bytes_received
    r.last_data_sent_ms = last_data_sent_ms
    r.transparent = transparent
    r.__class__ = SocketRecord
    return r  # type: ignore[no-any-return]


class FindingSlots:
    """Finding's slots, mutable: set all, then ``__class__ = Finding``."""

    __slots__ = (
        "capture", "entry", "kind", "min_silence_seconds", "owner", "reason", "socket", "upstream",
    )  # fmt: skip


def new_finding(  # noqa: PLR0917 (Finding's own positional order)
    kind: Kind,
    socket: SocketRecord,
    owner: Owner | None,
    entry: ConntrackEntry | None,
    upstream: SocketRecord | None,
    reason: UnprovenReason | None,
    capture: Capture | None,
    min_silence_seconds: float | None,
    _new: Any = object.__new__,
) -> Finding:
    """``Finding(...)`` with every field given (positional, in field order), ~4x faster.

    The classifier builds one per candidate and pairing one per paired finding
    (20,000 each at field scale).
    """
    f = _new(FindingSlots)
    f.kind = kind
    f.socket = socket
    f.owner = owner
    f.entry = entry
    f.upstream = upstream
    f.reason = reason
    f.capture = capture
    f.min_silence_seconds = min_silence_seconds
    f.__class__ = Finding
    return f  # type: ignore[no-any-return]
