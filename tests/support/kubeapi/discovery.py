"""Discovery, ``/version`` and OpenAPI documents, all derived from the registry.

Clients find resources through discovery before they touch them: kopf scans
``/api`` and ``/apis`` for every group/version, kubectl resolves ``hcp`` through
short names and categories there.  kubectl also reads ``/openapi/v3``: for
``kubectl explain``, and to learn from each PATCH operation's ``fieldValidation``
parameter that the server validates fields itself (so ``kubectl apply`` sends
``fieldValidation=Strict`` and prints the server's errors instead of its own).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .resources import Registry, ResourceType

SERVER_VERSION = {
    "major": "1",
    "minor": "35",
    "gitVersion": "v1.35.0+halfclose-emulator",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.25.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def api_versions(server_address: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    }


def _group_doc(group: str, versions: list[str]) -> dict[str, Any]:
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": entries, "preferredVersion": entries[0]}


def api_group_list(registry: Registry) -> dict[str, Any]:
    groups = [_group_doc(g, vs) for g, vs in sorted(registry.groups().items()) if g]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(registry: Registry, group: str) -> dict[str, Any] | None:
    versions = registry.groups().get(group)
    if not group or not versions:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group_doc(group, versions)}


def api_resource_list(registry: Registry, group: str, version: str) -> dict[str, Any] | None:
    types = sorted(
        (rt for rt in registry.all() if rt.group == group and rt.version == version),
        key=lambda rt: rt.plural,
    )
    if not types:
        return None
    resources: list[dict[str, Any]] = []
    for rt in types:
        entry: dict[str, Any] = {
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": list(rt.verbs),
            "storageVersionHash": hashlib.sha256(f"{rt.group}/{rt.plural}".encode()).hexdigest()[
                :12
            ],
        }
        if rt.short_names:
            entry["shortNames"] = list(rt.short_names)
        if rt.categories:
            entry["categories"] = list(rt.categories)
        resources.append(entry)
        for sub in rt.subresources:
            resources.append(
                {
                    "name": f"{rt.plural}/{sub}",
                    "singularName": "",
                    "namespaced": rt.namespaced,
                    "kind": rt.kind if sub == "status" else "Scale",
                    "verbs": ["get", "patch", "update"],
                }
            )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": resources,
    }


def root_paths(registry: Registry) -> dict[str, Any]:
    paths = {
        "/api",
        "/api/v1",
        "/apis",
        "/version",
        "/openapi/v2",
        "/openapi/v3",
        "/healthz",
        "/livez",
        "/readyz",
    }
    for group, versions in registry.groups().items():
        if group:
            paths.add(f"/apis/{group}")
            paths.update(f"/apis/{group}/{v}" for v in versions)
    return {"paths": sorted(paths)}


# ------------------------------------------------------------------ OpenAPI v3

OBJECT_META_REF = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
OBJECT_META_SCHEMA: dict[str, Any] = {
    "description": "ObjectMeta is metadata that all persisted resources must have.",
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "Name must be unique within a namespace."},
        "namespace": {
            "type": "string",
            "description": "Namespace defines the space within which each name must be unique.",
        },
        "labels": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Map of string keys and values to organize and categorize objects.",
        },
        "annotations": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Annotations is an unstructured key value map.",
        },
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {
            "type": "array",
            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer", "format": "int64"},
        "generateName": {"type": "string"},
        "creationTimestamp": {"type": "string", "format": "date-time"},
        "deletionTimestamp": {"type": "string", "format": "date-time"},
    },
}

_QUERY_PARAMS = ("dryRun", "fieldManager", "fieldValidation", "force", "pretty")


def schema_name(rt: ResourceType) -> str:
    """``io.halfclose.v1alpha1.HalfClosePolicy``, ``io.k8s.api.core.v1.Pod``: as the server."""
    if rt.custom:
        prefix = ".".join(reversed(rt.group.split(".")))
    else:
        prefix = f"io.k8s.api.{rt.group.split('.')[0] or 'core'}"
    return f"{prefix}.{rt.version}.{rt.kind}"


def _kind_schema(rt: ResourceType) -> dict[str, Any]:
    if rt.schema is not None:
        schema: dict[str, Any] = json.loads(json.dumps(rt.schema.root))
    else:
        schema = {
            "type": "object",
            "description": f"{rt.kind} (built into the API emulator).",
            "properties": {
                "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            },
        }
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {
        "type": "string",
        "description": "APIVersion defines the versioned schema of this representation.",
    }
    props["kind"] = {
        "type": "string",
        "description": "Kind is the REST resource this object represents.",
    }
    props["metadata"] = {
        "allOf": [{"$ref": f"#/components/schemas/{OBJECT_META_REF}"}],
        "description": "Standard object's metadata.",
    }
    schema["x-kubernetes-group-version-kind"] = [
        {"group": rt.group, "kind": rt.kind, "version": rt.version}
    ]
    return schema


def _operation(rt: ResourceType, action: str, verb: str, ref: str) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": f"{verb}{rt.kind}",
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {
            "group": rt.group,
            "kind": rt.kind,
            "version": rt.version,
        },
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": ref}}}}
        },
    }
    if action in ("post", "put", "patch"):
        op["parameters"] = [
            {"name": p, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
            for p in _QUERY_PARAMS
        ]
        # kubectl apply computes a strategic merge patch from this document when the PATCH
        # operation lists SMP, else from its compiled-in Go types (built-ins) or falls back
        # to a merge patch (custom resources, which answer SMP with 415).  Our built-in
        # schemas are skeletal, so SMP is never listed: kubectl then uses its Go types.
        types = (
            ["application/json"]
            if action != "patch"
            else [
                "application/json-patch+json",
                "application/merge-patch+json",
                "application/apply-patch+yaml",
            ]
        )
        op["requestBody"] = {"content": {t: {"schema": {"$ref": ref}} for t in types}}
    return op


def openapi_v3_index(registry: Registry) -> dict[str, Any]:
    paths = {}
    for group, versions in registry.groups().items():
        for version in versions:
            key = f"apis/{group}/{version}" if group else f"api/{version}"
            doc = json.dumps(openapi_v3_group_version(registry, group, version), sort_keys=True)
            digest = hashlib.sha512(doc.encode()).hexdigest()[:64].upper()
            paths[key] = {"serverRelativeURL": f"/openapi/v3/{key}?hash={digest}"}
    return {"paths": paths}


def openapi_v3_group_version(registry: Registry, group: str, version: str) -> dict[str, Any]:
    types = [rt for rt in registry.all() if rt.group == group and rt.version == version]
    schemas: dict[str, Any] = {OBJECT_META_REF: OBJECT_META_SCHEMA}
    paths: dict[str, Any] = {}
    for rt in types:
        name = schema_name(rt)
        schemas[name] = _kind_schema(rt)
        ref = f"#/components/schemas/{name}"
        base = f"/apis/{group}/{version}" if group else f"/api/{version}"
        scope = (
            f"{base}/namespaces/{{namespace}}/{rt.plural}"
            if rt.namespaced
            else f"{base}/{rt.plural}"
        )
        paths[scope] = {
            "get": _operation(rt, "list", "list", ref),
            "post": _operation(rt, "post", "create", ref),
        }
        paths[f"{scope}/{{name}}"] = {
            "get": _operation(rt, "get", "read", ref),
            "put": _operation(rt, "put", "replace", ref),
            "patch": _operation(rt, "patch", "patch", ref),
            "delete": _operation(rt, "delete", "delete", ref),
        }
        for sub in rt.subresources:
            paths[f"{scope}/{{name}}/{sub}"] = {
                "get": _operation(rt, "get", f"read{sub.title()}", ref),
                "put": _operation(rt, "put", f"replace{sub.title()}", ref),
                "patch": _operation(rt, "patch", f"patch{sub.title()}", ref),
            }
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def openapi_v2(registry: Registry) -> dict[str, Any]:
    """Swagger 2.0 with the same definitions, for clients that still read v2."""
    definitions: dict[str, Any] = {OBJECT_META_REF: OBJECT_META_SCHEMA}
    for rt in registry.all():
        schema = _kind_schema(rt)
        schema["properties"]["metadata"] = {"$ref": f"#/definitions/{OBJECT_META_REF}"}
        definitions[schema_name(rt)] = schema
    return {
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
        "paths": {},
        "definitions": definitions,
    }
