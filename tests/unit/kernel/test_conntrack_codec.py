"""ctnetlink codec against replayed kernel answers (tests/data/netlink, capture.py)."""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any

import pytest

from halfclose.agent.core.model import ConntrackEntry, FlowTuple
from halfclose.agent.kernel import ctnetlink as ct
from halfclose.agent.kernel import netlink as nl
from halfclose.agent.kernel.conntrack import Conntrack, entries_by_reply
from support.nldump import DATA, expected, load_datagrams

IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5  # REDIRECT is a destination NAT


def _tuple(values: list[Any]) -> FlowTuple:
    src, sport, dst, dport = values
    return FlowTuple(ipaddress.ip_address(src), sport, ipaddress.ip_address(dst), dport)


def _messages(name: str) -> list[nl.Message]:
    return [m for d in load_datagrams(name) for m in nl.iter_messages(memoryview(d))]


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_get_by_reply_answer_decodes_as_recorded(family: str) -> None:
    want = next(e for e in expected()["conntrack"] if e["family"] == family)
    (msg,) = _messages(f"conntrack_get_{family}.dump")
    assert msg.type == ct.MSG_NEW  # the kernel answers a GET with a NEW-typed message
    entry = ct.decode_entry(msg.payload)
    assert entry.original == _tuple(want["original"])
    assert entry.reply == _tuple(want["reply"])
    assert entry.tcp_state == want["tcp_state"]
    assert entry.status & IPS_DST_NAT and not entry.status & IPS_SRC_NAT
    assert entry.status & IPS_ASSURED and entry.status & IPS_SEEN_REPLY
    assert 0 < entry.timeout <= 60  # CLOSE_WAIT's default timer
    assert entry.entry_id != 0 and entry.zone == 0 and not entry.fixed_timeout


def test_missing_entry_answers_enoent() -> None:
    (msg,) = _messages("conntrack_get_enoent.dump")
    assert msg.type == nl.NLMSG_ERROR
    assert nl.error_code(msg) == errno.ENOENT


def test_dump_contains_the_recorded_entry() -> None:
    want = next(e for e in expected()["conntrack"] if e["family"] == "v4")
    entries = [
        ct.decode_entry(m.payload) for m in _messages("conntrack_dump.dump") if m.type == ct.MSG_NEW
    ]
    assert _tuple(want["reply"]) in entries_by_reply(entries)


def test_get_request_roundtrips_through_the_decoder() -> None:
    reply = FlowTuple(
        ipaddress.ip_address("2001:db8::1"), 15001, ipaddress.ip_address("2001:db8::2"), 40000
    )
    (msg,) = nl.iter_messages(memoryview(ct.encode_get_by_reply(reply, seq=4, zone=3)))
    assert msg.type == ct.MSG_GET and msg.flags == nl.NLM_F_REQUEST
    family = msg.payload[0]
    assert family == socket.AF_INET6
    attrs = dict(nl.iter_attrs(msg.payload, ct.NFGEN.size))
    assert set(attrs) == {ct.CTA_TUPLE_REPLY, ct.CTA_ZONE}
    assert ct._decode_tuple(attrs[ct.CTA_TUPLE_REPLY]) == (reply, 6)


def test_update_request_keys_on_the_original_tuple() -> None:
    entry = ConntrackEntry(
        original=FlowTuple(
            ipaddress.ip_address("192.0.2.10"), 40000, ipaddress.ip_address("203.0.113.10"), 7777
        ),
        reply=FlowTuple(
            ipaddress.ip_address("127.0.0.1"), 15001, ipaddress.ip_address("192.0.2.10"), 40000
        ),
        tcp_state="CLOSE_WAIT",
        timeout=3,
    )
    buf = ct.encode_update(entry, seq=5, timeout=600, status=ConntrackEntry.IPS_FIXED_TIMEOUT)
    (msg,) = nl.iter_messages(memoryview(buf))
    assert msg.type == ct.MSG_NEW
    assert not msg.flags & nl.NLM_F_CREATE  # update only: never create an entry
    attrs = dict(nl.iter_attrs(msg.payload, ct.NFGEN.size))
    assert ct._decode_tuple(attrs[ct.CTA_TUPLE_ORIG]) == (entry.original, 6)
    assert ct.CTA_TUPLE_REPLY not in attrs
    assert int.from_bytes(attrs[ct.CTA_TIMEOUT], "big") == 600
    assert int.from_bytes(attrs[ct.CTA_STATUS], "big") == 1 << 10


