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
from collections.abc import Callable
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


_NOT_AN_ADDRESS = object()
_ADDRESS_MEMO_SIZE = 65536


class WireError(ValueError):
    """A value that cannot cross, or data that is not what the type says."""


Codec = Callable[[Any], Any]


def encode(value: Any) -> Any:
    """``value`` as JSON-ready data (lists, dicts with string keys, scalars)."""
    kind = type(value)
    encoder = _ENCODERS.get(kind)
    if encoder is None:
        encoder = _ENCODERS[kind] = _encoder_for(kind)
    return encoder(value)


def _same(value: Any) -> Any:
    return value


def _encoder_for(kind: type) -> Codec:
    if kind in (type(None), bool, str, int, float):
        return _same
    if issubclass(kind, enum.Enum):
        return lambda v: encode(v.value)
    if issubclass(kind, bool | str | int | float):  # subclasses of scalars
        return _same
    if issubclass(kind, bytes):
        return bytes.hex
    if issubclass(kind, _ADDRESS_TYPES):
        return str
    if dataclasses.is_dataclass(kind):
        names = tuple(f.name for f in dataclasses.fields(kind) if f.init)
        return lambda v: {n: encode(getattr(v, n)) for n in names}
    if issubclass(kind, tuple | list | set | frozenset):
        return lambda v: [encode(x) for x in v]
    if issubclass(kind, collections.abc.Mapping):
        return lambda v: [[encode(k), encode(x)] for k, x in v.items()]

    def refuse(value: Any) -> Any:
        raise WireError(f"cannot encode a {type(value).__name__}")

    return refuse


_ENCODERS: dict[type, Codec] = {}


def _fail(tp: Any, data: Any) -> WireError:
    shown = repr(data)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return WireError(f"expected {getattr(tp, '__name__', tp)}, got {shown}")


def decode(tp: Any, data: Any) -> Any:
    """``data`` (from ``encode``) as a value of type ``tp``; ``WireError`` if it is not one."""
    return _decoder(tp)(data)


@cache
def _decoder(tp: Any) -> Codec:
    """A decoding function for ``tp``, built once per type (the hot path is its calls)."""
    if tp is Any or tp is object:
        return _same
    if tp is None or tp is type(None):

        def none(data: Any) -> Any:
            if data is not None:
                raise _fail(tp, data)
            return None

        return none
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        nullable = type(None) in args
        options = [_decoder(a) for a in args if a is not type(None)]

        def union(data: Any) -> Any:
            if data is None and nullable:
                return None
            for option in options:
                try:
                    return option(data)
                except WireError:
                    continue
            raise _fail(tp, data)

        return union
    if origin is typing.Literal:
        allowed = args

        def literal(data: Any) -> Any:
            if data not in allowed:
                raise _fail(tp, data)
            return data

        return literal
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = _decoder(args[0])

            def variadic(data: Any) -> Any:
                if type(data) is not list:
                    raise _fail(tp, data)
                return tuple([item(v) for v in data])

            return variadic
        items = [_decoder(a) for a in args]

        def fixed(data: Any) -> Any:
            if type(data) is not list or len(data) != len(items):
                raise _fail(tp, data)
            return tuple([d(v) for d, v in zip(items, data, strict=True)])

        return fixed
    if origin in (list, collections.abc.Sequence, collections.abc.Iterable):
        item = _decoder(args[0]) if args else _same
        as_list = origin is list

        def sequence(data: Any) -> Any:
            if type(data) is not list:
                raise _fail(tp, data)
            out = [item(v) for v in data]
            return out if as_list else tuple(out)

        return sequence
    if origin in (frozenset, set, collections.abc.Set):
        item = _decoder(args[0]) if args else _same
        build: Callable[[Any], Any] = set if origin is set else frozenset

        def aset(data: Any) -> Any:
            if type(data) is not list:
                raise _fail(tp, data)
            return build(item(v) for v in data)

        return aset
    if origin in (dict, collections.abc.Mapping):
        key, value = (_decoder(args[0]), _decoder(args[1])) if args else (_same, _same)

        def mapping(data: Any) -> Any:
            if type(data) is not list:
                raise _fail(tp, data)
            out = {}
            for pair in data:
                if type(pair) is not list or len(pair) != 2:
                    raise _fail(tp, data)
                out[key(pair[0])] = value(pair[1])
            return out

        return mapping
    if not isinstance(tp, type):
        raise WireError(f"cannot decode into {tp!r}")
    if issubclass(tp, enum.Enum):

        def member(data: Any) -> Any:
            try:
                return tp(data)
            except ValueError:
                raise _fail(tp, data) from None

        return member
    if tp in (bool, str):

        def exact(data: Any) -> Any:
            if type(data) is not tp:
                raise _fail(tp, data)
            return data

        return exact
    if tp is int:

        def integer(data: Any) -> Any:
            if type(data) is not int:
                raise _fail(tp, data)
            return data

        return integer
    if tp is float:

        def number(data: Any) -> Any:
            if type(data) is float:
                return data
            if type(data) is not int:
                raise _fail(tp, data)
            return float(data)

        return number
    if tp is bytes:

        def blob(data: Any) -> Any:
            if type(data) is not str:
                raise _fail(tp, data)
            try:
                return bytes.fromhex(data)
            except ValueError:
                raise _fail(tp, data) from None

        return blob
    if issubclass(tp, _ADDRESS_TYPES):
        # A scan names the same few addresses thousands of times, and parsing
        # one costs more than the rest of its socket: parse each text once
        # (the objects are immutable; failures are remembered too).
        memo: dict[str, Any] = {}

        def address(data: Any) -> Any:
            found = memo.get(data) if type(data) is str else None
            if found is None:
                if type(data) is not str:
                    raise _fail(tp, data)
                try:
                    found = tp(data)
                except ValueError:
                    found = _NOT_AN_ADDRESS
                if len(memo) >= _ADDRESS_MEMO_SIZE:
                    memo.clear()
                memo[data] = found
            if found is _NOT_AN_ADDRESS:
                raise _fail(tp, data)
            return found

        return address
    if dataclasses.is_dataclass(tp):
        return _dataclass_decoder(tp)
    raise WireError(f"cannot decode into {tp.__name__}")


def _dataclass_decoder(cls: type) -> Codec:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    known = frozenset(f.name for f in fields)
    required = frozenset(
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    # Field decoders are looked up lazily: a dataclass may refer to itself.
    decoders: dict[str, Codec] = {}

    def instance(data: Any) -> Any:
        if type(data) is not dict:
            raise _fail(cls, data)
        keys = data.keys()
        if not keys <= known:
            raise WireError(f"{cls.__name__}: unknown fields {sorted(keys - known)}")
        if not required <= keys:
            raise WireError(f"{cls.__name__}: missing fields {sorted(required - keys)}")
        kwargs = {}
        for name, value in data.items():
            decoder = decoders.get(name)
            if decoder is None:
                decoder = decoders[name] = _decoder(hints[name])
            kwargs[name] = decoder(value)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise WireError(f"{cls.__name__}: {exc}") from None

    return instance
