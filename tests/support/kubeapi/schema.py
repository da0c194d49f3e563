"""Structural-schema handling of custom resources: prune, default, validate.

The order and the wording follow the API server (apiextensions-apiserver):

1. **prune** fields the schema does not declare (unless
   ``x-kubernetes-preserve-unknown-fields``) and ``null`` values of non-nullable
   fields; the pruned paths become ``unknown field "spec.x"`` warnings, or a 400 under
   ``fieldValidation=Strict`` (what ``kubectl apply`` sends);
2. **default** absent properties from ``default`` (recursively, also inside defaults);
3. **validate** against the OpenAPI keywords (type, enum, required, bounds, lengths,
   pattern, items, list types) and the ``x-kubernetes-validations`` CEL rules;
   transition rules (those reading ``oldSelf``) run only where an old value exists.

Not modelled: validation ratcheting (unchanged invalid fields pass on update in
v1.30+), ``format`` checks, CEL cost limits.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import cel_rules, errors
from .errors import FieldError

# ObjectMeta's fields: anything else under metadata is dropped, as the server's decoder does.
OBJECT_META_FIELDS = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    }
)
EMBEDDED_KEYS = ("apiVersion", "kind", "metadata")


class _NoOld:
    """No old value at this path (a create, or a new list item): transition rules skip."""

    def __repr__(self) -> str:
        return "NO_OLD"


NO_OLD: Any = _NoOld()


@dataclass
class Outcome:
    obj: dict[str, Any]
    unknown_fields: list[str] = field(default_factory=list)
    errors: list[FieldError] = field(default_factory=list)


class StructuralSchema:
    """One version's ``openAPIV3Schema`` with its CEL rules compiled up front."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = dict(root)
        self._rules: dict[int, list[cel_rules.Rule]] = {}
        for node in _walk_nodes(self.root):
            specs = node.get("x-kubernetes-validations") or []
            if specs:
                self._rules[id(node)] = [cel_rules.compile_rule(s) for s in specs]

    # -- 1. pruning
    def prune(self, obj: Mapping[str, Any]) -> Outcome:
        unknown: list[str] = []
        pruned = _prune_object(obj, self.root, "", unknown, root=True)
        return Outcome(pruned, unknown)

    # -- 2. defaulting
    def default(self, obj: dict[str, Any]) -> dict[str, Any]:
        result = copy.deepcopy(obj)
        _default(result, self.root)
        return result

    # -- 3. validation
    def validate(self, obj: Mapping[str, Any], old: Mapping[str, Any] | None) -> list[FieldError]:
        errs: list[FieldError] = []
        for key, sub in (self.root.get("properties") or {}).items():
            if key in EMBEDDED_KEYS:
                continue  # the server validates metadata itself; apiVersion/kind are routing
            if key in obj:
                self._validate(obj[key], sub, key, errs, old[key] if old and key in old else NO_OLD)
        for key in self.root.get("required") or []:
            if key not in obj and key not in EMBEDDED_KEYS:
                errs.append(errors.required(key))
        self._run_rules(dict(obj), self.root, "", errs, NO_OLD if old is None else old)
        return errs

    def _validate(
        self,
        value: Any,
        node: Mapping[str, Any],
        path: str,
        errs: list[FieldError],
        old: Any = NO_OLD,
    ) -> None:
        if value is None:
            if not node.get("nullable"):
                errs.append(_type_error(path, value, node.get("type") or "object"))
            return
        if not _check_type(value, node, path, errs):
            return
        if "enum" in node and value not in node["enum"]:
            errs.append(errors.not_supported(path, value, node["enum"]))
        if isinstance(value, str):
            _check_string(value, node, path, errs)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            _check_number(value, node, path, errs)
        elif isinstance(value, list):
            self._check_array(value, node, path, errs, old)
        elif isinstance(value, dict):
            self._check_object(value, node, path, errs, old)
        for combinator in ("allOf", "anyOf", "oneOf"):
            self._check_combinator(combinator, value, node, path, errs)
        if isinstance(node.get("not"), Mapping):
            sub_errs: list[FieldError] = []
            self._validate(value, node["not"], path, sub_errs)
            if not sub_errs:
                errs.append(
                    errors.invalid(path, value, f"{path} in body must not match the schema")
                )
        self._run_rules(value, node, path, errs, old)

    def _check_array(
        self,
        value: list[Any],
        node: Mapping[str, Any],
        path: str,
        errs: list[FieldError],
        old: Any = NO_OLD,
    ) -> None:
        if "minItems" in node and len(value) < node["minItems"]:
            errs.append(
                errors.invalid(
                    path,
                    len(value),
                    f"{path} in body should have at least {node['minItems']} items",
                )
            )
        if "maxItems" in node and len(value) > node["maxItems"]:
            errs.append(errors.too_many(path, len(value), node["maxItems"]))
        list_type = node.get("x-kubernetes-list-type")
        keys = node.get("x-kubernetes-list-map-keys") or []
        if node.get("uniqueItems") or list_type == "set":
            seen: list[Any] = []
            for i, item in enumerate(value):
                if item in seen:
                    errs.append(errors.duplicate(f"{path}[{i}]", item))
                seen.append(item)
        old_by_key: dict[tuple[Any, ...], Any] = {}
        if list_type == "map" and keys:
            seen_keys: set[tuple[Any, ...]] = set()
            for i, item in enumerate(value):
                k = tuple(item.get(x) for x in keys) if isinstance(item, dict) else (item,)
                if k in seen_keys:
                    errs.append(errors.duplicate(f"{path}[{i}]", {x: item.get(x) for x in keys}))
                seen_keys.add(k)
            if isinstance(old, list):
                old_by_key = {tuple(o.get(x) for x in keys): o for o in old if isinstance(o, dict)}
        items = node.get("items")
        if isinstance(items, Mapping):
            for i, item in enumerate(value):
                item_key = (
                    tuple(item.get(x) for x in keys)
                    if list_type == "map" and isinstance(item, dict)
                    else None
                )
                item_old = old_by_key.get(item_key, NO_OLD) if item_key is not None else NO_OLD
                self._validate(item, items, f"{path}[{i}]", errs, item_old)

    def _check_object(
        self,
        value: dict[str, Any],
        node: Mapping[str, Any],
        path: str,
        errs: list[FieldError],
        old: Any = NO_OLD,
    ) -> None:
        props: Mapping[str, Any] = node.get("properties") or {}
        for key in node.get("required") or []:
            if key not in value:
                errs.append(errors.required(_join(path, key)))
        if "minProperties" in node and len(value) < node["minProperties"]:
            errs.append(
                errors.invalid(
                    path,
                    len(value),
                    f"{path} in body should have at least {node['minProperties']} properties",
                )
            )
        if "maxProperties" in node and len(value) > node["maxProperties"]:
            errs.append(errors.too_many(path, len(value), node["maxProperties"]))
        additional = node.get("additionalProperties")
        old_map = old if isinstance(old, dict) else {}
        for key, item in value.items():
            sub = (
                props.get(key)
                if key in props
                else additional
                if isinstance(additional, Mapping)
                else None
            )
            if sub is None:
                continue
            child = _join(path, key) if key in props else f"{path}[{key}]"
            self._validate(item, sub, child, errs, old_map.get(key, NO_OLD))

    def _check_combinator(
        self, name: str, value: Any, node: Mapping[str, Any], path: str, errs: list[FieldError]
    ) -> None:
        subs = node.get(name)
        if not isinstance(subs, list):
            return
        results = []
        for sub in subs:
            sub_errs: list[FieldError] = []
            self._validate(value, sub, path, sub_errs)
            results.append(sub_errs)
        passed = sum(1 for r in results if not r)
        if name == "allOf":
            for r in results:
                errs.extend(r)
        elif name == "anyOf" and passed == 0:
            errs.append(
                errors.invalid(path, value, f'"{path}" must validate at least one schema (anyOf)')
            )
        elif name == "oneOf" and passed != 1:
            errs.append(
                errors.invalid(
                    path, value, f'"{path}" must validate one and only one schema (oneOf)'
                )
            )

    def _run_rules(
        self,
        value: Any,
        node: Mapping[str, Any],
        path: str,
        errs: list[FieldError],
        old: Any = NO_OLD,
    ) -> None:
        rules = self._rules.get(id(node))
        if not rules:
            return
        cel_self = to_cel(value, node)
        has_old = old is not NO_OLD
        cel_old = to_cel(old, node) if has_old else None
        for rule in rules:
            if rule.is_transition and not has_old and not rule.optional_old_self:
                continue
            verdict = cel_rules.evaluate(rule, cel_self, cel_old, has_old=has_old)
            if verdict.ok:
                continue
            where = path + rule.field_path if rule.field_path else path
            where = where.lstrip(".")
            if rule.reason == "FieldValueForbidden":
                errs.append(errors.forbidden(where, verdict.message))
            elif rule.reason == "FieldValueRequired":
                errs.append(errors.required(where, verdict.message))
            elif rule.reason == "FieldValueDuplicate":
                errs.append(errors.duplicate(where, verdict.message))
            else:
                errs.append(errors.invalid(where, node.get("type") or "object", verdict.message))


