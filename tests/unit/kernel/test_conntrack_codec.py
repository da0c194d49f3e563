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
