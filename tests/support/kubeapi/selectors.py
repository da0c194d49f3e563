"""Label and field selectors, parsed and matched the way the API server does.

Label selectors follow k8s.io/apimachinery ``labels.Parse``: ``k``, ``!k``, ``k=v``,
``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k>1``, ``k<1``; ``!=`` and
``notin`` also match objects without the label.  Field selectors follow
``fields.ParseSelector``: ``f=v``, ``f==v``, ``f!=v`` with ``\\,`` ``\\=`` escapes, and
only the field labels a resource declares selectable are accepted (the server says
``field label not supported: x`` for the rest).  A missing field reads as ``""``, so
``spec.nodeName=`` selects unscheduled pods, exactly as in a real cluster.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import APIError, bad_request

# A qualified label key: optional DNS subdomain prefix, then a 63-char name.
_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_NAME}$")
_VALUE = re.compile(rf"^({_NAME})?$")


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    op: str  # exists, !, =, !=, in, notin, gt, lt
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        match self.op:
            case "exists":
                return present
            case "!":
                return not present
            case "=" | "in":
                return present and value in self.values
            case "!=" | "notin":
                return not present or value not in self.values
            case "gt" | "lt":
                try:
                    have, want = int(value or ""), int(self.values[0])
                except ValueError:
                    return False
                return have > want if self.op == "gt" else have < want
        raise AssertionError(self.op)  # pragma: no cover - parse() admits no other op


@dataclass(frozen=True)
class LabelSelector:
    requirements: tuple[LabelRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        return all(r.matches(labels or {}) for r in self.requirements)


def parse_label_selector(text: str) -> LabelSelector:
    reqs = [_parse_label_requirement(part.strip()) for part in _split_top_level(text)]
    return LabelSelector(tuple(r for r in reqs if r is not None))


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside ``( )``: ``a in (x,y),b`` is two requirements."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


_SET_RE = re.compile(r"^(?P<key>\S+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_CMP_RE = re.compile(r"^(?P<key>[^=!<>\s]+)\s*(?P<op>==|=|!=|>|<)\s*(?P<value>[^=!<>\s]*)$")


def _parse_label_requirement(text: str) -> LabelRequirement | None:
    if not text:
        return None
    if text.startswith("!"):
        return LabelRequirement(_key(text[1:].strip(), text), "!")
    if m := _SET_RE.match(text):
        values = tuple(v.strip() for v in m["values"].split(",") if v.strip())
        for v in values:
            _value(v, text)
        return LabelRequirement(_key(m["key"], text), m["op"], values)
    if m := _CMP_RE.match(text):
        op = {"==": "=", ">": "gt", "<": "lt"}.get(m["op"], m["op"])
        if op in ("gt", "lt") and not re.fullmatch(r"-?\d+", m["value"]):
            raise _unparsable(text, "for 'Gt', 'Lt' operators, the value must be an integer")
        return LabelRequirement(_key(m["key"], text), op, (_value(m["value"], text),))
    if " " not in text and not any(c in text for c in "=!<>()"):
        return LabelRequirement(_key(text, text), "exists")
    raise _unparsable(text, "found unexpected token")


def _key(key: str, text: str) -> str:
    if not _KEY.match(key):
        raise _unparsable(
            text, f'key: Invalid value: "{key}": name part must consist of alphanumeric characters'
        )
    return key


def _value(value: str, text: str) -> str:
    if not _VALUE.match(value):
        raise _unparsable(
            text,
            f'values[0][{value}]: Invalid value: "{value}": a valid label must be '
            "an empty string or consist of alphanumeric characters",
        )
    return value


def _unparsable(text: str, why: str) -> APIError:
    return bad_request(f"unable to parse requirement: {why} (in {text!r})")


# ---------------------------------------------------------------- field selectors

FieldGetter = Callable[[Mapping[str, Any]], Any]


@dataclass(frozen=True)
class FieldRequirement:
    label: str
    op: str  # = or !=
    value: str


@dataclass(frozen=True)
class FieldSelector:
    requirements: tuple[FieldRequirement, ...] = ()

    def matches(self, obj: Mapping[str, Any], fields: Mapping[str, FieldGetter]) -> bool:
        for req in self.requirements:
            have = field_text(fields[req.label](obj))
            if (have == req.value) != (req.op == "="):
                return False
        return True


def parse_field_selector(text: str, supported: Mapping[str, FieldGetter]) -> FieldSelector:
    reqs: list[FieldRequirement] = []
    for part in _split_unescaped(text, ","):
        if not part:
            continue
        m = re.match(r"^(?P<label>[^=!]+?)\s*(?P<op>!=|==|=)(?P<value>.*)$", part, re.S)
        if not m:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
        label = m["label"].strip()
        if label not in supported:
            raise bad_request(f"field label not supported: {label}")
        op = "=" if m["op"] in ("=", "==") else "!="
        reqs.append(FieldRequirement(label, op, _unescape(m["value"])))
    return FieldSelector(tuple(reqs))


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, cur, escaped = [], "", False
    for ch in text:
        if escaped:
            cur += "\\" + ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == sep:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def field_text(value: Any) -> str:
    """How the server renders a selectable field: missing is "", booleans are true/false."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def path_getter(path: str) -> FieldGetter:
    """A getter for a dotted path such as ``spec.nodeName`` (missing anywhere -> None)."""
    keys = path.split(".")

    def get(obj: Mapping[str, Any]) -> Any:
        cur: Any = obj
        for k in keys:
            if not isinstance(cur, Mapping):
                return None
            cur = cur.get(k)
        return cur

    return get
