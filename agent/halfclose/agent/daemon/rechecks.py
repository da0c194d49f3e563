"""The sockets of one netns whose proof is due again, and when (plain state, no I/O).

The agent's fast path (``engine/recheck.py``): rather than scan a netns at
each at-risk socket's predicted expiry, it re-checks just the sockets due.
Keyed by the socket's (normalized) NAT reply tuple, which a conntrack event
names as well as a scan's finding does: a scan's finding (socket with its
cookie, and its upstream leg when paired) replaces an event's tuple-only
probe of the same connection.  Bounded: past ``MAX_DUE`` sockets the caller
scans instead (a scan costs the same at any number of sockets).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field

from halfclose.agent.core.model import Endpoint, FlowTuple, SocketRecord, TcpState
from halfclose.agent.engine.recheck import NO_COOKIE

# Sockets waiting per netns; one more makes the netns fall back to scans.
MAX_DUE = 4096


@dataclass(frozen=True, slots=True)
class Due:
    at: float  # loop clock
    socket: SocketRecord  # as last seen (a scan's record), or a tuple-only probe
    upstream: SocketRecord | None = None  # its paired upstream leg, when a scan paired it


def probe_for(reply: FlowTuple) -> SocketRecord:
    """The proxy socket a conntrack event's reply tuple names, by tuple only.

    The reply tuple runs proxy -> app, as the socket does (local -> peer).
    Never judged or acted on itself: ``Kernel.recheck`` reads the socket
    under that tuple and judges what it reads (cookie included).
    """
    return SocketRecord(
        TcpState.FIN_WAIT2,
        Endpoint(reply.src, reply.sport),
        Endpoint(reply.dst, reply.dport),
        cookie=NO_COOKIE,
        inode=0,
        uid=0,
    )


@dataclass(slots=True)
class Rechecks:
    by_reply: dict[FlowTuple, Due] = field(default_factory=dict)
    # reply -> wall time its socket was last judged by a re-check (bounded): a
    # DESTROY of an entry that expired before then needs no scan (the re-check
    # saw the leak; the GC reaps expired entries late).
    judged: OrderedDict[FlowTuple, float] = field(default_factory=OrderedDict)
    # (at, sequence, reply); rows whose reply moved or left are skipped.
    _heap: list[tuple[float, int, FlowTuple]] = field(default_factory=list)
    _seq: int = 0

    def __len__(self) -> int:
        return len(self.by_reply)

    def __contains__(self, reply: object) -> bool:
        return reply in self.by_reply

    def add(self, reply: FlowTuple, due: Due) -> bool:
        """Due ``due.at`` (a newer prediction replaces an older one); False when full."""
        if reply not in self.by_reply and len(self.by_reply) >= MAX_DUE:
            return False
        self.by_reply[reply] = due
        self._seq += 1
        heapq.heappush(self._heap, (due.at, self._seq, reply))
        return True

    def next_at(self) -> float | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float, limit: int) -> list[Due]:
        """The sockets due by ``now``, earliest first, at most ``limit``; they leave."""
        out: list[Due] = []
        while len(out) < limit:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                break
            _at, _seq, reply = heapq.heappop(self._heap)
            out.append(self.by_reply.pop(reply))
        return out

    def clear(self) -> None:
        self.by_reply.clear()
        self._heap.clear()

    def note_judged(self, reply: FlowTuple, wall: float) -> None:
        self.judged[reply] = wall
        self.judged.move_to_end(reply)
        while len(self.judged) > MAX_DUE:
            self.judged.popitem(last=False)

    def saw_expired(self, reply: FlowTuple, expired_at: float | None) -> bool:
        """Was this entry's socket judged by a re-check after the entry expired?"""
        judged = self.judged.get(reply)
        return judged is not None and expired_at is not None and expired_at <= judged

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap:
            at, _seq, reply = heap[0]
            due = self.by_reply.get(reply)
            if due is not None and due.at == at:
                return
            heapq.heappop(heap)
