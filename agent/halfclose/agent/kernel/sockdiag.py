"""sock_diag (NETLINK_SOCK_DIAG) for TCP: a state-filtered dump and SOCK_DESTROY.

The dump asks the kernel to filter by state (``idiag_states``), so its cost follows
the number of half-closed sockets, not the total (design.md §3).  The parser is
ours: fixed offsets with ``struct.unpack_from`` over the receive buffer, a port
filter applied *before* any object is built, and only the ``tcp_info`` fields the
classifier and pairing use.

Layouts (include/uapi/linux/inet_diag.h, include/uapi/linux/tcp.h):

    inet_diag_req_v2  family u8, protocol u8, ext u8, pad u8, states u32, id
    inet_diag_sockid  sport be16, dport be16, src 4xbe32, dst 4xbe32, if u32,
                      cookie 2xu32 (host order; cookie = lo | hi << 32)
    inet_diag_msg     family u8, state u8, timer u8, retrans u8, id,
                      expires u32, rqueue u32, wqueue u32, uid u32, inode u32
    tcp_info          last_data_sent @44, last_ack_sent @48, last_data_recv @52,
                      last_ack_recv @56 (ms ages, u32), bytes_acked @120,
                      bytes_received @128 (u64)
    inet_diag_sockopt two u8 of bit fields; byte 0 bit 5 = transparent
                      (IP_TRANSPARENT: recverr, is_icsk, freebind, hdrincl,
                      mc_loop, transparent, ... allocated from bit 0)

INET_DIAG_SOCKOPT cannot be asked for (``idiag_ext`` is a u8 and it is extension
22): the kernel (5.10+) sends it with every full socket, before INET_DIAG_INFO,
and never with timewait or request minisockets.  Measured here: a socket accepted
from an IP_TRANSPARENT listener (TPROXY) carries the bit, like its listener.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable, Collection, Iterable

from halfclose.agent.core.model import Endpoint, SocketRecord, TcpState
from halfclose.agent.kernel import netlink as nl
from halfclose.agent.kernel.netns import NetnsHandle

SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21

INET_DIAG_INFO = 2
INET_DIAG_SOCKOPT = 22
SOCKOPT_TRANSPARENT = 0x20  # byte 0, bit 5 of struct inet_diag_sockopt

REQ = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states
SOCKID = struct.Struct("!HH16s16s")  # sport, dport, src, dst (network order)
SOCKID_TAIL = struct.Struct("=III")  # if, cookie lo, cookie hi (host order)
MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans
MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_TAIL_AT = MSG_HEAD.size + SOCKID.size + SOCKID_TAIL.size  # 52
MSG_SIZE = _TAIL_AT + MSG_TAIL.size  # 72

_SPORT_DPORT = struct.Struct("!HH")
_NLA = struct.Struct("=HH")
# last_data_sent, last_ack_sent, last_data_recv, last_ack_recv (adjacent)
_FOUR_U32 = struct.Struct("=IIII")
_TWO_U64 = struct.Struct("=QQ")  # bytes_acked, bytes_received (adjacent)
TCPI_LAST_DATA_SENT = 44
TCPI_LAST_DATA_RECV = 52
TCPI_LAST_ACK_RECV = 56
TCPI_BYTES_ACKED = 120
TCPI_BYTES_RECEIVED = 128

NO_COOKIE = 0xFFFFFFFF  # INET_DIAG_NOCOOKIE, per half


_STATES = {int(st): st for st in TcpState}
_ENDPOINTS: dict[tuple[bytes, int], Endpoint] = {}


def _endpoint(family: int, raw: bytes, port: int) -> Endpoint:
    # A pod has a handful of addresses and the local side of the sockets we
    # keep is mostly one capture endpoint; ipaddress objects are slow to
    # build, so endpoints are memoised (bounded: peers may be many).
    key = (raw[:4] if family == socket.AF_INET else raw, port)
    ep = _ENDPOINTS.get(key)
    if ep is None:
        if len(_ENDPOINTS) > 8192:
            _ENDPOINTS.clear()
        addr = key[0]
        ip = ipaddress.IPv4Address(addr) if len(addr) == 4 else ipaddress.IPv6Address(addr)
        ep = _ENDPOINTS[key] = Endpoint(ip, port)
    return ep


def _raw_addr(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return ip.packed.ljust(16, b"\0")


def encode_dump(family: int, states: int, seq: int, *, with_info: bool = True) -> bytes:
    """An inet_diag_req_v2 dump request for TCP sockets in ``states`` (a bit mask)."""
    ext = (1 << (INET_DIAG_INFO - 1)) if with_info else 0
    payload = (
        REQ.pack(family, socket.IPPROTO_TCP, ext, 0, states)
        + SOCKID.pack(0, 0, b"\0" * 16, b"\0" * 16)
        + SOCKID_TAIL.pack(0, NO_COOKIE, NO_COOKIE)
    )
    return nl.pack_message(SOCK_DIAG_BY_FAMILY, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, seq, payload)


def encode_destroy(record: SocketRecord, seq: int) -> bytes:
    """SOCK_DESTROY for exactly this socket: its tuple, its state and its cookie.

    The cookie is what makes this safe (design.md §3): without it a stale tuple
    fell through to the LISTEN socket and destroyed the listener; with it, a
    socket that is already gone answers ENOENT.  Refuses a record without one.
    """
    if record.cookie in (0, (NO_COOKIE << 32) | NO_COOKIE):
        raise ValueError("refusing SOCK_DESTROY without a socket cookie")
    family = socket.AF_INET if record.local.ip.version == 4 else socket.AF_INET6
    payload = (
        REQ.pack(family, socket.IPPROTO_TCP, 0, 0, record.state.mask)
        + SOCKID.pack(
            record.local.port,
            record.peer.port,
            _raw_addr(record.local.ip),
            _raw_addr(record.peer.ip),
        )
        + SOCKID_TAIL.pack(record.ifindex, record.cookie & 0xFFFFFFFF, record.cookie >> 32)
    )
    return nl.pack_message(SOCK_DESTROY, nl.NLM_F_REQUEST | nl.NLM_F_ACK, seq, payload)


def encode_get(record: SocketRecord, seq: int, *, with_info: bool = True) -> bytes:
    """A non-dump SOCK_DIAG_BY_FAMILY for one socket by tuple and cookie (a re-check)."""
    family = socket.AF_INET if record.local.ip.version == 4 else socket.AF_INET6
    ext = (1 << (INET_DIAG_INFO - 1)) if with_info else 0
    payload = (
        REQ.pack(family, socket.IPPROTO_TCP, ext, 0, 0xFFFFFFFF)
        + SOCKID.pack(
            record.local.port,
            record.peer.port,
            _raw_addr(record.local.ip),
            _raw_addr(record.peer.ip),
        )
        + SOCKID_TAIL.pack(record.ifindex, record.cookie & 0xFFFFFFFF, record.cookie >> 32)
    )
    return nl.pack_message(SOCK_DIAG_BY_FAMILY, nl.NLM_F_REQUEST | nl.NLM_F_ACK, seq, payload)


PortFilter = Callable[[int, int, int], bool]
"""(state, local port, peer port) -> keep?  Applied before any object is built."""


_head = MSG_HEAD.unpack_from
_sockid = SOCKID.unpack_from
_sockid_tail = SOCKID_TAIL.unpack_from
_tail = MSG_TAIL.unpack_from
_nla = _NLA.unpack_from
_four_u32 = _FOUR_U32.unpack_from
_two_u64 = _TWO_U64.unpack_from
_SOCKID_TAIL_AT = 4 + SOCKID.size
_TYPE_MASK = nl.NLA_TYPE_MASK


def decode_message(payload: memoryview) -> SocketRecord:
    """Decode one inet_diag_msg with its attributes (no filtering).

    Timewait minisockets (orphaned FIN_WAIT2/TIME_WAIT) carry no tcp_info:
    their ages and counters stay None and their inode is 0.
    """
    family, state, _timer, _retrans = _head(payload, 0)
    sport, dport, src, dst = _sockid(payload, 4)
    ifindex, cookie_lo, cookie_hi = _sockid_tail(payload, _SOCKID_TAIL_AT)
    _expires, _rq, _wq, uid, inode = _tail(payload, _TAIL_AT)
    last_sent = last_data = last_ack = acked = received = None
    transparent = False
    # Walk the attributes by hand: the kernel adds several we ignore (shutdown,
    # mark, cgroup id ...).  Only the sockopt byte and tcp_info are read; the
    # kernel puts sockopt first, so the walk normally ends at tcp_info.  This
    # runs once per kept socket: module-level bound unpackers, no objects.
    offset, end = MSG_SIZE, len(payload)
    while offset + 4 <= end:
        length, attr_type = _nla(payload, offset)
        if length < 4:
            break
        attr_type &= _TYPE_MASK
        if attr_type == INET_DIAG_INFO:
            info_len = (length if length < end - offset else end - offset) - 4
            at = offset + 4
            # tcp_info grew over kernel versions: read only what this one sent.
            if info_len >= TCPI_LAST_ACK_RECV + 4:
                last_sent, _ack_sent, last_data, last_ack = _four_u32(
                    payload, at + TCPI_LAST_DATA_SENT
                )
                if info_len >= TCPI_BYTES_RECEIVED + 8:
                    acked, received = _two_u64(payload, at + TCPI_BYTES_ACKED)
            break
        if attr_type == INET_DIAG_SOCKOPT and length > 4:
            transparent = payload[offset + 4] & SOCKOPT_TRANSPARENT != 0
        offset += (length + 3) & ~3
    return SocketRecord(
        _STATES[state],
        _endpoint(family, src, sport),
        _endpoint(family, dst, dport),
        cookie_lo | (cookie_hi << 32),
        inode,
        uid,
        last_data,
        last_ack,
        ifindex,
        acked,
        received,
        last_sent,
        transparent,
    )


def parse_dump(
    messages: Iterable[nl.Message], keep: PortFilter | None = None
) -> tuple[int, list[SocketRecord]]:
    """(messages seen, decoded sockets that pass ``keep``)."""
    seen = 0
    out: list[SocketRecord] = []
    head = MSG_HEAD.unpack_from
    ports = _SPORT_DPORT.unpack_from
    for msg in messages:
        if msg.type != SOCK_DIAG_BY_FAMILY:
            continue
        seen += 1
        if keep is not None:
            state = head(msg.payload, 0)[1]
            sport, dport = ports(msg.payload, 4)
            if not keep(state, sport, dport):
                continue
        out.append(decode_message(msg.payload))
    return seen, out


class SockDiag:
    """A sock_diag netlink socket (create it inside the target netns)."""

    def __init__(self, sock: socket.socket) -> None:
        self._nl = nl.NetlinkSocket(sock)

    @classmethod
    def open(cls, netns: NetnsHandle | None = None) -> SockDiag:
        """Open in ``netns`` (a NetnsHandle) or in the caller's netns."""
        return cls(nl.open_socket(nl.NETLINK_SOCK_DIAG, netns))

    def dump(
        self,
        states: Collection[TcpState],
        keep: PortFilter | None = None,
        families: Iterable[int] = (socket.AF_INET, socket.AF_INET6),
    ) -> tuple[int, list[SocketRecord]]:
        """Dump TCP sockets in ``states`` (kernel-side filter); see ``parse_dump``."""
        mask = 0
        for st in states:
            mask |= st.mask
        seen_total = 0
        result: list[SocketRecord] = []
        for family in families:
            seq = self._nl.next_seq()
            seen, socks = parse_dump(self._nl.dump(encode_dump(family, mask, seq), seq), keep)
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

    def close(self) -> None:
        self._nl.close()
