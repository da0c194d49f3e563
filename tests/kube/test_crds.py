"""crds/*.yaml are what the model generates; the examples are valid policies on a server."""

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
from support.kubeapi import KubeAPIEmulator

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
def test_examples_apply_and_the_server_defaults_them_as_parse_policy_does(
    kube_api: KubeAPIEmulator,
) -> None:
    for path in EXAMPLES:
        kube_api.kubectl("apply", "-f", str(path))
    for path in EXAMPLES:
        local = parse_policy(yaml.safe_load(path.read_text()))
        stored = kube_api.get_object(GROUP, VERSION, POLICY_PLURAL, path.stem)
        assert stored is not None
        # The schema's defaults were applied by the server, not just by our parser...
        assert stored["spec"]["thresholds"]["maxKillsPerMinute"] == (
            local.spec.thresholds.max_kills_per_minute
        )
        assert stored["spec"]["scanIntervalSeconds"] == local.spec.scan_interval_seconds
        # ...and both arrive at the same typed policy.
        assert parse_policy(stored).spec == local.spec
    listed = kube_api.kubectl("get", "hcp", "-o", "name").stdout.split()
    assert sorted(listed) == sorted(f"halfclosepolicy.halfclose.io/{p.stem}" for p in EXAMPLES)


@pytest.mark.kube
def test_short_names_and_category(kube_api: KubeAPIEmulator) -> None:
    kube_api.kubectl("apply", "-f", str(ROOT / "examples" / "linkerd.yaml"))
    for name in ("hcp", "halfclosepolicies", "halfclosepolicy", "halfclose"):
        out = kube_api.kubectl("get", name, "-o", "json").stdout
        assert [i["metadata"]["name"] for i in json.loads(out)["items"]] == ["linkerd"], name