def test_entry_without_tuples_is_rejected() -> None:
    payload = memoryview(
        ct.NFGEN.pack(socket.AF_INET, 0, 0) + nl.pack_attr(ct.CTA_TIMEOUT, b"\0\0\0\1")
    )
    with pytest.raises(ValueError, match="tuples"):
        ct.decode_entry(payload)


@pytest.mark.parametrize(
    ("src", "dst"), [("127.0.0.1", "192.0.2.10"), ("2001:db8::1", "2001:db8::2")]
)
def test_fast_get_encoder_matches_the_generic_one(src: str, dst: str) -> None:
    reply = FlowTuple(ipaddress.ip_address(src), 15001, ipaddress.ip_address(dst), 40000)
    generic = nl.pack_message(
        ct.MSG_GET,
        nl.NLM_F_REQUEST,
        7,
        ct.NFGEN.pack(ct._family(reply), 0, 0) + ct.encode_tuple(ct.CTA_TUPLE_REPLY, reply),
    )
    assert ct.encode_get_by_reply(reply, seq=7) == generic


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("127.0.0.1", "192.0.2.10"),
        ("2001:db8::1", "2001:db8::2"),
        ("::ffff:127.0.0.1", "::ffff:192.0.2.10"),  # a dual-stack listener's peer
    ],
)
@pytest.mark.parametrize("seq", [1, 0x01020304, 0xFFFFFFFF])
def test_socket_get_encoder_is_the_normalized_reply_get(src: str, dst: str, seq: int) -> None:
    """The scan's per-socket GET (no FlowTuple) is byte for byte the generic one,
    normalized: a mapped address must go out as IPv4 (design.md §2 part 3)."""
    reply = FlowTuple(ipaddress.ip_address(src), 15001, ipaddress.ip_address(dst), 40000)
    norm = reply.normalized()
    fast = ct.encode_socket_get(norm.src, norm.sport, norm.dst, norm.dport, seq)
    assert fast == ct.encode_get_by_reply(reply, seq=seq)
    assert (fast[16] == socket.AF_INET) is (norm.src.version == 4)


def test_dst_nat_dump_request_is_the_one_the_kernel_accepted() -> None:
    # capture_proof.py sent these bytes (plain struct code) to a 6.18 kernel and
    # got back only the TCP DST_NAT entries (proof_dst_nat_v4.dump).
    import importlib.util

    spec = importlib.util.spec_from_file_location("capture_proof", DATA / "capture_proof.py")
    assert spec is not None and spec.loader is not None
    capture_proof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(capture_proof)
    sent: list[bytes] = []

    class Recorder:
        def send(self, data: bytes) -> None:
            sent.append(data)

        def close(self) -> None:
            pass

    capture_proof.ct_socket = Recorder
    capture_proof.recv_all = lambda *_a, **_k: []
    capture_proof.ct_dump(True, 21)
    assert ct.encode_dump_dst_nat(socket.AF_INET, 21) == sent[0]
    msg = next(nl.iter_messages(memoryview(sent[0])))
    assert msg.flags & nl.NLM_F_DUMP == nl.NLM_F_DUMP


def test_no_nfnetlink_is_conntrack_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    from halfclose.errors import ConntrackUnavailable

    def refuse(*_: object) -> None:
        raise OSError(errno.EPROTONOSUPPORT, "Protocol not supported")

    monkeypatch.setattr(nl, "open_socket", refuse)
    with pytest.raises(ConntrackUnavailable) as info:
        Conntrack.open()
    assert info.value.reason == "conntrack_unavailable"


# -- the dump path's index (Conntrack.lookup_sockets_dump) ---------------------


def _key(t: FlowTuple) -> bytes:
    n = t.normalized()
    return ct.tuple_key(n.src, n.sport, n.dst, n.dport)