def to_cel(value: Any, node: Mapping[str, Any] | None) -> Any:
    """JSON -> CEL values: a ``type: number`` field holds a double even when written ``3``."""
    if node is None:
        return value
    if isinstance(value, dict):
        props = node.get("properties") or {}
        extra = node.get("additionalProperties")
        return {
            k: to_cel(v, props.get(k) or (extra if isinstance(extra, Mapping) else None))
            for k, v in value.items()
        }
    if isinstance(value, list):
        items = node.get("items")
        return [to_cel(v, items if isinstance(items, Mapping) else None) for v in value]
    if node.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# -------------------------------------------------------------------- helpers


def _walk_nodes(node: Any) -> Iterator[dict[str, Any]]:
    if not isinstance(node, dict):
        return
    yield node
    for key in ("properties", "patternProperties"):
        for sub in (node.get(key) or {}).values():
            yield from _walk_nodes(sub)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            yield from _walk_nodes(node[key])
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in node.get(key) or []:
            yield from _walk_nodes(sub)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _prune_object(
    value: Any, node: Mapping[str, Any] | None, path: str, unknown: list[str], *, root: bool = False
) -> Any:
    if node is None:
        return value
    if isinstance(value, dict):
        props: Mapping[str, Any] = node.get("properties") or {}
        additional = node.get("additionalProperties")
        keep_unknown = (
            node.get("x-kubernetes-preserve-unknown-fields") is True or additional is True
        )
        embedded = root or node.get("x-kubernetes-embedded-resource") is True
        out: dict[str, Any] = {}
        for key, item in value.items():
            child = _join(path, key)
            if embedded and key in EMBEDDED_KEYS:
                out[key] = _prune_meta(item, child, unknown) if key == "metadata" else item
                continue
            sub = (
                props.get(key)
                if key in props
                else additional
                if isinstance(additional, Mapping)
                else None
            )
            if item is None and sub is not None and not sub.get("nullable"):
                continue  # nulls of non-nullable fields go before defaulting
            if sub is not None:
                out[key] = _prune_object(item, sub, child, unknown)
            elif keep_unknown:
                out[key] = item
            else:
                unknown.append(child)
        return out
    if isinstance(value, list):
        items = node.get("items")
        sub_node = items if isinstance(items, Mapping) else None
        return [_prune_object(v, sub_node, f"{path}[{i}]", unknown) for i, v in enumerate(value)]
    return value


