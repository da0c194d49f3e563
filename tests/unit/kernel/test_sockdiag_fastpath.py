"""The decoder's fast path (``inetdiag._Shape``) against the generic walker, on real dumps.

``parse_buffers`` decodes a message by a layout learned from another one only
when its length, type and attribute headers are the same, and a whole
datagram in one ``iter_unpack`` only when every message in it is.  These tests
hold it to one rule: the records are exactly what the generic walker
(``decode_message``, one attribute walk per message) gives, field by field,
on the real captures (tests/data/netlink/capture_shapes.py: datagrams full of
one shape, a timewait minisocket among them, an IPv6 listener with
INET_DIAG_SKV6ONLY, both families in one TCPDIAG_GETSOCK dump) and on
datagrams edited to look alike but not be.
"""

from __future__ import annotations

import dataclasses
import gzip
import ipaddress
import json
import struct
from collections.abc import Iterator
from functools import cache
from typing import Any

import pytest

from halfclose.agent.core.model import (
    Endpoint,
    SocketRecord,
    TcpState,
    new_endpoint,
    new_socket_record,
)
from halfclose.agent.kernel import inetdiag
from halfclose.agent.kernel import netlink as nl
from support.nldump import DATA, load_datagrams

HDR = nl.NLMSG_HDR
SHAPES = DATA / "sockdiag_shapes.json.gz"


@cache
def _shapes() -> dict[str, Any]:
    with gzip.open(SHAPES, "rt") as f:
        return json.load(f)  # type: ignore[no-any-return]


def _dump(family: str, kind: str) -> tuple[int, list[bytes]]:
    d = _shapes()["dumps"][family][kind]
    return d["seq"], [bytes.fromhex(h) for h in d["datagrams"]]


def _reference(
    datagrams: list[bytes], seq: int, keep: inetdiag.PortFilter | None
) -> tuple[int, list[SocketRecord]]:
    """The generic walker, message by message, with parse_buffers' framing rules."""
    seen, out = 0, []
    for d in datagrams:
        for msg in nl.iter_messages(memoryview(d)):
            if msg.seq != seq:
                continue
            if msg.type in {nl.NLMSG_DONE, nl.NLMSG_ERROR}:
                return seen, out
            if msg.type not in {inetdiag.SOCK_DIAG_BY_FAMILY, inetdiag.TCPDIAG_GETSOCK}:
                continue
            seen += 1
            r = inetdiag.decode_message(msg.payload)
            if keep is None or keep(int(r.state), r.local.port, r.peer.port):
                out.append(r)
    return seen, out


def _fast(
    datagrams: list[bytes], seq: int, keep: inetdiag.PortFilter | None = None
) -> tuple[int, list[SocketRecord]]:
    return inetdiag.parse_buffers((memoryview(d) for d in datagrams), seq, keep)


def _assert_same(got: tuple[int, list[SocketRecord]], want: tuple[int, list[SocketRecord]]) -> None:
    """Same count, same records in the same order, every field equal *and* of the same type."""
    assert got[0] == want[0]
    assert len(got[1]) == len(want[1])
    for g, w in zip(got[1], want[1], strict=True):
        assert type(g) is SocketRecord
        for f in dataclasses.fields(SocketRecord):
            a, b = getattr(g, f.name), getattr(w, f.name)
            assert (a, type(a)) == (b, type(b)), (f.name, g, w)


def _scan_keep(state: int, sport: int, _dport: int) -> bool:
    # The scanner's filter at 15001 (engine/scan.py).
    return sport == 15001 if state == TcpState.FIN_WAIT2 else sport != 15001


def _drop_all(_state: int, _sport: int, _dport: int) -> bool:
    return False


CAPTURES = [(f, k) for f in ("v4", "v6") for k in ("half_closed", "all")]
CAPTURES.append(("both", "half_closed"))  # TCPDIAG_GETSOCK: type 18, families interleaved


@pytest.mark.parametrize(("family", "kind"), CAPTURES)
@pytest.mark.parametrize("keep", [None, _scan_keep, _drop_all])
def test_real_dumps_decode_as_the_generic_walker(
    family: str, kind: str, keep: inetdiag.PortFilter | None
) -> None:
    seq, datagrams = _dump(family, kind)
    _assert_same(_fast(datagrams, seq, keep), _reference(datagrams, seq, keep))


