"""Typed dataclasses as the one source of truth for the CRD schemas.

Each API object is a frozen dataclass whose fields carry their OpenAPI facts
(description, default, enum, bounds, list limits) through ``prop()``, and
whose class carries its cross-field rules through ``api_object()``.  From that
one description this module derives three things that must agree:

- ``openapi_schema(cls)``: the structural ``openAPIV3Schema`` written into
  ``crds/*.yaml``, including CEL ``x-kubernetes-validations``;
- ``decode(cls, raw)``: what the API server would do to an object -- apply
  schema defaults, check types/enums/bounds/required fields and the rules --
  followed by building the typed dataclass (so code never sees a raw dict);
- ``encode(obj)``: the reverse, camelCase JSON for status writes.

Every CEL rule has a Python twin (``Rule.check``) evaluated on the same
defaulted JSON the API server evaluates the CEL on, so a policy that a real
cluster rejects is also rejected by ``parse_policy`` (and by tests that only
have a file).  Unit tests evaluate both on the same cases.

Defaults follow API-server semantics on purpose: a scalar default is written
into the schema and applied when the field is absent; an object default
(``default: {}``) is written only where asked (``object_default=True``) so
``has(self.conntrack)`` in CEL means "the user wrote it".  Fields with no
schema default stay absent in the JSON and take their Python default in the
dataclass.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")

_MISSING: Any = dataclasses.MISSING


class SchemaError(ValueError):
    """An object does not satisfy its schema; ``path`` is the JSON field path."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


@dataclasses.dataclass(frozen=True, slots=True)
class Constraints:
    """OpenAPI value constraints; ``items`` constrains list items and map values."""

    enum: tuple[str, ...] | None = None
    minimum: int | None = None
    maximum: int | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    format: str | None = None
    min_items: int | None = None
    max_items: int | None = None
    max_properties: int | None = None
    list_type: Literal["atomic", "set", "map"] | None = None
    list_map_keys: tuple[str, ...] | None = None
    items: Constraints | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """A cross-field rule: CEL for the API server, ``check`` for Python.

    ``check`` receives the object's JSON mapping after defaulting (exactly
    what CEL's ``self`` is) and returns True when the object is valid.
    ``field_path`` (e.g. ``.conntrack``) points kubectl's error at a field.
    """

    cel: str
    message: str
    check: Callable[[Mapping[str, Any]], bool]
    field_path: str | None = None
    reason: Literal["FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired"] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class FieldInfo:
    description: str
    json_name: str | None
    required: bool
    object_default: bool
    emit_default: bool
    constraints: Constraints


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectInfo:
    description: str
    rules: tuple[Rule, ...]
    emit_defaults: bool


_OBJECTS: dict[type, ObjectInfo] = {}


def prop(
    description: str,
    *,
    default: Any = _MISSING,
    default_factory: Any = _MISSING,
    required: bool = False,
    json_name: str | None = None,
    object_default: bool = False,
    emit_default: bool = True,
    **constraints: Any,
) -> Any:
    """A dataclass field with its API facts (see ``Constraints`` for keywords).

    ``required`` fields have no Python default (use ``kw_only`` dataclasses).
    """
    info = FieldInfo(
        description=description,
        json_name=json_name,
        required=required,
        object_default=object_default,
        emit_default=emit_default,
        constraints=Constraints(**constraints),
    )
    metadata = {"api": info}
    if default is not _MISSING:
        return dataclasses.field(default=default, metadata=metadata)
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(metadata=metadata)


