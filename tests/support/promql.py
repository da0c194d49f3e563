"""The metric names a PromQL expression reads, and Grafana's variables removed.

promtool (the real parser) says whether an expression is valid; it does not
list the metrics it selects, so this small lexer does: it drops strings, label
matchers, ranges and grouping clauses, then every identifier that is neither a
function call nor a keyword is a metric name.  It only needs to be right on
expressions promtool has accepted.
"""

from __future__ import annotations

import re

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# An identifier not glued to a number or another name (so 1e3, 5m, 0.99 are
# not names) and not followed by "(" (a function or aggregation).
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()")
_KEYWORDS = frozenset(
    {
        "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
        "group_left", "group_right", "inf", "nan", "atan2", "start", "end",
    }
)  # fmt: skip

# Grafana's interval variables must become durations to stay valid PromQL;
# every other variable only ever appears inside a quoted label value.
_GRAFANA_DURATIONS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
}
_GRAFANA_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+?)\s*,\s*(?P<label>\w+)\s*\)\s*$")


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a (valid) PromQL expression."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {m for m in _IDENT.findall(text) if m not in _KEYWORDS}


def from_grafana(expr: str) -> str:
    """A Grafana query with its template variables replaced by plain values."""
    for var, duration in _GRAFANA_DURATIONS.items():
        expr = expr.replace(var, duration)
    return _GRAFANA_VAR.sub(lambda m: m.group(1) or m.group(2), expr)


def variable_selector(query: str) -> str | None:
    """The selector of a Grafana ``label_values(selector, label)`` query."""
    match = _LABEL_VALUES.match(query)
    return match["selector"] if match else None
