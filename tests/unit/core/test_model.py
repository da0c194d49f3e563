"""The model's fast copies stay exact copies (they are positional, for speed)."""

from __future__ import annotations

import dataclasses
import ipaddress

from halfclose.agent.core.model import (
    Capture,
    ConntrackEntry,
    Endpoint,
    Finding,
    FlowTuple,
    Kind,
    Owner,
    SocketRecord,
    TcpState,
    UnprovenReason,
    normalize_ip,
)


def _sock(cookie: int) -> SocketRecord:
    ep = Endpoint(ipaddress.ip_address("127.0.0.1"), 15001)
    return SocketRecord(TcpState.FIN_WAIT2, ep, Endpoint(ep.ip, 40000 + cookie), cookie, 7, 1337)


def test_with_upstream_and_with_owner_change_one_field_only() -> None:
    t = FlowTuple(ipaddress.ip_address("127.0.0.1"), 1, ipaddress.ip_address("127.0.0.2"), 2)
    f = Finding(
        Kind.UNPROVEN,
        _sock(1),
        Owner(1, "envoy", 3),
        ConntrackEntry(t, t, "SYN_SENT", 5),
        None,
        UnprovenReason.ENTRY_REMOVED_EARLY,
        Capture.CONNTRACK,
        2.2,
    )
    up, owner = _sock(2), Owner(9, "ztunnel", 4)
    assert f.with_upstream(up) == dataclasses.replace(f, upstream=up)
    assert f.with_owner(owner) == dataclasses.replace(f, owner=owner)
    # Every field is set explicitly: a new field with a non-default value must be carried.
    names = [x.name for x in dataclasses.fields(Finding)]
    assert names == [
        "kind", "socket", "owner", "entry", "upstream", "reason", "capture",
        "min_silence_seconds",
    ]  # fmt: skip


def test_normalize_ip_fast_path_keeps_the_answers() -> None:
    for text, want in [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"),
    ]:
        assert normalize_ip(ipaddress.ip_address(text)) == ipaddress.ip_address(want)