def api_object(
    description: str, *, rules: tuple[Rule, ...] = (), emit_defaults: bool = True
) -> Callable[[type[T]], type[T]]:
    """Register a dataclass as an API object with its description and rules.

    ``emit_defaults=False`` (used for status types) keeps defaults out of the
    schema: status is written whole by its controller, never defaulted.
    """

    def register(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        _OBJECTS[cls] = ObjectInfo(description, rules, emit_defaults)
        return cls

    return register


def object_info(cls: type) -> ObjectInfo:
    return _OBJECTS[cls]


def json_name(field: dataclasses.Field[Any]) -> str:
    info = _field_info(field)
    if info.json_name:
        return info.json_name
    head, *rest = field.name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _field_info(field: dataclasses.Field[Any]) -> FieldInfo:
    try:
        info = field.metadata["api"]
    except KeyError:
        raise TypeError(f"field {field.name!r} is not declared with prop()") from None
    assert isinstance(info, FieldInfo)
    return info


def _fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _python_default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not _MISSING:
        return field.default
    factory: Callable[[], Any] | Any = field.default_factory
    if factory is not _MISSING:
        return factory()
    return _MISSING


def _schema_default(cls: type, field: dataclasses.Field[Any], tp: Any) -> Any:
    """The value the API server fills in when the field is absent, or _MISSING."""
    info = _field_info(field)
    if not (_OBJECTS[cls].emit_defaults and info.emit_default):
        return _MISSING
    tp = _unwrap_optional(tp)
    if dataclasses.is_dataclass(tp):
        return {} if info.object_default else _MISSING
    default = _python_default(field)
    if isinstance(default, bool | int | str) and default is not None:
        return default
    return _MISSING


# --------------------------------------------------------------------------- schema


def openapi_schema(cls: type) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of an ``api_object`` dataclass."""
    obj = _OBJECTS[cls]
    properties: dict[str, Any] = {}
    required: list[str] = []
    for field, tp in _fields(cls):
        info = _field_info(field)
        name = json_name(field)
        node = _type_schema(tp, info.constraints)
        node = {"description": info.description, **node}
        default = _schema_default(cls, field, tp)
        if default is not _MISSING:
            node["default"] = default
        properties[name] = node
        if info.required:
            required.append(name)
    schema: dict[str, Any] = {"type": "object", "description": obj.description}
    schema["properties"] = properties
    if required:
        schema["required"] = required
    if obj.rules:
        schema["x-kubernetes-validations"] = [_rule_schema(r) for r in obj.rules]
    return schema


def _rule_schema(rule: Rule) -> dict[str, Any]:
    out: dict[str, Any] = {"rule": rule.cel, "message": rule.message}
    if rule.field_path:
        out["fieldPath"] = rule.field_path
    if rule.reason:
        out["reason"] = rule.reason
    return out


def _type_schema(tp: Any, c: Constraints) -> dict[str, Any]:
    tp = _unwrap_optional(tp)
    origin = get_origin(tp)
    node: dict[str, Any]
    if dataclasses.is_dataclass(tp):
        assert isinstance(tp, type)
        inner = openapi_schema(tp)
        inner.pop("description", None)  # the field's description says it in context
        node = inner
    elif origin is Literal:
        node = {"type": "string", "enum": [str(a) for a in get_args(tp)]}
    elif origin is tuple:
        item_tp = get_args(tp)[0]
        node = {"type": "array", "items": _type_schema(item_tp, c.items or Constraints())}
    elif origin in (Mapping, dict):
        value_tp = get_args(tp)[1]
        node = {
            "type": "object",
            "additionalProperties": _type_schema(value_tp, c.items or Constraints()),
        }
    elif tp is bool:
        node = {"type": "boolean"}
    elif tp is int:
        node = {"type": "integer"}
    elif tp is float:
        node = {"type": "number"}
    elif tp is str:
        node = {"type": "string"}
    else:
        raise TypeError(f"no schema for type {tp!r}")
    for attr, key in _CONSTRAINT_KEYS:
        value = getattr(c, attr)
        if value is not None:
            node[key] = list(value) if isinstance(value, tuple) else value
    return node


_CONSTRAINT_KEYS = (
    ("enum", "enum"),
    ("minimum", "minimum"),
    ("maximum", "maximum"),
    ("min_length", "minLength"),
    ("max_length", "maxLength"),
    ("pattern", "pattern"),
    ("format", "format"),
    ("min_items", "minItems"),
    ("max_items", "maxItems"),
    ("max_properties", "maxProperties"),
    ("list_type", "x-kubernetes-list-type"),
    ("list_map_keys", "x-kubernetes-list-map-keys"),
)


# --------------------------------------------------------------------------- decode


def decode(cls: type[T], raw: Any, path: str = "", *, strict: bool = False) -> T:
    """Default, validate and build ``cls`` from JSON, as the API server would.

    Raises ``SchemaError`` naming the first offending field path.  Unknown
    fields are ignored (the API server prunes them) unless ``strict``.
    """
    value, _ = _decode_object(cls, raw, path, strict)
    return typing.cast(T, value)


def _decode_object(cls: type, raw: Any, path: str, strict: bool) -> tuple[Any, dict[str, Any]]:
    if not isinstance(raw, Mapping):
        raise SchemaError(path, f"must be an object, got {_kind(raw)}")
    known = {json_name(f) for f, _ in _fields(cls)}
    if strict:
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SchemaError(_join(path, unknown[0]), "unknown field")
    normalised: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    for field, tp in _fields(cls):
        info = _field_info(field)
        name = json_name(field)
        fpath = _join(path, name)
        if name not in raw or raw[name] is None:
            default = _schema_default(cls, field, tp)
            if default is _MISSING:
                if info.required:
                    raise SchemaError(fpath, "required value")
                continue  # absent; the dataclass default applies
            raw_value = default
        else:
            raw_value = raw[name]
        kwargs[field.name], normalised[name] = _decode_value(
            tp, info.constraints, raw_value, fpath, strict
        )
    for rule in _OBJECTS[cls].rules:
        if not rule.check(normalised):
            where = _join(path, rule.field_path.lstrip(".")) if rule.field_path else path
            raise SchemaError(where, rule.message)
    return cls(**kwargs), normalised


def _decode_value(tp: Any, c: Constraints, raw: Any, path: str, strict: bool) -> tuple[Any, Any]:
    tp = _unwrap_optional(tp)
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        assert isinstance(tp, type)
        return _decode_object(tp, raw, path, strict)
    if origin is Literal:
        allowed = [str(a) for a in get_args(tp)]
        if raw not in allowed:
            raise SchemaError(path, f"unsupported value {raw!r}: must be one of {allowed}")
        return raw, raw
    if origin is tuple:
        if not isinstance(raw, list | tuple):
            raise SchemaError(path, f"must be a list, got {_kind(raw)}")
        _check_list(c, raw, path)
        item_tp = get_args(tp)[0]
        pairs = [
            _decode_value(item_tp, c.items or Constraints(), item, f"{path}[{i}]", strict)
            for i, item in enumerate(raw)
        ]
        return tuple(p[0] for p in pairs), [p[1] for p in pairs]
    if origin in (Mapping, dict):
        if not isinstance(raw, Mapping):
            raise SchemaError(path, f"must be an object, got {_kind(raw)}")
        if c.max_properties is not None and len(raw) > c.max_properties:
            raise SchemaError(path, f"must have at most {c.max_properties} entries")
        value_tp = get_args(tp)[1]
        out = {}
        for key, item in raw.items():
            if not isinstance(key, str):
                raise SchemaError(path, f"keys must be strings, got {_kind(key)}")
            out[key] = _decode_value(
                value_tp, c.items or Constraints(), item, _join(path, key), strict
            )[0]
        return out, dict(out)
    if tp is bool:
        if not isinstance(raw, bool):
            raise SchemaError(path, f"must be a boolean, got {_kind(raw)}")
        return raw, raw
    if tp is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise SchemaError(path, f"must be an integer, got {_kind(raw)}")
        _check_number(c, raw, path)
        return raw, raw
    if tp is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise SchemaError(path, f"must be a number, got {_kind(raw)}")
        _check_number(c, raw, path)
        return float(raw), raw
    if tp is str:
        if isinstance(raw, dt.datetime) and c.format == "date-time":
            raw = format_time(raw)  # YAML loaders turn unquoted timestamps into datetimes
        if not isinstance(raw, str):
            raise SchemaError(path, f"must be a string, got {_kind(raw)}")
        _check_string(c, raw, path)
        return raw, raw
    raise TypeError(f"no decoder for type {tp!r}")


def _check_number(c: Constraints, value: float, path: str) -> None:
    if c.minimum is not None and value < c.minimum:
        raise SchemaError(path, f"must be at least {c.minimum} (got {value})")
    if c.maximum is not None and value > c.maximum:
        raise SchemaError(path, f"must be at most {c.maximum} (got {value})")


def _check_string(c: Constraints, value: str, path: str) -> None:
    if c.enum is not None and value not in c.enum:
        raise SchemaError(path, f"unsupported value {value!r}: must be one of {list(c.enum)}")
    if c.min_length is not None and len(value) < c.min_length:
        raise SchemaError(path, f"must be at least {c.min_length} characters")
    if c.max_length is not None and len(value) > c.max_length:
        raise SchemaError(path, f"must be at most {c.max_length} characters")
    if c.pattern is not None and not re.search(c.pattern, value):
        raise SchemaError(path, f"{value!r} does not match {c.pattern}")
    if c.format == "date-time":
        try:
            parse_time(value)
        except ValueError:
            raise SchemaError(path, f"{value!r} is not an RFC 3339 date-time") from None


def _check_list(c: Constraints, value: list[Any] | tuple[Any, ...], path: str) -> None:
    if c.min_items is not None and len(value) < c.min_items:
        raise SchemaError(path, f"must have at least {c.min_items} items")
    if c.max_items is not None and len(value) > c.max_items:
        raise SchemaError(path, f"must have at most {c.max_items} items")
    if c.list_type == "set":
        seen: list[Any] = []
        for i, item in enumerate(value):
            if item in seen:
                raise SchemaError(f"{path}[{i}]", f"duplicate value {item!r}")
            seen.append(item)
    if c.list_type == "map" and c.list_map_keys:
        keys: set[tuple[Any, ...]] = set()
        for i, item in enumerate(value):
            if isinstance(item, Mapping):
                key = tuple(item.get(k) for k in c.list_map_keys)
                if key in keys:
                    raise SchemaError(f"{path}[{i}]", f"duplicate entry {key!r}")
                keys.add(key)


def _kind(value: Any) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# --------------------------------------------------------------------------- encode


def encode(obj: Any) -> Any:
    """camelCase JSON for an ``api_object`` (None fields omitted)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if value is None:
                continue
            out[json_name(field)] = encode(value)
        return out
    if isinstance(obj, tuple | list):
        return [encode(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: encode(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------- time


def format_time(when: dt.datetime) -> str:
    """RFC 3339 in UTC with a Z and whole seconds, as Kubernetes writes times."""
    if when.tzinfo is None:
        raise ValueError("naive datetime: pass an aware one (UTC)")
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> dt.datetime:
    """Inverse of ``format_time`` (accepts fractions and offsets too)."""
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return value.astimezone(dt.UTC)