@pytest.mark.parametrize(
    "name",
    [
        "sockdiag_v4.dump",
        "sockdiag_v6.dump",
        "sockdiag_sockopt_v4.dump",
        "sockdiag_sockopt_v6.dump",
        "proof_sockdiag_v4.dump",
        "proof_sockdiag_v6.dump",
    ],
)
def test_the_older_captures_decode_as_the_generic_walker(name: str) -> None:
    datagrams = load_datagrams(name)
    seq = HDR.unpack_from(datagrams[0], 0)[3]
    want = _reference(datagrams, seq, None)
    assert want[0] > 0
    _assert_same(_fast(datagrams, seq), want)


def test_full_datagrams_take_the_bulk_path_and_the_rest_is_per_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the real half-closed dump: the full datagrams in one go, the one with
    the timewait minisocket message by message (shape, then generic walker)."""
    calls = {"all": 0, "one": 0, "generic": 0}
    rows, row, generic = inetdiag._Shape.rows, inetdiag._Shape.row, inetdiag._decode

    def count(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(inetdiag._Shape, "rows", count("all", rows))
    monkeypatch.setattr(inetdiag._Shape, "row", count("one", row))
    monkeypatch.setattr(inetdiag, "_decode", count("generic", generic))
    seq, datagrams = _dump("v4", "half_closed")
    counts = [_count_socks(d) for d in datagrams]
    full = [n for n, uniform in counts if uniform and n]
    mixed = [n for n, uniform in counts if not uniform and n]
    assert len(full) >= 2 and max(full) > 70 and len(mixed) == 1  # what the capture holds
    seen, records = _fast(datagrams, seq)
    assert seen == sum(n for n, _ in counts) == 202
    assert calls == {"all": len(full), "one": mixed[0] - 1, "generic": 1}
    orphans = [r for r in records if r.orphan]
    assert len(orphans) == 1 and orphans[0].bytes_acked is None  # the minisocket, generic


def _count_socks(d: bytes) -> tuple[int, bool]:
    lengths = set()
    n = off = 0
    while off + HDR.size <= len(d):
        length, msg_type = HDR.unpack_from(d, off)[:2]
        if msg_type == inetdiag.SOCK_DIAG_BY_FAMILY:
            n += 1
            lengths.add(length)
        else:
            lengths.add(-1)
        off += (length + 3) & ~3
    return n, len(lengths) == 1


def test_records_match_the_sockets_as_recorded() -> None:
    """The fast path against the kernel's truth, not only against the walker."""
    got: dict[tuple[str, str | None], SocketRecord] = {}
    for family in ("v4", "v6"):
        seq, datagrams = _dump(family, "all")
        for r in _fast(datagrams, seq)[1]:
            peer = None if r.state is TcpState.LISTEN else str(r.peer)
            got[(str(r.local), peer)] = r
    want = _shapes()["sockets"]
    assert len(want) == 2 * 203
    for w in want:
        r = got[(w["local"], w["peer"])]
        assert (r.state, r.inode) == (TcpState[w["state"]], w["inode"]), w
        if w.get("orphan"):
            assert r.last_ack_recv_ms is None and r.bytes_acked is None
            continue
        assert (r.cookie, r.uid) == (w["cookie"], w["uid"]), w
        if "bytes_acked" in w:
            assert (r.bytes_acked, r.bytes_received) == (w["bytes_acked"], w["bytes_received"]), w
            assert None not in {r.last_data_sent_ms, r.last_data_recv_ms, r.last_ack_recv_ms}


# -- datagrams edited to look alike but not be ------------------------------------------


def _messages(d: bytes) -> Iterator[bytes]:
    off = 0
    while off + HDR.size <= len(d):
        length = HDR.unpack_from(d, off)[0]
        yield d[off : off + length]
        off += (length + 3) & ~3


def _full_datagram() -> tuple[int, list[bytes]]:
    """The messages of the first full datagram of the real v4 half-closed dump."""
    seq, datagrams = _dump("v4", "half_closed")
    for d in datagrams:
        n, uniform = _count_socks(d)
        if uniform and n > 70:
            return seq, list(_messages(d))
    raise AssertionError("no full datagram in the capture")