@pytest.mark.parametrize(
    ("src", "dst"),
    [("127.0.0.1", "192.0.2.10"), ("2001:db8::1", "2001:db8::2"), ("0.0.0.0", "255.255.255.255")],
)
def test_tuple_key_is_the_get_requests_tuple(src: str, dst: str) -> None:
    t = FlowTuple(ipaddress.ip_address(src), 65535, ipaddress.ip_address(dst), 1)
    get = ct.encode_get_by_reply(t, seq=9)
    assert _key(t) == get[ct.TUPLE_KEY_OFFSET :]
    assert ct.key_ports(_key(t)) == (65535, 1)


@pytest.mark.parametrize(
    "name", ["conntrack_dump.dump", "proof_ct_dump_v4.dump", "conntrack_get_v6.dump"]
)
def test_dumped_entries_are_indexed_under_both_tuples(name: str) -> None:
    """Replayed kernel answers: the raw tuple bytes are the keys a GET would ask."""
    seen = 0
    for msg in _messages(name):
        if msg.type != ct.MSG_NEW:
            continue
        entry = ct.decode_entry(msg.payload)
        want = (_key(entry.original), _key(entry.reply)) if entry.l4proto == 6 else (None, None)
        assert ct.index_dump_entry(msg.payload) == want
        seen += entry.l4proto == 6
    assert seen


def _tuple_attr(t: FlowTuple, *, nested_flag: bool = True, zone: int | None = None) -> bytes:
    """A CTA_TUPLE_* payload as a kernel might lay it out."""
    v4 = t.src.version == 4
    flag = nl.NLA_F_NESTED if nested_flag else 0
    ip = nl.pack_attr(
        ct.CTA_TUPLE_IP | flag,
        nl.pack_attr(ct.CTA_IP_V4_SRC if v4 else ct.CTA_IP_V6_SRC, t.src.packed)
        + nl.pack_attr(ct.CTA_IP_V4_DST if v4 else ct.CTA_IP_V6_DST, t.dst.packed),
    )
    proto = nl.pack_attr(
        ct.CTA_TUPLE_PROTO | flag,
        nl.pack_attr(ct.CTA_PROTO_NUM, bytes([6]))
        + nl.pack_attr(ct.CTA_PROTO_SRC_PORT, t.sport.to_bytes(2, "big"))
        + nl.pack_attr(ct.CTA_PROTO_DST_PORT, t.dport.to_bytes(2, "big")),
    )
    extra = b"" if zone is None else nl.pack_attr(ct.CTA_TUPLE_ZONE, zone.to_bytes(2, "big"))
    return ip + proto + extra


REPLY = FlowTuple(ipaddress.ip_address("127.0.0.1"), 15001, ipaddress.ip_address("192.0.2.9"), 4)


def test_a_tuple_in_another_layout_is_read_field_by_field() -> None:
    """Raw bytes are compared only where our layout is verified: a kernel that
    wrote the nests without NLA_F_NESTED must still be found (else: "absent")."""
    assert ct.dumped_tuple_key(_tuple_attr(REPLY)) == _key(REPLY)  # the fast path
    assert ct.dumped_tuple_key(_tuple_attr(REPLY, nested_flag=False)) == _key(REPLY)
    # A zone of its own in this direction: a zone-0 GET does not find it.
    assert ct.dumped_tuple_key(_tuple_attr(REPLY, zone=5)) is None
    assert ct.dumped_tuple_key(_tuple_attr(REPLY, zone=0)) == _key(REPLY)
    udp = _tuple_attr(REPLY).replace(
        nl.pack_attr(ct.CTA_PROTO_NUM, bytes([6])), nl.pack_attr(ct.CTA_PROTO_NUM, bytes([17]))
    )
    assert ct.dumped_tuple_key(udp) is None


