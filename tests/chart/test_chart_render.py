"""The chart renders, lints strict, validates, and its generated parts are current."""

from __future__ import annotations

import json
import tomllib
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from support import chart

pytestmark = pytest.mark.chart

# Custom resources kubernetes-validate has no schema for. A structural subset of
# prometheus-operator's monitoring.coreos.com/v1 CRDs, closed
# (additionalProperties: false) wherever the chart writes, so that a misspelt
# field fails here instead of being dropped by the API server.
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
}
_META = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
# A Prometheus duration: 1h30m, 15s, 0.
_DURATION = {
    "type": "string",
    "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
    "(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "honorLabels": {"type": "boolean"},
    },
}


def _monitor(endpoints_key: str, **endpoint_extra: Any) -> dict[str, Any]:
    endpoint = {**_ENDPOINT, "properties": {**_ENDPOINT["properties"], **endpoint_extra}}
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", endpoints_key],
                "properties": {
                    "jobLabel": {"type": "string"},
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    endpoints_key: {"type": "array", "minItems": 1, "items": endpoint},
                },
            },
        },
    }


_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string"},
        "record": {"type": "string"},
        "expr": {"type": "string", "minLength": 1},
        "for": _DURATION,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
CR_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": _monitor("endpoints", bearerTokenFile={"type": "string"}),
    "PodMonitor": _monitor("podMetricsEndpoints"),
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["groups"],
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["name", "rules"],
                            "properties": {
                                "name": {"type": "string"},
                                "interval": _DURATION,
                                "rules": {"type": "array", "minItems": 1, "items": _RULE},
                            },
                        },
                    }
                },
            },
        },
    },
}


# --- lint and validation ----------------------------------------------------


@pytest.mark.parametrize("kube", chart.KUBE_VERSIONS)
@pytest.mark.parametrize("values_set", ["default", "full"])
def test_lint_strict_is_clean(values_set: str, kube: str) -> None:
    values = chart.full_values() if values_set == "full" else None
    report = helm_python.lint(
        str(chart.CHART), values, strict=True, namespace=chart.NAMESPACE, kube_version=f"v{kube}"
    )
    # Severity 1 is INFO ("icon is recommended"); 2 WARNING and 3 ERROR fail strict lint.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("kube", chart.KUBE_VERSIONS)
def test_manifests_validate_strictly(manifests: list[chart.Manifest], kube: str) -> None:
    """Every object is checked: Kubernetes kinds by kubernetes-validate --strict
    (an unknown kind fails), the monitoring CRs by CR_SCHEMAS."""
    for m in manifests:
        where = f"{m.template}: {m.kind}/{m.name}"
        if m.kind in CR_SCHEMAS:
            jsonschema.validate(m.obj, CR_SCHEMAS[m.kind])
        else:
            try:
                kubernetes_validate.validate(m.obj, kube, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} is invalid for Kubernetes {kube}: {exc.message}")


def test_monitor_schemas_catch_a_misspelt_field() -> None:
    """The embedded CR schemas are closed: they are not a check that always passes."""
    sm = chart.one(chart.render({"metrics": {"serviceMonitor": {"enabled": True}}}),
                   "ServiceMonitor", "-agent")  # fmt: skip
    jsonschema.validate(sm, CR_SCHEMAS["ServiceMonitor"])
    sm["spec"]["endpoints"][0]["honourLabels"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(sm, CR_SCHEMAS["ServiceMonitor"])


def test_default_render_has_the_core_and_no_optional_parts(
    default_manifests: list[chart.Manifest],
) -> None:
    kinds = sorted(m.kind for m in default_manifests)
    assert kinds.count("CustomResourceDefinition") == 3
    assert kinds.count("Deployment") == 1 and kinds.count("DaemonSet") == 1
    assert kinds.count("ClusterRole") == 2 and kinds.count("ClusterRoleBinding") == 2
    assert kinds.count("ServiceAccount") == 2 and kinds.count("Service") == 2
    assert kinds.count("PodDisruptionBudget") == 1
    for optional in ("ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"):
        assert optional not in kinds


def test_full_render_has_every_optional_part(full_manifests: list[chart.Manifest]) -> None:
    kinds = {m.kind for m in full_manifests}
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap", "PodDisruptionBudget"} <= kinds
    assert len(chart.of_kind(full_manifests, "ServiceMonitor")) == 2  # agent and operator
    cm = chart.one(full_manifests, "ConfigMap", "-dashboard")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["halfclose.json"]) == json.loads(
        (chart.CHART / "files" / "dashboard.json").read_text(encoding="utf-8")
    )
    pods = chart.of_kind(chart.render({"metrics": {"podMonitor": {"enabled": True}}}), "PodMonitor")
    assert len(pods) == 2