def _attrs(msg: bytes) -> list[tuple[int, bytes]]:
    out, off = [], HDR.size + inetdiag.MSG_SIZE
    while off + 4 <= len(msg):
        length, attr_type = struct.unpack_from("=HH", msg, off)
        out.append((attr_type, msg[off + 4 : off + length]))
        off += (length + 3) & ~3
    return out


def _rebuild(msg: bytes, attrs: list[tuple[int, bytes]]) -> bytes:
    body = msg[HDR.size : HDR.size + inetdiag.MSG_SIZE] + b"".join(
        nl.pack_attr(t, v) for t, v in attrs
    )
    _len, msg_type, flags, seq, pid = HDR.unpack_from(msg, 0)
    return HDR.pack(HDR.size + len(body), msg_type, flags, seq, pid) + body


def _moved_info(msg: bytes) -> bytes:
    """Same length, INET_DIAG_INFO 8 bytes earlier: MARK dropped, an unknown attribute after
    INFO instead.  Read at the template's offsets, every tcp_info field would be wrong."""
    attrs = [(t, v) for t, v in _attrs(msg) if t != 15]
    out = _rebuild(msg, [*attrs, (40, b"\0\0\0\0")])
    assert len(out) == len(msg)
    return out


def _renamed_sockopt(msg: bytes) -> bytes:
    """Same length and offsets, but the sockopt attribute's type is another one (its
    transparent bit set): it is no sockopt, so not transparent."""
    attrs = [(99 if t == inetdiag.INET_DIAG_SOCKOPT else t, v) for t, v in _attrs(msg)]
    attrs = [(t, b"\x20\0" if t == 99 else v) for t, v in attrs]
    return _rebuild(msg, attrs)


def _with_ulp(msg: bytes) -> bytes:
    """One message longer: a kTLS socket's INET_DIAG_ULP_INFO (28) after tcp_info."""
    ulp = nl.pack_nested(28, nl.pack_attr(1, b"tls\0"), nl.pack_attr(2, b"\1\0\0\0"))
    return _rebuild(msg, [*_attrs(msg), (28 | nl.NLA_F_NESTED, ulp[4:])])


def _other_seq(msg: bytes) -> bytes:
    return msg[:8] + struct.pack("=I", HDR.unpack_from(msg, 0)[3] + 1) + msg[12:]


def _other_flags(msg: bytes) -> bytes:
    flags = HDR.unpack_from(msg, 0)[2] | 0x10  # NLM_F_DUMP_INTR
    return msg[:6] + struct.pack("=H", flags) + msg[8:]


EDITS = {
    "moved-info": _moved_info,
    "renamed-sockopt": _renamed_sockopt,
    "ulp-longer": _with_ulp,
    "stale-seq": _other_seq,
    "dump-intr-flag": _other_flags,
}


@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("where", [0, 1, 40, -1])
def test_one_edited_message_in_a_full_datagram(edit: str, where: int) -> None:
    """The bulk check must refuse the datagram; the edited message decodes as the walker
    decodes it, the others still by their shape."""
    seq, msgs = _full_datagram()
    msgs[where] = EDITS[edit](msgs[where])
    datagram = b"".join(msgs)
    _assert_same(_fast([datagram], seq), _reference([datagram], seq, None))


@pytest.mark.parametrize("edit", ["moved-info", "renamed-sockopt"])
def test_a_full_datagram_of_another_layout_with_the_same_length(edit: str) -> None:
    """The shape learned from the first datagram fits the second's length but not its
    attributes: neither the bulk check nor the per-message one may take it."""
    seq, msgs = _full_datagram()
    first = b"".join(msgs)
    second = b"".join(EDITS[edit](m) for m in msgs)
    assert len(second) == len(first)
    datagrams = [first, second]
    got, want = _fast(datagrams, seq), _reference(datagrams, seq, None)
    _assert_same(got, want)


