"""The sock_diag client for TCP: a state-filtered dump, re-reads and SOCK_DESTROY.

The dump asks the kernel to filter by state (``idiag_states``), so its cost follows
the number of half-closed sockets, not the total (docs/detection.md).  The
messages themselves are built and parsed by ``inetdiag``.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Collection, Iterable, Sequence

from halfclose.agent.core.model import IPAddress, SocketRecord, TcpState
from halfclose.agent.kernel import netlink as nl
from halfclose.agent.kernel.inetdiag import (
    SOCK_DIAG_BY_FAMILY,
    Endpoints,
    PortFilter,
    decode_message,
    encode_destroy,
    encode_dump,
    encode_dump_both,
    encode_get,
    parse_buffers,
)
from halfclose.agent.kernel.netns import NetnsHandle

# Up to this many sockets, ``reread`` asks for each (GETs, many per send())
# rather than dumping: below it the GETs cost less than one walk of the hash.
REREAD_BY_GET_MAX = 256


class SockDiag:
    """A sock_diag netlink socket (create it inside the target netns)."""

    def __init__(self, sock: socket.socket) -> None:
        self._nl = nl.NetlinkSocket(sock)
        # Both families by one TCPDIAG_GETSOCK dump, until the kernel refuses it.
        self._both = True

    @classmethod
    def open(cls, netns: NetnsHandle | None = None) -> SockDiag:
        """Open in ``netns`` (a NetnsHandle) or in the caller's netns."""
        return cls(nl.open_socket(nl.NETLINK_SOCK_DIAG, netns))

    def dump(
        self,
        states: Collection[TcpState],
        keep: PortFilter | None = None,
        families: Iterable[int] = (socket.AF_INET, socket.AF_INET6),
        endpoints: Endpoints | None = None,
    ) -> tuple[int, list[SocketRecord]]:
        """Dump TCP sockets in ``states`` (kernel-side filter); see ``parse_dump``.

        ``endpoints``: the memo to build endpoints with (one per dump if not given).
        Both families are asked for with one legacy TCPDIAG_GETSOCK dump (one
        walk of the kernel's TCP hash instead of one per family); a kernel
        that refuses it (EINVAL, EOPNOTSUPP) gets one dump per family, from
        then on.  The records are the same; only their order differs.
        """
        mask = 0
        for st in states:
            mask |= st.mask
        endpoints = endpoints or Endpoints()
        families = tuple(families)
        if self._both and sorted(families) == [socket.AF_INET, socket.AF_INET6]:
            seq = self._nl.next_seq()
            self._nl.send(encode_dump_both(mask, seq))
            try:
                return parse_buffers(self._nl.datagrams(), seq, keep, endpoints)
            except nl.NetlinkError as exc:
                # Refused (at once, in practice): whatever was parsed is dropped.
                if exc.errno not in {errno.EINVAL, errno.EOPNOTSUPP}:
                    raise
                self._both = False
        seen_total = 0
        result: list[SocketRecord] = []
        for family in families:
            seq = self._nl.next_seq()
            self._nl.send(encode_dump(family, mask, seq))
            seen, socks = parse_buffers(self._nl.datagrams(), seq, keep, endpoints)
            seen_total += seen
            result.extend(socks)
        return seen_total, result

    def get(self, record: SocketRecord) -> SocketRecord | None:
        """Re-read one socket by tuple + cookie; None if it is gone (ENOENT)."""
        seq = self._nl.next_seq()
        try:
            msgs = self._nl.request(encode_get(record, seq), seq)
        except nl.NetlinkError as exc:
            if exc.errno == 2:  # ENOENT
                return None
            raise
        for msg in msgs:
            if msg.type == SOCK_DIAG_BY_FAMILY:
                return decode_message(msg.payload)
        return None

    def destroy(self, record: SocketRecord) -> None:
        """SOCK_DESTROY one socket by cookie.  Raises NetlinkError (ENOENT: already gone)."""
        seq = self._nl.next_seq()
        self._nl.request(encode_destroy(record, seq), seq)

    def get_many(self, records: Sequence[SocketRecord]) -> list[SocketRecord | int | None]:
        """``get`` for many sockets, all requests in one send() per chunk.

        One answer per record, in order: the socket as the kernel has it now
        (same tuple and cookie), None when it is gone (ENOENT), or the errno
        of any other failure (never read as "gone").
        """
        out: list[SocketRecord | int | None] = []
        step = self._nl.batch_size()
        for start in range(0, len(records), step):
            chunk = records[start : start + step]
            reqs = []
            for record in chunk:
                seq = self._nl.next_seq()
                reqs.append((seq, encode_get(record, seq)))
            answers = self._nl.transact(reqs)
            for seq, _ in reqs:
                err, replies = answers[seq]
                if err == errno.ENOENT:
                    out.append(None)
                elif err:
                    out.append(err)
                elif replies:
                    out.append(decode_message(memoryview(replies[0])))
                else:
                    out.append(None)
        return out

    def reread(self, records: Sequence[SocketRecord]) -> list[SocketRecord | int | None]:
        """``get_many``'s answers, from one state-filtered dump instead of a GET each.

        A dump packs ~100 sockets per datagram where GETs answer one per
        datagram: this is how a kill re-reads thousands of sockets at ``ss``'s
        speed.  Matched by cookie (a socket's tuple never changes).  Sockets
        the dump does not show (gone, or in another state now) are asked for
        one by one, so the caller still learns which.
        """
        if not records:
            return []
        if len(records) <= REREAD_BY_GET_MAX:
            # A dump walks the host's whole TCP hash (every netns's sockets:
            # ~10 ms per family on a node of 110 busy pods); a GET is one hash
            # lookup.  A few sockets (the agent's fast path) are asked for alone.
            return self.get_many(records)
        # One pass over the records (each costs milliseconds at 20k): their
        # ports, and their own address objects (a pod has a handful).
        ports: set[int] = set()
        ips: dict[int, IPAddress] = {}
        for r in records:
            local, peer = r.local, r.peer
            ports.add(local.port)
            ips[id(local.ip)] = local.ip
            ips[id(peer.ip)] = peer.ip
        families = sorted({socket.AF_INET if ip.version == 4 else socket.AF_INET6
                           for ip in ips.values()})  # fmt: skip

        def keep(_state: int, sport: int, _dport: int) -> bool:
            return sport in ports

        # The addresses in the memo: a socket the dump shows on the same
        # addresses has the very same ip objects, so the tuple check below is
        # mostly identity tests.
        endpoints = Endpoints()
        endpoints.seed_addresses(ips.values())
        _, socks = self.dump({r.state for r in records}, keep, families, endpoints)
        now = {s.cookie: s for s in socks}
        out: list[SocketRecord | int | None] = []
        for r in records:
            got = now.get(r.cookie)
            # The cookie *and* the tuple, as a GET checks them: a cookie alone
            # could name another socket (a stale or wrong record).  Identical
            # addresses are equal; others are compared by value.
            if got is not None:
                gl, rl, gp, rp = got.local, r.local, got.peer, r.peer
                if (
                    gl.port != rl.port
                    or gp.port != rp.port
                    or (gl.ip is not rl.ip and gl.ip != rl.ip)
                    or (gp.ip is not rp.ip and gp.ip != rp.ip)
                ):
                    got = None
            out.append(got)
        missing = [i for i, found in enumerate(out) if found is None]
        if missing:
            answers = self.get_many([records[i] for i in missing])
            for i, answer in zip(missing, answers, strict=True):
                out[i] = answer
        return out

    def destroy_many(self, records: Sequence[SocketRecord]) -> list[int]:
        """``destroy`` for many sockets (each by its cookie), many per send().

        One errno per record, in order: 0 destroyed, ENOENT/ESTALE gone already,
        anything else a failure.  ``encode_destroy`` refuses a record without a
        cookie before anything is sent.  The destroys carry no NLM_F_ACK (the
        kernel then answers only failures) and a NOOP with an ACK closes each
        batch: one datagram per batch instead of one per socket.  If the
        receive buffer overran (answers lost), the outcome is read back from a
        dump instead of assumed.
        """
        out: list[int] = []
        step = self._nl.batch_size(1024)
        for start in range(0, len(records), step):
            chunk = records[start : start + step]
            reqs = []
            for record in chunk:
                seq = self._nl.next_seq()
                reqs.append((seq, encode_destroy(record, seq, ack=False)))
            try:
                errors = self._nl.transact_quiet(reqs)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                still = self.reread(chunk)
                out.extend(0 if s is None else errno.ENOBUFS for s in still)
                continue
            out.extend(errors.get(seq, 0) for seq, _ in reqs)
        return out

    def close(self) -> None:
        self._nl.close()
