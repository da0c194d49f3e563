"""The chart's alert rules, with their ``for:`` durations shortened for a test.

The expressions are the chart's, byte for byte (charts/halfclose/files/alerts.yaml,
the PrometheusRule's groups rendered with the default values).  Only ``for:``
changes: a test cannot wait 15 minutes, so every duration is divided by
``SCALE`` (10m -> 4s, 5m -> 2s, 15m -> 6s), keeping their order.  An alert that
fires here with the short ``for:`` fires in production once the condition has
held for the real one; the condition itself is what this test proves.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "charts" / "halfclose" / "files" / "alerts.yaml"
SCALE = 150
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")


def seconds(duration: str) -> float:
    """A Prometheus duration ("1h30m", "10m", "500ms") in seconds."""
    parts = _PART.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def chart_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def shortened(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of a rule file with every ``for:`` divided by SCALE (at least 1 s)."""
    out = {"groups": []}
    for group in doc["groups"]:
        rules = []
        for original in group["rules"]:
            rule = dict(original)
            if "for" in rule:
                rule["for"] = f"{max(1, round(seconds(str(rule['for'])) / SCALE))}s"
            rules.append(rule)
        out["groups"].append({**group, "rules": rules})
    return out


def write_test_rules(path: Path) -> list[dict[str, Any]]:
    """Write the shortened chart rules to ``path``; returns its alert rules."""
    doc = shortened(yaml.safe_load(ALERTS.read_text(encoding="utf-8")))
    path.write_text(
        "# The chart's alerts.yaml with every `for:` divided by "
        f"{SCALE} for a test; expressions unchanged.\n" + yaml.safe_dump(doc, sort_keys=False),
        encoding="utf-8",
    )
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def longest_for(rules: list[dict[str, Any]]) -> float:
    return max((seconds(str(r["for"])) for r in rules if "for" in r), default=0.0)