def test_edited_layouts_would_decode_wrongly_at_the_template_offsets() -> None:
    """Why the checks matter: the template's layout applied blindly gives other values."""
    seq, msgs = _full_datagram()
    shape = inetdiag._Shape.learn(msgs[0], 0, len(msgs[0]), len(msgs[0]))
    assert shape is not None
    for edit in ("moved-info", "renamed-sockopt"):
        edited = EDITS[edit](msgs[3])
        blind: list[SocketRecord] = []
        inetdiag._emit([shape.row(edited, 0)], inetdiag.Endpoints(), None, blind.append)
        assert blind != [inetdiag.decode_message(memoryview(edited)[HDR.size :])], edit
        assert not shape.matches(edited, 0)
        assert not shape.uniform(b"".join([*msgs[:3], edited]), 4 * len(edited), seq)


def test_datagram_ending_in_done_or_error_after_sockets() -> None:
    seq, msgs = _full_datagram()
    done = nl.pack_message(nl.NLMSG_DONE, nl.NLM_F_MULTI, seq, b"\0\0\0\0")
    datagram = b"".join([*msgs[:10], done, *msgs[10:20]])
    got = _fast([datagram, b"".join(msgs)], seq)
    assert got[0] == 10
    _assert_same(got, _reference([datagram], seq, None))
    error = nl.pack_message(nl.NLMSG_ERROR, 0, seq, struct.pack("=i", -16) + bytes(16))
    with pytest.raises(nl.NetlinkError):
        _fast([b"".join([*msgs[:5], error])], seq)


def test_truncated_datagram_is_an_error_not_a_short_read() -> None:
    seq, msgs = _full_datagram()
    datagram = b"".join(msgs)
    with pytest.raises(ValueError, match="truncated"):
        _fast([datagram[:-8]], seq)


def test_fast_constructors_build_the_same_objects() -> None:
    """new_socket_record / new_endpoint set every field SocketRecord / Endpoint have."""
    names = [f.name for f in dataclasses.fields(SocketRecord)]
    values: list[Any] = [
        TcpState.FIN_WAIT2,
        Endpoint(ipaddress.ip_address("192.0.2.1"), 15001),
        Endpoint(ipaddress.ip_address("2001:db8::1"), 40000),
        *range(3, len(names) - 1),
        True,
    ]
    want = SocketRecord(*values)
    got = new_socket_record(*values)
    assert type(got) is SocketRecord and got == want and hash(got) == hash(want)
    assert [getattr(got, n) for n in names] == values
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.cookie = 1  # type: ignore[misc]
    ep = new_endpoint(ipaddress.ip_address("192.0.2.1"), 80)
    assert type(ep) is Endpoint and ep == Endpoint(ipaddress.ip_address("192.0.2.1"), 80)
    assert hash(ep) == hash(Endpoint(ipaddress.ip_address("192.0.2.1"), 80))


def test_ipv4_dump_addresses_are_four_bytes_and_shared() -> None:
    seq, datagrams = _dump("v4", "half_closed")
    _seen, records = _fast(datagrams, seq)
    listen = ipaddress.ip_address("127.0.0.1")
    assert {r.local.ip for r in records} == {listen}
    proxy_side = [r.local for r in records if r.local.port == 15001]
    assert len(proxy_side) > 100 and all(ep is proxy_side[0] for ep in proxy_side)


def _readdress(msg: bytes, src: bytes) -> bytes:
    at = HDR.size + 4 + 4  # inet_diag_msg: family, state, timer, retrans, sport, dport
    return msg[:at] + src + msg[at + 16 :]