def _prune_meta(meta: Any, path: str, unknown: list[str]) -> Any:
    if not isinstance(meta, dict):
        return meta
    for key in meta:
        if key not in OBJECT_META_FIELDS:
            unknown.append(_join(path, key))
    return {k: v for k, v in meta.items() if k in OBJECT_META_FIELDS}


def _default(value: Any, node: Mapping[str, Any]) -> None:
    if isinstance(value, dict):
        props: Mapping[str, Any] = node.get("properties") or {}
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _default(value[key], sub)
        additional = node.get("additionalProperties")
        if isinstance(additional, Mapping):
            for key, item in value.items():
                if key not in props:
                    _default(item, additional)
    elif isinstance(value, list) and isinstance(node.get("items"), Mapping):
        for item in value:
            _default(item, node["items"])


_JSON_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
}


def _json_type(value: Any) -> str:
    for name in ("boolean", "integer", "number", "string", "array", "object"):
        if _JSON_TYPES[name](value):
            return name
    return "null"


def _type_error(path: str, value: Any, want: str) -> FieldError:
    have = _json_type(value)
    return errors.invalid(path, have, f'{path} in body must be of type {want}: "{have}"')


def _check_type(value: Any, node: Mapping[str, Any], path: str, errs: list[FieldError]) -> bool:
    if node.get("x-kubernetes-int-or-string"):
        if isinstance(value, str) or _JSON_TYPES["integer"](value):
            return True
        errs.append(_type_error(path, value, "integer-or-string"))
        return False
    want = node.get("type")
    if not want or _JSON_TYPES.get(want, lambda v: True)(value):
        return True
    errs.append(_type_error(path, value, want))
    return False


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _check_string(value: str, node: Mapping[str, Any], path: str, errs: list[FieldError]) -> None:
    if "minLength" in node and len(value) < node["minLength"]:
        errs.append(
            errors.invalid(
                path, value, f"{path} in body should be at least {node['minLength']} chars long"
            )
        )
    if "maxLength" in node and len(value) > node["maxLength"]:
        errs.append(errors.too_long(path, node["maxLength"]))
    if "pattern" in node and not re.search(node["pattern"], value):
        errs.append(errors.invalid(path, value, f"{path} in body should match '{node['pattern']}'"))


def _check_number(value: float, node: Mapping[str, Any], path: str, errs: list[FieldError]) -> None:
    if "minimum" in node:
        low = node["minimum"]
        if node.get("exclusiveMinimum") and value <= low:
            errs.append(
                errors.invalid(path, value, f"{path} in body should be greater than {_num(low)}")
            )
        elif value < low:
            errs.append(
                errors.invalid(
                    path, value, f"{path} in body should be greater than or equal to {_num(low)}"
                )
            )
    if "maximum" in node:
        high = node["maximum"]
        if node.get("exclusiveMaximum") and value >= high:
            errs.append(
                errors.invalid(path, value, f"{path} in body should be less than {_num(high)}")
            )
        elif value > high:
            errs.append(
                errors.invalid(
                    path, value, f"{path} in body should be less than or equal to {_num(high)}"
                )
            )
    step = node.get("multipleOf")
    if step and not math.isclose(value / step, round(value / step)):
        errs.append(
            errors.invalid(path, value, f"{path} in body should be a multiple of {_num(step)}")
        )
