"""inet_diag wire format (NETLINK_SOCK_DIAG) for TCP: requests built, dumps decoded.

Pure encode/decode over bytes, so it is unit-tested on captured kernel dumps;
the socket that sends these is ``sockdiag.SockDiag``.

The parser is ours: fixed offsets with ``struct.unpack_from`` over the receive buffer, a port
filter applied *before* any object is built, and only the ``tcp_info`` fields the
classifier and pairing use.  The kernel sends the sockets of a dump with one
layout (~80 per datagram): ``_Shape`` learns it from one message and reads the
others with one unpack each (one ``iter_unpack`` for a datagram made only of
them), once the header words that decide where ``_decode``'s attribute walk
lands are checked equal; any other message goes through ``_decode`` itself.

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

import array
import ipaddress
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from halfclose.agent.core.model import (
    Endpoint,
    EndpointSlots,
    SocketRecord,
    SocketRecordSlots,
    TcpState,
    new_endpoint,
    new_socket_record,
)
from halfclose.agent.kernel import netlink as nl

SOCK_DIAG_BY_FAMILY = 20
# The legacy request (struct inet_diag_req): the kernel runs its dump with
# AF_UNSPEC, so one walk of the TCP hash returns both families, where one
# SOCK_DIAG_BY_FAMILY dump per family walks the whole hash twice (the hash
# holds every netns's sockets: measured at 20k leaks, the empty IPv6 walk
# alone cost ~10 ms).  Its replies carry this type and the same payload.
TCPDIAG_GETSOCK = 18
_SOCKET_TYPES = (SOCK_DIAG_BY_FAMILY, TCPDIAG_GETSOCK)
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


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# One address of a dump: its ipaddress object and its Endpoints by port.
AddressEntry = tuple[IPAddress, dict[int, Endpoint]]


class Endpoints:
    """Endpoints built from raw sock_diag addresses, memoised for one dump.

    Addresses stay raw bytes until here; an ``ipaddress`` object is built once
    per distinct address (a pod has a handful) and an ``Endpoint`` once per
    distinct (address, port).  The memo lives as long as one parse, so it
    neither thrashes (the old module-wide cache was cleared at 8,192 entries,
    every ~4k leaks) nor grows across scans.

    ``addresses(family)`` maps a raw address to its ``AddressEntry``: two
    lookups per endpoint (raw bytes, then port), no key tuple to build; the
    decoder's loop reads it directly.  One map per family: a raw address is
    16 bytes, IPv4 in the first 4, so IPv4 192.0.2.1 and IPv6 c000:201:: have
    the same raw bytes (one shared memo once gave an IPv6 socket the IPv4
    endpoint of the other family's dump).
    """

    __slots__ = ("_v4", "_v6")

    def __init__(self) -> None:
        self._v4: dict[bytes, AddressEntry] = {}
        self._v6: dict[bytes, AddressEntry] = {}

    def addresses(self, family: int) -> dict[bytes, AddressEntry]:
        return self._v4 if family == socket.AF_INET else self._v6

    def entry(self, family: int, raw: bytes) -> AddressEntry:
        """The entry of a raw address (16 bytes; IPv4 in the first 4), made if new."""
        addresses = self.addresses(family)
        entry = addresses.get(raw)
        if entry is None:
            ip = (
                ipaddress.IPv4Address(raw[:4])
                if family == socket.AF_INET
                else ipaddress.IPv6Address(raw)
            )
            entry = addresses[raw] = (ip, {})
        return entry

    def get(self, family: int, raw: bytes, port: int) -> Endpoint:
        ip, ports = self.entry(family, raw)
        ep = ports.get(port)
        if ep is None:
            ep = ports[port] = new_endpoint(ip, port)
        return ep

    def seed_addresses(self, ips: Iterable[IPAddress]) -> None:
        """File these address objects under the raw bytes the kernel sends for them.

        A dump that shows them then builds its endpoints on the very same
        objects, so a re-read compares addresses by identity first (a handful
        of objects seeded, instead of ``ipaddress``'s Python ``__eq__`` per
        socket, or an Endpoint seeded per socket).
        """
        for ip in ips:
            family = socket.AF_INET if ip.__class__ is ipaddress.IPv4Address else socket.AF_INET6
            self.addresses(family).setdefault(ip.packed.ljust(16, b"\0"), (ip, {}))


def encode_dump(family: int, states: int, seq: int, *, with_info: bool = True) -> bytes:
    """An inet_diag_req_v2 dump request for TCP sockets in ``states`` (a bit mask)."""
    ext = (1 << (INET_DIAG_INFO - 1)) if with_info else 0
    payload = (
        REQ.pack(family, socket.IPPROTO_TCP, ext, 0, states)
        + SOCKID.pack(0, 0, b"\0" * 16, b"\0" * 16)
        + SOCKID_TAIL.pack(0, NO_COOKIE, NO_COOKIE)
    )
    return nl.pack_message(SOCK_DIAG_BY_FAMILY, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, seq, payload)


def encode_dump_both(states: int, seq: int, *, with_info: bool = True) -> bytes:
    """A TCPDIAG_GETSOCK dump request: TCP sockets of both families in ``states``.

    struct inet_diag_req: family, src_len, dst_len, ext (u8 each), id,
    states, dbs (u32).  The kernel ignores the family of a dump of this kind.
    """
    ext = (1 << (INET_DIAG_INFO - 1)) if with_info else 0
    payload = (
        MSG_HEAD.pack(socket.AF_UNSPEC, 0, 0, ext)
        + SOCKID.pack(0, 0, b"\0" * 16, b"\0" * 16)
        + SOCKID_TAIL.pack(0, NO_COOKIE, NO_COOKIE)
        + struct.pack("=II", states, 0)
    )
    return nl.pack_message(TCPDIAG_GETSOCK, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, seq, payload)


# A whole SOCK_DESTROY (or GET) request in one pack: nlmsghdr, inet_diag_req_v2
# with its sockid.  The ports are network order inside a host-order struct, so
# they go in byte-swapped (``_BE16`` is its own inverse).  At 20k kills the
# five packs and four concatenations per request cost ~5 us; this, ~1.5 us.
_REQUEST = struct.Struct("=IHHIIBBBBIHH16s16sIII")


def _pack_request(
    msg_type: int, flags: int, seq: int, record: SocketRecord, *, ext: int, states: int
) -> bytes:
    local, peer = record.local, record.peer
    lip, pip = local.ip, peer.ip
    v4 = lip.version == 4
    cookie = record.cookie
    return _REQUEST.pack(
        _REQUEST.size,
        msg_type,
        flags,
        seq,
        0,
        socket.AF_INET if v4 else socket.AF_INET6,
        socket.IPPROTO_TCP,
        ext,
        0,
        states,
        _BE16[local.port],
        _BE16[peer.port],
        lip.packed,  # "16s" pads an IPv4 address with zeros, as the kernel reads it
        pip.packed,
        record.ifindex,
        cookie & 0xFFFFFFFF,
        cookie >> 32,
    )


def encode_destroy(record: SocketRecord, seq: int, *, ack: bool = True) -> bytes:
    """SOCK_DESTROY for exactly this socket: its tuple, its state and its cookie.

    The cookie is what makes this safe (docs/detection.md): without it a stale tuple
    fell through to the LISTEN socket and destroyed the listener; with it, a
    socket that is already gone answers ENOENT.  Refuses a record without one.
    """
    if record.cookie in (0, (NO_COOKIE << 32) | NO_COOKIE):
        raise ValueError("refusing SOCK_DESTROY without a socket cookie")
    flags = nl.NLM_F_REQUEST | (nl.NLM_F_ACK if ack else 0)
    return _pack_request(SOCK_DESTROY, flags, seq, record, ext=0, states=record.state.mask)


def encode_get(record: SocketRecord, seq: int, *, with_info: bool = True) -> bytes:
    """A non-dump SOCK_DIAG_BY_FAMILY for one socket by tuple and cookie (a re-check)."""
    ext = (1 << (INET_DIAG_INFO - 1)) if with_info else 0
    flags = nl.NLM_F_REQUEST | nl.NLM_F_ACK
    return _pack_request(SOCK_DIAG_BY_FAMILY, flags, seq, record, ext=ext, states=0xFFFFFFFF)


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
    return new_socket_record(
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
        if msg.type not in _SOCKET_TYPES:
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

    Same-shaped messages (``_Shape``) are read with one ``struct`` unpack
    each, a datagram made only of them with one ``iter_unpack``; anything
    else (timewait minisockets, other attribute layouts) goes through the
    generic walker ``_decode``, with the same result.
    """
    seen = 0
    out: list[SocketRecord] = []
    append = out.append
    endpoints = endpoints or Endpoints()
    shapes: dict[int, _Shape | None] = {}
    for buf in buffers:
        size = len(buf)
        if size >= _NLMSG_HDR:
            # The common case: a datagram of ~80 sockets of one shape.
            first = _u32(buf, 0)[0]
            if first in shapes:
                shape = shapes[first]
            else:
                shape = shapes[first] = _Shape.learn(buf, 0, first, size)
            if shape is not None and shape.uniform(buf, size, seq):
                seen += size // first
                _emit(shape.rows(buf), endpoints, keep, append)
                continue
        count, done = _walk(buf, seq, shapes, endpoints, keep, append)
        seen += count
        if done:
            break
    return seen, out


def _walk(  # noqa: PLR0917 (private)
    buf: memoryview | bytes,
    seq: int,
    shapes: dict[int, _Shape | None],
    endpoints: Endpoints,
    keep: PortFilter | None,
    append: Callable[[SocketRecord], None],
) -> tuple[int, bool]:
    """One datagram, message by message: (sockets seen, whether the dump ended).

    A message of a known shape is read with one unpack (its row held until
    the next one that is not, so the records keep the kernel's order); any
    other goes to ``_decode``.
    """
    seen = 0
    rows: list[tuple[Any, ...]] = []
    offset, size = 0, len(buf)
    while offset + _NLMSG_HDR <= size:
        length, msg_type, _flags, msg_seq, _pid = _nlmsg(buf, offset)
        if length < _NLMSG_HDR or offset + length > size:
            raise ValueError(f"truncated netlink message at offset {offset} (len {length})")
        if msg_seq == seq:
            if msg_type in _SOCKET_TYPES:
                seen += 1
                if length in shapes:
                    shape = shapes[length]
                    if shape is not None and not shape.matches(buf, offset):
                        # Another layout of the same length: learn that one.
                        shape = _Shape.learn(buf, offset, length, size)
                        if shape is not None:
                            shapes[length] = shape
                else:
                    shape = shapes[length] = _Shape.learn(buf, offset, length, size)
                if shape is not None:
                    rows.append(shape.row(buf, offset))
                else:
                    if rows:
                        _emit(rows, endpoints, keep, append)
                        rows = []
                    record = _decode(buf, offset + _NLMSG_HDR, offset + length, endpoints, keep)
                    if record is not None:
                        append(record)
            elif msg_type == nl.NLMSG_DONE:
                _emit(rows, endpoints, keep, append)
                return seen, True
            elif msg_type == nl.NLMSG_ERROR:
                err = -nl.ERRNO.unpack_from(buf, offset + _NLMSG_HDR)[0]
                if err:
                    raise nl.NetlinkError(err, "sock_diag dump")
                _emit(rows, endpoints, keep, append)
                return seen, True
        offset += (length + 3) & ~3
    _emit(rows, endpoints, keep, append)
    return seen, False


_u32 = struct.Struct("=I").unpack_from


def _layout(fields: list[tuple[int, str]], size: int) -> struct.Struct:
    """A struct reading ``fields`` ((offset, format), ascending), skipping the rest of ``size``."""
    fmt, at = "=", 0
    for offset, part in fields:
        fmt += f"{offset - at}x" + part
        at = offset + struct.calcsize("=" + part)
    layout = struct.Struct(f"{fmt}{size - at}x")
    assert layout.size == size
    return layout


class _Shape:
    """The layout of one kind of socket message (SOCK_DIAG_BY_FAMILY or TCPDIAG_GETSOCK:
    the same payload), learned from one of them.

    The kernel sends every full socket of a dump with the same attributes in
    the same order, so their messages have one length and every field at the
    same offset.  A shape is learned from a *template* message by walking its
    attributes as ``_decode`` does (up to INET_DIAG_INFO, where ``_decode``
    stops), and it keeps the header (length and type, one u32) of each.
    Another message is decoded by the shape only if its nlmsg length and type
    and all those attribute headers equal the template's: ``_decode`` would
    then walk it to the same offsets, so reading them directly gives the same
    record.  A message that differs in any of them goes to ``_decode``.

    Only full sockets with INET_DIAG_SOCKOPT and a tcp_info holding the byte
    counters (kernel 5.10+) get a shape; other layouts (timewait
    minisockets, older kernels) always take the generic walker.
    """

    __slots__ = ("_checks", "_expected", "_headers", "_length", "_record", "_words")

    def __init__(
        self, length: int, attrs: list[tuple[int, int]], opt_at: int, info_at: int
    ) -> None:
        self._length = length
        # The attribute headers: (offset in the message, u32 as sent).
        self._headers = tuple(word for _, word in attrs)
        self._checks = _layout([(at, "I") for at, _ in attrs], length)
        # The same as (word index, value) for a datagram's strided compare,
        # whose expected rows are kept per (count, seq, type word).
        self._words = [(at // 4, word) for at, word in attrs]
        self._expected: dict[tuple[int, int, int], list[tuple[int, memoryview]]] = {}
        info = info_at + 4
        # family, state, sport, dport, src, dst, if, cookie lo/hi, uid, inode,
        # sockopt byte 0, last_data_sent, last_data_recv, last_ack_recv,
        # bytes_acked, bytes_received.
        self._record = _layout(
            [
                (_NLMSG_HDR, _MSG.format[1:]),
                (opt_at + 4, "B"),
                (info + TCPI_LAST_DATA_SENT, "I4xII"),
                (info + TCPI_BYTES_ACKED, "QQ"),
            ],
            length,
        )

    @classmethod
    def learn(cls, buf: memoryview | bytes, at: int, length: int, size: int) -> _Shape | None:
        """The shape of the message at ``buf[at:at+length]``, or None if it gets none."""
        if length < _NLMSG_HDR + MSG_SIZE or length % 4 or at + length > size:
            return None
        if _nlmsg(buf, at)[1] not in _SOCKET_TYPES:
            return None
        end = at + length
        offset = at + _NLMSG_HDR + MSG_SIZE
        attrs: list[tuple[int, int]] = []
        opt_at = -1
        # _decode's walk, stricter: a malformed attribute gets no shape.
        while offset + 4 <= end:
            attr_len, attr_type = _nla(buf, offset)
            if attr_len < 4 or offset + attr_len > end:
                return None
            attrs.append((offset - at, _u32(buf, offset)[0]))
            attr_type &= _TYPE_MASK
            if attr_type == INET_DIAG_INFO:
                if opt_at < 0 or attr_len - 4 < TCPI_BYTES_RECEIVED + 8:
                    return None
                return cls(length, attrs, opt_at, offset - at)
            if attr_type == INET_DIAG_SOCKOPT and attr_len > 4:
                opt_at = offset - at
            offset += (attr_len + 3) & ~3
        return None

    def matches(self, buf: memoryview | bytes, at: int) -> bool:
        """Whether the message at ``at``, of this shape's length and type, has its attributes."""
        return self._checks.unpack_from(buf, at) == self._headers

    def uniform(self, buf: memoryview | bytes, size: int, seq: int) -> bool:
        """Whether the datagram is made only of messages of this shape, all for ``seq``.

        Checked in bulk: each header word (nlmsg_len, nlmsg_type with the
        flags, nlmsg_seq, the attribute headers) is compared across all the
        messages at once, a strided view of the datagram as u32s against a
        row of the expected value (C speed, no Python per message).  The flags
        must be the first message's (a dump's are all NLM_F_MULTI).
        """
        length = self._length
        if size % length:
            return False
        words = memoryview(buf).cast("I")
        type_word = words[1]
        if type_word & 0xFFFF not in _SOCKET_TYPES:
            return False
        key = (size // length, seq, type_word)
        expected = self._expected.get(key)
        if expected is None:
            expected = self._expected[key] = self._expect(*key)
        stride = length // 4
        return all(words[index::stride] == want for index, want in expected)

    def _expect(self, count: int, seq: int, type_word: int) -> list[tuple[int, memoryview]]:
        """(word index, ``count`` times its value) for each word ``uniform`` compares."""
        words = [(0, self._length), (1, type_word), (2, seq), *self._words]
        return [(index, memoryview(array.array("I", [value]) * count)) for index, value in words]

    def rows(self, buf: memoryview | bytes) -> Iterator[tuple[Any, ...]]:
        """The rows of a datagram ``uniform`` accepted, for ``_emit``."""
        return self._record.iter_unpack(buf)

    def row(self, buf: memoryview | bytes, at: int) -> tuple[Any, ...]:
        """The row of the message at ``at``, which ``matches`` accepted, for ``_emit``."""
        return self._record.unpack_from(buf, at)


def _emit(
    rows: Iterable[tuple[Any, ...]],
    endpoints: Endpoints,
    keep: PortFilter | None,
    append: Callable[[SocketRecord], None],
) -> None:
    """The records of ``_Shape`` rows that pass ``keep``: what ``_decode`` builds from them.

    The hot loop of a scan (once per dumped socket): the endpoint memo is
    read inline and the objects are built by filling their mutable twins
    (``core.model.new_socket_record`` explains); a call per object would cost
    as much as the whole rest.
    """
    v4, v6 = endpoints.addresses(socket.AF_INET), endpoints.addresses(socket.AF_INET6)
    af_inet = socket.AF_INET
    entry_of = endpoints.entry
    states = _STATES
    be16 = _BE16
    new: Callable[..., Any] = object.__new__  # the twins, untyped: the fields are SocketRecord's
    record_cls, endpoint_cls = SocketRecord, Endpoint
    for (family, state, sport_be, dport_be, src, dst, ifindex, cookie_lo, cookie_hi, uid, inode,
         opt, last_sent, last_data, last_ack, acked, received) in rows:  # fmt: skip
        sport = be16[sport_be]
        dport = be16[dport_be]
        if keep is not None and not keep(state, sport, dport):
            continue
        addresses = v4 if family == af_inet else v6
        entry = addresses.get(src) or entry_of(family, src)
        local = entry[1].get(sport)
        if local is None:
            ep = new(EndpointSlots)
            ep.ip = entry[0]
            ep.port = sport
            ep.__class__ = endpoint_cls
            local = entry[1][sport] = ep
        entry = addresses.get(dst) or entry_of(family, dst)
        peer = entry[1].get(dport)
        if peer is None:
            ep = new(EndpointSlots)
            ep.ip = entry[0]
            ep.port = dport
            ep.__class__ = endpoint_cls
            peer = entry[1][dport] = ep
        r = new(SocketRecordSlots)
        r.state = states[state]
        r.local = local
        r.peer = peer
        r.cookie = cookie_lo | (cookie_hi << 32)
        r.inode = inode
        r.uid = uid
        r.last_data_recv_ms = last_data
        r.last_ack_recv_ms = last_ack
        r.ifindex = ifindex
        r.bytes_acked = acked
        r.bytes_received = received
        r.last_data_sent_ms = last_sent
        r.transparent = opt & SOCKOPT_TRANSPARENT != 0
        r.__class__ = record_cls
        append(r)
