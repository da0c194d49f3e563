"""The privileged worker's wire codec (``halfclose.agent.core.wire``): what crosses,
and that the receiver builds only the types it declares, whatever it is sent."""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from halfclose.agent.core.wire import WireError, decode, encode


class Colour(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass(frozen=True, slots=True)
class Inner:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int


@dataclass(frozen=True, slots=True)
class Outer:
    name: str
    colour: Colour
    level: Level
    inner: Inner | None
    items: tuple[Inner, ...]
    pair: tuple[int, str]
    tags: frozenset[str]
    by_port: Mapping[int, str]
    blob: bytes
    ratio: float
    mode: Literal["a", "b"] = "a"
    extra: list[int] = field(default_factory=list)


def _cross(tp: Any, value: Any) -> Any:
    return decode(tp, json.loads(json.dumps(encode(value))))


def test_nested_dataclasses_round_trip_through_json() -> None:
    value = Outer(
        name="x",
        colour=Colour.BLUE,
        level=Level.HIGH,
        inner=Inner(ipaddress.ip_address("2001:db8::1"), 15001),
        items=(Inner(ipaddress.ip_address("192.0.2.1"), 1), Inner(ipaddress.ip_address("::1"), 2)),
        pair=(3, "three"),
        tags=frozenset({"a", "b"}),
        by_port={15001: "outbound", 15006: "inbound"},
        blob=b"\x00\xff",
        ratio=1,  # an int where a float is declared decodes as the float
        mode="b",
        extra=[1, 2],
    )
    back = _cross(Outer, value)
    assert back == value
    assert isinstance(back.colour, Colour) and isinstance(back.level, Level)
    assert isinstance(back.inner.address, ipaddress.IPv6Address)
    assert isinstance(back.ratio, float)
    assert _cross(Outer, dataclasses.replace(value, inner=None)).inner is None


@pytest.mark.parametrize(
    ("tp", "data"),
    [
        (int, "1"),
        (int, True),
        (str, 1),
        (Colour, "green"),
        (Inner, {"address": "192.0.2.1"}),  # a required field missing
        (Inner, {"address": "192.0.2.1", "port": 1, "command": "rm -rf /"}),  # unknown field
        (Inner, {"address": "not-an-ip", "port": 1}),
        (tuple[int, str], [1]),
        (Literal["a", "b"], "c"),
        (bytes, "zz"),
    ],
)
def test_data_that_is_not_the_declared_type_is_refused(tp: Any, data: Any) -> None:
    with pytest.raises(WireError):
        decode(tp, data)


def test_no_class_name_on_the_wire_chooses_what_is_built() -> None:
    """The receiver's declared type decides: a payload naming another class is just data."""
    data = {"__class__": "subprocess.Popen", "address": "192.0.2.1", "port": 1}
    with pytest.raises(WireError, match="unknown fields"):
        decode(Inner, data)
    encoded = encode(Inner(ipaddress.ip_address("192.0.2.1"), 1))
    assert encoded == {"address": "192.0.2.1", "port": 1}


def test_values_that_cannot_cross_are_refused_on_the_sending_side() -> None:
    with pytest.raises(WireError):
        encode(object())
    with pytest.raises(WireError):
        encode(lambda: None)
