"""Netlink framing: hand-built edge cases the kernel never sends us on a good day."""

from __future__ import annotations

import struct

import pytest

from halfclose.agent.kernel import netlink as nl


def test_pack_attr_pads_to_four_bytes_and_iterates_back() -> None:
    buf = nl.pack_attr(1, b"abc") + nl.pack_attr(2, b"") + nl.pack_nested(3, nl.pack_attr(4, b"x"))
    assert len(buf) % 4 == 0
    attrs = list(nl.iter_attrs(memoryview(buf)))
    assert [(t, bytes(v)) for t, v in attrs[:2]] == [(1, b"abc"), (2, b"")]
    nested_type, nested = attrs[2]
    assert nested_type == 3  # NLA_F_NESTED is masked off
    assert [(t, bytes(v)) for t, v in nl.iter_attrs(nested)] == [(4, b"x")]


def test_iter_messages_walks_aligned_messages() -> None:
    a = nl.pack_message(20, 0, 1, b"12345")  # 21 bytes, padded to 24 on the wire
    b = nl.pack_message(3, 0, 2, struct.pack("=i", 0))
    buf = a + b"\0" * 3 + b
    msgs = list(nl.iter_messages(memoryview(buf)))
    assert [(m.type, m.seq, bytes(m.payload)) for m in msgs] == [
        (20, 1, b"12345"),
        (3, 2, b"\0\0\0\0"),
    ]


@pytest.mark.parametrize(
    "buf",
    [
        nl.NLMSG_HDR.pack(64, 20, 0, 1, 0) + b"\0" * 8,  # claims more than the buffer
        nl.NLMSG_HDR.pack(8, 20, 0, 1, 0),  # shorter than its own header
    ],
)
def test_truncated_message_is_an_error_not_a_silent_stop(buf: bytes) -> None:
    with pytest.raises(ValueError, match="truncated"):
        list(nl.iter_messages(memoryview(buf)))


def test_truncated_attribute_is_an_error() -> None:
    buf = nl.NLA_HDR.pack(40, 1) + b"\0" * 4
    with pytest.raises(ValueError, match="truncated"):
        list(nl.iter_attrs(memoryview(buf)))


def test_error_code_reads_negative_errno() -> None:
    msg = nl.Message(nl.NLMSG_ERROR, 0, 1, memoryview(struct.pack("=i", -2) + b"\0" * 16))
    assert nl.error_code(msg) == 2
    ack = nl.Message(nl.NLMSG_ERROR, 0, 1, memoryview(struct.pack("=i", 0) + b"\0" * 16))
    assert nl.error_code(ack) == 0
