"""Best-effort pairing of a flagged downstream socket with the proxy's upstream one.

When the upstream sends FIN the proxy's upstream socket goes to CLOSE_WAIT and its
downstream (the flagged FIN_WAIT2 socket) is shut down; both leak together.  The
kernel keeps no link between them, so we infer it, and say None rather than guess:
a wrong pair is worse than none (the remediation verifies the pair it reports).

Evidence, strongest first:

1. At-risk only: the live conntrack entry's *original* tuple holds the app's
   intended destination, which is where the proxy dialled: the upstream
   socket's peer.
2. Byte counters (tcp_info, RFC 4898): an L4 proxy forwards every byte, so the
   downstream received what the upstream had acked and vice versa.
3. FIN time: the upstream socket last heard from its peer when the FIN arrived
   (``last_ack_recv``), and the downstream last heard from the app when it
   ACKed the FIN the proxy forwarded a moment later.

Candidates are CLOSE_WAIT sockets of the *same process* (pid) not on a capture
port.  A choice must be unique by a margin and mutual (the chosen upstream's
best downstream is this one); otherwise the pair is None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence

from halfclose.agent.core.model import Endpoint, Finding, Kind, Owner, SocketRecord, TcpState

# tcp_info ages have jiffy resolution (1-4 ms); two FIN times closer than this
# cannot be told apart.
FIN_MARGIN_MS = 10
# The proxy forwards a FIN within milliseconds; a larger gap is a different FIN.
FIN_MAX_GAP_MS = 2000


def upstream_pool(
    sockets: Iterable[SocketRecord],
    capture_ports: Collection[int],
    owners: Mapping[int, Owner],
) -> list[SocketRecord]:
    """Owned CLOSE_WAIT sockets that could be a proxy's upstream leg."""
    return [
        s
        for s in sockets
        if s.state is TcpState.CLOSE_WAIT
        and not s.orphan
        and s.local.port not in capture_ports
        and s.inode in owners
    ]


def _bytes_match(down: SocketRecord, up: SocketRecord) -> bool:
    """Counters consistent with one proxied connection, in the measured accounting.

    Measured on Linux 6.18: sequence-space counters include the FIN (so the
    downstream's acked == the upstream's received once the FIN was forwarded
    and acked) and, on the connect()ing side only, the SYN (so the upstream's
    acked is the downstream's received, plus one).  The plus-one is allowed,
    not required, so an accept()ed upstream leg also matches.
    """
    if (
        down.bytes_acked is None
        or down.bytes_received is None
        or up.bytes_acked is None
        or up.bytes_received is None
    ):
        return False
    return down.bytes_acked == up.bytes_received and up.bytes_acked - down.bytes_received in (0, 1)


def _fin_gap(down: SocketRecord, up: SocketRecord) -> int | None:
    if down.last_ack_recv_ms is None or up.last_ack_recv_ms is None:
        return None
    return abs(down.last_ack_recv_ms - up.last_ack_recv_ms)


def _best_by_time(
    target: SocketRecord, others: Sequence[SocketRecord], *, down_is_target: bool
) -> SocketRecord | None:
    """The unique nearest-FIN-time partner of ``target`` among ``others``."""
    scored: list[tuple[int, SocketRecord]] = []
    for other in others:
        gap = _fin_gap(target, other) if down_is_target else _fin_gap(other, target)
        if gap is not None and gap <= FIN_MAX_GAP_MS:
            scored.append((gap, other))
    if not scored:
        return None
    scored.sort(key=lambda x: x[0])
    if len(scored) > 1 and scored[1][0] - scored[0][0] < FIN_MARGIN_MS:
        return None
    return scored[0][1]


def _choose(
    down: SocketRecord, candidates: Sequence[SocketRecord], rivals: Sequence[SocketRecord]
) -> SocketRecord | None:
    """Pick ``down``'s upstream among ``candidates``; ``rivals`` are the other
    downstreams competing for the same candidates (for the mutual check)."""
    if not candidates:
        return None
    exact = [u for u in candidates if _bytes_match(down, u)]
    if len(exact) == 1:
        up = exact[0]
        if not any(_bytes_match(r, up) for r in rivals):
            return up
        pool = [down, *[r for r in rivals if _bytes_match(r, up)]]
        # Same byte counts on several downstreams: fall back to time between them.
        best_down = _best_by_time(up, pool, down_is_target=False)
        return up if best_down is down else None
    pool_up = exact if exact else list(candidates)
    up_choice = _best_by_time(down, pool_up, down_is_target=True)
    if up_choice is None:
        return None
    contenders = [down, *rivals]
    if exact:
        contenders = [d for d in contenders if _bytes_match(d, up_choice)]
    back = _best_by_time(up_choice, contenders, down_is_target=False)
    return up_choice if back is down else None


def pair(
    findings: Sequence[Finding],
    sockets: Iterable[SocketRecord],
    capture_ports: Collection[int],
    owners: Mapping[int, Owner],
) -> list[Finding]:
    """``findings`` with ``upstream`` filled where it can be determined."""
    pool = upstream_pool(sockets, capture_ports, owners)
    by_pid: dict[int, list[SocketRecord]] = {}
    for s in pool:
        by_pid.setdefault(owners[s.inode].pid, []).append(s)

    chosen: dict[int, SocketRecord] = {}  # finding index -> upstream
    claimed: set[int] = set()  # upstream cookies already paired

    # 1. At-risk: the original destination narrows candidates to one service.
    for i, f in enumerate(findings):
        if f.kind is not Kind.AT_RISK or f.entry is None or f.owner is None:
            continue
        dest = Endpoint(f.entry.original.dst, f.entry.original.dport)
        cands = [u for u in by_pid.get(f.owner.pid, []) if u.peer == dest]
        rivals = [
            g.socket
            for j, g in enumerate(findings)
            if j != i
            and g.kind is Kind.AT_RISK
            and g.entry is not None
            and g.owner is not None
            and g.owner.pid == f.owner.pid
            and Endpoint(g.entry.original.dst, g.entry.original.dport) == dest
        ]
        up = cands[0] if len(cands) == 1 and not rivals else _choose(f.socket, cands, rivals)
        if up is not None:
            chosen[i] = up
            claimed.add(up.cookie)

    # 2. Leaked (and at-risk left unpaired): same process, counters and FIN time.
    rest = [(i, f.owner.pid) for i, f in enumerate(findings) if i not in chosen and f.owner]
    for i, pid in rest:
        cands = [u for u in by_pid.get(pid, []) if u.cookie not in claimed]
        rivals = [findings[j].socket for j, other in rest if j != i and other == pid]
        up = _choose(findings[i].socket, cands, rivals)
        if up is not None:
            chosen[i] = up
    # A candidate chosen twice means the evidence was not decisive for either.
    counts: dict[int, int] = {}
    for up in chosen.values():
        counts[up.cookie] = counts.get(up.cookie, 0) + 1
    return [
        dataclasses.replace(f, upstream=chosen[i])
        if i in chosen and counts[chosen[i].cookie] == 1
        else f
        for i, f in enumerate(findings)
    ]