@pytest.mark.parametrize("generic", [False, True])
def test_one_memo_for_both_families_keeps_them_apart(generic: bool) -> None:
    """SockDiag.dump parses both families with one Endpoints: IPv4 127.0.0.1 and IPv6
    7f00:1:: have the same 16 raw bytes, and each must keep its own family."""
    seq4, msgs4 = _full_datagram()
    _seq6, datagrams6 = _dump("v6", "half_closed")
    v6 = next(m for d in datagrams6 for m in _messages(d) if len(m) == len(msgs4[0]))
    v6 = v6[:8] + struct.pack("=I", seq4) + v6[12:]
    raw = ipaddress.ip_address("127.0.0.1").packed.ljust(16, b"\0")
    assert msgs4[0][HDR.size + 8 : HDR.size + 24] == raw
    v6 = _readdress(v6, raw)
    if generic:  # one message per datagram: the walker, not a shape
        first, second = b"".join(msgs4[:1]), v6
    else:
        first, second = b"".join(msgs4), b"".join([v6] * 3)
    endpoints = inetdiag.Endpoints()
    _, got4 = inetdiag.parse_buffers([memoryview(first)], seq4, None, endpoints)
    _, got6 = inetdiag.parse_buffers([memoryview(second)], seq4, None, endpoints)
    assert {r.local.ip for r in got4} == {ipaddress.ip_address("127.0.0.1")}
    assert {r.local.ip for r in got6} == {ipaddress.ip_address("7f00:1::")}


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_seeded_addresses_are_the_dumps_address_objects_and_nothing_else_changes(
    family: str,
) -> None:
    """SockDiag.reread seeds the memo with the records' address objects: the same dump
    then builds its endpoints on those very objects (identity), with equal records; an
    address the dump does not hold changes nothing."""
    seq, datagrams = _dump(family, "all")
    plain = _fast(datagrams, seq)[1]
    # Objects equal to, but not, the dump's own addresses; and one it does not hold.
    copies = {ipaddress.ip_address(str(ip)) for r in plain for ip in (r.local.ip, r.peer.ip)}
    stranger = ipaddress.ip_address("192.0.2.200")
    endpoints = inetdiag.Endpoints()
    endpoints.seed_addresses([*copies, stranger])
    seeded = inetdiag.parse_buffers((memoryview(d) for d in datagrams), seq, None, endpoints)[1]
    _assert_same((len(seeded), seeded), (len(plain), plain))
    ids = {id(ip) for ip in copies}
    for r in seeded:
        assert id(r.local.ip) in ids and id(r.peer.ip) in ids
    assert stranger not in {ep.ip for r in seeded for ep in (r.local, r.peer)}


def test_the_one_walk_dump_holds_what_the_two_family_dumps_hold() -> None:
    """TCPDIAG_GETSOCK (SockDiag.dump's request for both families): the same sockets as
    a SOCK_DIAG_BY_FAMILY dump per family, in one walk, with IPv4 and IPv6 interleaved."""

    def stable(records: list[SocketRecord]) -> set[tuple[Any, ...]]:
        return {
            (r.state, r.local, r.peer, r.cookie if not r.orphan else 0, r.inode, r.uid,
             r.bytes_acked, r.bytes_received, r.transparent)
            for r in records
        }  # fmt: skip

    seq, datagrams = _dump("both", "half_closed")
    assert {HDR.unpack_from(d, 0)[1] for d in datagrams[:-1]} == {inetdiag.TCPDIAG_GETSOCK}
    seen, both = _fast(datagrams, seq)
    per_family: list[SocketRecord] = []
    for family in ("v4", "v6"):
        s, d = _dump(family, "half_closed")
        per_family += _fast(d, s)[1]
    assert seen == len(both) == len(per_family) == 2 * 202
    assert stable(both) == stable(per_family)
    families = [r.local.ip.version for r in both]
    assert families != sorted(families)  # interleaved: one walk, not two


def test_both_families_request_is_a_legacy_inet_diag_req() -> None:
    mask = TcpState.FIN_WAIT2.mask | TcpState.CLOSE_WAIT.mask
    (msg,) = nl.iter_messages(memoryview(inetdiag.encode_dump_both(mask, 5)))
    assert msg.type == inetdiag.TCPDIAG_GETSOCK == 18
    assert msg.flags & nl.NLM_F_DUMP == nl.NLM_F_DUMP
    assert len(msg.payload) == 60  # sizeof(struct inet_diag_req)
    _family, _src_len, _dst_len, ext = struct.unpack_from("=BBBB", msg.payload, 0)
    assert ext == 1 << (inetdiag.INET_DIAG_INFO - 1)
    assert struct.unpack_from("=II", msg.payload, 52) == (mask, 0)
    cookie = struct.unpack_from("=II", msg.payload, 4 + 40)
    assert cookie == (inetdiag.NO_COOKIE, inetdiag.NO_COOKIE)
