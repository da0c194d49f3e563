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

Candidates are CLOSE_WAIT sockets of the *same holder* not on a capture port:
the same process (pid) where /proc told us the owners, else the same socket
uid from sock_diag (the agent's default capabilities cannot list another
user's /proc/<pid>/fd; a sidecar runs under its own uid, 1337 or 2102).  A
choice must be unique by a margin and mutual (the chosen upstream's best
downstream is this one); otherwise the pair is None.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from itertools import repeat
from operator import add
from typing import Any

from halfclose.agent.core.model import (
    Endpoint,
    Finding,
    FindingSlots,
    Kind,
    Owner,
    SocketRecord,
    TcpState,
)

# tcp_info ages have jiffy resolution (1-4 ms); two FIN times closer than this
# cannot be told apart.
FIN_MARGIN_MS = 10
# The proxy forwards a FIN within milliseconds; a larger gap is a different FIN.
FIN_MAX_GAP_MS = 2000


Holder = tuple[str, int]


def holder(sock: SocketRecord, owners: Mapping[int, Owner]) -> Holder:
    """Who holds ``sock``: its process when known, else its uid (weaker, still one proxy)."""
    owner = owners.get(sock.inode)
    return ("pid", owner.pid) if owner is not None else ("uid", sock.uid)


def upstream_pool(
    sockets: Iterable[SocketRecord], capture_ports: Collection[int]
) -> list[SocketRecord]:
    """CLOSE_WAIT sockets held by a process that could be a proxy's upstream leg."""
    close_wait = TcpState.CLOSE_WAIT
    # inode 0 is SocketRecord.orphan, read without the property (40,000 sockets at 20k leaks).
    return [
        s
        for s in sockets
        if s.state is close_wait and s.inode != 0 and s.local.port not in capture_ports
    ]


def _down_key(down: SocketRecord) -> tuple[int, int] | None:
    if down.bytes_acked is None or down.bytes_received is None:
        return None
    return down.bytes_acked, down.bytes_received


def _up_keys(up: SocketRecord) -> tuple[tuple[int, int], ...]:
    """The downstream keys (acked, received) an upstream leg is consistent with.

    Measured on Linux 6.18: sequence-space counters include the FIN (so the
    downstream's acked == the upstream's received once the FIN was forwarded
    and acked) and, on the connect()ing side only, the SYN (so the upstream's
    acked is the downstream's received plus one).  The plus-one is allowed,
    not required, so an accept()ed upstream leg matches too.
    """
    if up.bytes_acked is None or up.bytes_received is None:
        return ()
    return (up.bytes_received, up.bytes_acked - 1), (up.bytes_received, up.bytes_acked)


def _unique(socks: Iterable[SocketRecord]) -> list[SocketRecord]:
    """Deduplicated by cookie (hashing whole records is slow: ipaddress hashes)."""
    if not isinstance(socks, list):
        socks = list(socks)
    if len(socks) < 2:  # the usual answer: one exact match (no dict needed)
        return socks
    seen: dict[int, SocketRecord] = {}
    for sock in socks:
        seen.setdefault(sock.cookie, sock)
    return list(seen.values())


class _TimeIndex:
    """Sockets sorted by FIN time (``last_ack_recv``): nearest neighbour by bisection."""

    def __init__(self, socks: Sequence[SocketRecord]) -> None:
        timed = sorted(
            ((s.last_ack_recv_ms, i) for i, s in enumerate(socks) if s.last_ack_recv_ms is not None)
        )
        self.times = [t for t, _ in timed]
        self.socks = [socks[i] for _, i in timed]

    def best(self, t: int | None) -> SocketRecord | None:
        """The unique socket nearest to ``t``: within FIN_MAX_GAP_MS and ahead of
        the runner-up by FIN_MARGIN_MS; None when ambiguous or nothing is near."""
        if t is None or not self.times:
            return None
        i = bisect.bisect_left(self.times, t)
        lo, hi = max(0, i - 2), min(len(self.times), i + 2)
        near = sorted((abs(self.times[j] - t), j) for j in range(lo, hi))
        gap, j = near[0]
        if gap > FIN_MAX_GAP_MS:
            return None
        if len(near) > 1 and near[1][0] - gap < FIN_MARGIN_MS:
            return None
        return self.socks[j]


class _Group:
    """Downstreams and upstream candidates of one process, indexed by counters and time.

    Indexes keep pairing linear-ish in the number of flagged sockets: a proxy
    with thousands of leaks must not cost a quadratic scan.
    """

    def __init__(self, downs: Sequence[SocketRecord], ups: Sequence[SocketRecord]) -> None:
        self.downs = list(downs)
        self.ups = list(ups)
        # The keys of _up_keys / _down_key, computed inline (two calls per
        # socket otherwise, 40,000 at 20k leaks).
        ups_by_key: dict[tuple[int, int], list[SocketRecord]] = {}
        for u in ups:
            acked, received = u.bytes_acked, u.bytes_received
            if acked is None or received is None:
                continue
            for key in ((received, acked - 1), (received, acked)):
                same = ups_by_key.get(key)
                if same is None:
                    ups_by_key[key] = [u]
                else:
                    same.append(u)
        downs_by_key: dict[tuple[int, int], list[SocketRecord]] = {}
        for d in downs:
            acked, received = d.bytes_acked, d.bytes_received
            if acked is None or received is None:
                continue
            key = (acked, received)
            same = downs_by_key.get(key)
            if same is None:
                downs_by_key[key] = [d]
            else:
                same.append(d)
        self.ups_by_key = ups_by_key
        self.downs_by_key = downs_by_key
        self._indexes: dict[object, _TimeIndex] = {}

    def _index(self, key: object, socks: Sequence[SocketRecord]) -> _TimeIndex:
        index = self._indexes.get(key)
        if index is None:
            index = self._indexes[key] = _TimeIndex(socks)
        return index

    def exact_ups(self, down: SocketRecord) -> list[SocketRecord]:
        key = _down_key(down)
        return _unique(self.ups_by_key.get(key, ())) if key else []

    def exact_downs(self, up: SocketRecord) -> list[SocketRecord]:
        out: list[SocketRecord] = []
        for key in _up_keys(up):
            out.extend(self.downs_by_key.get(key, ()))
        return _unique(out)

    def choose(self, down: SocketRecord) -> SocketRecord | None:
        """``down``'s upstream: unique by counters, else by FIN time; mutual either way."""
        exact = self.exact_ups(down)
        if len(exact) == 1:
            up = exact[0]
            rivals = self.exact_downs(up)
            if rivals == [down]:
                return up
            # Several downstreams share these counters: time decides between them.
            back = self._index(("downs", _up_keys(up)), rivals).best(up.last_ack_recv_ms)
            return up if back is down else None
        if exact:
            ups = self._index(("ups", _down_key(down)), exact)
        else:
            ups = self._index("ups", self.ups)
        choice = ups.best(down.last_ack_recv_ms)
        if choice is None:
            return None
        if exact:
            downs = self._index(("downs", _up_keys(choice)), self.exact_downs(choice))
        else:
            downs = self._index("downs", self.downs)
        return choice if downs.best(choice.last_ack_recv_ms) is down else None


def _holders(socks: Sequence[SocketRecord], owners: Mapping[int, Owner]) -> list[Holder]:
    """``holder(s, owners)`` for each of ``socks`` (one comprehension, not a call each)."""
    if not owners:  # one key per uid, not per socket
        uids = [s.uid for s in socks]
        keys: dict[int, Holder] = {uid: ("uid", uid) for uid in set(uids)}
        return list(map(keys.__getitem__, uids))
    get = owners.get
    by_pid: dict[int, Holder] = {}
    by_uid: dict[int, Holder] = {}
    return [
        (by_pid.get(o.pid) or by_pid.setdefault(o.pid, ("pid", o.pid)))
        if (o := get(s.inode)) is not None
        else (by_uid.get(s.uid) or by_uid.setdefault(s.uid, ("uid", s.uid)))
        for s in socks
    ]


def _grouped(keys: Sequence[Holder]) -> dict[Holder, list[int]]:
    """Positions in ``keys`` by key, in order (one proxy, one holder: the usual case)."""
    if not keys:
        return {}
    if keys.count(keys[0]) == len(keys):
        return {keys[0]: list(range(len(keys)))}
    out: dict[Holder, list[int]] = {}
    for i, k in enumerate(keys):
        same = out.get(k)
        if same is None:
            out[k] = [i]
        else:
            same.append(i)
    return out


# Below this many downstreams _choose_all asks choose() for each directly.
_FEW = 8


def _choose_all(
    downs: Sequence[SocketRecord], ups: Sequence[SocketRecord]
) -> list[SocketRecord | None]:
    """``_Group(downs, ups).choose(d)`` for each ``d`` in ``downs``, in order.

    Where the counters alone decide, the answer is read from counts rather
    than from ``choose``'s lists: exactly one upstream is indexed under the
    downstream's counters (``exact_ups`` is that one), and exactly one
    downstream under that upstream's two keys (``exact_downs`` is ``[down]``,
    since ``down`` is one of them): ``choose`` returns that upstream.  Every
    other downstream is asked of ``choose`` itself (the group is built on
    first need).  The counts are taken with C-level ``map``s over whole
    lists: at 20k leaks a per-socket loop touching each matched upstream's
    keys at random cost ~3x more (cache misses, not hashing).
    """
    if len(downs) <= _FEW:
        # A few leaks (the usual netns): the lists cost less than the counts.
        few = _Group(downs, ups)
        return [few.choose(d) for d in downs]
    n = len(ups)
    # The keys of _up_keys / _down_key: (received, acked - 1) and
    # (received, acked) for an upstream, (acked, received) for a downstream.
    hi = [
        None if (acked := u.bytes_acked) is None or (got := u.bytes_received) is None
        else (got, acked)
        for u in ups
    ]  # fmt: skip
    lo = [None if k is None else (k[0], k[1] - 1) for k in hi]
    keys = [
        None if (acked := d.bytes_acked) is None or (got := d.bytes_received) is None
        else (acked, got)
        for d in downs
    ]  # fmt: skip
    up_at = dict(zip(lo, range(n), strict=True))
    up_at.update(zip(hi, range(n), strict=True))
    # j: the one upstream indexed under the downstream's key, or None.
    js = list(map(up_at.get, keys))
    if len(up_at) != 2 * n:
        # Some key is held by two upstreams (or a counter is unknown: the
        # None key): an upstream there is not the only exact one.
        up_count = Counter(lo)
        up_count.update(hi)
        js = [
            None if j is None or k is None or up_count[k] != 1 else j
            for j, k in zip(js, keys, strict=True)
        ]
    # Downstreams indexed under each upstream's two keys (its rivals: mutual
    # when ``down`` is the only one).  Used only for upstreams found by a
    # known key, so their own keys are known.
    down_count = Counter(keys)
    rivals = down_count.get
    mutual = list(map(add, map(rivals, lo, repeat(0)), map(rivals, hi, repeat(0))))
    out: list[SocketRecord | None] = [None if j is None or mutual[j] != 1 else ups[j] for j in js]
    if None in out:  # some not decided by the counters alone
        group = _Group(downs, ups)
        for i, up in enumerate(out):
            if up is None:
                out[i] = group.choose(downs[i])
    return out


def pair(
    findings: Sequence[Finding],
    sockets: Iterable[SocketRecord],
    capture_ports: Collection[int],
    owners: Mapping[int, Owner],
) -> list[Finding]:
    """``findings`` with ``upstream`` filled where it can be determined."""
    out = list(findings)
    new = object.__new__
    for i, up in enumerate(upstreams(findings, sockets, capture_ports, owners)):
        if up is not None:
            f = out[i]
            # f.with_upstream(up) (new_finding, inline: 20,000 at field scale).
            g: Any = new(FindingSlots)
            g.kind = f.kind
            g.socket = f.socket
            g.owner = f.owner
            g.entry = f.entry
            g.upstream = up
            g.reason = f.reason
            g.capture = f.capture
            g.min_silence_seconds = f.min_silence_seconds
            g.__class__ = Finding
            out[i] = g
    return out


def upstreams(
    findings: Sequence[Finding],
    sockets: Iterable[SocketRecord],
    capture_ports: Collection[int],
    owners: Mapping[int, Owner],
) -> list[SocketRecord | None]:
    """Each finding's upstream, where it can be determined (what ``pair`` fills in).

    Reads only each finding's ``kind``, ``entry`` and ``socket``.
    """
    pool = upstream_pool(sockets, capture_ports)
    by_holder = {who: [pool[j] for j in at] for who, at in _grouped(_holders(pool, owners)).items()}
    downs = [f.socket for f in findings]
    holders = _holders(downs, owners)

    # chosen[i]: finding i's upstream (None: not paired).
    chosen: list[SocketRecord | None] = [None] * len(findings)
    claimed: set[int] = set()  # upstream cookies already paired

    # 1. At-risk: the original destination narrows candidates to one service.
    at_risk = Kind.AT_RISK
    by_dest: dict[tuple[Holder, Endpoint], list[int]] = {}
    for i, f in enumerate(findings):
        if f.kind is at_risk and f.entry is not None:
            dest = Endpoint(f.entry.original.dst, f.entry.original.dport)
            by_dest.setdefault((holders[i], dest), []).append(i)
    for (who, dest), idxs in by_dest.items():
        group = _Group(
            [downs[i] for i in idxs], [u for u in by_holder.get(who, []) if u.peer == dest]
        )
        for i in idxs:
            if len(idxs) == 1 and len(group.ups) == 1:
                up: SocketRecord | None = group.ups[0]
            else:
                up = group.choose(downs[i])
            if up is not None:
                chosen[i] = up
                claimed.add(up.cookie)

    # 2. Leaked (and at-risk left unpaired): same holder, counters and FIN time.
    if claimed:
        left = [i for i, up in enumerate(chosen) if up is None]
        rest = {
            who: [left[j] for j in at] for who, at in _grouped([holders[i] for i in left]).items()
        }
    else:
        rest = _grouped(holders)
    for who, idxs in rest.items():
        ups = by_holder.get(who, [])
        if claimed:
            ups = [u for u in ups if u.cookie not in claimed]
        if len(idxs) == len(findings):  # one holder, nothing chosen in step 1: all of them
            chosen = _choose_all(downs, ups)
            continue
        for i, up in zip(idxs, _choose_all([downs[i] for i in idxs], ups), strict=True):
            chosen[i] = up
    # A candidate chosen twice means the evidence was not decisive for either.
    # The usual answer: no upstream chosen twice.  Told without reading each
    # chosen record (at random places in memory): distinct objects, from a
    # pool whose cookies are distinct, have distinct cookies.
    picked = [id(up) for up in chosen if up is not None]
    once = len(set(picked)) == len(picked) and len({u.cookie for u in pool}) == len(pool)
    if once:
        return chosen
    counts = Counter(up.cookie for up in chosen if up is not None)
    return [up if up is not None and counts[up.cookie] == 1 else None for up in chosen]
