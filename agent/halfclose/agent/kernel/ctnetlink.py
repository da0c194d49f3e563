"""ctnetlink (NETLINK_NETFILTER, subsystem CTNETLINK) wire format for TCP entries.

Pure encode/decode over bytes, so it is unit-tested on captured kernel replies;
the socket that sends these is ``conntrack.Conntrack``.

Attribute layout (include/uapi/linux/netfilter/nfnetlink_conntrack.h); values
are big-endian:

    CTA_TUPLE_ORIG/REPLY { CTA_TUPLE_IP { V4_SRC, V4_DST | V6_SRC, V6_DST },
                           CTA_TUPLE_PROTO { NUM u8, SRC_PORT be16, DST_PORT be16 },
                           CTA_TUPLE_ZONE be16 }
    CTA_STATUS be32, CTA_TIMEOUT be32, CTA_MARK be32, CTA_ID be32, CTA_ZONE be16,
    CTA_PROTOINFO { CTA_PROTOINFO_TCP { STATE u8, ... } }
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from ipaddress import IPv4Address, IPv6Address

from halfclose.agent.core.model import ConntrackEntry, FlowTuple, IPAddress
from halfclose.agent.kernel import netlink as nl

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
IPCTNL_MSG_CT_GET_STATS = 5

MSG_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
MSG_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
MSG_GET_STATS = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_ID = 12
CTA_ZONE = 18
CTA_FILTER = 25
CTA_STATUS_MASK = 26

CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_TUPLE_ZONE = 3
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_FILTER_ORIG_FLAGS = 1
CTA_FILTER_REPLY_FLAGS = 2
CTA_FILTER_FLAG_CTA_PROTO_NUM = 1 << 3  # CTA_FILTER_F_CTA_PROTO_NUM
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1
CTA_STATS_GLOBAL_ENTRIES = 1

NFGEN = struct.Struct("!BBH")  # family, version, res_id
NFNETLINK_V0 = 0
_BE16 = struct.Struct("!H")
BE32 = struct.Struct("!I")
_HOST32 = struct.Struct("=I")

# enum tcp_conntrack (include/uapi/linux/netfilter/nf_conntrack_tcp.h)
TCP_CONNTRACK_STATES = (
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "SYN_SENT2",
)


def _family(t: FlowTuple) -> int:
    return socket.AF_INET if t.src.version == 4 else socket.AF_INET6


def encode_tuple(attr_type: int, t: FlowTuple, zone: int | None = None) -> bytes:
    # IPv4-mapped addresses (a dual-stack listener's peers) are IPv4 to
    # conntrack: asking AF_INET6 for them finds nothing, which would read as
    # "mapping gone" (docs/detection.md part 3).
    t = t.normalized()
    v4 = t.src.version == 4
    ip = nl.pack_nested(
        CTA_TUPLE_IP,
        nl.pack_attr(CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC, t.src.packed),
        nl.pack_attr(CTA_IP_V4_DST if v4 else CTA_IP_V6_DST, t.dst.packed),
    )
    proto = nl.pack_nested(
        CTA_TUPLE_PROTO,
        nl.pack_attr(CTA_PROTO_NUM, bytes([socket.IPPROTO_TCP])),
        nl.pack_attr(CTA_PROTO_SRC_PORT, _BE16.pack(t.sport)),
        nl.pack_attr(CTA_PROTO_DST_PORT, _BE16.pack(t.dport)),
    )
    parts = [ip, proto]
    if zone is not None:
        parts.append(nl.pack_attr(CTA_TUPLE_ZONE, _BE16.pack(zone)))
    return nl.pack_nested(attr_type, *parts)


# IPCTNL_MSG_CT_GET by reply tuple, laid out once per family (the hot path:
# one per candidate socket).  Same bytes as nfgenmsg + encode_tuple(CTA_TUPLE_REPLY).
_GET_V4 = struct.Struct("!BBH HH HH HH4s HH4s HH HHB3x HHH2x HHH2x")
_GET_V6 = struct.Struct("!BBH HH HH HH16s HH16s HH HHB3x HHH2x HHH2x")


def _nla_hdr(length: int, attr_type: int) -> tuple[int, int]:
    # nlattr headers are host-endian; the fast structs above are big-endian,
    # so the two header fields are byte-swapped here on little-endian hosts.
    raw = nl.NLA_HDR.pack(length, attr_type)
    a, b = struct.unpack("!HH", raw)
    return a, b


def encode_get_by_reply(reply: FlowTuple, seq: int, zone: int = 0) -> bytes:
    """IPCTNL_MSG_CT_GET for the entry whose reply tuple is ``reply`` (normalized)."""
    reply = reply.normalized()
    if zone:
        payload = NFGEN.pack(_family(reply), NFNETLINK_V0, 0) + encode_tuple(CTA_TUPLE_REPLY, reply)
        payload += nl.pack_attr(CTA_ZONE, _BE16.pack(zone))
        return nl.pack_message(MSG_GET, nl.NLM_F_REQUEST, seq, payload)
    payload = _pack_reply_get(reply)
    return nl.NLMSG_HDR.pack(
        nl.NLMSG_HDR.size + len(payload), MSG_GET, nl.NLM_F_REQUEST, seq, 0
    ) + (payload)


def _pack_reply_get(reply: FlowTuple) -> bytes:
    v4 = reply.src.version == 4
    alen = 4 if v4 else 16
    ip_len = 4 + 2 * (4 + alen)
    proto_len = 4 + 8 + 8 + 8
    fields = (
        socket.AF_INET if v4 else socket.AF_INET6,
        NFNETLINK_V0,
        0,
        *_HDR[(4 + ip_len + proto_len, CTA_TUPLE_REPLY | nl.NLA_F_NESTED)],
        *_HDR[(ip_len, CTA_TUPLE_IP | nl.NLA_F_NESTED)],
        *_HDR[(4 + alen, CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC)],
        reply.src.packed,
        *_HDR[(4 + alen, CTA_IP_V4_DST if v4 else CTA_IP_V6_DST)],
        reply.dst.packed,
        *_HDR[(proto_len, CTA_TUPLE_PROTO | nl.NLA_F_NESTED)],
        *_HDR[(5, CTA_PROTO_NUM)],
        socket.IPPROTO_TCP,
        *_HDR[(6, CTA_PROTO_SRC_PORT)],
        reply.sport,
        *_HDR[(6, CTA_PROTO_DST_PORT)],
        reply.dport,
    )
    return (_GET_V4 if v4 else _GET_V6).pack(*fields)


# The same request with the addresses as numbers (``int(ip)``: no ``packed``
# bytes built) and the nlmsghdr included; the header's host-order fields are
# pre-swapped into this big-endian layout once (``_fast_header``).
_FAST_V4 = struct.Struct("!IHHII BBH HH HH HHI HHI HH HHB3x HHH2x HHH2x")
_FAST_V6 = struct.Struct("!IHHII BBH HH HH HHQQ HHQQ HH HHB3x HHH2x HHH2x")


def _fast_prefix(v4: bool) -> tuple[int, ...]:
    """The constant fields of a reply-tuple GET before the addresses, in ``_FAST_*`` order."""
    alen = 4 if v4 else 16
    ip_len = 4 + 2 * (4 + alen)
    proto_len = 4 + 8 + 8 + 8
    size = (_FAST_V4 if v4 else _FAST_V6).size
    hdr = struct.unpack("!IHHII", nl.NLMSG_HDR.pack(size, MSG_GET, nl.NLM_F_REQUEST, 0, 0))
    return (
        *hdr,
        socket.AF_INET if v4 else socket.AF_INET6,
        NFNETLINK_V0,
        0,
        *_HDR[(4 + ip_len + proto_len, CTA_TUPLE_REPLY | nl.NLA_F_NESTED)],
        *_HDR[(ip_len, CTA_TUPLE_IP | nl.NLA_F_NESTED)],
        *_HDR[(4 + alen, CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC)],
    )


class _HeaderCache(dict[tuple[int, int], tuple[int, int]]):
    def __missing__(self, key: tuple[int, int]) -> tuple[int, int]:
        value = self[key] = _nla_hdr(*key)
        return value


_HDR = _HeaderCache()
_V4 = ipaddress.IPv4Address
_LOW64 = (1 << 64) - 1
_V4_HDRS = _fast_prefix(True)
_V6_HDRS = _fast_prefix(False)
_V4_TAIL_DST = _HDR[(8, CTA_IP_V4_DST)]
_V6_TAIL_DST = _HDR[(20, CTA_IP_V6_DST)]
_TAIL_PROTO = (
    *_HDR[(4 + 8 + 8 + 8, CTA_TUPLE_PROTO | nl.NLA_F_NESTED)],
    *_HDR[(5, CTA_PROTO_NUM)],
    socket.IPPROTO_TCP,
    *_HDR[(6, CTA_PROTO_SRC_PORT)],
)
_TAIL_DPORT = _HDR[(6, CTA_PROTO_DST_PORT)]


def encode_update(
    entry: ConntrackEntry,
    seq: int,
    *,
    timeout: int | None = None,
    status: int | None = None,
    mark: int | None = None,
) -> bytes:
    """IPCTNL_MSG_CT_NEW without NLM_F_CREATE: change an existing entry.

    The kernel finds the entry by its full *original* tuple (docs/detection.md), so
    this takes a decoded entry rather than a tuple the caller assembled.  Only
    the given attributes change.  A new timeout is reset to the state's default
    by the next packet unless ``status`` carries IPS_FIXED_TIMEOUT.
    """
    payload = NFGEN.pack(_family(entry.original.normalized()), NFNETLINK_V0, 0) + encode_tuple(
        CTA_TUPLE_ORIG, entry.original
    )
    if entry.zone:
        payload += nl.pack_attr(CTA_ZONE, _BE16.pack(entry.zone))
    if timeout is not None:
        payload += nl.pack_attr(CTA_TIMEOUT, BE32.pack(timeout))
    if status is not None:
        payload += nl.pack_attr(CTA_STATUS, BE32.pack(status))
    if mark is not None:
        payload += nl.pack_attr(CTA_MARK, BE32.pack(mark))
    return nl.pack_message(MSG_NEW, nl.NLM_F_REQUEST | nl.NLM_F_ACK, seq, payload)


def encode_get_stats(seq: int) -> bytes:
    return nl.pack_message(
        MSG_GET_STATS, nl.NLM_F_REQUEST, seq, NFGEN.pack(socket.AF_UNSPEC, NFNETLINK_V0, 0)
    )


def encode_dump_dst_nat(family: int, seq: int) -> bytes:
    """A dump of one family's TCP entries that were destination-NATed.

    Filtered in the kernel (CTA_STATUS/CTA_STATUS_MASK, Linux 5.19+; CTA_FILTER
    on the original tuple's protocol, 5.8+), so only the evidence crosses to
    us.  Older kernels ignore or refuse the filter; ``decode_entry`` callers
    check status and protocol again.
    """
    payload = NFGEN.pack(family, NFNETLINK_V0, 0)
    payload += nl.pack_nested(
        CTA_TUPLE_ORIG,
        nl.pack_nested(CTA_TUPLE_PROTO, nl.pack_attr(CTA_PROTO_NUM, bytes([socket.IPPROTO_TCP]))),
    )
    payload += nl.pack_nested(
        CTA_FILTER, nl.pack_attr(CTA_FILTER_ORIG_FLAGS, _HOST32.pack(CTA_FILTER_FLAG_CTA_PROTO_NUM))
    )
    payload += nl.pack_attr(CTA_STATUS, BE32.pack(ConntrackEntry.IPS_DST_NAT))
    payload += nl.pack_attr(CTA_STATUS_MASK, BE32.pack(ConntrackEntry.IPS_DST_NAT))
    return nl.pack_message(MSG_GET, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, seq, payload)


def encode_dump_all(family: int, seq: int) -> bytes:
    return nl.pack_message(
        MSG_GET, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, seq, NFGEN.pack(family, NFNETLINK_V0, 0)
    )


def _decode_tuple(buf: memoryview) -> tuple[FlowTuple, int]:
    """(tuple, layer-4 protocol number)."""
    src = dst = None
    sport = dport = 0
    proto = socket.IPPROTO_TCP
    for t, v in nl.iter_attrs(buf):
        if t == CTA_TUPLE_IP:
            for it, iv in nl.iter_attrs(v):
                if it in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = ipaddress.ip_address(bytes(iv))
                elif it in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = ipaddress.ip_address(bytes(iv))
        elif t == CTA_TUPLE_PROTO:
            for pt, pv in nl.iter_attrs(v):
                if pt == CTA_PROTO_NUM and len(pv) >= 1:
                    proto = pv[0]
                elif pt == CTA_PROTO_SRC_PORT:
                    sport = _BE16.unpack_from(pv)[0]
                elif pt == CTA_PROTO_DST_PORT:
                    dport = _BE16.unpack_from(pv)[0]
    if src is None or dst is None:
        raise ValueError("conntrack tuple without addresses")
    return FlowTuple(src, sport, dst, dport), proto


def decode_entry(payload: memoryview) -> ConntrackEntry:
    """Decode an IPCTNL_MSG_CT_NEW message (a GET reply or a dump item)."""
    original = reply = None
    proto = socket.IPPROTO_TCP
    tcp_state = "NONE"
    timeout = status = mark = zone = entry_id = 0
    for t, v in nl.iter_attrs(payload, NFGEN.size):
        if t == CTA_TUPLE_ORIG:
            original, proto = _decode_tuple(v)
        elif t == CTA_TUPLE_REPLY:
            reply, _ = _decode_tuple(v)
        elif t == CTA_STATUS:
            status = BE32.unpack_from(v)[0]
        elif t == CTA_TIMEOUT:
            timeout = BE32.unpack_from(v)[0]
        elif t == CTA_MARK:
            mark = BE32.unpack_from(v)[0]
        elif t == CTA_ID:
            entry_id = BE32.unpack_from(v)[0]
        elif t == CTA_ZONE:
            zone = _BE16.unpack_from(v)[0]
        elif t == CTA_PROTOINFO:
            for pt, pv in nl.iter_attrs(v):
                if pt != CTA_PROTOINFO_TCP:
                    continue
                for st, sv in nl.iter_attrs(pv):
                    if st == CTA_PROTOINFO_TCP_STATE and len(sv) >= 1:
                        n = sv[0]
                        tcp_state = (
                            TCP_CONNTRACK_STATES[n] if n < len(TCP_CONNTRACK_STATES) else str(n)
                        )
    if original is None or reply is None:
        raise ValueError("conntrack entry without both tuples")
    return ConntrackEntry(
        original=original,
        reply=reply,
        tcp_state=tcp_state,
        timeout=timeout,
        status=status,
        mark=mark,
        zone=zone,
        entry_id=entry_id,
        l4proto=proto,
    )


# -- answering reply-tuple lookups from one dump (Conntrack.lookup_sockets) ----
#
# A GET by tuple T answers the entry having T as its original *or* reply tuple
# in zone 0 (nf_conntrack_find_get hashes both directions), or ENOENT.  To give
# exactly that answer from a dump, every dumped entry is indexed under both of
# its tuples, as the bytes the kernel writes for them: the payload of its
# CTA_TUPLE_ORIG / CTA_TUPLE_REPLY attribute, which for a TCP tuple in zone 0
# is byte for byte the payload of our GET's CTA_TUPLE_REPLY (same attributes,
# same order, zero padding: ctnetlink_dump_tuples).  The layout is checked,
# not assumed: a tuple whose fixed bytes differ from ours (other flags, a
# CTA_TUPLE_ZONE, another protocol) is parsed field by field instead, so a
# layout change can never turn a present entry into "absent".

TUPLE_KEY_OFFSET = 24  # nlmsghdr 16 + nfgenmsg 4 + the CTA_TUPLE_REPLY header 4
_KEY_V4 = struct.Struct("!HH HHI HHI HH HHB3x HHH2x HHH2x")
_KEY_V6 = struct.Struct("!HH HHQQ HHQQ HH HHB3x HHH2x HHH2x")


def _tuple_key_slow(src: IPAddress, sport: int, dst: IPAddress, dport: int) -> bytes:
    # The layout, spelled out field by field (``tuple_key`` packs its constants).
    if src.__class__ is _V4 and dst.__class__ is _V4:
        h = _V4_HDRS
        return _KEY_V4.pack(
            h[10], h[11], h[12], h[13], int(src),
            *_V4_TAIL_DST, int(dst), *_TAIL_PROTO, sport, *_TAIL_DPORT, dport,
        )  # fmt: skip
    s6, d6 = int(src), int(dst)
    h = _V6_HDRS
    return _KEY_V6.pack(
        h[10], h[11], h[12], h[13], s6 >> 64, s6 & _LOW64,
        *_V6_TAIL_DST, d6 >> 64, d6 & _LOW64, *_TAIL_PROTO, sport, *_TAIL_DPORT, dport,
    )  # fmt: skip


def _constant_runs(key: bytes, fmt: str) -> tuple[struct.Struct, tuple[bytes, ...]]:
    """A struct packing only the values, and the constant runs between them."""
    packer = struct.Struct(fmt)
    runs, at = [], 0
    for part in fmt.lstrip("!").split():
        size = struct.calcsize("!" + part)
        if part.endswith("s"):
            runs.append(key[at : at + size])
        at += size
    return packer, tuple(runs)


# The values' places in a key: src, dst, sport, dport; the rest never changes.
_FAST_KEY_V4, _RUNS_V4 = _constant_runs(
    _tuple_key_slow(IPv4Address(0), 0, IPv4Address(0), 0), "!8s I 4s I 16s H 6s H 2s"
)
_FAST_KEY_V6, _RUNS_V6 = _constant_runs(
    _tuple_key_slow(IPv6Address(0), 0, IPv6Address(0), 0), "!8s QQ 4s QQ 16s H 6s H 2s"
)


def tuple_key(src: IPAddress, sport: int, dst: IPAddress, dport: int) -> bytes:
    """The CTA_TUPLE_* payload the kernel writes for this TCP tuple in zone 0.

    The addresses must be normalized already (``normalize_ip``).  Equal to
    ``encode_socket_get(src, sport, dst, dport, seq)[TUPLE_KEY_OFFSET:]``.
    """
    if src.__class__ is _V4 and dst.__class__ is _V4:
        a, b, c, d, e = _RUNS_V4
        return _FAST_KEY_V4.pack(a, int(src), b, int(dst), c, sport, d, dport, e)
    s6, d6 = int(src), int(dst)
    a, b, c, d, e = _RUNS_V6
    return _FAST_KEY_V6.pack(
        a, s6 >> 64, s6 & _LOW64, b, d6 >> 64, d6 & _LOW64, c, sport, d, dport, e
    )


def _fixed_bytes(size: int, key: bytes, variable: tuple[slice, ...]) -> tuple[int, int]:
    """(mask, value) over ``key`` as a big integer: every byte but the ``variable`` ones."""
    mask = bytearray(b"\xff" * size)
    for part in variable:
        mask[part] = bytes(len(mask[part]))
    return int.from_bytes(mask, "big"), int.from_bytes(key, "big") & int.from_bytes(mask, "big")


_ZERO4 = IPv4Address(0)
_ZERO6 = IPv6Address(0)
# Value positions inside a key: src, dst, sport, dport (the rest is headers and padding).
_MASK_V4, _FIXED_V4 = _fixed_bytes(
    _KEY_V4.size,
    tuple_key(_ZERO4, 0, _ZERO4, 0),
    (slice(8, 12), slice(16, 20), slice(36, 38), slice(44, 46)),
)
_MASK_V6, _FIXED_V6 = _fixed_bytes(
    _KEY_V6.size,
    tuple_key(_ZERO6, 0, _ZERO6, 0),
    (slice(8, 24), slice(28, 44), slice(60, 62), slice(68, 70)),
)
_SIZE_V4, _SIZE_V6 = _KEY_V4.size, _KEY_V6.size
_from_bytes = int.from_bytes


def dumped_tuple_key(raw: bytes) -> bytes | None:
    """``tuple_key`` of a dumped CTA_TUPLE_* payload; None unless TCP in zone 0."""
    n = len(raw)
    if n == _SIZE_V4:
        if _from_bytes(raw, "big") & _MASK_V4 == _FIXED_V4:
            return raw
    elif n == _SIZE_V6 and _from_bytes(raw, "big") & _MASK_V6 == _FIXED_V6:
        return raw
    return _parsed_tuple_key(memoryview(raw))


def _parsed_tuple_key(buf: memoryview) -> bytes | None:
    # Not our layout: read it field by field (any order, any flags).
    try:
        t, proto = _decode_tuple(buf)
    except (ValueError, struct.error):
        return None
    if proto != socket.IPPROTO_TCP:
        return None
    for attr_type, value in nl.iter_attrs(buf):
        if attr_type == CTA_TUPLE_ZONE and len(value) >= 2 and _BE16.unpack_from(value)[0]:
            return None  # a zone of its own in this direction: a zone-0 GET misses it
    return tuple_key(t.src, t.sport, t.dst, t.dport)


def index_dump_entry(payload: bytes | memoryview) -> tuple[bytes | None, bytes | None]:
    """(original key, reply key) of one dumped entry (nfgenmsg + attributes).

    A key is None for a direction a zone-0 TCP GET cannot match: another
    protocol, or a zone (CTA_ZONE for both directions, CTA_TUPLE_ZONE for one).
    """
    orig = reply = None
    offset, end = NFGEN.size, len(payload)
    unpack = nl.NLA_HDR.unpack_from
    while offset + 4 <= end:
        length, attr_type = unpack(payload, offset)
        if length < 4 or offset + length > end:
            raise ValueError(f"truncated conntrack attribute at offset {offset}")
        attr_type &= nl.NLA_TYPE_MASK
        if attr_type == CTA_TUPLE_ORIG:
            orig = bytes(payload[offset + 4 : offset + length])
        elif attr_type == CTA_TUPLE_REPLY:
            reply = bytes(payload[offset + 4 : offset + length])
        elif attr_type == CTA_ZONE and length >= 6 and _BE16.unpack_from(payload, offset + 4)[0]:
            return None, None
        offset += (length + 3) & ~3
    return (
        dumped_tuple_key(orig) if orig is not None else None,
        dumped_tuple_key(reply) if reply is not None else None,
    )


def encode_dump_tcp(family: int, seq: int) -> bytes:
    """A dump of one family's TCP entries (CTA_FILTER on the protocol, Linux 5.8+)."""
    payload = NFGEN.pack(family, NFNETLINK_V0, 0)
    payload += nl.pack_nested(
        CTA_TUPLE_ORIG,
        nl.pack_nested(CTA_TUPLE_PROTO, nl.pack_attr(CTA_PROTO_NUM, bytes([socket.IPPROTO_TCP]))),
    )
    payload += nl.pack_nested(
        CTA_FILTER, nl.pack_attr(CTA_FILTER_ORIG_FLAGS, _HOST32.pack(CTA_FILTER_FLAG_CTA_PROTO_NUM))
    )
    return nl.pack_message(MSG_GET, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, seq, payload)


_PORTS_V4 = struct.Struct("!36xH6xH")
_PORTS_V6 = struct.Struct("!60xH6xH")


def key_ports(key: bytes) -> tuple[int, int]:
    """(source port, destination port) of a ``tuple_key``."""
    return (_PORTS_V4 if len(key) == _SIZE_V4 else _PORTS_V6).unpack_from(key)


# The GET's bytes before its tuple: the nlmsghdr's host-order fields around
# the sequence number, then nfgenmsg and the CTA_TUPLE_REPLY header.
_NLH_V4 = struct.Struct(f"=IHHII{TUPLE_KEY_OFFSET - nl.NLMSG_HDR.size}s")
_NLH_V6 = _NLH_V4
_AFTER_NLH_V4 = _FAST_V4.pack(*_V4_HDRS, 0, *_V4_TAIL_DST, 0, *_TAIL_PROTO, 0, *_TAIL_DPORT, 0)[
    nl.NLMSG_HDR.size : TUPLE_KEY_OFFSET
]
_AFTER_NLH_V6 = _FAST_V6.pack(
    *_V6_HDRS, 0, 0, *_V6_TAIL_DST, 0, 0, *_TAIL_PROTO, 0, *_TAIL_DPORT, 0
)[nl.NLMSG_HDR.size : TUPLE_KEY_OFFSET]
_GET_SIZE_V4, _GET_SIZE_V6 = _FAST_V4.size, _FAST_V6.size


def encode_socket_get(src: IPAddress, sport: int, dst: IPAddress, dport: int, seq: int) -> bytes:
    """``encode_get_by_reply(FlowTuple(src, sport, dst, dport), seq)`` (zone 0), fast.

    The addresses must be normalized already (``normalize_ip``).  The scan
    builds one per candidate: no FlowTuple, no ``packed`` bytes; the header
    is packed in host order (no byte swap of ``seq``) and the tuple is
    ``tuple_key``'s bytes.
    """
    key = tuple_key(src, sport, dst, dport)
    if len(key) == _SIZE_V4:
        return _NLH_V4.pack(_GET_SIZE_V4, MSG_GET, nl.NLM_F_REQUEST, seq, 0, _AFTER_NLH_V4) + key
    return _NLH_V6.pack(_GET_SIZE_V6, MSG_GET, nl.NLM_F_REQUEST, seq, 0, _AFTER_NLH_V6) + key


def _tuple_from_raw(raw: bytes, memo: dict[bytes, IPAddress]) -> tuple[FlowTuple, int]:
    """``_decode_tuple`` of a CTA_TUPLE_* payload, without a parse when it has our layout."""
    n = len(raw)
    if n == _SIZE_V4 and _from_bytes(raw, "big") & _MASK_V4 == _FIXED_V4:
        s, d = raw[8:12], raw[16:20]
        src = memo.get(s) or memo.setdefault(s, IPv4Address(s))
        dst = memo.get(d) or memo.setdefault(d, IPv4Address(d))
        sport, dport = _PORTS_V4.unpack_from(raw)
        return FlowTuple(src, sport, dst, dport), socket.IPPROTO_TCP
    if n == _SIZE_V6 and _from_bytes(raw, "big") & _MASK_V6 == _FIXED_V6:
        s, d = raw[8:24], raw[28:44]
        src = memo.get(s) or memo.setdefault(s, IPv6Address(s))
        dst = memo.get(d) or memo.setdefault(d, IPv6Address(d))
        sport, dport = _PORTS_V6.unpack_from(raw)
        return FlowTuple(src, sport, dst, dport), socket.IPPROTO_TCP
    return _decode_tuple(memoryview(raw))


def decode_entry_fast(
    payload: bytes | memoryview, memo: dict[bytes, IPAddress] | None = None
) -> ConntrackEntry:
    """``decode_entry``, same result, ~4x cheaper: one pass with ``struct`` over the
    attributes, TCP tuples of the verified layout read at fixed offsets, and each
    address built once per ``memo`` (a dict the caller keeps for one lookup).
    """
    memo = {} if memo is None else memo
    original = reply = None
    proto = socket.IPPROTO_TCP
    tcp_state = "NONE"
    timeout = status = mark = zone = entry_id = 0
    offset, end = NFGEN.size, len(payload)
    unpack = nl.NLA_HDR.unpack_from
    while offset + 4 <= end:
        length, attr_type = unpack(payload, offset)
        if length < 4 or offset + length > end:
            raise ValueError(f"truncated netlink attribute at offset {offset} (len {length})")
        attr_type &= nl.NLA_TYPE_MASK
        start, stop = offset + 4, offset + length
        if attr_type == CTA_TUPLE_ORIG:
            original, proto = _tuple_from_raw(bytes(payload[start:stop]), memo)
        elif attr_type == CTA_TUPLE_REPLY:
            reply, _ = _tuple_from_raw(bytes(payload[start:stop]), memo)
        elif attr_type == CTA_STATUS:
            status = BE32.unpack_from(payload[start:stop])[0]
        elif attr_type == CTA_TIMEOUT:
            timeout = BE32.unpack_from(payload[start:stop])[0]
        elif attr_type == CTA_MARK:
            mark = BE32.unpack_from(payload[start:stop])[0]
        elif attr_type == CTA_ID:
            entry_id = BE32.unpack_from(payload[start:stop])[0]
        elif attr_type == CTA_ZONE:
            zone = _BE16.unpack_from(payload[start:stop])[0]
        elif attr_type == CTA_PROTOINFO:
            tcp_state = _tcp_state(memoryview(payload)[start:stop], tcp_state)
        offset += (length + 3) & ~3
    if original is None or reply is None:
        raise ValueError("conntrack entry without both tuples")
    return ConntrackEntry(
        original=original,
        reply=reply,
        tcp_state=tcp_state,
        timeout=timeout,
        status=status,
        mark=mark,
        zone=zone,
        entry_id=entry_id,
        l4proto=proto,
    )


_PROTOINFO_HDRS = struct.Struct("=HHHHB")  # TCP nest len, type; STATE len, type; state


def _tcp_state(protoinfo: memoryview, state: str) -> str:
    if len(protoinfo) >= _PROTOINFO_HDRS.size:
        # tcp_to_nlattr writes the TCP nest first and the state first in it.
        tcp_len, tcp_type, st_len, st_type, n = _PROTOINFO_HDRS.unpack_from(protoinfo)
        if (
            tcp_type & nl.NLA_TYPE_MASK == CTA_PROTOINFO_TCP
            and st_type & nl.NLA_TYPE_MASK == CTA_PROTOINFO_TCP_STATE
            and st_len == 5
            and 9 <= tcp_len <= len(protoinfo)
            and not _later_state(protoinfo, tcp_len)
        ):
            return TCP_CONNTRACK_STATES[n] if n < len(TCP_CONNTRACK_STATES) else str(n)
    for pt, pv in nl.iter_attrs(protoinfo):
        if pt != CTA_PROTOINFO_TCP:
            continue
        for st, sv in nl.iter_attrs(pv):
            if st == CTA_PROTOINFO_TCP_STATE and len(sv) >= 1:
                n = sv[0]
                state = TCP_CONNTRACK_STATES[n] if n < len(TCP_CONNTRACK_STATES) else str(n)
    return state


def _later_state(protoinfo: memoryview, tcp_len: int) -> bool:
    """Another TCP nest after the first (never from the kernel): take the slow path."""
    return (tcp_len + 3) & ~3 < len(protoinfo)
