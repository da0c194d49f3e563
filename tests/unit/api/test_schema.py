"""The generated CRDs: structural, with the defaults, bounds, rules and columns the docs promise."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from halfclose.api import names
from halfclose.api.crds import all_crds, peering_crd, policy_crd, report_crd


def _version(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    return dict(version)


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    return dict(_version(crd)["schema"]["openAPIV3Schema"])


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def _at(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = schema
    for part in dotted.split("."):
        node = node["properties"][part]
    return node


@pytest.mark.parametrize("crd", all_crds(), ids=lambda c: c["metadata"]["name"])
def test_schema_is_structural(crd: dict[str, Any]) -> None:
    # A structural schema gives every node a type; a preserve-unknown-fields node may omit
    # properties.  No node may mix an object's properties with additionalProperties.
    for path, node in _nodes(_schema(crd)):
        assert "type" in node, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        if node["type"] == "array":
            assert "items" in node, path


def test_names_scope_and_subresources() -> None:
    policy, report = policy_crd(), report_crd()
    assert policy["metadata"]["name"] == "halfclosepolicies.halfclose.io"
    assert policy["spec"]["scope"] == "Cluster"
    assert report["spec"]["scope"] == "Namespaced"
    assert policy["spec"]["names"]["shortNames"] == ["hcp"]
    assert report["spec"]["names"]["shortNames"] == ["hcr"]
    for crd in (policy, report):
        assert crd["spec"]["group"] == names.GROUP
        assert crd["spec"]["names"]["categories"] == ["halfclose"]
        assert _version(crd)["name"] == names.VERSION
        assert _version(crd)["subresources"] == {"status": {}}
    assert peering_crd()["spec"]["names"]["kind"] == "ClusterKopfPeering"


def test_printer_columns_as_the_issue_lists() -> None:
    def headers(crd: dict[str, Any]) -> list[str]:
        return [c["name"].upper() for c in _version(crd)["additionalPrinterColumns"]]

    assert headers(policy_crd()) == [
        "ACTION",
        "NAMESPACES",
        "PODS",
        "LEAKED",
        "KILLED",
        "READY",
        "AGE",
    ]
    assert headers(report_crd()) == [
        "POD",
        "NODE",
        "LEAKED",
        "AT-RISK",
        "KILLED",
        "LAST-SCAN",
        "AGE",
    ]


def test_printer_columns_point_at_real_fields() -> None:
    # A column whose jsonPath names no schema field prints <none> forever.
    for crd in (policy_crd(), report_crd()):
        schema = _schema(crd)
        for column in _version(crd)["additionalPrinterColumns"]:
            path = column["jsonPath"].split("[")[0].lstrip(".")
            if path.startswith("metadata."):
                continue  # ObjectMeta is the API server's, not in our schema
            _at(schema, path)  # KeyError if the field does not exist


def test_spec_defaults_bounds_and_enums() -> None:
    spec = _at(_schema(policy_crd()), "spec")
    assert _at(spec, "action")["enum"] == ["Report", "KillSockets", "PatchConntrack"]
    assert _at(spec, "action")["default"] == "Report"
    assert _at(spec, "thresholds")["default"] == {}
    assert _at(spec, "thresholds.minIdleSeconds")["minimum"] == 0
    assert _at(spec, "thresholds.minIdleSeconds")["default"] == 60
    assert _at(spec, "conntrack.strategy")["enum"] == ["PerEntry", "Sysctl"]
    # No object default for conntrack: has(self.conntrack) must mean "the user wrote it".
    assert "default" not in _at(spec, "conntrack")
    assert _at(spec, "capturePorts")["items"] == {"type": "integer", "minimum": 1, "maximum": 65535}
    assert _at(spec, "capturePorts")["x-kubernetes-list-type"] == "set"
    assert "default" not in _at(spec, "capturePorts")  # empty = detect
    bounds = _at(spec, "conntrack.closeWaitTimeoutSeconds")
    assert (bounds["minimum"], bounds["maximum"]) == (120, 86400)


def test_cel_rules_present() -> None:
    spec = _at(_schema(policy_crd()), "spec")
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("namespaceSelector" in r for r in rules)
    assert any("PatchConntrack" in r for r in rules)
    conntrack_rules = _at(spec, "conntrack")["x-kubernetes-validations"]
    assert "closeWaitTimeoutSeconds" in conntrack_rules[0]["rule"]
    requirement = _at(spec, "podSelector.matchExpressions")["items"]
    assert "operator" in requirement["x-kubernetes-validations"][0]["rule"]
    for _, node in _nodes(_schema(policy_crd())):
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["message"], rule


def test_cel_rules_on_lists_are_cost_bounded() -> None:
    # The API server rejects CEL whose worst-case cost is unbounded: every list and map a
    # rule may iterate over needs maxItems / maxProperties, every string maxLength.
    for crd in (policy_crd(), report_crd()):
        for path, node in _nodes(_schema(crd)):
            if path.startswith(".spec") and node["type"] == "array":
                assert "maxItems" in node, path


def test_status_has_no_defaults() -> None:
    # Status is written whole by its controller; schema defaults there would only
    # make a freshly created object look observed.
    for crd in (policy_crd(), report_crd()):
        for path, node in _nodes(_at(_schema(crd), "status"), ".status"):
            assert "default" not in node, path


def test_every_field_is_documented() -> None:
    # docs/api.md is the reference: a field added to the model must be added there too.
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[3] / "docs" / "api.md").read_text()
    missing = set()
    for crd in (policy_crd(), report_crd()):
        for path, _ in _nodes(_schema(crd)):
            name = path.rsplit(".", 1)[-1].rstrip("[]{}")
            if path.count(".") >= 2 and name and f"`{name}`" not in doc and f".{name}`" not in doc:
                missing.add(path)
    assert not missing, sorted(missing)
