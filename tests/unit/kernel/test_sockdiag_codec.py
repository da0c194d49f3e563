"""sock_diag codec against replayed kernel dumps (tests/data/netlink, capture.py).

The expectations were recorded from the socket objects themselves at capture
time (getsockname, fstat inode, SO_COOKIE, TCP_INFO), not by our parser.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

import pytest

from halfclose.agent.core.model import Endpoint, SocketRecord, TcpState
from halfclose.agent.kernel import inetdiag
from halfclose.agent.kernel import netlink as nl
from support.nldump import DATA, expected, load_datagrams


def _records(name: str, keep: inetdiag.PortFilter | None = None) -> tuple[int, list[SocketRecord]]:
    messages = [m for d in load_datagrams(name) for m in nl.iter_messages(memoryview(d))]
    return inetdiag.parse_dump(messages, keep)


def _key(local: str, peer: str | None) -> tuple[str, str | None]:
    return local, peer


@pytest.mark.parametrize(
    ("family", "dump"), [("v4", "sockdiag_v4.dump"), ("v6", "sockdiag_v6.dump")]
)
def test_dump_decodes_every_socket_as_recorded(family: str, dump: str) -> None:
    want: list[dict[str, Any]] = expected()["sockets"][family]
    seen, records = _records(dump)
    assert seen == len(records)
    by_key = {}
    for r in records:
        peer = None if r.state is TcpState.LISTEN else str(r.peer)
        by_key[_key(str(r.local), peer)] = r
    for w in want:
        r = by_key[_key(w["local"], w["peer"])]
        assert r.state is TcpState[w["state"]], w
        assert r.inode == w["inode"], w
        if w.get("orphan"):
            # A timewait minisocket: no owner, no tcp_info.
            assert r.orphan and r.last_ack_recv_ms is None and r.bytes_acked is None
            continue
        assert r.cookie == w["cookie"], w
        assert r.uid == w["uid"], w
        if "bytes_acked" in w:
            assert (r.bytes_acked, r.bytes_received) == (w["bytes_acked"], w["bytes_received"])
            assert r.last_ack_recv_ms is not None and r.last_data_recv_ms is not None


def test_port_filter_runs_before_decoding() -> None:
    seen_all, everything = _records("sockdiag_v4.dump")
    asked: list[tuple[int, int, int]] = []

    def keep(state: int, sport: int, dport: int) -> bool:
        asked.append((state, sport, dport))
        return state == TcpState.FIN_WAIT2 and sport == 15001

    seen, kept = _records("sockdiag_v4.dump", keep)
    assert seen == seen_all == len(asked)
    assert [(r.state, r.local.port) for r in kept] == [(TcpState.FIN_WAIT2, 15001)]
    assert {(int(r.state), r.local.port, r.peer.port) for r in everything} == set(asked)


def test_ipv6_addresses_are_full_sixteen_bytes() -> None:
    _seen, records = _records("sockdiag_v6.dump")
    addrs = {r.local.ip for r in records}
    assert ipaddress.IPv6Address("2001:db8::10") in addrs
    assert all(a.version == 6 for a in addrs)


def _record(state: TcpState = TcpState.FIN_WAIT2, cookie: int = 0x1_0000_0002) -> SocketRecord:
    return SocketRecord(
        state=state,
        local=Endpoint(ipaddress.ip_address("127.0.0.1"), 15001),
        peer=Endpoint(ipaddress.ip_address("192.0.2.10"), 40000),
        cookie=cookie,
        inode=5,
        uid=1337,
        ifindex=1,
    )


def test_destroy_request_carries_tuple_state_and_cookie() -> None:
    buf = inetdiag.encode_destroy(_record(), seq=9)
    (msg,) = nl.iter_messages(memoryview(buf))
    assert msg.type == inetdiag.SOCK_DESTROY == 21
    assert msg.flags & nl.NLM_F_ACK and msg.flags & nl.NLM_F_REQUEST
    assert not msg.flags & nl.NLM_F_DUMP
    family, proto, _ext, _pad, states = inetdiag.REQ.unpack_from(msg.payload, 0)
    assert (family, proto, states) == (socket.AF_INET, socket.IPPROTO_TCP, 1 << 5)
    sport, dport, src, dst = inetdiag.SOCKID.unpack_from(msg.payload, 8)
    assert (sport, dport) == (15001, 40000)
    assert src[:4] == socket.inet_aton("127.0.0.1") and dst[:4] == socket.inet_aton("192.0.2.10")
    ifindex, lo, hi = struct.unpack_from("=III", msg.payload, 8 + 36)
    assert (ifindex, lo | hi << 32) == (1, 0x1_0000_0002)


def _by_parts(
    msg_type: int, flags: int, seq: int, r: SocketRecord, *, ext: int, states: int
) -> bytes:
    """The request as the uapi layout spells it, one struct per part (the reference)."""
    family = socket.AF_INET if r.local.ip.version == 4 else socket.AF_INET6
    payload = (
        inetdiag.REQ.pack(family, socket.IPPROTO_TCP, ext, 0, states)
        + inetdiag.SOCKID.pack(
            r.local.port, r.peer.port, r.local.ip.packed.ljust(16, b"\0"),
            r.peer.ip.packed.ljust(16, b"\0"),
        )
        + inetdiag.SOCKID_TAIL.pack(r.ifindex, r.cookie & 0xFFFFFFFF, r.cookie >> 32)
    )  # fmt: skip
    return nl.pack_message(msg_type, flags, seq, payload)


@pytest.mark.parametrize(
    ("local", "peer"),
    [("127.0.0.1", "192.0.2.10"), ("2001:db8::1", "2001:db8::2"), ("::ffff:192.0.2.1", "::1")],
)
@pytest.mark.parametrize("port", [1, 256, 15001, 65535])
def test_destroy_and_get_requests_are_the_uapi_layout_byte_for_byte(
    local: str, peer: str, port: int
) -> None:
    """One struct.pack builds each request (ports byte-swapped into a host-order
    struct): every byte must be what the part-by-part layout gives."""
    r = SocketRecord(
        state=TcpState.FIN_WAIT2,
        local=Endpoint(ipaddress.ip_address(local), port),
        peer=Endpoint(ipaddress.ip_address(peer), 65535 - port),
        cookie=0x8000_0001_F00D_0002,
        inode=5,
        uid=1337,
        ifindex=7,
    )
    seq = 0x8000_0003
    ack = nl.NLM_F_REQUEST | nl.NLM_F_ACK
    req, fw2, every = nl.NLM_F_REQUEST, 1 << 5, 0xFFFFFFFF
    info = 1 << (inetdiag.INET_DIAG_INFO - 1)
    assert inetdiag.encode_destroy(r, seq) == _by_parts(21, ack, seq, r, ext=0, states=fw2)
    no_ack = _by_parts(21, req, seq, r, ext=0, states=fw2)
    assert inetdiag.encode_destroy(r, seq, ack=False) == no_ack
    assert inetdiag.encode_get(r, seq) == _by_parts(20, ack, seq, r, ext=info, states=every)
    no_info = _by_parts(20, ack, seq, r, ext=0, states=every)
    assert inetdiag.encode_get(r, seq, with_info=False) == no_info


@pytest.mark.parametrize("cookie", [0, 0xFFFF_FFFF_FFFF_FFFF])
def test_destroy_refuses_a_record_without_cookie(cookie: int) -> None:
    with pytest.raises(ValueError, match="cookie"):
        inetdiag.encode_destroy(_record(cookie=cookie), seq=1)


def test_dump_request_sets_state_filter_and_info_extension() -> None:
    mask = TcpState.FIN_WAIT2.mask | TcpState.CLOSE_WAIT.mask
    (msg,) = nl.iter_messages(memoryview(inetdiag.encode_dump(socket.AF_INET6, mask, 3)))
    assert msg.flags & nl.NLM_F_DUMP == nl.NLM_F_DUMP
    family, proto, ext, _pad, states = inetdiag.REQ.unpack_from(msg.payload, 0)
    assert (family, proto, states) == (socket.AF_INET6, socket.IPPROTO_TCP, (1 << 5) | (1 << 8))
    assert ext == 1 << (inetdiag.INET_DIAG_INFO - 1)
    assert len(msg.payload) == 56  # sizeof(struct inet_diag_req_v2)


def test_message_without_tcp_info_decodes_with_unknown_ages() -> None:
    payload = (
        struct.pack("=BBBB", socket.AF_INET, TcpState.TIME_WAIT, 0, 0)
        + inetdiag.SOCKID.pack(
            80,
            40000,
            socket.inet_aton("192.0.2.1").ljust(16, b"\0"),
            socket.inet_aton("192.0.2.2").ljust(16, b"\0"),
        )
        + struct.pack("=III", 0, 7, 0)
        + struct.pack("=IIIII", 0, 0, 0, 0, 0)
    )
    r = inetdiag.decode_message(memoryview(payload))
    assert r.state is TcpState.TIME_WAIT and r.orphan and r.cookie == 7
    assert r.idle_seconds is None and r.bytes_acked is None


def test_short_tcp_info_from_an_older_kernel_reads_what_is_there() -> None:
    head = (
        struct.pack("=BBBB", socket.AF_INET, TcpState.FIN_WAIT2, 0, 0)
        + inetdiag.SOCKID.pack(
            15001, 40000, b"\x7f\0\0\x01".ljust(16, b"\0"), b"\xc0\0\x02\x0a".ljust(16, b"\0")
        )
        + struct.pack("=III", 0, 1, 0)
        + struct.pack("=IIIII", 0, 0, 0, 1337, 99)
    )
    info = bytearray(104)  # tcp_info as of Linux 3.x: no byte counters yet
    struct.pack_into("=II", info, 52, 1500, 2500)
    r = inetdiag.decode_message(
        memoryview(head + nl.pack_attr(inetdiag.INET_DIAG_INFO, bytes(info)))
    )
    assert (r.last_data_recv_ms, r.last_ack_recv_ms) == (1500, 2500)
    assert r.idle_seconds == 1.5
    assert r.bytes_acked is None


def _sockopt_expected() -> list[dict[str, Any]]:
    import json

    return json.loads((DATA / "sockopt_expected.json").read_text())["sockets"]  # type: ignore[no-any-return]


def test_transparent_bit_and_last_data_sent_as_recorded() -> None:
    """capture_sockopt.py: a TPROXY-style listener, its accepted socket, plain ones."""
    records = {}
    for dump in ("sockdiag_sockopt_v4.dump", "sockdiag_sockopt_v6.dump"):
        for r in _records(dump)[1]:
            peer = None if r.state is TcpState.LISTEN else str(r.peer)
            records[(str(r.local), peer)] = r
    want = _sockopt_expected()
    assert {w["transparent"] for w in want} == {True, False}  # both cases present
    for w in want:
        r = records[(w["local"], w["peer"])]
        assert r.state is TcpState[w["state"]], w
        assert r.cookie == w["cookie"], w
        assert r.transparent is w["transparent"], w
        if "last_data_sent_ms" in w:
            # Recorded by getsockopt(TCP_INFO) just after the dump: a few ms older.
            assert r.last_data_sent_ms is not None
            assert 0 <= w["last_data_sent_ms"] - r.last_data_sent_ms < 200, w
        else:
            assert r.last_data_sent_ms is None or r.state is TcpState.LISTEN


def test_accepted_tproxy_socket_is_transparent_and_half_closed() -> None:
    fin_wait2 = [
        r for r in _records("sockdiag_sockopt_v4.dump")[1] if r.state is TcpState.FIN_WAIT2
    ]
    assert [(r.local.port, r.transparent) for r in fin_wait2] == [(15006, True)]


def test_dual_stack_listener_holds_ipv4_peers_as_mapped_addresses() -> None:
    established = [
        r for r in _records("sockdiag_sockopt_v6.dump")[1] if r.state is TcpState.ESTABLISHED
    ]
    (r,) = established
    assert str(r.local) == "[::ffff:127.0.0.1]:15001"
    assert isinstance(r.local.ip, ipaddress.IPv6Address) and r.local.ip.ipv4_mapped is not None
    assert not r.transparent


def _with_attrs(*attrs: bytes) -> SocketRecord:
    head = (
        struct.pack("=BBBB", socket.AF_INET, TcpState.FIN_WAIT2, 0, 0)
        + inetdiag.SOCKID.pack(
            8080, 40000, b"\xc0\0\x02\x0a".ljust(16, b"\0"), b"\xc6\x33\x64\x02".ljust(16, b"\0")
        )
        + struct.pack("=III", 0, 1, 0)
        + struct.pack("=IIIII", 0, 0, 0, 1337, 99)
    )
    return inetdiag.decode_message(memoryview(head + b"".join(attrs)))


def test_sockopt_then_tcp_info_in_kernel_order_unknown_attrs_skipped() -> None:
    info = bytearray(232)
    struct.pack_into("=IIII", info, 44, 7000, 6000, 1500, 2500)
    r = _with_attrs(
        nl.pack_attr(8, b"\x01"),  # INET_DIAG_SHUTDOWN
        nl.pack_attr(inetdiag.INET_DIAG_SOCKOPT, b"\x20\x00"),
        nl.pack_attr(inetdiag.INET_DIAG_INFO, bytes(info)),
    )
    assert r.transparent
    assert (r.last_data_sent_ms, r.last_data_recv_ms, r.last_ack_recv_ms) == (7000, 1500, 2500)
    # Every other bit set, transparent clear: not transparent.
    r = _with_attrs(nl.pack_attr(inetdiag.INET_DIAG_SOCKOPT, b"\xdf\xff"))
    assert not r.transparent and r.last_data_sent_ms is None


def test_socket_record_field_order_matches_the_positional_decoder() -> None:
    """decode_message builds SocketRecord positionally (the hot path): a reorder must fail here."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(SocketRecord)]
    assert names[:13] == [
        "state", "local", "peer", "cookie", "inode", "uid", "last_data_recv_ms",
        "last_ack_recv_ms", "ifindex", "bytes_acked", "bytes_received", "last_data_sent_ms",
        "transparent",
    ]  # fmt: skip
    required = [
        f.name for f in dataclasses.fields(SocketRecord)[13:] if f.default is dataclasses.MISSING
    ]
    assert required == []
