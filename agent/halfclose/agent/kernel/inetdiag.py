"""inet_diag wire format (NETLINK_SOCK_DIAG) for TCP: requests built, dumps decoded.

Pure encode/decode over bytes, so it is unit-tested on captured kernel dumps;
the socket that sends these is ``sockdiag.SockDiag``.

The parser is ours: fixed offsets with ``struct.unpack_from`` over the receive buffer, a port
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
import sys
from collections.abc import Callable, Iterable

from halfclose.agent.core.model import Endpoint, SocketRecord, TcpState
from halfclose.agent.kernel import netlink as nl

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


class Endpoints:
    """Endpoints built from raw sock_diag addresses, memoised for one dump.

    Addresses stay raw bytes until here; an ``ipaddress`` object is built once
    per distinct address (a pod has a handful) and an ``Endpoint`` once per
    distinct (address, port).  The memo lives as long as one parse, so it
    neither thrashes (the old module-wide cache was cleared at 8,192 entries,
    every ~4k leaks) nor grows across scans.
    """

    __slots__ = ("_eps", "_ips")

    def __init__(self) -> None:
        self._ips: dict[bytes, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
        self._eps: dict[tuple[bytes, int], Endpoint] = {}

    def get(self, family: int, raw: bytes, port: int) -> Endpoint:
        key = (raw, port)
        ep = self._eps.get(key)
        if ep is None:
            addr = raw[:4] if family == socket.AF_INET else raw
            ip = self._ips.get(addr)
            if ip is None:
                ip = self._ips[addr] = (
                    ipaddress.IPv4Address(addr) if len(addr) == 4 else ipaddress.IPv6Address(addr)
                )
            ep = self._eps[key] = Endpoint(ip, port)
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


def encode_destroy(record: SocketRecord, seq: int, *, ack: bool = True) -> bytes:
    """SOCK_DESTROY for exactly this socket: its tuple, its state and its cookie.

    The cookie is what makes this safe (docs/detection.md): without it a stale tuple
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
    flags = nl.NLM_F_REQUEST | (nl.NLM_F_ACK if ack else 0)
    return nl.pack_message(SOCK_DESTROY, flags, seq, payload)


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


# inet_diag_msg in one unpack: family, state, (timer, retrans), sport, dport
# (read host-order, swapped below: one struct cannot mix byte orders), src,
# dst, if, cookie lo/hi, (expires, rqueue, wqueue), uid, inode.
_MSG = struct.Struct("=BBxxHH16s16sIII12xII")
assert _MSG.size == MSG_SIZE
_msg = _MSG.unpack_from
_nla = _NLA.unpack_from
_four_u32 = _FOUR_U32.unpack_from
_two_u64 = _TWO_U64.unpack_from
_nlmsg = nl.NLMSG_HDR.unpack_from
_TYPE_MASK = nl.NLA_TYPE_MASK
_NLMSG_HDR = nl.NLMSG_HDR.size
# Network-order u16 read as host order -> its value (an identity on big-endian).
_BE16 = (
    [((p & 0xFF) << 8) | (p >> 8) for p in range(65536)]
    if sys.byteorder == "little"
    else list(range(65536))
)


def _decode(
    buf: memoryview | bytes, at: int, end: int, endpoints: Endpoints, keep: PortFilter | None
) -> SocketRecord | None:
    """Decode the inet_diag_msg at ``buf[at:end]``; None when ``keep`` drops it.

    Timewait minisockets (orphaned FIN_WAIT2/TIME_WAIT) carry no tcp_info:
    their ages and counters stay None and their inode is 0.  This runs once
    per dumped socket: one unpack for the fixed part, the filter before any
    object is built, then only the attributes the proof and pairing read.
    """
    family, state, sport, dport, src, dst, ifindex, cookie_lo, cookie_hi, uid, inode = _msg(buf, at)
    sport = _BE16[sport]
    dport = _BE16[dport]
    if keep is not None and not keep(state, sport, dport):
        return None
    last_sent = last_data = last_ack = acked = received = None
    transparent = False
    # Walk the attributes by hand: the kernel adds several we ignore (shutdown,
    # mark, cgroup id ...).  Only the sockopt byte and tcp_info are read; the
    # kernel puts sockopt first, so the walk normally ends at tcp_info.
    offset = at + MSG_SIZE
    while offset + 4 <= end:
        length, attr_type = _nla(buf, offset)
        if length < 4:
            break
        attr_type &= _TYPE_MASK
        if attr_type == INET_DIAG_INFO:
            info_len = (length if length < end - offset else end - offset) - 4
            info = offset + 4
            # tcp_info grew over kernel versions: read only what this one sent.
            if info_len >= TCPI_LAST_ACK_RECV + 4:
                last_sent, _ack_sent, last_data, last_ack = _four_u32(
                    buf, info + TCPI_LAST_DATA_SENT
                )
                if info_len >= TCPI_BYTES_RECEIVED + 8:
                    acked, received = _two_u64(buf, info + TCPI_BYTES_ACKED)
            break
        if attr_type == INET_DIAG_SOCKOPT and length > 4:
            transparent = buf[offset + 4] & SOCKOPT_TRANSPARENT != 0
        offset += (length + 3) & ~3
    return SocketRecord(
        _STATES[state],
        endpoints.get(family, src, sport),
        endpoints.get(family, dst, dport),
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


def decode_message(payload: memoryview) -> SocketRecord:
    """Decode one inet_diag_msg with its attributes (no filtering)."""
    record = _decode(payload, 0, len(payload), Endpoints(), None)
    assert record is not None
    return record


def parse_dump(
    messages: Iterable[nl.Message], keep: PortFilter | None = None
) -> tuple[int, list[SocketRecord]]:
    """(messages seen, decoded sockets that pass ``keep``)."""
    seen = 0
    out: list[SocketRecord] = []
    endpoints = Endpoints()
    for msg in messages:
        if msg.type != SOCK_DIAG_BY_FAMILY:
            continue
        seen += 1
        record = _decode(msg.payload, 0, len(msg.payload), endpoints, keep)
        if record is not None:
            out.append(record)
    return seen, out


def parse_buffers(
    buffers: Iterable[memoryview],
    seq: int,
    keep: PortFilter | None = None,
    endpoints: Endpoints | None = None,
) -> tuple[int, list[SocketRecord]]:
    """``parse_dump`` straight over the dump's datagrams (the hot path).

    Walks the nlmsghdrs itself instead of building a ``Message`` per socket.
    Stops at NLMSG_DONE; an NLMSG_ERROR for ``seq`` is raised.
    """
    seen = 0
    out: list[SocketRecord] = []
    append = out.append
    endpoints = endpoints or Endpoints()
    for buf in buffers:
        offset, size = 0, len(buf)
        while offset + _NLMSG_HDR <= size:
            length, msg_type, _flags, msg_seq, _pid = _nlmsg(buf, offset)
            if length < _NLMSG_HDR or offset + length > size:
                raise ValueError(f"truncated netlink message at offset {offset} (len {length})")
            if msg_seq == seq:
                if msg_type == SOCK_DIAG_BY_FAMILY:
                    seen += 1
                    record = _decode(buf, offset + _NLMSG_HDR, offset + length, endpoints, keep)
                    if record is not None:
                        append(record)
                elif msg_type == nl.NLMSG_DONE:
                    return seen, out
                elif msg_type == nl.NLMSG_ERROR:
                    err = -nl.ERRNO.unpack_from(buf, offset + _NLMSG_HDR)[0]
                    if err:
                        raise nl.NetlinkError(err, "sock_diag dump")
                    return seen, out
            offset += (length + 3) & ~3
    return seen, out
