"""The JSONPath subset CRD printer columns use (k8s.io/client-go/util/jsonpath).

Supported: ``.a.b``, ``['a.b']``, ``[0]``, ``[-1]``, ``[*]``, ``.*`` and filters
``[?(@.type=="Ready")]`` with ``==``/``!=`` against a string, number or boolean
literal.  That covers every column CRD authors write in practice; anything else is a
``ValueError`` at CRD load time, which is better than a silently empty column.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Field:
    name: str


@dataclass(frozen=True)
class Index:
    index: int


@dataclass(frozen=True)
class Wildcard:
    pass


@dataclass(frozen=True)
class Filter:
    path: tuple[Any, ...]
    op: str
    literal: Any


Step = Field | Index | Wildcard | Filter

_FILTER = re.compile(r"^\?\(@(?P<path>[^=!]*?)\s*(?P<op>==|!=)\s*(?P<lit>.+?)\s*\)$")


def parse(expr: str) -> tuple[Step, ...]:
    text = expr.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    steps: list[Step] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ".":
            m = re.match(r"\.([A-Za-z0-9_\-/*]*)", text[i:])
            assert m is not None  # the pattern always matches a lone dot
            name = m.group(1)
            if name == "*":
                steps.append(Wildcard())
            elif name:
                steps.append(Field(name))
            i += m.end()
        elif ch == "[":
            end = _closing_bracket(text, i)
            steps.append(_bracket(text[i + 1 : end], expr))
            i = end + 1
        elif ch == "$" and i == 0:
            i += 1
        else:
            raise ValueError(f"unsupported JSONPath {expr!r} at {text[i:]!r}")
    return tuple(steps)


def _closing_bracket(text: str, start: int) -> int:
    depth, quote = 0, ""
    for j in range(start, len(text)):
        c = text[j]
        if quote:
            if c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced brackets in JSONPath {text!r}")


def _bracket(inner: str, expr: str) -> Step:
    inner = inner.strip()
    if inner == "*":
        return Wildcard()
    if re.fullmatch(r"-?\d+", inner):
        return Index(int(inner))
    if len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
        return Field(inner[1:-1])
    m = _FILTER.match(inner)
    if m:
        lit = m["lit"]
        literal = lit[1:-1] if lit[:1] in "'\"" else json.loads(lit)
        return Filter(parse(m["path"]) if m["path"] else (), m["op"], literal)
    raise ValueError(f"unsupported JSONPath {expr!r}: [{inner}]")


def find(steps: tuple[Step, ...], data: Any) -> list[Any]:
    """All values the path selects, in document order."""
    current = [data]
    for step in steps:
        current = [v for node in current for v in _apply(step, node)]
    return current


def _apply(step: Step, node: Any) -> Iterator[Any]:
    if isinstance(step, Field):
        if isinstance(node, dict) and step.name in node:
            yield node[step.name]
    elif isinstance(step, Index):
        if isinstance(node, list) and -len(node) <= step.index < len(node):
            yield node[step.index]
    elif isinstance(step, Wildcard):
        if isinstance(node, list):
            yield from node
        elif isinstance(node, dict):
            yield from node.values()
    elif isinstance(node, list):
        for item in node:
            found = find(step.path, item)
            if found and ((found[0] == step.literal) == (step.op == "==")):
                yield item
