"""Leaked / at-risk classification (design.md §2), as pure functions.

Inputs are what the kernel layer measured; nothing here does I/O.

A socket is a *candidate* when it is FIN_WAIT2, owned by a process (inode != 0:
an orphan has the kernel's tcp_fin_timeout and will go by itself) and its local
port is a capture port.  For a candidate, the conntrack entry whose reply tuple
is ``local -> peer`` decides:

- entry absent  -> LEAKED: the NAT mapping is gone, so the app's FIN can never be
  translated back to the proxy.  Certain, not a guess.
- entry present -> AT_RISK: it becomes leaked if the app closes after the entry
  (usually CLOSE_WAIT, timer running) expires.

Everything else (ESTABLISHED, CLOSE_WAIT, TIME_WAIT, orphans, other ports) is
never flagged.

``min_idle_seconds`` filters findings by the socket's idle age from tcp_info
(time since the peer last sent anything).  It applies to both kinds, because a
freshly half-closed socket is usually just an app about to close.  A socket
whose age is unknown (no tcp_info) passes only when the threshold is 0: an
unknown age must not satisfy "idle for at least N seconds".
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from halfclose.agent.core.model import (
    ConntrackEntry,
    Finding,
    FlowTuple,
    Kind,
    Owner,
    SocketRecord,
    TcpState,
)


def is_candidate(sock: SocketRecord, capture_ports: Collection[int]) -> bool:
    """FIN_WAIT2, owned (not an orphan), on a capture port."""
    return sock.state is TcpState.FIN_WAIT2 and not sock.orphan and sock.local.port in capture_ports


def old_enough(sock: SocketRecord, min_idle_seconds: float) -> bool:
    if min_idle_seconds <= 0:
        return True
    idle = sock.idle_seconds
    return idle is not None and idle >= min_idle_seconds


def classify(
    sockets: Iterable[SocketRecord],
    capture_ports: Collection[int],
    lookups: Mapping[FlowTuple, ConntrackEntry | None],
    owners: Mapping[int, Owner],
    min_idle_seconds: float = 0.0,
) -> list[Finding]:
    """Findings for the candidates among ``sockets``, leaked first.

    ``lookups`` maps a reply tuple to its entry, or to None when the lookup
    found none.  A candidate whose tuple was *not looked up* (missing key) is
    skipped: absence of evidence is not the proof a leak needs.
    """
    findings: list[Finding] = []
    for sock in sockets:
        if not is_candidate(sock, capture_ports):
            continue
        if not old_enough(sock, min_idle_seconds):
            continue
        reply = sock.nat_reply_tuple
        try:
            entry = lookups[reply]
        except KeyError:
            continue
        kind = Kind.LEAKED if entry is None else Kind.AT_RISK
        findings.append(Finding(kind, sock, owners.get(sock.inode), entry))
    findings.sort(key=_order)
    return findings


def _order(f: Finding) -> tuple[int, int, str, int, str, int]:
    s = f.socket
    return (
        0 if f.kind is Kind.LEAKED else 1,
        s.local.ip.version,
        str(s.local.ip),
        s.local.port,
        str(s.peer.ip),
        s.peer.port,
    )