def test_everything_is_named_and_namespaced_consistently(manifests: list[chart.Manifest]) -> None:
    cluster_scoped = {
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    names = [(m.kind, m.name) for m in manifests]
    assert len(names) == len(set(names)), "two objects share a kind and a name"
    for m in manifests:
        labels = m.obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "halfclose", m.name
        if m.kind in cluster_scoped:
            assert "namespace" not in m.obj["metadata"], m.name
        elif m.kind != "ConfigMap":  # the dashboard may go to Grafana's namespace
            assert m.obj["metadata"]["namespace"] == chart.NAMESPACE, m.name


def test_image_reference_tag_defaults_to_app_version_and_digest_wins() -> None:
    app_version = yaml.safe_load((chart.CHART / "Chart.yaml").read_text())["appVersion"]
    programs = (("DaemonSet", "agent"), ("Deployment", "operator"))  # one image each
    rendered = chart.render()
    for kind, program in programs:
        pod = chart.one(rendered, kind)["spec"]["template"]["spec"]
        image = pod["containers"][0]["image"]
        assert image == f"ghcr.io/halfclose/halfclose-{program}:{app_version}"
    digest = "sha256:" + "ab" * 32
    image = {"tag": "v9", "digest": digest}
    rendered = chart.render({"agent": {"image": image}, "operator": {"image": image}})
    for kind, program in programs:
        pod = chart.one(rendered, kind)["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == f"ghcr.io/halfclose/halfclose-{program}@{digest}"


def test_app_version_is_the_python_package_version() -> None:
    chart_yaml = yaml.safe_load((chart.CHART / "Chart.yaml").read_text())
    for dist in ("core", "agent", "operator", "cli"):  # one version for all four
        pyproject = tomllib.loads((chart.REPO / dist / "pyproject.toml").read_text())
        assert chart_yaml["appVersion"] == pyproject["project"]["version"], dist


# --- values.schema.json -------------------------------------------------------

BAD_VALUES = [
    ({"operator": {"replicas": "two"}}, "/operator/replicas"),
    ({"opertor": {"replicas": 2}}, "opertor"),
    ({"agent": {"capabilities": {"sysAdmin": True}}}, "sysAdmin"),
    ({"agent": {"logLevel": "TRACE"}}, "/agent/logLevel"),
    ({"agent": {"metricsPort": 70000}}, "/agent/metricsPort"),
    ({"agent": {"maxUnavailable": 0}}, "/agent/maxUnavailable"),
    ({"alerts": {"leakedSocketsThreshold": 0}}, "/alerts/leakedSocketsThreshold"),
    ({"alerts": {"leakedSocketsFor": "ten minutes"}}, "/alerts/leakedSocketsFor"),
    ({"agent": {"image": {"digest": "latest"}}}, "/agent/image/digest"),
    ({"image": {"repository": "one/image/for/both"}}, "repository"),
    ({"crds": {"enabled": "yes"}}, "/crds/enabled"),
]


@pytest.mark.parametrize(("values", "where"), BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_schema_rejects_bad_values(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as excinfo:
        chart.render(values)
    assert where in str(excinfo.value)


def _closed_object_paths(schema: dict[str, Any], values: Any, path: str = "") -> list[str]:
    """Keys of values.yaml that a closed object of the schema does not declare."""
    missing: list[str] = []
    if not isinstance(values, dict) or schema.get("type") != "object":
        return missing
    props = schema.get("properties", {})
    for key, value in values.items():
        if key not in props:
            if schema.get("additionalProperties") is False:
                missing.append(f"{path}{key}")
            continue
        missing += _closed_object_paths(props[key], value, f"{path}{key}.")
    return missing


def test_schema_declares_every_value() -> None:
    schema = json.loads((chart.CHART / "values.schema.json").read_text())
    values = yaml.safe_load((chart.CHART / "values.yaml").read_text())
    assert _closed_object_paths(schema, values) == []
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
            "exclusive",
        ),
        ({"operator": {"replicas": 2, "leaderElection": {"enabled": False}}}, "leaderElection"),
    ],
)
def test_contradictory_values_fail_the_render(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmError) as excinfo:
        chart.render(values)
    assert message in str(excinfo.value)


# --- generated and copied files ----------------------------------------------


def _strictly_equal(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0, nor True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_strictly_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_strictly_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _repo_crds() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((chart.REPO / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                out[doc["metadata"]["name"]] = doc
    return out


def test_chart_crd_files_are_copies_of_the_repository_crds() -> None:
    sync = chart.load_hack("sync_crds")
    assert any((chart.REPO / "crds").glob("*.yaml")), "crds/ is empty: run `make crds`"
    writes, removals = sync.plan(chart.REPO / "crds", chart.CHART / "files" / "crds")
    assert not writes and not removals, "charts/halfclose/files/crds is stale: run `make crds`"


def test_rendered_crds_equal_the_repository_crds(default_manifests: list[chart.Manifest]) -> None:
    expected = _repo_crds()
    rendered = {m.name: m.obj for m in chart.of_kind(default_manifests, "CustomResourceDefinition")}
    assert rendered.keys() == expected.keys()
    for name, crd in rendered.items():
        meta = crd["metadata"]
        assert meta["annotations"] == {"helm.sh/resource-policy": "keep"}, name
        # The chart adds its labels; everything else is the generated CRD exactly.
        want = json.loads(json.dumps(expected[name]))
        got = json.loads(json.dumps(crd))
        got["metadata"].pop("annotations")
        got["metadata"]["labels"] = {
            k: v for k, v in meta["labels"].items() if k in want["metadata"].get("labels", {})
        }
        assert _strictly_equal(got, want), f"{name} differs from crds/{name}.yaml"


def test_crds_follow_enabled_and_keep() -> None:
    assert (
        chart.of_kind(chart.render({"crds": {"enabled": False}}), "CustomResourceDefinition") == []
    )
    unkept = chart.of_kind(chart.render({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert len(unkept) == 3
    assert all("annotations" not in c.obj["metadata"] for c in unkept)


def test_crds_match_the_python_model(default_manifests: list[chart.Manifest]) -> None:
    """Independent of crds/ on disk: the CRDs the chart installs are the model's."""
    crds = pytest.importorskip("halfclose.api.crds", reason="the API model is not built yet")
    model = {c["metadata"]["name"]: json.loads(json.dumps(c)) for c in crds.all_crds()}
    rendered = {m.name: m.obj for m in chart.of_kind(default_manifests, "CustomResourceDefinition")}
    assert rendered.keys() == model.keys()
    for name, crd in rendered.items():
        assert _strictly_equal(crd["spec"], model[name]["spec"]), name


def test_readme_values_table_and_standalone_alerts_are_current() -> None:
    generate = chart.load_hack("generate")
    stale = [p.name for p, text in generate.expected().items() if p.read_text("utf-8") != text]
    assert stale == [], f"stale {stale}: run `make chart`"


def test_every_value_is_documented_and_the_rule_is_enforced() -> None:
    generate = chart.load_hack("generate")
    docs = generate.value_docs((chart.CHART / "values.yaml").read_text(encoding="utf-8"))
    assert all(d.description for d in docs)
    keys = {d.key for d in docs}
    assert {"agent.capabilities.netRaw", "alerts.leakedSocketsThreshold", "crds.keep"} <= keys
    with pytest.raises(generate.DocError, match=r"b\.c"):
        generate.value_docs("a:\n  # -- documented\n  x: 1\nb:\n  c: 2\n")
    with pytest.raises(generate.DocError, match=r"d\.e"):
        generate.value_docs("d:\n  # -- hidden inside a documented map\n  e: 1\n"
                            .replace("d:\n", "# -- the map\nd:\n"))  # fmt: skip


def test_notes_name_the_objects_users_look_for() -> None:
    text = chart.notes()
    assert "kubectl get halfclosereports -A" in text
    assert "pod-security.kubernetes.io/enforce=privileged" in text
    assert f"daemonset/{chart.RELEASE}-agent" in text
