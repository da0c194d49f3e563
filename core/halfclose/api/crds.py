"""The two CustomResourceDefinitions, built from the model (docs/api.md).

``python -m halfclose.api.generate`` writes these to ``crds/``; a test fails
when the files and this module disagree.
"""

from __future__ import annotations

from typing import Any

from halfclose.api import names
from halfclose.api.policy import PolicySpec, PolicyStatus
from halfclose.api.report import ReportSpec, ReportStatus
from halfclose.api.schema import openapi_schema

_POLICY_DESCRIPTION = (
    "HalfClosePolicy says which pods halfclose watches for leaked half-closed proxy"
    " sockets and what the node agent does about them. Cluster-scoped; when several"
    " policies select one pod, the oldest applies (docs/api.md)."
)
_REPORT_DESCRIPTION = (
    "HalfCloseReport holds what the node agent found in one pod: counts and the most"
    " recent findings. One per pod with findings, owned by the pod."
)


def _root_schema(description: str, spec: type, status: type) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": openapi_schema(spec),
            "status": openapi_schema(status),
        },
        "required": ["spec"],
    }


def _age() -> dict[str, Any]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def _crd(
    *,
    kind: str,
    plural: str,
    singular: str,
    short_name: str,
    scope: str,
    schema: dict[str, Any],
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{names.GROUP}",
            "labels": {"app.kubernetes.io/name": "halfclose"},
        },
        "spec": {
            "group": names.GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": [short_name],
                "categories": [names.CATEGORY],
            },
            "versions": [
                {
                    "name": names.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def policy_crd() -> dict[str, Any]:
    return _crd(
        kind=names.POLICY_KIND,
        plural=names.POLICY_PLURAL,
        singular=names.POLICY_SINGULAR,
        short_name=names.POLICY_SHORT_NAME,
        scope="Cluster",
        schema=_root_schema(_POLICY_DESCRIPTION, PolicySpec, PolicyStatus),
        columns=[
            {"name": "Action", "type": "string", "jsonPath": ".spec.action"},
            {
                "name": "Namespaces",
                "type": "integer",
                "jsonPath": ".status.matchedNamespaces",
                "description": "Existing namespaces in the policy's scope.",
            },
            {
                "name": "Pods",
                "type": "integer",
                "jsonPath": ".status.matchedPods",
                "description": "Pods the policy applies to.",
            },
            {"name": "Leaked", "type": "integer", "jsonPath": ".status.leakedNow"},
            {"name": "Killed", "type": "integer", "jsonPath": ".status.killedTotal"},
            {
                "name": "Ready",
                "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
            },
            _age(),
        ],
    )


def report_crd() -> dict[str, Any]:
    return _crd(
        kind=names.REPORT_KIND,
        plural=names.REPORT_PLURAL,
        singular=names.REPORT_SINGULAR,
        short_name=names.REPORT_SHORT_NAME,
        scope="Namespaced",
        schema=_root_schema(_REPORT_DESCRIPTION, ReportSpec, ReportStatus),
        columns=[
            {"name": "Pod", "type": "string", "jsonPath": ".spec.podName"},
            {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName"},
            {"name": "Leaked", "type": "integer", "jsonPath": ".status.leaked"},
            {"name": "At-Risk", "type": "integer", "jsonPath": ".status.atRisk"},
            {"name": "Killed", "type": "integer", "jsonPath": ".status.killedTotal"},
            {"name": "Last-Scan", "type": "date", "jsonPath": ".status.lastScanTime"},
            _age(),
        ],
    )


# kopf's peering resource (leader election between operator replicas).  It is
# kopf's schema, not ours, but it ships in crds/ with ours so that one
# `kubectl apply -f crds/` (or the chart) installs everything the operator needs.
PEERING_GROUP = "kopf.dev"
PEERING_VERSION = "v1"
PEERING_KIND = "ClusterKopfPeering"
PEERING_PLURAL = "clusterkopfpeerings"


def peering_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PEERING_PLURAL}.{PEERING_GROUP}",
            "labels": {"app.kubernetes.io/name": "halfclose"},
        },
        "spec": {
            "group": PEERING_GROUP,
            "scope": "Cluster",
            "names": {
                "kind": PEERING_KIND,
                "plural": PEERING_PLURAL,
                "singular": PEERING_KIND.lower(),
            },
            "versions": [
                {
                    "name": PEERING_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                # kopf keeps one key per operator replica here.
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


def all_crds() -> list[dict[str, Any]]:
    """Every CRD halfclose installs, in apply order."""
    return [policy_crd(), report_crd(), peering_crd()]
