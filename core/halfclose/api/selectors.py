"""Label selectors with Kubernetes semantics (metav1.LabelSelector).

``matchLabels`` and ``matchExpressions`` are ANDed; an empty selector
matches everything, as in every Kubernetes API.  ``In``/``NotIn`` need
values, ``Exists``/``DoesNotExist`` must have none (a CEL rule on the CRD and
the same check here).  ``NotIn`` and ``DoesNotExist`` match objects that lack
the key, as the API server's selectors do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from halfclose.api.schema import Constraints, Rule, api_object, prop

Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]

_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _values_fit_operator(req: Mapping[str, Any]) -> bool:
    values = req.get("values") or []
    if req.get("operator") in ("In", "NotIn"):
        return len(values) > 0
    return len(values) == 0


@api_object(
    "A label requirement: key, operator and values.",
    rules=(
        # The CEL and its Python twin must agree (tests evaluate both).
        Rule(
            cel="self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0)"
            " : (!has(self.values) || size(self.values) == 0)",
            message="values must be non-empty for In and NotIn, and empty for Exists and"
            " DoesNotExist",
            check=_values_fit_operator,
            field_path=".values",
        ),
    ),
)
@dataclass(frozen=True, slots=True, kw_only=True)
class LabelSelectorRequirement:
    key: str = prop("The label key.", required=True, min_length=1, max_length=317)
    operator: Operator = prop(
        "In, NotIn, Exists or DoesNotExist.",
        required=True,
    )
    values: tuple[str, ...] = prop(
        "Label values for In and NotIn; must be empty for Exists and DoesNotExist.",
        default=(),
        max_items=64,
        items=Constraints(max_length=63, pattern=_LABEL_VALUE),
    )

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present


@api_object("A label query over objects; empty matches everything.")
@dataclass(frozen=True, slots=True, kw_only=True)
class LabelSelector:
    match_labels: Mapping[str, str] = prop(
        "Labels that must all be present with these values.",
        default_factory=dict,
        max_properties=64,
        items=Constraints(max_length=63, pattern=_LABEL_VALUE),
    )
    match_expressions: tuple[LabelSelectorRequirement, ...] = prop(
        "Requirements that must all hold.",
        default=(),
        max_items=32,
    )

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        return all(req.matches(labels) for req in self.match_expressions)

    def describe(self) -> str:
        """kubectl's selector syntax, e.g. ``app=web,tier in (a,b),!canary``."""
        parts = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        for req in self.match_expressions:
            if req.operator == "Exists":
                parts.append(req.key)
            elif req.operator == "DoesNotExist":
                parts.append(f"!{req.key}")
            else:
                op = "in" if req.operator == "In" else "notin"
                parts.append(f"{req.key} {op} ({','.join(req.values)})")
        return ",".join(parts) or "<everything>"


def label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid label key, or None.

    The CRD schema cannot check map keys, so this runs in ``parse_policy``
    (and the operator reports it as Accepted=False).
    """
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"label key {key!r}: the prefix must be a DNS subdomain of at most 253 characters"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return (
            f"label key {key!r}: the name must be 1-63 characters of letters, digits, '-', '_'"
            " or '.', starting and ending with a letter or digit"
        )
    return None


def selector_problems(selector: LabelSelector, path: str) -> list[str]:
    keys = [*selector.match_labels, *(r.key for r in selector.match_expressions)]
    return [f"{path}: {p}" for p in map(label_key_problem, keys) if p]


__all__ = [
    "LabelSelector",
    "LabelSelectorRequirement",
    "Operator",
    "label_key_problem",
    "selector_problems",
]
