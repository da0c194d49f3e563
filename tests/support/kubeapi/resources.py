"""What the emulated server serves: resource types, from CRDs and built in.

A :class:`ResourceType` is one served group/version/plural with everything the
server needs to know about it: scope, names for discovery, the structural schema,
printer columns, subresources and selectable fields.  :class:`Registry` is the
mutable set of them; CRDs created through the API register and unregister here, so
``kubectl apply -f crds/`` works against a fresh emulator like against a cluster.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .schema import StructuralSchema
from .selectors import FieldGetter, path_getter

META_FIELDS = ("metadata.name", "metadata.namespace")


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    singular: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()  # "status", "scale"
    schema: StructuralSchema | None = None  # None: no pruning or validation (built-ins)
    printer_columns: tuple[Mapping[str, Any], ...] = ()
    selectable_fields: Mapping[str, FieldGetter] = field(default_factory=dict)
    custom: bool = False  # served from a CRD: the CR rules (generation, SMP 415, ...)
    storage_version: str = ""  # the CRD's storage version; objects are shared across versions
    return_deleted_object: bool = False  # DELETE answers the object (pods) or a Status (CRs)
    tracks_generation: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> tuple[str, str]:
        """Objects are stored once per group/resource, whatever version a client reads."""
        return (self.group, self.plural)

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    @property
    def verbs(self) -> tuple[str, ...]:
        return ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")

    def describe(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


def field_getters(
    names: Iterable[str], aliases: Mapping[str, str] | None = None
) -> dict[str, FieldGetter]:
    """Selectable field labels -> getters; ``aliases`` maps a label to another path."""
    aliases = aliases or {}
    return {name: path_getter(aliases.get(name, name)) for name in (*META_FIELDS, *names)}


def from_crd(crd: Mapping[str, Any]) -> list[ResourceType]:
    """One :class:`ResourceType` per served version of an apiextensions.k8s.io/v1 CRD."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group = spec["group"]
    storage = next((v["name"] for v in spec.get("versions", []) if v.get("storage")), "")
    result = []
    for version in spec.get("versions", []):
        if not version.get("served", True):
            continue
        raw_schema = (version.get("schema") or {}).get("openAPIV3Schema")
        subresources = tuple(sorted((version.get("subresources") or {}).keys()))
        selectable = [f["jsonPath"].lstrip(".") for f in version.get("selectableFields") or []]
        result.append(
            ResourceType(
                group=group,
                version=version["name"],
                plural=names["plural"],
                kind=names["kind"],
                singular=names.get("singular") or names["kind"].lower(),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                subresources=subresources,
                schema=StructuralSchema(raw_schema) if raw_schema else None,
                printer_columns=tuple(version.get("additionalPrinterColumns") or ()),
                selectable_fields=field_getters(selectable),
                custom=True,
                storage_version=storage,
            )
        )
    return result


def load_crd_files(paths: Iterable[Path | str]) -> list[dict[str, Any]]:
    """Every ``CustomResourceDefinition`` document in the given YAML files."""
    crds = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                    crds.append(doc)
    return crds


class Registry:
    """The served resource types, keyed for URL routing and for discovery."""

    def __init__(self) -> None:
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        self._crd_versions: dict[str, list[tuple[str, str, str]]] = {}  # CRD name -> keys

    def add(self, rt: ResourceType) -> None:
        self._types[(rt.group, rt.version, rt.plural)] = rt

    def add_crd(self, crd: Mapping[str, Any]) -> list[ResourceType]:
        name = crd["metadata"]["name"]
        self.remove_crd(name)
        types = from_crd(crd)
        for rt in types:
            self.add(rt)
        self._crd_versions[name] = [(rt.group, rt.version, rt.plural) for rt in types]
        return types

    def remove_crd(self, name: str) -> None:
        for key in self._crd_versions.pop(name, []):
            self._types.pop(key, None)

    def get(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._types.get((group, version, plural))

    def all(self) -> list[ResourceType]:
        return list(self._types.values())

    def versions_of(self, group: str, plural: str) -> list[ResourceType]:
        return [rt for rt in self._types.values() if rt.group == group and rt.plural == plural]

    def by_kind(self, api_version: str, kind: str) -> ResourceType | None:
        return next(
            (
                rt
                for rt in self._types.values()
                if rt.api_version == api_version and rt.kind == kind
            ),
            None,
        )

    def groups(self) -> dict[str, list[str]]:
        """Group -> served versions, preferred (storage) version first."""
        result: dict[str, list[str]] = {}
        for rt in self._types.values():
            versions = result.setdefault(rt.group, [])
            if rt.version not in versions:
                versions.append(rt.version)
        for group, versions in result.items():
            preferred = next(
                (
                    rt.storage_version
                    for rt in self._types.values()
                    if rt.group == group and rt.storage_version in versions
                ),
                "",
            )
            versions.sort(key=lambda v: (v != preferred, _version_priority(v)))
        return result


def _version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes version ordering: GA > beta > alpha, higher numbers first."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not m:
        return (3, 0, 0)
    stability = {"None": 0, "beta": 1, "alpha": 2}[str(m[2])]
    return (stability, -int(m[1]), -int(m[3] or 0))
