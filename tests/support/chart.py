"""Render the Helm chart offline with Helm's own SDK (helm-python-sdk) for tests.

``render(values)`` gives the manifests as parsed objects, each remembering the
template it came from.  Nothing here talks to a cluster.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "halfclose"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
RELEASE = "halfclose"
NAMESPACE = "halfclose-system"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the
# newest whose schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.30.0", "1.37.0")


@dataclass(frozen=True)
class Manifest:
    template: str
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])


def full_values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(FULL_VALUES.read_text(encoding="utf-8"))
    return loaded


def render_raw(values: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would produce it."""
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart:
        return chart.render(dict(values or {}), name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(values: Mapping[str, Any] | None = None) -> list[Manifest]:
    """Every object the chart renders (NOTES.txt excluded), in template order."""
    out: list[Manifest] = []
    for template, text in sorted(render_raw(values).items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append(Manifest(template, doc))
    return out


def notes(values: Mapping[str, Any] | None = None) -> str:
    return next(t for p, t in render_raw(values).items() if p.endswith("NOTES.txt"))


def of_kind(manifests: Iterable[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m.kind == kind]


def one(manifests: Iterable[Manifest], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [m.obj for m in manifests if m.kind == kind and m.name.endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {len(found)}"
    return found[0]


def load_hack(name: str) -> ModuleType:
    """Import charts/halfclose/hack/<name>.py (a script, not a package)."""
    path = CHART / "hack" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"halfclose_chart_hack_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses resolve annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --- metric names ----------------------------------------------------------

_TABLE_ROW = re.compile(r"^\|\s*`(?P<name>halfclose_[a-z0-9_]+)`\s*\|\s*(?P<type>[^|]+?)\s*\|")


@cache
def documented_metrics() -> dict[str, str]:
    """docs/metrics.md's tables: metric name -> type (gauge, counter, histogram)."""
    text = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    out: dict[str, str] = {}
    for line in text.splitlines():
        row = _TABLE_ROW.match(line)
        if row:
            out[row["name"]] = row["type"].split()[0]
    return out


def series_names(name: str, metric_type: str) -> set[str]:
    """The series names a metric of that type exposes to Prometheus."""
    if metric_type == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if metric_type == "summary":
        return {name, f"{name}_sum", f"{name}_count"}
    return {name}


def promtool() -> str | None:
    return shutil.which("promtool")


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    tool = promtool()
    assert tool is not None
    return subprocess.run(
        [tool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
