"""Plain data <-> JSON, directed by the declared types (the privileged worker's wire).

The agent's kernel work runs in a separate, privileged process
(``halfclose.agent.daemon.worker``); what crosses to it and back is JSON.  No
class names travel on the wire: the receiver decodes each value as the type
its own annotations declare (a method's parameter or return type), so the
worker can only ever build the dataclasses, enums and addresses its Protocol
names, whatever the other side sends.  That is the point: the unprivileged
side is the one facing the network, and a compromised one must not be able to
make the privileged one instantiate or execute anything else (which pickle
would allow).

Supported: None, bool, int, float, str, bytes (hex), enums (by value),
ipaddress addresses and networks (text), dataclasses (an object of their init
fields), tuple (fixed or variadic), list, set/frozenset, dict/Mapping (a list
of pairs: keys need not be strings), ``X | None`` and unions (first match),
``Literal``.  Anything else raises ``WireError`` on the sending side.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import ipaddress
import types
import typing
from functools import cache
from typing import Any

_ADDRESS_TYPES = (
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
    ipaddress.IPv4Interface,
    ipaddress.IPv6Interface,
)


class WireError(ValueError):
    """A value that cannot cross, or data that is not what the type says."""


def encode(value: Any) -> Any:
    """``value`` as JSON-ready data (lists, dicts with string keys, scalars)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, enum.Enum):
        return encode(value.value)
    if isinstance(value, int | float):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, _ADDRESS_TYPES):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, tuple | list):
        return [encode(v) for v in value]
    if isinstance(value, set | frozenset):
        return [encode(v) for v in value]
    if isinstance(value, collections.abc.Mapping):
        return [[encode(k), encode(v)] for k, v in value.items()]
    raise WireError(f"cannot encode a {type(value).__name__}")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fail(tp: Any, data: Any) -> WireError:
    shown = repr(data)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return WireError(f"expected {getattr(tp, '__name__', tp)}, got {shown}")


def decode(tp: Any, data: Any) -> Any:
    """``data`` (from ``encode``) as a value of type ``tp``; ``WireError`` if it is not one."""
    if tp is Any or tp is object:
        return data
    if tp is None or tp is type(None):
        if data is not None:
            raise _fail(tp, data)
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if data is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return decode(option, data)
            except WireError:
                continue
        raise _fail(tp, data)
    if origin is typing.Literal:
        if data not in args:
            raise _fail(tp, data)
        return data
    if origin in (tuple,):
        if not isinstance(data, list):
            raise _fail(tp, data)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v) for v in data)
        if len(args) != len(data):
            raise _fail(tp, data)
        return tuple(decode(a, v) for a, v in zip(args, data, strict=True))
    if origin in (list, collections.abc.Sequence, collections.abc.Iterable):
        if not isinstance(data, list):
            raise _fail(tp, data)
        item = args[0] if args else Any
        out = [decode(item, v) for v in data]
        return tuple(out) if origin is not list else out
    if origin in (frozenset, set, collections.abc.Set):
        if not isinstance(data, list):
            raise _fail(tp, data)
        item = args[0] if args else Any
        values = (decode(item, v) for v in data)
        return set(values) if origin is set else frozenset(values)
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(data, list):
            raise _fail(tp, data)
        key, value = args if args else (Any, Any)
        pairs = {}
        for pair in data:
            if not isinstance(pair, list) or len(pair) != 2:
                raise _fail(tp, data)
            pairs[decode(key, pair[0])] = decode(value, pair[1])
        return pairs
    if not isinstance(tp, type):
        raise WireError(f"cannot decode into {tp!r}")
    if issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            raise _fail(tp, data) from None
    if tp is bool:
        if not isinstance(data, bool):
            raise _fail(tp, data)
        return data
    if tp is int:
        if not isinstance(data, int) or isinstance(data, bool):
            raise _fail(tp, data)
        return data
    if tp is float:
        if not isinstance(data, int | float) or isinstance(data, bool):
            raise _fail(tp, data)
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            raise _fail(tp, data)
        return data
    if tp is bytes:
        if not isinstance(data, str):
            raise _fail(tp, data)
        try:
            return bytes.fromhex(data)
        except ValueError:
            raise _fail(tp, data) from None
    if issubclass(tp, _ADDRESS_TYPES):
        if not isinstance(data, str):
            raise _fail(tp, data)
        try:
            return tp(data)
        except ValueError:
            raise _fail(tp, data) from None
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise _fail(tp, data)
        hints = _hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if not f.init:
                continue
            if f.name in data:
                kwargs[f.name] = decode(hints[f.name], data[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise WireError(f"{tp.__name__}: missing field {f.name!r}")
        unknown = set(data) - {f.name for f in dataclasses.fields(tp)}
        if unknown:
            raise WireError(f"{tp.__name__}: unknown fields {sorted(unknown)}")
        try:
            return tp(**kwargs)
        except (TypeError, ValueError) as exc:
            raise WireError(f"{tp.__name__}: {exc}") from None
    raise WireError(f"cannot decode into {tp.__name__}")
