"""crds/*.yaml are what the model generates; the examples are valid policies on a real
API server, and invalid ones are refused with the messages the real server prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from halfclose.api import GROUP, POLICY_PLURAL, VERSION, parse_policy
from halfclose.api.crds import all_crds
from halfclose.api.generate import expected_files, stale_files
from support import chart
from support.controlplane import ControlPlane

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_crd_files_match_the_model() -> None:
    # On failure: run `make crds` and commit the result.
    assert stale_files(ROOT) == []
    generated = {p.name for p in expected_files(ROOT) if p.parent == ROOT / "crds"}
    assert {p.name for p in (ROOT / "crds").glob("*.yaml")} == generated


@pytest.mark.parametrize("crd", all_crds(), ids=lambda c: c["metadata"]["name"])
def test_crds_are_valid_apiextensions_objects(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, kubernetes_validate.latest_version(), strict=True)


def test_there_are_the_four_examples() -> None:
    assert {p.stem for p in EXAMPLES} == {
        "istio-report-only",
        "istio-kill",
        "linkerd",
        "prevention-only",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_parses_strictly(path: Path) -> None:
    policy = parse_policy(yaml.safe_load(path.read_text()), strict=True)
    assert policy.name == path.stem


@pytest.mark.kube
def test_the_server_established_every_crd(kube: ControlPlane) -> None:
    crds = {
        c["metadata"]["name"]: c
        for c in kube.objects("apiextensions.k8s.io", "v1", "customresourcedefinitions")
    }
    for crd in all_crds():
        stored = crds[crd["metadata"]["name"]]
        conditions = {c["type"]: c["status"] for c in stored["status"]["conditions"]}
        assert conditions["Established"] == "True"
        assert conditions["NamesAccepted"] == "True"
        # No structural-schema complaints (the server would say NonStructuralSchema).
        assert "NonStructuralSchema" not in conditions


@pytest.mark.kube
def test_examples_apply_and_the_server_defaults_them_as_parse_policy_does(
    kube: ControlPlane,
) -> None:
    for path in EXAMPLES:
        kube.kubectl("apply", "-f", str(path))
    for path in EXAMPLES:
        local = parse_policy(yaml.safe_load(path.read_text()))
        stored = kube.get_object(GROUP, VERSION, POLICY_PLURAL, path.stem)
        assert stored is not None
        # The schema's defaults were applied by the server, not just by our parser...
        assert stored["spec"]["thresholds"]["maxKillsPerMinute"] == (
            local.spec.thresholds.max_kills_per_minute
        )
        assert stored["spec"]["scanIntervalSeconds"] == local.spec.scan_interval_seconds
        # ...and both arrive at the same typed policy.
        assert parse_policy(stored).spec == local.spec
    listed = kube.kubectl("get", "hcp", "-o", "name").stdout.split()
    assert sorted(listed) == sorted(f"halfclosepolicy.halfclose.io/{p.stem}" for p in EXAMPLES)


@pytest.mark.kube
def test_short_names_category_and_explain(kube: ControlPlane) -> None:
    kube.kubectl("apply", "-f", str(ROOT / "examples" / "linkerd.yaml"))
    for name in ("hcp", "halfclosepolicies", "halfclosepolicy", "halfclose"):
        out = kube.kubectl("get", name, "-o", "json").stdout
        assert [i["metadata"]["name"] for i in json.loads(out)["items"]] == ["linkerd"], name
    # The published OpenAPI carries the schema (kubectl explain reads it from there).
    explained = kube.kubectl("explain", "hcp.spec.action").stdout
    assert "KillSockets" in explained or "FIELD: action" in explained


def _documented_policies() -> list[tuple[str, dict[str, Any]]]:
    out = [
        (p.name, yaml.safe_load(p.read_text()))
        for p in sorted((ROOT / "e2e" / "manifests").glob("policy-*.yaml"))
    ]
    # The first policy NOTES.txt tells users to apply.
    block = chart.notes().split("<<'EOF'\n", 1)[1].split("  EOF", 1)[0]
    out.append(("NOTES.txt", yaml.safe_load(block)))
    return out


@pytest.mark.kube
def test_documented_policies_are_accepted_by_the_server(kube: ControlPlane) -> None:
    """What the docs tell users to apply: no unknown field, schema and CEL rules pass."""
    policies = _documented_policies()
    assert len(policies) >= 2
    for where, policy in policies:
        proc = kube.kubectl(
            "apply", "--dry-run=server", "-f", "-", input=json.dumps(policy), check=False
        )
        assert proc.returncode == 0 and proc.stderr == "", f"{where}: {proc.stderr}"


def _policy(name: str, **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "HalfClosePolicy",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def _errors(stderr: str) -> set[str]:
    """kubectl's message as its set of error lines: one error follows ``is invalid: ``,
    several are ``* `` bullets, in an order that is not stable between runs."""
    _, sep, body = stderr.strip().partition(" is invalid: ")
    assert sep, stderr
    body = body.strip()
    if body.startswith("* "):
        return {line[2:] for line in body.splitlines() if line.startswith("* ")}
    return {body}


SKIPPED = (
    "<nil>: Invalid value: null: some validation rules were not checked because the object "
    "was invalid; correct the existing errors to complete validation"
)
ACTIONS = 'supported values: "Report", "KillSockets", "PatchConntrack"'
BELOW_0 = "should be greater than or equal to 0"

# What kubectl prints for each invalid policy, as Kubernetes 1.37 says it.  Note the
# real server's habits: CEL rules are skipped after a type or enum error (the <nil>
# line; a bound violation does not stop them), CEL failures print no value, map keys
# print as `matchLabels.app`.
INVALID: dict[str, tuple[dict[str, Any], set[str]]] = {
    "cel-conntrack-needs-patchconntrack": (
        {"namespaces": ["shop"], "conntrack": {"strategy": "Sysctl"}},
        {"spec.conntrack: Forbidden: conntrack settings apply only to action PatchConntrack"},
    ),
    "minimum": (
        {"namespaces": ["shop"], "thresholds": {"minIdleSeconds": -1}},
        {
            "spec.thresholds.minIdleSeconds: Invalid value: -1: "
            f"spec.thresholds.minIdleSeconds in body {BELOW_0}"
        },
    ),
    "enum-skips-cel": (
        {"namespaces": ["shop"], "action": "Kill"},
        {f'spec.action: Unsupported value: "Kill": {ACTIONS}', SKIPPED},
    ),
    "enum-hides-the-scope-rule": (
        {"action": "Kill"},  # no namespaces either, but that CEL rule never ran
        {f'spec.action: Unsupported value: "Kill": {ACTIONS}', SKIPPED},
    ),
    "cel-scope-required": (
        {"podSelector": {"matchLabels": {"app": "web"}}},
        {
            "spec: Required value: set namespaces, namespaceSelector or both "
            "(namespaceSelector: {} selects every namespace except kube-system)"
        },
    ),
    "maximum-in-a-list": (
        {"namespaces": ["shop"], "capturePorts": [15001, 70000]},
        {
            "spec.capturePorts[1]: Invalid value: 70000: "
            "spec.capturePorts[1] in body should be less than or equal to 65535"
        },
    ),
    "set-duplicate": (
        {"namespaces": ["shop"], "capturePorts": [15001, 15001]},
        {"spec.capturePorts[1]: Duplicate value: 15001"},
    ),
    "two-schema-errors": (
        {"namespaces": ["shop"], "action": "Kill", "thresholds": {"minIdleSeconds": -1}},
        {
            f'spec.action: Unsupported value: "Kill": {ACTIONS}',
            "spec.thresholds.minIdleSeconds: Invalid value: -1: "
            f"spec.thresholds.minIdleSeconds in body {BELOW_0}",
            SKIPPED,
        },
    ),
    "bound-and-cel-together": (
        {"namespaces": ["shop"], "scanIntervalSeconds": 0, "conntrack": {"strategy": "Sysctl"}},
        {
            "spec.scanIntervalSeconds: Invalid value: 0: "
            "spec.scanIntervalSeconds in body should be greater than or equal to 1",
            "spec.conntrack: Forbidden: conntrack settings apply only to action PatchConntrack",
        },
    ),
    "cel-sysctl-timeout": (
        {
            "namespaces": ["shop"],
            "action": "PatchConntrack",
            "conntrack": {"strategy": "Sysctl", "closeWaitTimeoutSeconds": 7200},
        },
        {
            "spec.conntrack.closeWaitTimeoutSeconds: Invalid value: with strategy Sysctl every "
            "CLOSE_WAIT entry of the pod lives that long, so closeWaitTimeoutSeconds must be "
            "at most 3600"
        },
    ),
    "cel-selector-values": (
        {"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
        {
            "spec.namespaceSelector.matchExpressions[0].values: Invalid value: values must be "
            "non-empty for In and NotIn, and empty for Exists and DoesNotExist"
        },
    ),
    "map-value-type": (
        {"namespaces": ["shop"], "podSelector": {"matchLabels": {"app": 5}}},
        {
            'spec.podSelector.matchLabels.app: Invalid value: "integer": '
            'spec.podSelector.matchLabels.app in body must be of type string: "integer"',
            SKIPPED,
        },
    ),
}


@pytest.mark.kube
def test_invalid_policies_are_refused_with_the_servers_messages(kube: ControlPlane) -> None:
    wrong = {}
    for name, (spec, expected) in INVALID.items():
        proc = kube.kubectl("apply", "-f", "-", input=_policy(name, **spec), check=False)
        assert proc.returncode == 1, (name, proc.stdout)
        if _errors(proc.stderr) != expected:
            wrong[name] = proc.stderr
    assert wrong == {}
    assert kube.objects(GROUP, VERSION, POLICY_PLURAL) == []


@pytest.mark.kube
def test_an_unknown_field_is_a_strict_decoding_error(kube: ControlPlane) -> None:
    proc = kube.kubectl(
        "apply", "-f", "-", input=_policy("x", namespaces=["shop"], bogus=1), check=False
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        'Error from server (BadRequest): error when creating "STDIN": HalfClosePolicy in '
        'version "v1alpha1" cannot be handled as a HalfClosePolicy: strict decoding error: '
        'unknown field "spec.bogus"'
    )
    # Without strict validation the server drops the field and warns.
    proc = kube.kubectl(
        "apply", "--validate=warn", "-f", "-", input=_policy("x", namespaces=["shop"], bogus=1)
    )
    assert 'unknown field "spec.bogus"' in proc.stderr
    stored = kube.get_object(GROUP, VERSION, POLICY_PLURAL, "x")
    assert stored is not None and "bogus" not in stored["spec"]
