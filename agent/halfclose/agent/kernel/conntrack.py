"""The ctnetlink client: look up, dump, count and update TCP conntrack entries.

A leak is proven by the *absence* of the entry whose reply tuple is the proxy
socket's ``local -> peer`` (docs/detection.md), so the hot path is a batch of
IPCTNL_MSG_CT_GET requests keyed by CTA_TUPLE_REPLY: the kernel hashes the tuple
and answers each with the entry or ENOENT.  Cost follows the number of
candidates, not the size of the table (a dump would read every entry).

The messages themselves are built and read by ``ctnetlink``.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

from halfclose.agent.core.model import (
    ConntrackEntry,
    FlowTuple,
    IPAddress,
    SocketRecord,
    normalize_ip,
)
from halfclose.agent.kernel import netlink as nl
from halfclose.agent.kernel.ctnetlink import (
    BE32,
    CTA_STATS_GLOBAL_ENTRIES,
    MSG_GET,
    MSG_NEW,
    NFGEN,
    NFNETLINK_V0,
    decode_entry,
    decode_entry_fast,
    encode_dump_all,
    encode_dump_dst_nat,
    encode_dump_tcp,
    encode_get_by_reply,
    encode_get_stats,
    encode_socket_get,
    encode_update,
    index_dump_entry,
    key_ports,
    tuple_key,
)
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.errors import ConntrackUnavailable

_nlmsg = nl.NLMSG_HDR.unpack_from
_NLMSG_HDR = nl.NLMSG_HDR.size

# A batch of GETs is answered into our receive buffer before we read it; keep
# the worst case (every request answered with a ~250-byte entry) well under it.
BATCH = 1024
# When one dump answers the lookups instead of a GET each (``lookup_sockets``).
# A dump walks the kernel's whole conntrack hash (global: every netns's
# entries), a fixed cost, then costs per entry of *this* netns; each GET costs
# a request, an answer datagram and a recv().  Measured on the 20k-leak farm
# (2 cores, 262,144 buckets, an empty pod table): the walk 9-11 ms, a GET
# ~4-5 us, a dumped entry ~3 us in Python (index_dump_entry + key_ports);
# 2,048 GETs were still 20% faster than the dump, 4,096 were 30% slower.
GET_COST_US = 4.5
DUMPED_ENTRY_COST_US = 3.0
DUMP_WALK_COST_US = 12_000.0
# Below this many lookups the GETs win whatever the table: not even its size
# is asked for.
DUMP_MIN_LOOKUPS = 1024
# Tests only: True answers every lookup_sockets by dump, False by GETs.
FORCE_DUMP: bool | None = None


def dump_pays(lookups: int, entries: int) -> bool:
    """Whether one dump of a table of ``entries`` costs less than ``lookups`` GETs."""
    return lookups * GET_COST_US >= DUMP_WALK_COST_US + entries * DUMPED_ENTRY_COST_US


@dataclass(frozen=True, slots=True)
class Lookup:
    """Result of one reply-tuple lookup: the entry, or None with why it is absent."""

    reply: FlowTuple
    entry: ConntrackEntry | None
    errno: int = 0  # 0 when found; ENOENT when no such entry


class Conntrack:
    """A ctnetlink socket (create it inside the target netns)."""

    def __init__(self, sock: socket.socket) -> None:
        self._nl = nl.NetlinkSocket(sock)

    @classmethod
    def open(cls, netns: NetnsHandle | None = None) -> Conntrack:
        """A ctnetlink socket in ``netns``; ConntrackUnavailable without nfnetlink."""
        try:
            return cls(nl.open_socket(nl.NETLINK_NETFILTER, netns))
        except OSError as exc:
            if exc.errno in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
                # No nfnetlink in this kernel: no table to prove a leak with.
                raise ConntrackUnavailable(f"no conntrack netlink here: {exc.strerror}") from exc
            raise

    def lookup_replies(
        self, replies: Sequence[FlowTuple], zone: int = 0
    ) -> dict[FlowTuple, ConntrackEntry | None]:
        """Look up many entries by reply tuple; absent ones map to None.

        Requests go out in batches (one send() each) and every request is
        answered exactly once: the entry, or an NLMSG_ERROR.  Any error but
        ENOENT is raised: a failed lookup must never read as "entry absent",
        because absence is what proves a leak.
        """
        out: dict[FlowTuple, ConntrackEntry | None] = {}
        for start in range(0, len(replies), BATCH):
            for item in self._lookup_batch(replies[start : start + BATCH], zone):
                out[item.reply] = item.entry
        return out

    def _lookup_batch(self, replies: Sequence[FlowTuple], zone: int) -> Iterator[Lookup]:
        pending: dict[int, FlowTuple] = {}
        chunks = []
        for reply in replies:
            seq = self._nl.next_seq()
            pending[seq] = reply
            chunks.append(encode_get_by_reply(reply, seq, zone))
        self._nl.send(b"".join(chunks))
        while pending:
            for msg in nl.iter_messages(self._nl.recv()):
                asked = pending.pop(msg.seq, None)
                if asked is None:
                    continue  # a late answer to an earlier, abandoned request
                if msg.type == nl.NLMSG_ERROR:
                    err = nl.error_code(msg)
                    if err == errno.ENOENT:
                        yield Lookup(asked, None, err)
                        continue
                    raise nl.NetlinkError(err, f"conntrack lookup of reply {asked}")
                yield Lookup(asked, decode_entry(msg.payload))

    def lookup_sockets(self, sockets: Sequence[SocketRecord]) -> dict[int, ConntrackEntry | None]:
        """Each socket's entry under its normalized NAT reply tuple, by cookie (zone 0).

        The scan's part 3.  Few sockets: one GET each (``lookup_sockets_get``).
        Many: one dump of the netns's table, indexed as a GET matches
        (``lookup_sockets_dump``), when that costs less (``dump_pays``: the
        table's size is one cheap stats request).  Same answer either way.
        """
        n = len(sockets)
        if FORCE_DUMP is None:
            dump = n >= DUMP_MIN_LOOKUPS and dump_pays(n, self.count())
        else:
            dump = FORCE_DUMP and n > 0
        return self.lookup_sockets_dump(sockets) if dump else self.lookup_sockets_get(sockets)

    def lookup_sockets_get(
        self, sockets: Sequence[SocketRecord]
    ) -> dict[int, ConntrackEntry | None]:
        """``lookup_sockets`` by one GET per socket, each answered at once.

        ``lookup_replies`` for ``s.nat_reply_tuple``, with each request built
        straight from the socket (no FlowTuple, nothing hashed but the cookie).
        Same rules: many requests per send(), every one answered once, any
        error but ENOENT raised.  The kill's re-check uses this path: each
        answer is the entry as it is at that moment.
        """
        out: dict[int, ConntrackEntry | None] = {}
        nls = self._nl
        memo: dict[bytes, IPAddress] = {}  # each address built once per call
        for start in range(0, len(sockets), BATCH):
            pending: dict[int, SocketRecord] = {}
            chunks = []
            for sock in sockets[start : start + BATCH]:
                seq = nls.next_seq()
                pending[seq] = sock
                local, peer = sock.local, sock.peer
                chunks.append(
                    encode_socket_get(
                        normalize_ip(local.ip), local.port, normalize_ip(peer.ip), peer.port, seq
                    )
                )
            nls.send(b"".join(chunks))
            while pending:
                buf = nls.recv()
                offset, size = 0, len(buf)
                while offset + _NLMSG_HDR <= size:
                    length, msg_type, _flags, seq, _pid = _nlmsg(buf, offset)
                    if length < _NLMSG_HDR or offset + length > size:
                        raise ValueError(f"truncated netlink message at offset {offset}")
                    asked = pending.pop(seq, None)
                    if asked is not None:
                        if msg_type == nl.NLMSG_ERROR:
                            err = -nl.ERRNO.unpack_from(buf, offset + _NLMSG_HDR)[0]
                            if err != errno.ENOENT:
                                raise nl.NetlinkError(
                                    err or errno.EPROTO,
                                    f"conntrack lookup of reply {asked.nat_reply_tuple}",
                                )
                            out[asked.cookie] = None
                        else:
                            out[asked.cookie] = decode_entry_fast(
                                buf[offset + _NLMSG_HDR : offset + length], memo
                            )
                    offset += (length + 3) & ~3
        return out

    def lookup_sockets_dump(
        self, sockets: Sequence[SocketRecord]
    ) -> dict[int, ConntrackEntry | None]:
        """``lookup_sockets`` answered from one dump of the netns's table.

        Why the answers are the GETs' (net/netfilter/nf_conntrack_netlink.c
        and nf_conntrack_core.c, Linux 6.x, read for this):

        - A GET (ctnetlink_get_conntrack -> nf_conntrack_find_get) hashes T
          and returns the entry owning a tuplehash equal to T in *either*
          direction, whose zone id for that direction equals the request's
          (0 here), confirmed, of this netns; an expired one is skipped (and
          reaped).  So every dumped entry is indexed under both its tuples,
          and a direction carrying a zone (CTA_ZONE: both; CTA_TUPLE_ZONE:
          that one) is not indexed (``ctnetlink.index_dump_entry``).
        - The dump (ctnetlink_dump_table) walks every bucket of the global
          hash under its lock, skips expired entries, other netns's and the
          reply-direction nodes (each entry is sent once per sighting), and
          fills datagram after datagram.  An entry that did not fit is held
          and the next round resumes at it; if it vanished meanwhile, that
          bucket is walked again from its start.  So an entry present
          throughout the dump is sent (perhaps twice), never missed.  An entry
          created or removed during the dump may or may not be seen: as with
          GETs, each answer is the table at one moment within the call.
        - An entry can sit in the hash by its reply tuple only, invisible to
          dumps (nf_ct_resolve_clash_harder: a NAT clash loser), but only for
          protocols that allow clashes (UDP, generic), never TCP: for TCP the
          two agree.
        - Not covered: a resize of the hash (a write to the global
          nf_conntrack_buckets) during the walk may skip entries.  A scan's
          answer is never what a kill acts on alone: the kill re-checks each
          entry by GET just before its destroy (engine/kill.py).

        Any error is raised, never read as "absent".

        Cheap per socket: only entries whose port pair some socket has are
        kept (and decoded), and only a socket whose port pair some kept entry
        has builds its full key; the rest are absent at the cost of a set
        lookup.  All-IPv4 sockets need one TCP-filtered IPv4 dump; otherwise
        one unfiltered dump of every family (one walk of the hash, not two).
        """
        # One pass over the sockets (at 20k, each pass costs milliseconds).
        out: dict[int, ConntrackEntry | None] = {}
        by_pair: dict[tuple[int, int], SocketRecord] = {}
        more: list[SocketRecord] = []  # sockets sharing a port pair with an earlier one
        all_v4 = True
        v4 = IPv4Address
        for sock in sockets:
            local, peer = sock.local, sock.peer
            out[sock.cookie] = None
            if all_v4 and (local.ip.__class__ is not v4 or peer.ip.__class__ is not v4):
                all_v4 = False
            if by_pair.setdefault((local.port, peer.port), sock) is not sock:
                more.append(sock)
        found: dict[bytes, ConntrackEntry] = {}
        family = socket.AF_INET if all_v4 else socket.AF_UNSPEC
        for key, entry in self._dump_matching(family, by_pair):
            found[key] = entry  # a later sighting is as valid as an earlier one
        if not found:
            return out
        hits = {key_ports(key) for key in found}
        for sock in [by_pair[pair] for pair in hits if pair in by_pair] + more:
            local, peer = sock.local, sock.peer
            if (local.port, peer.port) in hits:
                key = tuple_key(
                    normalize_ip(local.ip), local.port, normalize_ip(peer.ip), peer.port
                )
                out[sock.cookie] = found.get(key)
        return out

    def _dump_matching(
        self, family: int, pairs: Container[tuple[int, int]]
    ) -> Iterator[tuple[bytes, ConntrackEntry]]:
        """(key, entry) for each dumped TCP entry tuple whose port pair is in ``pairs``."""
        if family == socket.AF_UNSPEC:
            yield from self._dump_keys(encode_dump_all, family, pairs)
            return
        try:
            yield from self._dump_keys(encode_dump_tcp, family, pairs)
        except OSError as exc:
            # A kernel without CTA_FILTER (before 5.8) refuses it before
            # sending any entry: nothing was yielded yet.
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            yield from self._dump_keys(encode_dump_all, family, pairs)

    def _dump_keys(
        self,
        encode: Callable[[int, int], bytes],
        family: int,
        pairs: Container[tuple[int, int]],
    ) -> Iterator[tuple[bytes, ConntrackEntry]]:
        nls = self._nl
        memo: dict[bytes, IPAddress] = {}
        seq = nls.next_seq()
        nls.send(encode(family, seq))
        while True:
            buf = nls.recv()
            offset, size = 0, len(buf)
            while offset + _NLMSG_HDR <= size:
                length, msg_type, _flags, msg_seq, _pid = _nlmsg(buf, offset)
                if length < _NLMSG_HDR or offset + length > size:
                    raise ValueError(f"truncated netlink message at offset {offset}")
                start, offset = offset + _NLMSG_HDR, offset + ((length + 3) & ~3)
                if msg_seq != seq:
                    continue  # a late answer to an earlier, abandoned request
                if msg_type == nl.NLMSG_DONE:
                    return
                if msg_type == nl.NLMSG_ERROR:
                    err = -nl.ERRNO.unpack_from(buf, start)[0]
                    if err:
                        raise nl.NetlinkError(err, "conntrack dump")
                    return
                if msg_type != MSG_NEW:
                    continue
                payload = buf[start : start + length - _NLMSG_HDR]
                entry = None
                for key in index_dump_entry(payload):
                    if key is not None and key_ports(key) in pairs:
                        if entry is None:
                            entry = decode_entry_fast(payload, memo)  # now: buffer reused
                        yield key, entry

    def get_by_reply(self, reply: FlowTuple, zone: int = 0) -> ConntrackEntry | None:
        return self.lookup_replies([reply], zone)[reply]

    def dump(self) -> Iterator[ConntrackEntry]:
        """Every TCP entry of the netns (for tests and tools; the scan does lookups)."""
        for family in (socket.AF_INET, socket.AF_INET6):
            seq = self._nl.next_seq()
            req = nl.pack_message(
                MSG_GET,
                nl.NLM_F_REQUEST | nl.NLM_F_DUMP,
                seq,
                NFGEN.pack(family, NFNETLINK_V0, 0),
            )
            for msg in self._nl.dump(req, seq):
                entry = decode_entry(msg.payload)
                yield entry

    def dst_nat_entries(self) -> list[ConntrackEntry]:
        """The TCP entries of this netns that were destination-NATed (REDIRECT, DNAT).

        Their reply sources show which local endpoints a NAT capture feeds
        (docs/detection.md part 2) without reading any rule.  One filtered dump per
        family; a kernel that refuses the filter (EINVAL, EOPNOTSUPP before
        5.19) gets a plain dump, filtered here.
        """
        out: list[ConntrackEntry] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                out.extend(self._dst_nat(encode_dump_dst_nat, family))
            except OSError as exc:
                # The kernel refuses a filter it does not know before sending
                # any entry, so nothing was collected for this family yet.
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                out.extend(self._dst_nat(encode_dump_all, family))
        return out

    def _dst_nat(
        self, encode: Callable[[int, int], bytes], family: int
    ) -> Iterator[ConntrackEntry]:
        seq = self._nl.next_seq()
        for msg in self._nl.dump(encode(family, seq), seq):
            entry = decode_entry(msg.payload)  # at once: the view is reused
            if entry.dst_nat and entry.l4proto == socket.IPPROTO_TCP:
                yield entry

    def count(self) -> int:
        """Entries in this netns's table (CTA_STATS_GLOBAL_ENTRIES)."""
        seq = self._nl.next_seq()
        self._nl.send(encode_get_stats(seq))
        while True:
            for msg in nl.iter_messages(self._nl.recv()):
                if msg.seq != seq:
                    continue
                if msg.type == nl.NLMSG_ERROR:
                    raise nl.NetlinkError(nl.error_code(msg) or errno.EPROTO, "conntrack stats")
                for t, v in nl.iter_attrs(msg.payload, NFGEN.size):
                    if t == CTA_STATS_GLOBAL_ENTRIES:
                        return int(BE32.unpack_from(v)[0])
                return 0

    def update(
        self,
        entry: ConntrackEntry,
        *,
        timeout: int | None = None,
        status: int | None = None,
        mark: int | None = None,
    ) -> None:
        """Apply ``encode_update`` changes to one existing entry (ACKed)."""
        seq = self._nl.next_seq()
        self._nl.request(encode_update(entry, seq, timeout=timeout, status=status, mark=mark), seq)

    def close(self) -> None:
        self._nl.close()


def entries_by_reply(entries: Iterable[ConntrackEntry]) -> dict[FlowTuple, ConntrackEntry]:
    return {e.reply: e for e in entries}
