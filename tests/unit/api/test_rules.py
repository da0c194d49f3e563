"""Each CRD rule's CEL and its Python twin agree (the API server runs one, parse_policy the other).

The CEL is evaluated by a real CEL implementation (``cel``, the package the API
emulator uses), on the same defaulted JSON the API server would give it.
"""

from __future__ import annotations

from typing import Any

import pytest

from halfclose.api.conditions import Condition
from halfclose.api.policy import ConntrackSettings, PolicySpec
from halfclose.api.report import ReportSpec
from halfclose.api.schema import Rule, object_info
from halfclose.api.selectors import LabelSelectorRequirement

cel = pytest.importorskip(
    "cel", reason="the CEL evaluator (common-expression-language) is a dev dependency"
)

# (class, rule index, self after defaulting, valid?)
CASES: list[tuple[type, int, dict[str, Any], bool]] = [
    (PolicySpec, 0, {"namespaces": ["shop"], "action": "Report"}, True),
    (PolicySpec, 0, {"namespaceSelector": {}, "action": "Report"}, True),
    (PolicySpec, 0, {"namespaces": ["a"], "namespaceSelector": {"matchLabels": {"x": "y"}}}, True),
    (PolicySpec, 0, {"namespaces": [], "action": "Report"}, False),
    (PolicySpec, 0, {"action": "Report"}, False),
    (PolicySpec, 1, {"action": "PatchConntrack", "conntrack": {"strategy": "PerEntry"}}, True),
    (PolicySpec, 1, {"action": "PatchConntrack"}, True),
    (PolicySpec, 1, {"action": "Report"}, True),
    (PolicySpec, 1, {"action": "KillSockets", "conntrack": {"strategy": "Sysctl"}}, False),
    (PolicySpec, 1, {"action": "Report", "conntrack": {}}, False),
    (ConntrackSettings, 0, {"strategy": "Sysctl", "closeWaitTimeoutSeconds": 3600}, True),
    (ConntrackSettings, 0, {"strategy": "Sysctl", "closeWaitTimeoutSeconds": 3601}, False),
    (ConntrackSettings, 0, {"strategy": "PerEntry", "closeWaitTimeoutSeconds": 86400}, True),
    (LabelSelectorRequirement, 0, {"key": "a", "operator": "In", "values": ["x"]}, True),
    (LabelSelectorRequirement, 0, {"key": "a", "operator": "NotIn", "values": []}, False),
    (LabelSelectorRequirement, 0, {"key": "a", "operator": "In"}, False),
    (LabelSelectorRequirement, 0, {"key": "a", "operator": "Exists"}, True),
    (LabelSelectorRequirement, 0, {"key": "a", "operator": "Exists", "values": []}, True),
    (LabelSelectorRequirement, 0, {"key": "a", "operator": "DoesNotExist", "values": ["x"]}, False),
]


def _rule(cls: type, index: int) -> Rule:
    return object_info(cls).rules[index]


@pytest.mark.parametrize(("cls", "index", "self_value", "valid"), CASES)
def test_cel_and_python_twin_agree(
    cls: type, index: int, self_value: dict[str, Any], valid: bool
) -> None:
    rule = _rule(cls, index)
    assert rule.check(self_value) is valid, "Python twin"
    result = cel.compile(rule.cel).execute(cel.Context(variables={"self": self_value}))
    assert result is valid, f"CEL: {rule.cel}"


def test_every_rule_has_cases() -> None:
    covered = {(cls, i) for cls, i, _, _ in CASES}
    declared = {
        (cls, i)
        for cls in (PolicySpec, ConntrackSettings, LabelSelectorRequirement, ReportSpec, Condition)
        for i in range(len(object_info(cls).rules))
    }
    assert declared == covered
    for cls, i in declared:
        outcomes = {valid for c, j, _, valid in CASES if (c, j) == (cls, i)}
        assert outcomes == {True, False}, (
            f"{cls.__name__} rule {i} needs a passing and a failing case"
        )