def test_an_entry_in_a_zone_is_indexed_under_neither_tuple() -> None:
    orig = FlowTuple(REPLY.dst, REPLY.dport, ipaddress.ip_address("203.0.113.10"), 7777)
    payload = (
        ct.NFGEN.pack(socket.AF_INET, 0, 0)
        + nl.pack_attr(ct.CTA_TUPLE_ORIG | nl.NLA_F_NESTED, _tuple_attr(orig))
        + nl.pack_attr(ct.CTA_TUPLE_REPLY | nl.NLA_F_NESTED, _tuple_attr(REPLY))
    )
    assert ct.index_dump_entry(payload) == (_key(orig), _key(REPLY))
    zoned = payload + nl.pack_attr(ct.CTA_ZONE, (3).to_bytes(2, "big"))
    assert ct.index_dump_entry(zoned) == (None, None)
    zero = payload + nl.pack_attr(ct.CTA_ZONE, (0).to_bytes(2, "big"))
    assert ct.index_dump_entry(zero) == (_key(orig), _key(REPLY))


def _replayed_entries() -> list[bytes]:
    out = []
    for path in sorted(DATA.glob("*.dump")):
        for msg in _messages(path.name):
            if msg.type == ct.MSG_NEW and msg.payload[0] in (socket.AF_INET, socket.AF_INET6):
                out.append(bytes(msg.payload))
    return out


def test_fast_decoder_gives_the_generic_decoders_entry_on_every_replayed_answer() -> None:
    entries = _replayed_entries()
    assert len(entries) >= 8
    memo: dict[bytes, Any] = {}
    for payload in entries:
        assert ct.decode_entry_fast(payload, memo) == ct.decode_entry(memoryview(payload))


def _entry_payload(*, nested_flag: bool = True, protoinfo: bytes | None = None) -> bytes:
    orig = FlowTuple(REPLY.dst, REPLY.dport, ipaddress.ip_address("203.0.113.10"), 7777)
    if protoinfo is None:
        protoinfo = nl.pack_nested(
            ct.CTA_PROTOINFO_TCP,
            nl.pack_attr(ct.CTA_PROTOINFO_TCP_STATE, bytes([5])),
            nl.pack_attr(2, bytes([7])),  # WSCALE_ORIGINAL
        )
    return (
        ct.NFGEN.pack(socket.AF_INET, 0, 0)
        + nl.pack_attr(
            ct.CTA_TUPLE_ORIG | nl.NLA_F_NESTED, _tuple_attr(orig, nested_flag=nested_flag)
        )
        + nl.pack_attr(ct.CTA_TUPLE_REPLY | nl.NLA_F_NESTED, _tuple_attr(REPLY, zone=4))
        + nl.pack_attr(ct.CTA_STATUS, (0x1AE).to_bytes(4, "big"))
        + nl.pack_attr(ct.CTA_TIMEOUT, (55).to_bytes(4, "big"))
        + nl.pack_attr(ct.CTA_PROTOINFO | nl.NLA_F_NESTED, protoinfo)
        + nl.pack_attr(ct.CTA_ID, (99).to_bytes(4, "big"))
        + nl.pack_attr(ct.CTA_ZONE, (4).to_bytes(2, "big"))
    )


@pytest.mark.parametrize(
    "payload",
    [
        _entry_payload(),
        _entry_payload(nested_flag=False),  # tuples read field by field
        _entry_payload(protoinfo=b""),  # no TCP state: NONE
        _entry_payload(  # the state not first in the TCP nest
            protoinfo=nl.pack_nested(
                ct.CTA_PROTOINFO_TCP,
                nl.pack_attr(2, bytes([7])),
                nl.pack_attr(ct.CTA_PROTOINFO_TCP_STATE, bytes([1])),
            )
        ),
        _entry_payload(  # two TCP nests: the generic decoder keeps the last state
            protoinfo=nl.pack_nested(
                ct.CTA_PROTOINFO_TCP, nl.pack_attr(ct.CTA_PROTOINFO_TCP_STATE, bytes([3]))
            )
            + nl.pack_nested(
                ct.CTA_PROTOINFO_TCP, nl.pack_attr(ct.CTA_PROTOINFO_TCP_STATE, bytes([7]))
            )
        ),
    ],
)
def test_fast_decoder_matches_the_generic_one_off_the_common_layout(payload: bytes) -> None:
    assert ct.decode_entry_fast(payload) == ct.decode_entry(memoryview(payload))
