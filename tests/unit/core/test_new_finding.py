"""``new_finding`` (and the classifier's inline copy of it) builds ordinary Findings."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from halfclose.agent.core.model import (
    Capture,
    ConntrackEntry,
    Endpoint,
    Finding,
    FindingSlots,
    FlowTuple,
    Kind,
    Owner,
    SocketRecord,
    TcpState,
    UnprovenReason,
    new_finding,
)

A = ipaddress.ip_address("192.0.2.1")
B = ipaddress.ip_address("192.0.2.2")
SOCK = SocketRecord(TcpState.FIN_WAIT2, Endpoint(A, 15001), Endpoint(B, 40000), 1, 1, 0)
UP = SocketRecord(TcpState.CLOSE_WAIT, Endpoint(A, 40001), Endpoint(B, 80), 2, 2, 0)
ENTRY = ConntrackEntry(FlowTuple(B, 40000, A, 80), FlowTuple(A, 15001, B, 40000), "SYN_SENT", 3)


def test_the_slots_are_the_fields() -> None:
    # A field added to Finding must be added to FindingSlots (and set by every
    # builder), or __class__ assignment fails: this says so first.
    assert set(FindingSlots.__slots__) == {f.name for f in dataclasses.fields(Finding)}


def test_same_object_as_the_dataclass_builds() -> None:
    values = (
        Kind.COLLISION,
        SOCK,
        Owner(1, "envoy", 3),
        ENTRY,
        UP,
        UnprovenReason.ENTRY_REMOVED_EARLY,
        Capture.CONNTRACK,
        5.2,
    )
    want = Finding(*values)
    got = new_finding(*values)
    assert type(got) is Finding and got == want and hash(got) == hash(want)
    assert [getattr(got, f.name) for f in dataclasses.fields(Finding)] == list(values)
    assert got.with_upstream(None) == want.with_upstream(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.kind = Kind.LEAKED  # type: ignore[misc]
